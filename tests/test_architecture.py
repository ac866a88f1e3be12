"""A new op reuses the op machinery: backend dispatch (``BackendTable``) and registration
(``DifferentiableOp``: custom op, autograd Function, router), without copying them.

The toy op here is ``y = x * w`` with a per-element weight ``w`` broadcast along the last
axis; its backend module is this test file (``BACKEND`` below).
"""

from __future__ import annotations

import pytest
import torch

import pwlu
from pwlu.ops import dispatch
from pwlu.ops.dispatch import BackendTable
from pwlu.ops.registration import DifferentiableOp

CALLS: list[str] = []


class ScaleTorchBackend:
    name = "torch"

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return True

    @staticmethod
    def forward(x, w):
        CALLS.append("forward")
        return x * w

    @staticmethod
    def backward(grad, x, w):
        CALLS.append("backward")
        return grad * w, (grad * x).reshape(-1, w.shape[-1]).sum(0)


BACKEND = ScaleTorchBackend()
SCALE_BACKENDS = BackendTable("scale", {"torch": __name__})


def scale_fwd(x, w, flag):
    return SCALE_BACKENDS.select(x.device).forward(x, w)


def scale_bwd(grad, x, w, flag):
    return SCALE_BACKENDS.select(x.device).backward(grad, x, w)


def scale_composite(x, w, flag):
    return x * w


SCALE_OP = DifferentiableOp(
    "pwlu_test::scale",
    scale_fwd,
    scale_bwd,
    scale_composite,
    tensor_names=("x", "w"),
    static_schema="int flag",
    function_name="ScaleFunction",
)


def test_new_op_dispatches_through_its_own_table():
    cpu = torch.device("cpu")
    assert SCALE_BACKENDS.select(cpu) is BACKEND
    assert SCALE_BACKENDS.is_available("torch", cpu)
    assert not SCALE_BACKENDS.is_available("triton", cpu)  # this op declares no Triton backend
    with pwlu.use_backend("cpu"), pytest.raises(RuntimeError, match="scale backend 'cpu'"):
        SCALE_BACKENDS.select(cpu)  # forced, but this op has none: a clear error
    dispatch.forget_selection()  # reaches every table
    assert SCALE_BACKENDS._selected == {}


def test_new_op_eager_autograd_matches_autograd_of_the_formula():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    CALLS.clear()
    y = SCALE_OP(x, w, 0)
    assert type(y.grad_fn).__name__ == "ScaleFunctionBackward"
    y.sum().backward()
    assert CALLS == ["forward", "backward"]
    torch.testing.assert_close(x.grad, w.detach().expand(3, 5))
    torch.testing.assert_close(w.grad, x.detach().sum(0))
    assert torch.autograd.gradcheck(
        lambda a, b: SCALE_OP(a, b, 0), (x.detach().requires_grad_(), w.detach().requires_grad_())
    )


def test_new_op_without_gradients_runs_the_bare_forward():
    x, w = torch.randn(2, 4), torch.randn(4)
    y = SCALE_OP(x, w, 0)
    assert y.grad_fn is None
    torch.testing.assert_close(y, x * w)


def test_new_op_is_one_custom_op_under_compile():
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    compiled = torch.compile(lambda a, b: SCALE_OP(a, b, 1).square().sum(), fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    loss.backward()
    gx, gw = torch.autograd.grad((x * w).square().sum(), (x, w))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)
    assert torch.ops.pwlu_test.scale.default is not None


@pytest.mark.parametrize("name", ["torch", "cpu", "triton"])
def test_every_pwlu_backend_declares_the_whole_protocol(name):
    """Each BACKEND has every member of PWLUBackend (optional entry points declared as None,
    never left to be discovered)."""
    from pwlu.ops.dispatch import PWLU_BACKENDS, PWLUBackend

    backend = PWLU_BACKENDS.load(name)
    if backend is None:
        pytest.skip(f"{name} backend not importable here")
    assert isinstance(backend, PWLUBackend)
    members = set(PWLUBackend.__annotations__) | {"name", "is_available"}
    missing = sorted(m for m in members if not hasattr(type(backend), m))
    assert not missing, f"{name} backend lacks {missing}"
    assert backend.name == name
