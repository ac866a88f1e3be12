"""torch.compile and torch.library checks of the PWLU custom op.

``fullgraph=True`` fails on any graph break, so these tests show that a model with PWLU
compiles to one graph in training (forward and backward) and in eval, and matches eager.
The op is opaque to the compiler: its kernels are whichever backend dispatch picks (the
CPU kernel here, Triton on CUDA).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pwlu
from helpers import random_params


def cpu_and_cuda():
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        ),
    ]


class ConvNet(nn.Module):
    """NCHW channel-wise PWLU, a channels-last-free layer-wise one, and (B, T, C) with channel_dim=-1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = pwlu.PWLU(8, num_intervals=8)
        self.proj = nn.Linear(8, 6)
        self.act2 = pwlu.PWLU(6, num_intervals=4, channel_dim=-1, init="silu")
        self.act3 = pwlu.PWLU(None, num_intervals=16)

    def forward(self, x):
        h = self.act1(self.conv(x))  # (B, 8, H, W)
        h = self.act2(self.proj(h.flatten(2).transpose(1, 2)))  # (B, H*W, 6)
        return self.act3(h).mean(1)


def _perturb(model: nn.Module) -> nn.Module:
    """Move the PWLU parameters off their init so every parameter gradient is non-trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, pwlu.PWLU):
                module.points.add_(0.1 * torch.randn(module.points.shape, generator=gen))
                module.left_slope.add_(0.2)
    return model


def _train_step(fn, module, x):
    """``fn(x)`` (the module or its compiled wrapper), backward; output and ``module``'s grads."""
    module.zero_grad(set_to_none=True)
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), {name: p.grad for name, p in module.named_parameters()}


def _check_against_eager(backend: str, device: str) -> None:
    torch.manual_seed(0)
    eager = _perturb(ConvNet()).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 5, 5, device=device)

    y_eager, g_eager = _train_step(eager, eager, x)
    y_comp, g_comp = _train_step(compiled, compiled_model, x)
    torch.testing.assert_close(y_comp, y_eager, msg=lambda m: f"train output: {m}")
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], msg=lambda m, name=name: f"d{name}: {m}")

    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), msg=lambda m: f"eval output: {m}")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile_fullgraph_aot_eager(device):
    _check_against_eager("aot_eager", device)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_compile_fullgraph_inductor(device):
    """Inductor on a PWLU alone (the op is an extern call: no code to generate, a fast compile)."""
    torch.manual_seed(0)
    eager = _perturb(nn.Sequential(pwlu.PWLU(4, num_intervals=8))).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="inductor")
    x = torch.randn(3, 4, 7, device=device) * 3
    y_eager, g_eager = _train_step(eager, eager, x)
    y_comp, g_comp = _train_step(compiled, compiled_model, x)
    torch.testing.assert_close(y_comp, y_eager, msg=lambda m: f"train output: {m}")
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], msg=lambda m, name=name: f"d{name}: {m}")
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), msg=lambda m: f"eval output: {m}")


def test_compile_with_statistics_collection():
    """Phase I (running statistics updated in training forwards) also compiles to one graph."""
    eager = pwlu.PWLU(4, num_intervals=8)
    eager.set_collecting(True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 7) * 2 + 1
    _train_step(eager, eager, x)
    _train_step(compiled, compiled_model, x)
    torch.testing.assert_close(compiled_model.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_model.running_std, eager.running_std)


OPCHECK_CASES = [
    # (num_channels, shape, channel_dim, channels_last, dtype)
    (None, (2, 3, 5), 1, False, torch.float32),
    (3, (2, 3, 5), 1, False, torch.float32),
    (3, (2, 3, 4, 5), 1, True, torch.float32),
    (5, (2, 4, 5), -1, False, torch.float32),
    (3, (2, 3, 5), 1, False, torch.float64),
    (3, (2, 3, 5), 1, False, torch.bfloat16),
]


@pytest.mark.parametrize("num_channels,shape,channel_dim,channels_last,dtype", OPCHECK_CASES)
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device, num_channels, shape, channel_dim, channels_last, dtype):
    """torch.library.opcheck: schema, fake kernels (shapes and strides), autograd registration."""
    params = [p.to(device).requires_grad_(True) for p in random_params(num_channels, n=8, seed=1)]
    x = (torch.randn(shape) * 3).to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    cd = None if num_channels is None else channel_dim % x.dim()
    torch.library.opcheck(torch.ops.pwlu.pwlu.default, (x.requires_grad_(True), *params, cd))
    grad = torch.randn_like(x)
    torch.library.opcheck(torch.ops.pwlu.pwlu_backward.default, (grad, x.detach(), *(p.detach() for p in params), cd))
