"""Building and loading the CPU kernels: compiler, flags, cache, ctypes declarations.

The C source in ``csrc/`` is compiled on first use with the system C compiler (``$CC``,
default ``gcc``; flags ``-O3 -march=native -fopenmp -shared -fPIC``, falling back to fewer
flags) into ``$PWLU_CPU_BUILD_DIR`` or ``$XDG_CACHE_HOME/pwlu`` (default ``~/.cache/pwlu``),
under a name that hashes the source, the compiler, the flags and the CPU's feature flags,
written atomically; later processes just load it with :mod:`ctypes` (which releases the
GIL during the call). Where no compiler exists or the build fails, :func:`is_available`
returns ``False`` after one warning, and dispatch falls back to the torch backend, so
``pip install pwlu`` never needs a compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

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
    from .. import dispatch

    dispatch.forget_selection()


def is_available(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and library() is not None


