"""Registering an op once for every way it is called: eager autograd (first and higher order,
forward mode), ``torch.func`` transforms, ``torch.compile`` and ``torch.export``.

An op supplies

* ``fwd(*tensors, *static) -> Tensor`` and ``bwd(grad, *tensors, *static) -> gradients``: the
  fast kernels (no autograd inside, one gradient per tensor);
* ``composite(*tensors, *static) -> Tensor``: the same function in plain differentiable torch
  ops (the op's reference), for everything beyond a first-order backward.

:class:`DifferentiableOp` makes from them

* a custom op ``torch.ops.<namespace>.<name>`` with a fake kernel, and its backward as a
  second custom op, joined by ``register_autograd`` (one opaque graph node under
  ``torch.compile``/``torch.export``);
* a ``torch.autograd.Function`` for eager calls, which skips the custom-op dispatcher (whose
  Python overhead dominates small tensors), and a second one with ``setup_context``, ``jvp``
  and a ``vmap`` rule for calls under a transform;
* a router that picks one of them, or the bare forward when no derivative is needed.

The first-order backward runs ``bwd`` and saves only the op's input tensors. It runs under the
backend setting (:func:`pwlu.use_backend`) that its forward ran under, so a forward inside
``with pwlu.use_backend("torch"):`` whose ``.backward()`` runs after the block still has the
torch backend's backward. When the backward
itself must be differentiable (``create_graph=True``: gradient penalties, ``gradgradcheck``),
under a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``,
``vmap``), and in forward mode (``torch.autograd.forward_ad``, ``jvp``), the derivatives are
those of ``composite`` (``torch.func.vjp`` / ``torch.vmap`` of it; the jvp as the vjp of the
linear pullback), so they equal what autograd gives through the reference, to any order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import dispatch

_functorch = torch._C._functorch


def _under(setting: str, fn: Callable, *args):
    """``fn(*args)`` under the backend setting ``setting`` (the one its forward ran under)."""
    if setting == dispatch.get_backend_name():
        return fn(*args)
    with dispatch.backward_setting(setting):  # this thread only: backwards may run concurrently
        return fn(*args)


def in_transform() -> bool:
    """Whether a ``torch.func`` transform or a forward-mode dual level is active (then the
    kernels, which read raw data pointers, cannot see the tensors' derivatives)."""
    return _functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


class DifferentiableOp:
    """One op, registered (see the module docstring). Call it with the tensors, then the static
    arguments, exactly as ``fwd``."""

    def __init__(
        self,
        qualname: str,
        fwd: Callable[..., Tensor],
        bwd: Callable[..., tuple[Tensor, ...]],
        composite: Callable[..., Tensor],
        tensor_names: Sequence[str],
        static_schema: str,
        function_name: str,
    ) -> None:
        self.fwd, self.bwd, self.composite = fwd, bwd, composite
        self.num_tensors = n = len(tensor_names)
        statics = [s.strip() for s in static_schema.split(",") if s.strip()]
        tensors = ", ".join(f"Tensor {name}" for name in tensor_names)
        all_args = ", ".join([tensors, *statics])
        outputs = ", ".join(["Tensor"] * n)

        def vjp(grad, tensors, static):
            """``bwd``, or the composite's vector-Jacobian product where the backward must itself
            be differentiable or runs under a transform."""
            if torch.is_grad_enabled() or in_transform():
                _, pullback = torch.func.vjp(lambda *t: composite(*t, *static), *tensors)
                return pullback(grad)
            return bwd(grad, *tensors, *static)

        op = torch.library.custom_op(qualname, fwd, mutates_args=(), schema=f"({all_args}) -> Tensor")
        op.register_fake(lambda *args: torch.empty_like(args[0]))
        backward_op = torch.library.custom_op(
            qualname + "_backward", bwd, mutates_args=(), schema=f"(Tensor grad, {all_args}) -> ({outputs})"
        )
        backward_op.register_fake(lambda grad, *args: tuple(torch.empty_like(t) for t in args[:n]))

        def op_setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n])
            ctx.static = tuple(inputs[n:])
            ctx.setting = dispatch.get_backend_name()

        def op_backward(ctx, grad):
            tensors, static = ctx.saved_tensors, ctx.static
            if torch.is_grad_enabled():  # create_graph: a differentiable composition
                grads = _under(ctx.setting, vjp, grad, tensors, static)
            else:
                grads = _under(ctx.setting, backward_op, grad, *tensors, *static)
            return (*grads, *(None,) * len(static))

        op.register_autograd(op_backward, setup_context=op_setup_context)
        self.op, self.backward_op = op, backward_op

        # Two Functions: defining setup_context costs every apply an inspect.signature (tens of
        # microseconds), so plain first-order calls use a ctx-style Function, and only calls
        # under a transform (which needs setup_context, jvp and vmap) use the second one.
        def first_order_forward(ctx, *args):
            ctx.save_for_backward(*args[:n])
            ctx.static = args[n:]
            ctx.setting = dispatch.get_backend_name()
            return fwd(*args)

        def backward(ctx, grad):
            grads = _under(ctx.setting, vjp, grad, ctx.saved_tensors, ctx.static)
            return (*grads, *(None,) * len(ctx.static))

        def forward(*args):
            return fwd(*args)

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n])
            ctx.save_for_forward(*inputs[:n])
            ctx.static = tuple(inputs[n:])
            ctx.setting = dispatch.get_backend_name()

        def jvp(ctx, *tangents):
            # J v as the vector-Jacobian product of the (linear) pullback u -> J^T u: reverse
            # mode only, since forward mode cannot nest inside forward mode
            primals, static = ctx.saved_tensors, ctx.static
            tangents = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents[:n]))
            out, pullback = torch.func.vjp(lambda *t: composite(*t, *static), *primals)
            _, pullback_of_pullback = torch.func.vjp(pullback, torch.zeros_like(out))
            return pullback_of_pullback(tangents)[0]

        def vmap(info, in_dims, *args):
            return torch.vmap(composite, in_dims=tuple(in_dims))(*args), 0

        doc = f"Eager autograd of {qualname}: saves only its input tensors."
        self.function: type[torch.autograd.Function] = type(
            function_name,
            (torch.autograd.Function,),
            {"__doc__": doc, "forward": staticmethod(first_order_forward), "backward": staticmethod(backward)},
        )
        self.transform_function: type[torch.autograd.Function] = type(
            function_name.removesuffix("Function") + "TransformFunction",
            (torch.autograd.Function,),
            {
                "__doc__": doc + " For torch.func transforms and forward mode.",
                "forward": staticmethod(forward),
                "setup_context": staticmethod(setup_context),
                "backward": staticmethod(backward),
                "jvp": staticmethod(jvp),
                "vmap": staticmethod(vmap),
            },
        )

    def __call__(self, *args):
        """The custom op under ``torch.compile``/``torch.export``; the autograd Function when a
        gradient is needed or a transform is active; else the bare forward."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        if in_transform():
            return self.transform_function.apply(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[: self.num_tensors]):
            return self.function.apply(*args)
        return self.fwd(*args)
