"""Registering an op once for every way it is called: eager autograd, ``torch.compile`` and
``torch.export``.

An op supplies a forward ``fwd(*tensors, *static) -> Tensor`` and a backward
``bwd(grad, *tensors, *static) -> tuple of one gradient per tensor`` (no autograd inside
either); :func:`differentiable_op` makes

* a custom op ``torch.ops.<namespace>.<name>`` with a fake kernel, and its backward as a
  second custom op, joined by ``register_autograd`` (one opaque graph node under
  ``torch.compile``/``torch.export``);
* a ``torch.autograd.Function`` for eager calls, which skips the custom-op dispatcher (whose
  Python overhead dominates small tensors);
* a router that picks one of the two, or the bare forward when no gradient is needed.

Both paths save only the op's input tensors for the backward and run the same ``fwd``/``bwd``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class DifferentiableOp:
    """One op, registered (see the module docstring). Call it with the tensors, then the static
    arguments, exactly as ``fwd``."""

    def __init__(
        self,
        qualname: str,
        fwd: Callable[..., Tensor],
        bwd: Callable[..., tuple[Tensor, ...]],
        tensor_names: Sequence[str],
        static_schema: str,
        function_name: str,
    ) -> None:
        self.fwd, self.bwd = fwd, bwd
        self.num_tensors = n = len(tensor_names)
        statics = [s.strip() for s in static_schema.split(",") if s.strip()]
        tensors = ", ".join(f"Tensor {name}" for name in tensor_names)
        all_args = ", ".join([tensors, *statics])
        outputs = ", ".join(["Tensor"] * n)

        op = torch.library.custom_op(qualname, fwd, mutates_args=(), schema=f"({all_args}) -> Tensor")
        op.register_fake(lambda *args: torch.empty_like(args[0]))
        backward_op = torch.library.custom_op(
            qualname + "_backward", bwd, mutates_args=(), schema=f"(Tensor grad, {all_args}) -> ({outputs})"
        )
        backward_op.register_fake(lambda grad, *args: tuple(torch.empty_like(t) for t in args[:n]))

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n])
            ctx.static = tuple(inputs[n:])

        def backward(ctx, grad):
            return (*backward_op(grad, *ctx.saved_tensors, *ctx.static), *(None,) * len(ctx.static))

        op.register_autograd(backward, setup_context=setup_context)
        self.op, self.backward_op = op, backward_op

        def function_forward(ctx, *args):
            ctx.save_for_backward(*args[:n])
            ctx.static = args[n:]
            return fwd(*args)

        def function_backward(ctx, grad):
            return (*bwd(grad, *ctx.saved_tensors, *ctx.static), *(None,) * len(ctx.static))

        self.function: type[torch.autograd.Function] = type(
            function_name,
            (torch.autograd.Function,),
            {
                "__doc__": f"Eager autograd of {qualname}: saves only its input tensors.",
                "forward": staticmethod(function_forward),
                "backward": staticmethod(function_backward),
            },
        )

    def __call__(self, *args):
        """The custom op under ``torch.compile``/``torch.export``, the autograd Function when a
        gradient is needed, else the bare forward."""
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[: self.num_tensors]):
            return self.function.apply(*args)
        return self.fwd(*args)
