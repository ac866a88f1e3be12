"""Compiled CPU backend: a small plain-C kernel (``csrc/pwlu_cpu.c``) built on first use.

Same interface as ``torch_backend.py`` (which defines the semantics)::

    forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift) -> y
    backward(grad, x, slopes, left, right, inv_d, channel_dim) -> (dx, hist)

plus the entry points :mod:`pwlu.ops.pwlu_op` prefers, which take the raw parameters and do
the folding (and, backward, the exact parameter gradients from the histogram, in double) in
the same C call, because on small tensors the ~20 torch ops of folding and the ~30 of the
gradient epilogue cost more than the kernel::

    forward_from_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim) -> y
    backward_from_params(grad, x, points, ..., channel_dim) -> (dx, (d_points, d_left_bound, ...))

How it works. On the first call the C source is compiled with the system C compiler
(``$CC``, default ``gcc``; flags ``-O3 -march=native -fopenmp -shared -fPIC``, about 1 s)
into ``$PWLU_CPU_BUILD_DIR`` or ``$XDG_CACHE_HOME/pwlu`` (default ``~/.cache/pwlu``),
under a name that hashes the source, the compiler, the flags and the CPU's feature flags,
written atomically; later processes just load it with :mod:`ctypes` (which releases the
GIL during the call). Where no compiler exists or the build fails, :func:`is_available`
returns ``False`` after one warning, and dispatch falls back to the torch backend, so
``pip install pwlu`` never needs a compiler.

The kernel views x as ``(outer, C, inner)`` in memory order (any dense layout: NCHW,
channels-last, ``(B, T, C)`` with ``channel_dim=-1``; other strides are copied once with
``.contiguous()``), and returns ``y``/``dx`` with x's memory format. One pass forward
(read x, write y) and one pass backward (read x and g, write dx), the same traffic as
ReLU. With AVX-512 the 16-lane loop finds the region with one subtract, one multiply and
two compares and looks the slope and intercept up in registers (``vpermt2ps`` over the
``N + 2 <= 32`` entries of the channel; a gather beyond that); fp16/bf16 are loaded and
stored in their dtype and computed in fp32 (F16C conversion; bf16 by bit shifts, round to
nearest even). The parameter-gradient histogram uses lane-private accumulators, one
compare and two masked adds per region and 16 elements (float for at most 256 terms per
lane, then double), per thread over a static partition, reduced in a fixed order: the
parameter gradients are bit-identical run to run for a fixed thread count
(``torch.get_num_threads()``, or one thread below :data:`GRAIN_SIZE` elements). Where the
channels are the fastest axis (channels-last, ``(B, T, C)``) lanes are channels: the
histogram is the same lane-private one; the forward transposes 16x16 tiles in registers so
that it can use the in-register lookup (C a multiple of 16), the backward gathers the slope
per lane. Rows shorter than 512 elements (small feature maps) go channel by channel, each
channel's tables loaded once for all its rows (forward: rows under 256 elements), and the
backward adds each element's region, g and g*r into that channel's double bins, from one
thread per channel (no partial histograms). Without AVX-512, and for fp64, a portable scalar
loop is used.

Eval-mode calls without gradients go through an :class:`InferencePlan` (made by the
``PWLU`` module on its first such call): folded tables and kernel arguments prepared once
per input geometry; before each call the C side compares the parameters byte for byte with
the snapshot the tables were folded from, so a plan can never run with stale tables.

Alternatives measured (2 cores, NCHW (32, 64, 56, 56) fp32, N = 16, interleaved with ReLU
in the same run; details in ``benchmarks/results/cpu_backend_choice.md``): the eager
vectorised-torch backend is ~54x ReLU forward and ~59x ReLU backward; ``torch.compile``
(inductor C++) of the same code is 5.6x forward and 29.5x backward (the histogram stays an
``index_add_`` scatter), needs a compiler as well and takes ~8 s on first call; this kernel
is 1.07x forward and 2.3x ReLU's ``threshold_backward``. For the histogram, a scalar
scatter into double bins (4 or 8 copies, blocked or not) cost 4-5x the rest of the
backward; the vectorised compare-and-masked-add form costs 1.5x.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import common

_SOURCE = Path(__file__).with_name("csrc") / "pwlu_cpu.c"
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-shared", "-fPIC"),
)
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_ABI_VERSION = 6
#: Below this many elements one thread runs the kernel (as ATen's grain size): waking a
#: second thread costs more than it saves, and on a busy machine it can cost a time slice.
GRAIN_SIZE = 65536

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": ctypes.CDLL, or "error": str once a build failed


def build_dir() -> Path:
    """Where compiled kernels are cached: ``$PWLU_CPU_BUILD_DIR``, else ``$XDG_CACHE_HOME/pwlu``."""
    override = os.environ.get("PWLU_CPU_BUILD_DIR")
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pwlu"


def _compiler() -> str:
    return os.environ.get("CC") or "gcc"


def _cpu_flags() -> str:
    """The CPU's feature flags, so a cache shared across machines never loads a foreign -march=native build."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _library_path(source: bytes, cc: str, flags: tuple[str, ...]) -> Path:
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_flags().encode()]))
    return build_dir() / f"pwlu_cpu_{key.hexdigest()[:20]}.so"


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile to a temporary file next to ``target`` and rename it into place (atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("pwlu_forward_f32c", "pwlu_forward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, i32, i64, i64, i64, p, p, p, p, p, p, i64, i32]
        fn.restype = i32
    for name in ("pwlu_backward_f32c", "pwlu_backward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i32, i64, i64, i64, p, p, p, p, i64, i32, p]
        fn.restype = i32
    for name in ("pwlu_fold_f32", "pwlu_fold_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, i64, i64, ctypes.c_double, p]
        fn.restype = i32
    for name in ("pwlu_fold_forward_f32c", "pwlu_fold_forward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, ctypes.c_double, p, p, i32, i64, i64, i64, i64, i32]
        fn.restype = i32
    for name in ("pwlu_fold_backward_f32c", "pwlu_fold_backward_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, p, p, ctypes.c_double, p, p, p, i32, i64, i64, i64, i64, i32, p, p, p, p, p]
        fn.restype = i32
    lib.pwlu_forward_plan.argtypes = [p, p, p]
    lib.pwlu_forward_plan.restype = i32
    for name in ("pwlu_cpu_abi_version", "pwlu_cpu_has_avx512", "pwlu_cpu_has_f16"):
        getattr(lib, name).restype = i32


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    cc = _compiler()
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler: {cc!r} was not found (set CC to a C compiler)")
    errors = []
    for flags in _FLAG_SETS:
        path = _library_path(source, cc, flags)
        try:
            if not path.exists():
                _compile(cc, flags, path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.pwlu_cpu_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"{path} has ABI version {lib.pwlu_cpu_abi_version()}, expected {_ABI_VERSION}")
            return lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(flags)}: {e}")
    raise RuntimeError("\n".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; ``None`` (after one warning) if it cannot be built."""
    lib = _state.get("lib")
    if lib is not None or "error" in _state:
        return lib  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as e:  # noqa: BLE001 - any failure means: fall back
                _state["error"] = str(e)
                warnings.warn(
                    f"pwlu: the compiled CPU kernel is unavailable, falling back to the slower torch backend "
                    f"({e}). Install a C compiler (gcc) or set CC; kernels are cached in {build_dir()}.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _state.get("lib")  # type: ignore[return-value]


def _reset_for_tests() -> None:
    """Forget the loaded library and any build error (the next call builds again)."""
    with _lock:
        _state.clear()
    from . import dispatch

    dispatch.forget_selection()


def is_available(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and library() is not None


def _dense_order(x: Tensor) -> list[int] | None:
    """A permutation ``p`` with ``x.permute(p)`` contiguous (memory order, outermost first), else ``None``."""
    if x.is_contiguous():
        return list(range(x.dim()))
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order).is_contiguous() else None


def _layout(x: Tensor, channel_dim: int | None) -> tuple[Tensor, list[int], tuple[int, int, int]]:
    """x (made dense if needed), its memory order and its ``(outer, C, inner)`` view."""
    order = _dense_order(x)
    if order is None:
        x = x.contiguous()
        order = list(range(x.dim()))
    if channel_dim is None:
        return x, order, (1, 1, x.numel())
    sizes = [x.shape[d] for d in order]
    pos = order.index(channel_dim)
    outer = 1
    for s in sizes[:pos]:
        outer *= s
    inner = 1
    for s in sizes[pos + 1 :]:
        inner *= s
    return x, order, (outer, sizes[pos], inner)


def _like(x: Tensor, order: list[int]) -> Tensor:
    """An uninitialised tensor shaped like x with the same memory order."""
    out = torch.empty_like(x)
    if not (out.is_contiguous() if order == sorted(order) else out.permute(order).is_contiguous()):
        perm_shape = [x.shape[d] for d in order]
        out = torch.empty(perm_shape, dtype=x.dtype, device=x.device).permute(_inverse(order))
    return out


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def _in_order(t: Tensor, order: list[int]) -> Tensor:
    """``t`` laid out in ``order`` (a copy only when it is not already)."""
    if t.permute(order).is_contiguous():
        return t
    return t.permute(order).contiguous().permute(_inverse(order))


def _num_threads(numel: int) -> int:
    return 1 if numel < GRAIN_SIZE else torch.get_num_threads()


def _tables(*tables: Tensor) -> list[Tensor]:
    return [t.detach().contiguous() for t in tables]


def _kernel_dtype(x: Tensor, lib: ctypes.CDLL) -> int:
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"pwlu cpu backend: unsupported dtype {x.dtype}")
    return _DTYPE_CODES[x.dtype]


def fold_tables(points, left_bound, right_bound, left_slope, right_slope):
    """:func:`pwlu.ops.common.fold_tables` in C (not differentiable): one call instead of ~20
    small torch ops, which dominate the cost of a PWLU on small tensors."""
    if points.dtype not in (torch.float32, torch.float64):
        return common.fold_tables(points, left_bound, right_bound, left_slope, right_slope)
    lib = library()
    num_channels, n = points.shape[0], points.shape[1] - 1
    params = [t.detach().contiguous() for t in (points, left_bound, right_bound, left_slope, right_slope)]
    out = torch.empty(2 * num_channels * (n + 2) + 4 * num_channels, dtype=points.dtype)
    fn = lib.pwlu_fold_f64 if points.dtype == torch.float64 else lib.pwlu_fold_f32
    rc = fn(*(t.data_ptr() for t in params), num_channels, n, common.MIN_WIDTH, out.data_ptr())
    assert rc == 0
    size = num_channels * (n + 2)
    rest = out[2 * size :].view(4, num_channels)
    return out[:size].view(num_channels, n + 2), out[size : 2 * size].view(num_channels, n + 2), *rest.unbind(0)


def forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift):
    lib = library()
    assert lib is not None, "cpu backend used while unavailable"
    if x.dtype == torch.float16 and not lib.pwlu_cpu_has_f16():
        return forward(x.float(), slopes, intercepts, left, right, inv_d, channel_dim, shift).half()
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    y = _like(x, order)
    if x.numel() == 0:
        return y
    n = slopes.shape[-1] - 2
    slopes, intercepts, left, right, inv_d, shift = _tables(slopes, intercepts, left, right, inv_d, shift)
    fn = lib.pwlu_forward_f64 if x.dtype == torch.float64 else lib.pwlu_forward_f32c
    assert slopes.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    rc = fn(
        x.data_ptr(), y.data_ptr(), _kernel_dtype(x, lib), outer, channels, inner,
        slopes.data_ptr(), intercepts.data_ptr(), left.data_ptr(), right.data_ptr(), inv_d.data_ptr(),
        shift.data_ptr(), n, _num_threads(x.numel()),
    )  # fmt: skip
    assert rc == 0
    return y


def _raw_params(x: Tensor, params) -> list[Tensor]:
    """The five parameters in x's compute dtype, contiguous (no copy when they already are)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return [p if p.dtype == dtype and p.is_contiguous() else p.detach().to(dtype).contiguous() for p in params]


def _fused_ok(x: Tensor, lib) -> bool:
    return x.dtype != torch.float16 or bool(lib.pwlu_cpu_has_f16())


def forward_from_params(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """Fold and forward in one C call, from the parameters (shapes as validated by
    :func:`pwlu.ops.validation.check_params`); ``None`` where this path does not apply."""
    lib = library()
    if lib is None or not _fused_ok(x, lib):
        return None
    params = _raw_params(x, (points, left_bound, right_bound, left_slope, right_slope))
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    y = _like(x, order)
    if x.numel() == 0:
        return y
    fn = lib.pwlu_fold_forward_f64 if x.dtype == torch.float64 else lib.pwlu_fold_forward_f32c
    rc = fn(
        *(t.data_ptr() for t in params), common.MIN_WIDTH, x.data_ptr(), y.data_ptr(), _kernel_dtype(x, lib),
        outer, channels, inner, points.shape[-1] - 1, _num_threads(x.numel()),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("pwlu cpu backend: could not allocate the folded tables")
    return y


class _PlanArgs(ctypes.Structure):
    """``pwlu_plan`` of ``csrc/pwlu_cpu.c``: the kernel arguments other than x and y."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dt", "outer", "C", "inner", "n", "nthreads")),
        *((name, ctypes.c_void_p) for name in ("sl", "ic", "lo", "ro", "iv", "sh")),
        ("live", ctypes.c_void_p * 5),  # the five parameter tensors' data
        ("snap", ctypes.c_void_p * 5),  # the copies the tables were folded from
        ("bytes", ctypes.c_int64 * 5),
    ]


class InferencePlan:
    """One PWLU's forward for one input geometry, prepared once: the folded tables, the
    kernel's arguments in a C struct. Calling it costs one check that it still fits and one
    native call with three arguments, where the general path spends ~10 us of Python per call
    (validation, layout, dispatch, folding), which on the small feature maps of a MobileNet
    is as much as the kernel itself.

    It is only used where the general path would compute exactly the same thing: gradients
    disabled, the same parameter tensors (identity and storage, checked here) holding the same
    bytes as the snapshot the tables were folded from (compared in C before every call, so an
    optimizer step, ``load_state_dict``, ``.data =`` or an in-place write through ``.data``,
    which bumps no version counter, all rebuild it), the same input shape, strides, dtype and
    device, the same backend setting and thread count. ``__call__`` returns ``None`` when
    anything differs, and the caller takes the general path (which makes a new plan).
    """

    __slots__ = ("params", "key", "shape", "stride", "dtype", "backend", "threads", "run", "struct", "tables")

    def __init__(self, x: Tensor, params: tuple[Tensor, ...], run, struct: _PlanArgs, tables: list[Tensor], backend: str):
        self.params = params
        self.key = self._param_key(params)
        self.shape, self.stride, self.dtype = x.shape, x.stride(), x.dtype
        self.backend = backend
        self.threads = torch.get_num_threads()
        self.run, self.struct = run, ctypes.addressof(struct)
        self.tables = (tables, struct)  # keeps the tables and the struct the pointers point to alive

    @staticmethod
    def _param_key(params: tuple[Tensor, ...]) -> tuple:
        """Where the parameters' data lives (the C side reads it: never through a stale pointer)."""
        p0, p1, p2, p3, p4 = params
        return (p0.data_ptr(), p1.data_ptr(), p2.data_ptr(), p3.data_ptr(), p4.data_ptr())

    def __reduce__(self):  # native pointers: copying or pickling a module drops its plan
        return (_no_plan, ())

    def __call__(self, x: Tensor, params: tuple[Tensor, ...], backend: str) -> Tensor | None:
        """``y`` for input ``x``, or ``None`` when this plan does not fit the call."""
        mine = self.params
        if not (
            x.shape == self.shape and x.stride() == self.stride and x.dtype == self.dtype and x.is_cpu
            and params[0] is mine[0] and params[1] is mine[1] and params[2] is mine[2] and params[3] is mine[3]
            and params[4] is mine[4] and backend == self.backend and self._param_key(mine) == self.key
            and torch.get_num_threads() == self.threads
        ):  # fmt: skip
            return None
        y = torch.empty_like(x)
        if self.run(self.struct, x.data_ptr(), y.data_ptr()) != 0:
            return None  # the parameters' values changed since the tables were folded
        return y


def _no_plan() -> None:
    return None


def inference_plan(x, points, left_bound, right_bound, left_slope, right_slope, channel_dim, backend: str):
    """An :class:`InferencePlan` for this call (arguments as validated by
    :func:`pwlu.ops.validation.check_params`), or ``None`` where none applies (a layout that
    needs a copy, fp16 without F16C, an empty input, non-contiguous parameters)."""
    lib = library()
    if lib is None or not _fused_ok(x, lib) or x.numel() == 0:
        return None
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    if not all(p.is_contiguous() for p in originals):
        return None  # compared byte for byte on every call: only dense parameters
    order = _dense_order(x)
    if order is None or torch.empty_like(x).stride() != x.stride():
        return None
    _, _, (outer, channels, inner) = _layout(x, channel_dim)
    n = points.shape[-1] - 1
    tables = _tables(*fold_tables(*common.channel_form(*originals, common.compute_dtype(x.dtype))))
    snapshots = [p.detach().clone() for p in originals]
    struct = _PlanArgs(
        _kernel_dtype(x, lib), outer, channels, inner, n, _num_threads(x.numel()), *(t.data_ptr() for t in tables),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in originals)),
        (ctypes.c_void_p * 5)(*(p.data_ptr() for p in snapshots)),
        (ctypes.c_int64 * 5)(*(p.numel() * p.element_size() for p in originals)),
    )  # fmt: skip
    return InferencePlan(x, originals, lib.pwlu_forward_plan, struct, [*tables, *snapshots], backend)


def backward_from_params(grad, x, points, left_bound, right_bound, left_slope, right_slope, channel_dim):
    """``(dx, (d_points, d_left_bound, d_right_bound, d_left_slope, d_right_slope))`` in one C
    call (fold, kernel, gradient epilogue in double); ``None`` where this path does not apply."""
    lib = library()
    if lib is None or not _fused_ok(x, lib):
        return None
    originals = (points, left_bound, right_bound, left_slope, right_slope)
    params = _raw_params(x, originals)
    n = points.shape[-1] - 1
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    grad = _in_order(grad.to(x.dtype).expand_as(x), order)
    dx = _like(x, order)
    # each gradient in its own tensor, written by the kernel (in the compute dtype)
    grads = [torch.empty(p.shape, dtype=params[0].dtype) for p in originals]
    fn = lib.pwlu_fold_backward_f64 if x.dtype == torch.float64 else lib.pwlu_fold_backward_f32c
    rc = fn(
        *(t.data_ptr() for t in params), common.MIN_WIDTH, grad.data_ptr(), x.data_ptr(), dx.data_ptr(),
        _kernel_dtype(x, lib), outer, channels, inner, n, _num_threads(x.numel()), *(g.data_ptr() for g in grads),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("pwlu cpu backend: could not allocate the histogram buffers")
    return dx, tuple(g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(grads, originals))


def backward(grad, x, slopes, left, right, inv_d, channel_dim):
    lib = library()
    assert lib is not None, "cpu backend used while unavailable"
    if x.dtype == torch.float16 and not lib.pwlu_cpu_has_f16():
        dx, hist = backward(grad.float(), x.float(), slopes, left, right, inv_d, channel_dim)
        return dx.half(), hist
    n = slopes.shape[-1] - 2
    num_channels = slopes.shape[0]
    x, order, (outer, channels, inner) = _layout(x, channel_dim)
    grad = _in_order(grad.to(x.dtype).expand_as(x), order)
    dx = _like(x, order)
    hist = torch.zeros(num_channels, n + 2, 2, dtype=torch.float64)
    if x.numel() > 0:
        slopes, left, right, inv_d = _tables(slopes, left, right, inv_d)
        fn = lib.pwlu_backward_f64 if x.dtype == torch.float64 else lib.pwlu_backward_f32c
        rc = fn(
            grad.data_ptr(), x.data_ptr(), dx.data_ptr(), _kernel_dtype(x, lib), outer, channels, inner,
            slopes.data_ptr(), left.data_ptr(), right.data_ptr(), inv_d.data_ptr(),
            n, _num_threads(x.numel()), hist.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("pwlu cpu backend: could not allocate the histogram buffers")
    return dx, hist.to(slopes.dtype)


if __name__ == "__main__":  # python -m pwlu.ops.cpu_backend: build and report
    lib = library()
    print(f"library: {lib._name if lib else None}", file=sys.stderr)
