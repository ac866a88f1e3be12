"""Building and loading native kernels: compiler, flags, cache, ctypes loading.

A :class:`NativeLibrary` is one C entry file in ``csrc/`` (which includes the shared headers
there), compiled on first use with the system C compiler (``$CC``, default ``gcc``; flags
``-O3 -march=native -fopenmp -shared -fPIC``, falling back to fewer flags only where the
compiler rejects them) into ``$PWLU_CPU_BUILD_DIR`` or ``$XDG_CACHE_HOME/pwlu`` (default
``~/.cache/pwlu``), under a name that hashes every ``.c`` and ``.h`` file of ``csrc/``, the
entry file's name, the compiler, the flags and the CPU's feature flags, written atomically;
later processes just load it with :mod:`ctypes` (which releases the GIL during the call). A
cached file that is cut short (:func:`intact`), does not load or reports another ABI version is
rebuilt with the same flags. Where no compiler exists or the build fails, :meth:`NativeLibrary.get`
returns ``None`` after one warning, and dispatch falls back to the torch backend, so
``pip install pwlu`` never needs a compiler.

The ABI version, the dtype codes and the return codes are defined once, in
``csrc/pwlu_common.h``; this module reads them from there (:func:`header_constants`), and every
library must export ``<name>_abi_version()`` returning ``PWLU_ABI_VERSION``.

The PWLU kernels are one such library (``csrc/pwlu_cpu.c``, :data:`PWLU_CPU`; module-level
:func:`library`). A new op adds its own entry file and ctypes declarations::

    MY_OP = NativeLibrary("pwlu_my_op", "pwlu_my_op.c", declare=_declare_my_op)
    lib = MY_OP.get()  # a ctypes.CDLL, or None
    check(lib.pwlu_my_op_forward(...), "pwlu_my_op_forward")
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

#: The C sources: entry files and the headers they share.
CSRC = Path(__file__).with_name("csrc")
#: Where the ABI version, dtype codes and return codes are defined.
COMMON_HEADER = "pwlu_common.h"
#: Tried in order; a flag set moves on to the next only when the compiler rejects it.
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-fopenmp", "-shared", "-fPIC"),
    ("-O3", "-shared", "-fPIC"),
)
#: Other targets than the machine's own (``-march=native``), for tests and benchmarks that run
#: the other kernel paths on this CPU: ``avx2``, what x86 CPUs without AVX-512 run (needs AVX2,
#: FMA and F16C here), and ``portable``, the scalar loop of a build for baseline x86-64 or ARM.
TARGET_FLAGS = {
    "avx2": ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"),
    "portable": ("-O3", "-fopenmp", "-shared", "-fPIC"),
}
#: Below this many elements one thread runs the kernel (as ATen's grain size): waking a
#: second thread costs more than it saves, and on a busy machine it can cost a time slice.
GRAIN_SIZE = 65536

_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(PWLU_\w+)[ \t]+(-?\d+)\b", re.MULTILINE)


def header_constants(header: Path) -> dict[str, int]:
    """The integer ``#define PWLU_<NAME> <value>`` lines of a C header, by name."""
    return {name: int(value) for name, value in _DEFINE.findall(header.read_text())}


def abi_version(csrc: Path = CSRC) -> int:
    """``PWLU_ABI_VERSION`` of ``csrc``'s common header: what a loaded library must report."""
    return header_constants(csrc / COMMON_HEADER)["PWLU_ABI_VERSION"]


_CONSTANTS = header_constants(CSRC / COMMON_HEADER)
_DTYPE_CODES = {
    torch.float32: _CONSTANTS["PWLU_F32"],
    torch.float64: _CONSTANTS["PWLU_F64"],
    torch.float16: _CONSTANTS["PWLU_F16"],
    torch.bfloat16: _CONSTANTS["PWLU_BF16"],
}
OK = _CONSTANTS["PWLU_OK"]
ERR_NOMEM = _CONSTANTS["PWLU_ERR_NOMEM"]
PLAN_STALE = _CONSTANTS["PWLU_PLAN_STALE"]
_ERROR_NAMES = {value: name for name, value in _CONSTANTS.items() if name.startswith("PWLU_ERR_")}


def check(rc: int, function: str) -> None:
    """Raise if a kernel's return code ``rc`` is not ``PWLU_OK``: :class:`MemoryError` for
    ``PWLU_ERR_NOMEM``, :class:`RuntimeError` naming ``function`` and the code otherwise."""
    if rc == OK:
        return
    if rc == ERR_NOMEM:
        raise MemoryError(f"pwlu: {function} could not allocate its scratch buffers")
    raise RuntimeError(f"pwlu: {function} failed with return code {rc} ({_ERROR_NAMES.get(rc, 'unknown code')})")


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


def source_digest(csrc: Path) -> str:
    """A hash of every ``.c`` and ``.h`` file in ``csrc`` (names and bytes): editing any of them rebuilds."""
    h = hashlib.sha256()
    for path in sorted(p for p in csrc.iterdir() if p.suffix in (".c", ".h") and p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# ELF layouts, 32- and 64-bit: header fields (offset of e_phoff, e_shoff; of e_phentsize, e_phnum,
# e_shentsize, e_shnum; the address format), the program and section header sizes, and the
# offsets of p_offset, p_filesz, sh_offset, sh_size.
_ELF = {
    1: (0x1C, 0x2A, "I", 32, 40, 4, 16, 16, 20),
    2: (0x20, 0x36, "Q", 56, 64, 8, 32, 24, 32),
}


def intact(path: Path) -> bool:
    """Whether a cached library is whole: on ELF platforms, every header table, loaded segment
    and section its headers name lies inside the file. ``dlopen`` of a truncated library can
    kill the process with SIGBUS (it maps segments past the end of the file) instead of failing,
    so a cached file is checked before it is loaded."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF":
        return not sys.platform.startswith("linux") and len(data) > 0
    if len(data) < 64 or data[4] not in _ELF or data[5] not in (1, 2):
        return False
    tables, counts, addr, ph_size, sh_size, p_offset, p_filesz, sh_offset, sh_bytes = _ELF[data[4]]
    end = "<" if data[5] == 1 else ">"
    try:
        phoff, shoff = struct.unpack_from(end + 2 * addr, data, tables)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, counts)
        if phentsize != ph_size or shentsize != sh_size:
            return False
        if phoff + phnum * ph_size > len(data) or shoff + shnum * sh_size > len(data):
            return False
        for at in range(phoff, phoff + phnum * ph_size, ph_size):
            (p_type,) = struct.unpack_from(end + "I", data, at)
            (offset,), (size,) = (struct.unpack_from(end + addr, data, at + f) for f in (p_offset, p_filesz))
            if p_type == 1 and offset + size > len(data):  # PT_LOAD
                return False
        for at in range(shoff, shoff + shnum * sh_size, sh_size):
            (sh_type,) = struct.unpack_from(end + "I", data, at + 4)
            (offset,), (size,) = (struct.unpack_from(end + addr, data, at + f) for f in (sh_offset, sh_bytes))
            if sh_type != 8 and offset + size > len(data):  # not SHT_NOBITS: has file contents
                return False
    except struct.error:
        return False
    return True


class CompileError(RuntimeError):
    """The compiler rejected a flag set (or could not run): the next flag set is tried."""


class AbiMismatch(RuntimeError):
    """A library reports another ABI version than ``csrc``'s common header defines."""


def _unload(lib: ctypes.CDLL) -> None:
    """Best effort ``dlclose``, so that a rebuilt file at the same path is really loaded again."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)
    except (ImportError, AttributeError, OSError):
        pass


class NativeLibrary:
    """One C entry file of ``csrc`` built into a shared library on first use (see the module docstring).

    ``name``: the library's file-name prefix and the prefix of its ``<name>_abi_version``
    export; ``entry``: its C file in ``csrc``; ``declare(lib)``: sets the ctypes ``argtypes``
    and ``restype`` of its functions.
    """

    def __init__(self, name: str, entry: str, declare: Callable[[ctypes.CDLL], None], csrc: Path = CSRC) -> None:
        self.name, self.entry, self.declare, self.csrc = name, entry, declare, Path(csrc)
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}  # "lib": ctypes.CDLL, or "error": str once a build failed

    def __repr__(self) -> str:
        return f"NativeLibrary({self.name!r}, {self.entry!r}, csrc={str(self.csrc)!r})"

    def path(self, flags: tuple[str, ...], cc: str | None = None) -> Path:
        """The cached library for these flags (and compiler, sources, CPU)."""
        parts = [source_digest(self.csrc), self.entry, cc or _compiler(), " ".join(flags), _cpu_flags()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
        return build_dir() / f"{self.name}_{key}.so"

    def compile(self, flags: tuple[str, ...], target: Path, cc: str | None = None) -> None:
        """Compile to a temporary file next to ``target`` and rename it into place (atomic);
        :class:`CompileError` if the compiler fails."""
        cc = cc or _compiler()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
        os.close(fd)
        command = [cc, *flags, f"-I{self.csrc}", str(self.csrc / self.entry), "-o", tmp, "-lm"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise CompileError(f"{cc} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            raise CompileError(f"{cc} could not run: {e}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: Path) -> ctypes.CDLL:
        """Load a built library and check its ABI version; :class:`OSError` (not a loadable
        library), :class:`AttributeError` (a function is missing) or :class:`AbiMismatch`."""
        lib = ctypes.CDLL(str(path))
        try:
            version_fn = getattr(lib, f"{self.name}_abi_version")
            version_fn.argtypes, version_fn.restype = [], ctypes.c_int
            found, expected = version_fn(), abi_version(self.csrc)
            if found != expected:
                raise AbiMismatch(
                    f"{path} has ABI version {found}, but {self.csrc / COMMON_HEADER} defines "
                    f"PWLU_ABI_VERSION {expected}"
                )
            self.declare(lib)
        except BaseException:
            _unload(lib)
            raise
        return lib

    def _build(self) -> ctypes.CDLL:
        cc = _compiler()
        if shutil.which(cc) is None:
            raise RuntimeError(f"no C compiler: {cc!r} was not found (set CC to a C compiler)")
        errors = []
        for flags in _FLAG_SETS:
            path = self.path(flags, cc)
            if path.exists() and intact(path):
                try:
                    return self.load(path)
                except (OSError, AttributeError, AbiMismatch):
                    pass  # damaged or foreign: rebuilt below with the same flags, never skipped
            try:
                self.compile(flags, path, cc)
            except CompileError as e:
                errors.append(f"{' '.join(flags)}: {e}")
                continue
            return self.load(path)  # a fresh build that does not load is an error, not a reason for slower flags
        raise RuntimeError("\n".join(errors))

    def loaded(self) -> ctypes.CDLL | None:
        """The library if an earlier :meth:`get` built or loaded it, else ``None`` (never builds)."""
        return self._state.get("lib")  # type: ignore[return-value]

    def get(self) -> ctypes.CDLL | None:
        """The compiled library, building it on first use; ``None`` (after one warning) if it cannot be built."""
        lib = self._state.get("lib")
        if lib is not None or "error" in self._state:
            return lib  # type: ignore[return-value]
        with self._lock:
            if "lib" not in self._state and "error" not in self._state:
                try:
                    self._state["lib"] = self._build()
                except Exception as e:  # noqa: BLE001 - any failure means: fall back
                    self._state["error"] = str(e)
                    warnings.warn(
                        f"pwlu: the compiled CPU kernel ({self.entry}) is unavailable, falling back to the slower "
                        f"torch backend ({e}). Install a C compiler (gcc) or set CC; kernels are cached in "
                        f"{build_dir()}.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self._state.get("lib")  # type: ignore[return-value]

    def is_available(self) -> bool:
        return self.get() is not None

    def reset(self) -> None:
        """Forget the loaded library and any build error (the next :meth:`get` builds or loads again)."""
        with self._lock:
            self._state.clear()


def _declare(lib: ctypes.CDLL) -> None:
    """The ctypes signatures of ``csrc/pwlu_cpu.c``'s exports; every one returns a ``PWLU_*`` code."""
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
    lib.pwlu_param_summary_f32.argtypes = [p, p, i32, p, i32, ctypes.c_float, p]
    lib.pwlu_param_summary_f32.restype = i32
    for name in ("pwlu_cpu_abi_version", "pwlu_cpu_has_avx512", "pwlu_cpu_has_avx2", "pwlu_cpu_has_f16"):
        getattr(lib, name).restype = i32


#: The PWLU kernels (``csrc/pwlu_cpu.c``).
PWLU_CPU = NativeLibrary("pwlu_cpu", "pwlu_cpu.c", declare=_declare)
#: Every library of this package, for :func:`_reset_for_tests`.
LIBRARIES: list[NativeLibrary] = [PWLU_CPU]


def library() -> ctypes.CDLL | None:
    """The PWLU kernel library, building it on first use; ``None`` (after one warning) if it cannot be built."""
    return PWLU_CPU.get()


def _reset_for_tests() -> None:
    """Forget the loaded libraries and any build error (the next call builds or loads again)."""
    for lib in LIBRARIES:
        lib.reset()
    from .. import dispatch

    dispatch.forget_selection()


def is_available(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and library() is not None
