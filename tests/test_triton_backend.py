"""Triton kernels against pwlu_reference: on the CPU in the Triton interpreter, natively on CUDA.

Every case runs twice: ``interpreter`` (CPU tensors, ``TRITON_INTERPRET=1``) and ``cuda``
(skipped without a GPU). Triton fixes interpreter mode when it is first imported, so a
process that imported it without the variable (``make test``) cannot interpret kernels:
there, :func:`test_interpreter_cases_in_fresh_process` reruns this file's interpreter cases
in a fresh process with ``TRITON_INTERPRET=1``. To run them directly:
``TRITON_INTERPRET=1 pytest tests/test_triton_backend.py``.

Every result goes through the op (``pwlu.use_backend("triton")`` + autograd) and is
compared with the reference's autograd, output by output with labels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pwlu
from helpers import PARAM_NAMES, max_err, random_params

pytest.importorskip("triton")
from pwlu.ops import dispatch, torch_backend, triton_backend  # noqa: E402
from pwlu.ops.folding import fold_tables  # noqa: E402

INTERPRETED = triton_backend._INTERPRETED
KEYS = ("y", "dx") + tuple(f"d{name}" for name in PARAM_NAMES)


@pytest.fixture(params=["interpreter", "cuda"])
def device(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return torch.device("cuda")
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported: run by test_interpreter_cases_in_fresh_process")
    return torch.device("cpu")


def run(fn, x, params, channel_dim, grad=None, backend="triton", seed=123):
    """Output and all six gradients of ``fn``, forward and backward under ``backend``."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().to(x.device).requires_grad_(True) for p in params]
    if grad is None:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    with pwlu.use_backend(backend):
        if backend == "triton":
            assert dispatch.select(x.device) is triton_backend.BACKEND
        y = fn(x, *params, channel_dim=channel_dim)
        y.backward(grad.to(device=x.device, dtype=y.dtype))
    grads = {f"d{name}": p.grad for name, p in zip(PARAM_NAMES, params)}
    return {"y": y.detach(), "dx": x.grad, **grads}


def assert_outputs_close(got, want, keys=KEYS, **tol):
    for key in keys:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], equal_nan=True, msg=lambda m, key=key: f"{key}: {m}", **tol)


def inputs(shape, device, dtype=torch.float32, seed=4, scale=3.0):
    """Normal inputs, scaled so that every region, the outer ones included, gets elements."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- fast path vs reference

CASES = [
    # (num_channels, shape, channel_dim)
    (None, (1, 1, 1023), 1),  # layer-wise, odd length
    (None, (3, 7, 33), 1),
    (7, (3, 7, 33), 1),  # NCL, inner 33 (masked inner block)
    (5, (2, 5, 3, 7), 1),  # NCHW
    (1, (2, 1, 9), 1),  # a single channel
    (6, (2, 3, 6), -1),  # (B, T, C): channel axis innermost
    (70, (3, 70), -1),  # more channels than one channel block
    (4, (4, 3, 5, 2), 0),  # channel axis outermost
]


@pytest.mark.parametrize("num_channels,shape,channel_dim", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, num_channels, shape, channel_dim, dtype):
    params = random_params(num_channels, n=16, dtype=dtype, seed=3)
    x = inputs(shape, device, dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_outputs_close(run(pwlu.pwlu, x, params, channel_dim), run(pwlu.pwlu_reference, x, params, channel_dim), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "num_channels,shape,channel_dim,channels_last",
    [(None, (3, 7, 33), 1, False), (7, (3, 7, 33), 1, False), (5, (2, 5, 3, 7), 1, True), (6, (2, 9, 6), -1, False)],
)
def test_low_precision_rule(device, dtype, num_channels, shape, channel_dim, channels_last):
    """err(triton lowp vs fp32 reference) <= 2 * err(lowp reference vs fp32 reference) + atol."""
    params = random_params(num_channels, n=16, seed=2)
    x32 = inputs(shape, device, seed=5)
    if channels_last:
        x32 = x32.to(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype).float()
    ref32 = run(pwlu.pwlu_reference, x32, params, channel_dim, grad, backend="reference")
    ref_lp = run(pwlu.pwlu_reference, x32.to(dtype), params, channel_dim, grad, backend="reference")
    fast_lp = run(pwlu.pwlu, x32.to(dtype), params, channel_dim, grad)
    for key in KEYS:
        assert fast_lp[key].dtype == ref_lp[key].dtype, key
        scale = ref32[key].abs().max().item() + 1.0
        e_fast, e_ref = max_err(fast_lp[key], ref32[key]), max_err(ref_lp[key], ref32[key])
        assert e_fast <= 2 * e_ref + 1e-3 * scale, f"{key}: triton err {e_fast} vs reference err {e_ref}"


@pytest.mark.parametrize("num_channels", [None, 6])
def test_channels_last(device, num_channels):
    params = random_params(num_channels, n=8, seed=1)
    x = inputs((2, 6, 5, 3), device).to(memory_format=torch.channels_last)
    got = run(pwlu.pwlu, x, params, 1)
    assert_outputs_close(got, run(pwlu.pwlu_reference, x, params, 1), rtol=1e-5, atol=1e-4)
    for key in ("y", "dx"):
        assert got[key].is_contiguous(memory_format=torch.channels_last), key


def test_non_dense_input_and_expanded_grad(device):
    """A strided view is copied once; the output has the layout torch.empty_like gives it
    (as the fake kernel says); ``y.sum().backward()`` sends an expanded (stride 0) gradient."""
    params = random_params(4, n=8, seed=6)
    x = inputs((3, 4, 10), device)[:, :, ::2]
    got = run(pwlu.pwlu, x, params, 1, grad=torch.ones(()).expand(x.shape))
    want = run(pwlu.pwlu_reference, x, params, 1, grad=torch.ones(()).expand(x.shape))
    assert_outputs_close(got, want, rtol=1e-5, atol=1e-4)
    assert got["y"].stride() == torch.empty_like(x).stride()


def test_breakpoints_and_outside_points(device):
    """B_L = -2, B_R = 2, N = 8: every breakpoint exactly, points just beside them, far outside."""
    n = 8
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, n + 1, generator=g), torch.full((3,), -2.0), torch.full((3,), 2.0)]
    params += [torch.randn(3, generator=g), torch.randn(3, generator=g)]
    points = torch.linspace(-2, 2, n + 1)
    beside = torch.cat([points - 1e-3, points + 1e-3])
    far = torch.tensor([-1e4, -5.0, -2.5, 2.5, 5.0, 1e4])
    row = torch.cat([points, beside, far])
    x = row.expand(2, 3, -1).contiguous().to(device)
    assert_outputs_close(run(pwlu.pwlu, x, params, 1), run(pwlu.pwlu_reference, x, params, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("init", ["relu", "leaky_relu"])
def test_nan_and_inf(device, init):
    """NaN gives NaN, ±inf the limits (a flat outer piece its constant). The reference's
    autograd turns parameter gradients NaN around non-finite inputs, so those are checked
    against the torch backend, whose per-region sums define the fast-path convention."""
    module = pwlu.PWLU(3, num_intervals=8, init=init)
    params = [p.detach() for p in module.parameters()]
    x = inputs((2, 3, 7), device)
    x[0, 0, 0], x[0, 1, 1], x[1, 2, 2], x[1, 0, 3] = float("nan"), float("-inf"), float("inf"), float("-inf")
    got = run(pwlu.pwlu, x, params, 1)
    assert_outputs_close(got, run(pwlu.pwlu_reference, x, params, 1), keys=("y", "dx"), rtol=1e-5, atol=1e-5)
    assert torch.isnan(got["y"]).sum() == 1
    assert_outputs_close(got, run(pwlu.pwlu, x, params, 1, backend="torch"), keys=KEYS[2:], rtol=1e-5, atol=1e-5)


def test_empty_input(device):
    params = random_params(3, n=4)
    x = torch.empty(0, 3, 5, device=device)
    got = run(pwlu.pwlu, x, params, 1)
    assert got["y"].shape == x.shape
    for name in PARAM_NAMES:
        assert torch.all(got[f"d{name}"] == 0), name


# ---------------------------------------------------------------- kernels directly


def compare_kernels_with_torch(tables, shape, channel_dim, channels_last, device, grad_seed):
    """The Triton forward and backward (y, dx, histogram) on folded tables against the torch
    backend's; outputs keep x's memory format."""
    slopes, intercepts, left, right, inv_d, shift = tables
    x = inputs(shape, device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = inputs(shape, device, seed=grad_seed, scale=1.0)
    y = triton_backend.forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)
    y_want = torch_backend.forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)
    dx, hist = triton_backend.backward(grad, x, slopes, left, right, inv_d, channel_dim)
    dx_want, hist_want = torch_backend.backward(grad, x, slopes, left, right, inv_d, channel_dim)
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(dx, dx_want, rtol=0, atol=0, msg=lambda m: f"dx: {m}")
    torch.testing.assert_close(hist, hist_want, rtol=1e-5, atol=1e-4, msg=lambda m: f"hist: {m}")
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize(
    "num_channels,shape,channel_dim,channels_last",
    [
        (None, (2, 3, 40, 40), None, False),
        (3, (2, 3, 40, 40), 1, False),
        (70, (2, 70, 3, 3), 1, True),
        (64, (1, 64), 1, False),  # one row of 64 channels: a thread per channel, no slot sum
    ],
)
def test_kernels_match_torch_backend(device, num_channels, shape, channel_dim, channels_last):
    """Forward and backward (dx, histogram) on the folded tables; several tiles per program."""
    params = random_params(num_channels, n=16, seed=8)
    two_d = [params[0].reshape(-1, 17).to(device)] + [p.reshape(-1).to(device) for p in params[1:]]
    tables = fold_tables(*two_d)
    compare_kernels_with_torch(tables, shape, channel_dim, channels_last, device, grad_seed=9)


@pytest.mark.parametrize(
    "num_channels,shape,channel_dim,channels_last",
    [(3, (2, 3, 9, 40), 1, False), (70, (5, 70, 3, 3), 1, True), (None, (2, 700), None, False)],
)
@pytest.mark.parametrize("n,passes", [(62, [(0, 64)]), (64, [(0, 33), (33, 66)]), (100, [(0, 51), (51, 102)])])
def test_kernels_many_intervals(device, num_channels, shape, channel_dim, channels_last, n, passes):
    """Past 64 regions the backward histograms them in passes (dx stored by the first); 64
    regions (N = 62) in one launch with 64-row histograms."""
    assert triton_backend._region_passes(n) == passes
    params = random_params(num_channels, n=n, seed=12)
    two_d = [params[0].reshape(-1, n + 1).to(device)] + [p.reshape(-1).to(device) for p in params[1:]]
    tables = fold_tables(*two_d)
    compare_kernels_with_torch(tables, shape, channel_dim, channels_last, device, grad_seed=13)


@pytest.mark.parametrize(
    "make,channel_dim,expected",
    [
        (lambda: torch.empty(2, 3, 4, 5), 1, (2, 3, 20)),
        (lambda: torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last), 1, (40, 3, 1)),
        (lambda: torch.empty(2, 7, 3), 2, (14, 3, 1)),
        (lambda: torch.empty(2, 7, 3), None, (1, 1, 42)),
        (lambda: torch.empty(2, 1, 3), 1, (1, 1, 6)),
    ],
)
def test_layout_without_copies(make, channel_dim, expected):
    """NCHW, channels-last and (B, T, C) are read in place as (outer, C, inner)."""
    x = make()
    y = torch.empty_like(x)
    assert triton_backend._as_dense(x, y) is x
    assert triton_backend._layout(y, channel_dim) == expected


@pytest.mark.parametrize(
    "outer,num_channels,inner",
    [
        (2, 100_000, 7),  # NCHW-like, more channels than grid axis 1 allows (65535)
        (1, 70_000, 2),
        (2, 65_536, 1024),
        (3, 5_000_000, 1),  # channels-last: 78125 channel blocks of 64
        (1, 1, 2**31),  # layer-wise, 2**31 elements
        (4, 300_000, 8000),  # 2.4e9 elements per outer row: int32 tile offsets need BLOCK_O = 1
        (3, 7, 33),
    ],
)
@pytest.mark.parametrize("sms", [None, 132])
def test_launch_grids_within_cuda_limits(outer, num_channels, inner, sms):
    """CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31 - 1): no channel count puts a
    launch past them, and the programs cover every (column, tile) once. Pure Python: the
    interpreter would take minutes to run 100k programs."""
    limits = (2**31 - 1, 65535, 65535)
    for kind in ("forward", "backward"):
        if kind == "forward":
            block_o, block_k, _ = triton_backend._forward_blocks(outer, num_channels, inner, aligned=inner % 2 == 0)
        else:
            block_o, block_k, slots = triton_backend._backward_blocks(outer, num_channels, inner)
            # a slot (thread) sees one channel: SLOTS is a multiple of BLOCK_K for channels-last
            assert (block_o * block_k) % slots == 0
            if inner == 1 and num_channels > 1:
                assert slots % block_k == 0
        # int32 offsets inside a tile
        row_stride = num_channels if inner == 1 and num_channels > 1 else num_channels * inner
        assert (block_o - 1) * row_stride + block_k < 2**31
        tiles, columns = triton_backend._tiles(outer, num_channels, inner, block_o, block_k)
        # the tiles of a column cover its (outer, inner) or (outer, channel-block) elements
        if inner == 1 and num_channels > 1:
            assert tiles * block_o >= outer and columns * block_k >= num_channels
        else:
            assert columns == num_channels and tiles * block_o * block_k >= outer * inner
        if kind == "forward":
            grid = triton_backend._forward_grid(outer, num_channels, inner, block_o, block_k)
            assert grid == (tiles * columns,)
            # the kernel's decoding of the last program: the last tile of the last column
            last = grid[0] - 1
            if inner == 1 and num_channels > 1:
                assert (last // columns, last % columns) == (tiles - 1, columns - 1)
            else:
                assert (last // tiles, last % tiles) == (columns - 1, tiles - 1)
        else:
            grid = triton_backend._backward_grid(outer, num_channels, inner, block_o, block_k, sms)
            assert grid[0] == columns and 1 <= grid[1] <= min(tiles, 2 if sms is None else 4 * sms)
        assert all(1 <= n <= limit for n, limit in zip(grid, limits)), (kind, grid)
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        triton_backend._check_grid((1, 70_000))


def test_parameter_gradients_deterministic(device):
    """Partial histograms are summed in a fixed order: bit-identical gradients run to run."""
    params = random_params(3, n=16, seed=10)
    x = inputs((4, 3, 50), device)
    first, second = run(pwlu.pwlu, x, params, 1), run(pwlu.pwlu, x, params, 1)
    for key in KEYS[1:]:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "channels_innermost"])
def test_opcheck(device, layout):
    """Fake kernels agree with the Triton outputs (shapes, strides), autograd registration holds."""
    x = inputs((2, 3, 4, 6), device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[..., ::2]
    cd = 3 if layout == "channels_innermost" else 1
    params = [p.to(device) for p in random_params(x.shape[cd], n=8, seed=11)]
    with pwlu.use_backend("triton"):
        torch.library.opcheck(torch.ops.pwlu.pwlu.default, (x.requires_grad_(True), *(p.requires_grad_(True) for p in params), cd))
        grad = torch.randn_like(x)
        torch.library.opcheck(torch.ops.pwlu.pwlu_backward.default, (grad, x.detach(), *(p.detach() for p in params), cd))


def test_compile_fullgraph(device):
    """The op with Triton kernels inside a torch.compile(fullgraph=True) graph, training step."""
    module = pwlu.PWLU(4, num_intervals=8, channel_dim=-1)
    with torch.no_grad():
        module.points.add_(0.1 * torch.randn(module.points.shape, generator=torch.Generator().manual_seed(0)))
    module = module.to(device)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = inputs((3, 5, 4), device)
    with pwlu.use_backend("triton"):
        y = compiled(x)
        y.square().sum().backward()
    got = {"y": y.detach(), **{f"d{name}": getattr(module, name).grad for name in PARAM_NAMES}}
    params = [getattr(module, name).detach() for name in PARAM_NAMES]
    want = run(pwlu.pwlu_reference, x, params, -1, grad=2 * got["y"], backend="reference")
    assert_outputs_close(got, want, keys=("y",) + KEYS[2:], rtol=1e-5, atol=1e-4)


def test_is_available():
    assert triton_backend.is_available(torch.device("cpu")) == INTERPRETED
    assert triton_backend.is_available(torch.device("cuda"))


@pytest.mark.skipif(INTERPRETED, reason="the interpreter cases run in this process")
def test_interpreter_cases_in_fresh_process():
    """Run this file's ``interpreter`` cases where TRITON_INTERPRET=1 precedes ``import triton``."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__, "-k", "interpreter"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-6000:]
