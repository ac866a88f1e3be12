"""Building and loading the compiled CPU kernels: cache, flag sets, ABI version, return codes.

The build tests use a fresh cache directory (``PWLU_CPU_BUILD_DIR``) and restore the real
library afterwards.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import random_params
from pwlu.ops import torch_backend
from pwlu.ops.cpu import backend as cpu_backend
from pwlu.ops.cpu import build as cpu_build
from pwlu.ops.folding import fold_tables

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(torch.device("cpu")), reason="no C compiler")


def assert_kernel_works(lib):
    """One forward through the loaded library against the torch backend."""
    assert lib is not None and lib is cpu_build.library()
    x = 3 * torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(0))
    tables = fold_tables(*random_params(5, 16, seed=1))
    y = cpu_backend.forward(x, *tables[:5], 1, tables[5])
    torch.testing.assert_close(y, torch_backend.forward(x, *tables[:5], 1, tables[5]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cached_library_is_rebuilt_with_the_same_flags(fresh_build, damage):
    """A cached library that does not load is rebuilt with the fastest flag set, never silently
    replaced by a slower one."""
    fastest = cpu_build._FLAG_SETS[0]
    path = cpu_build.PWLU_CPU.path(fastest)
    if damage == "garbage":
        path.write_bytes(b"\x7fELF not really a shared library" * 50)
    else:  # compiled (not loaded into this process), then cut short
        cpu_build.PWLU_CPU.compile(fastest, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    damaged = path.read_bytes()
    assert not cpu_build.intact(path)  # (dlopen of a truncated library can kill the process)
    cpu_build._reset_for_tests()

    lib = cpu_build.library()
    assert lib is not None
    assert sorted(p.name for p in fresh_build.glob("*.so")) == [path.name], "a slower flag set was built"
    assert lib._name == str(path)
    assert path.read_bytes() != damaged, "the damaged file was not rebuilt"
    assert_kernel_works(lib)
    if "-march=native" in fastest and "avx512f" in cpu_build._cpu_flags().split():
        assert lib.pwlu_cpu_has_avx512()


def test_only_a_compile_failure_moves_on_to_the_next_flag_set(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_build, "_FLAG_SETS", (("-fno-such-flag-pwlu",), *cpu_build._FLAG_SETS[1:]))
    lib = cpu_build.library()
    second = cpu_build.PWLU_CPU.path(cpu_build._FLAG_SETS[1])
    assert lib is not None and lib._name == str(second)
    assert [p.name for p in fresh_build.glob("*.so")] == [second.name]


def copy_csrc(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(cpu_build.CSRC, csrc)
    return csrc


def test_every_source_file_is_part_of_the_build_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("PWLU_CPU_BUILD_DIR", str(tmp_path / "cache"))
    csrc = copy_csrc(tmp_path)
    files = sorted(p.name for p in csrc.iterdir())
    assert "pwlu_cpu.c" in files and {"pwlu_common.h", "pwlu_fold.h"} <= set(files)
    lib = cpu_build.NativeLibrary("pwlu_cpu", "pwlu_cpu.c", cpu_build._declare, csrc=csrc)
    flags = cpu_build._FLAG_SETS[0]
    base = lib.path(flags)
    assert base.parent == tmp_path / "cache" and base.name.startswith("pwlu_cpu_")
    for name in files:
        path = csrc / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n/* edited */\n")
        assert lib.path(flags) != base, f"editing {name} does not change the library's name"
        path.write_bytes(original)
        assert lib.path(flags) == base
    (csrc / "pwlu_new_op.h").write_text("/* a new header */\n")
    assert lib.path(flags) != base, "a new header does not change the library's name"
    # the flags and the library's name are part of it too
    assert lib.path(cpu_build._FLAG_SETS[1]) != lib.path(flags)
    other = cpu_build.NativeLibrary("pwlu_other", "pwlu_cpu.c", cpu_build._declare, csrc=csrc)
    assert other.path(flags).name.startswith("pwlu_other_")


def test_abi_version_is_read_from_the_header(tmp_path):
    assert cpu_build.abi_version() == cpu_build.library().pwlu_cpu_abi_version()
    csrc = copy_csrc(tmp_path)
    header = csrc / cpu_build.COMMON_HEADER
    text = header.read_text()
    assert text.count("#define PWLU_ABI_VERSION") == 1
    header.write_text(
        text.replace(f"#define PWLU_ABI_VERSION {cpu_build.abi_version()}", "#define PWLU_ABI_VERSION 41")
    )
    assert cpu_build.abi_version(csrc) == 41
    # and defined nowhere in Python
    source = (cpu_build.CSRC.parent / "build.py").read_text()
    assert f"= {cpu_build.abi_version()}\n" not in source


def test_abi_mismatch_is_a_clear_error(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_build, "abi_version", lambda csrc=cpu_build.CSRC: 9999)
    with pytest.warns(RuntimeWarning, match=r"ABI version \d+, but .*pwlu_common.h defines PWLU_ABI_VERSION 9999"):
        assert cpu_build.library() is None
    assert not cpu_backend.is_available(torch.device("cpu"))
    with pytest.raises(cpu_build.AbiMismatch, match="9999"):
        cpu_build.PWLU_CPU.load(cpu_build.PWLU_CPU.path(cpu_build._FLAG_SETS[0]))


def test_header_constants_are_the_python_constants():
    constants = cpu_build.header_constants(cpu_build.CSRC / cpu_build.COMMON_HEADER)
    assert cpu_build._DTYPE_CODES[torch.float32] == constants["PWLU_F32"]
    assert cpu_build._DTYPE_CODES[torch.bfloat16] == constants["PWLU_BF16"]
    assert cpu_build.ERR_NOMEM == constants["PWLU_ERR_NOMEM"] != cpu_build.OK == constants["PWLU_OK"] == 0


def test_check_raises_on_every_error_code():
    cpu_build.check(cpu_build.OK, "pwlu_forward_f32c")
    with pytest.raises(MemoryError, match="pwlu_fold_backward_f32c"):
        cpu_build.check(cpu_build.ERR_NOMEM, "pwlu_fold_backward_f32c")
    with pytest.raises(RuntimeError, match=r"pwlu_backward_f64 failed with return code 12345 \(unknown"):
        cpu_build.check(12345, "pwlu_backward_f64")
    dtype_error = cpu_build.header_constants(cpu_build.CSRC / cpu_build.COMMON_HEADER)["PWLU_ERR_DTYPE"]
    with pytest.raises(RuntimeError, match="PWLU_ERR_DTYPE"):
        cpu_build.check(dtype_error, "pwlu_forward_f32c")


def test_kernels_return_an_error_for_an_unknown_dtype_code():
    """The C side refuses a dtype code it cannot read, and check() turns that into an exception."""
    lib = cpu_build.library()
    outer, c, inner, n = 2, 3, 40, 8
    for dtype, fn, wrong in (
        (torch.float32, lib.pwlu_forward_f32c, (7, cpu_build._DTYPE_CODES[torch.float64])),
        (torch.float64, lib.pwlu_forward_f64, (cpu_build._DTYPE_CODES[torch.float32],)),
    ):
        x = torch.randn(outer, c, inner, dtype=dtype)
        y = torch.zeros_like(x)
        tables = [t.data_ptr() for t in fold_tables(*random_params(c, n, dtype=dtype, seed=2))]
        for dt in wrong:
            rc = fn(x.data_ptr(), y.data_ptr(), dt, outer, c, inner, *tables, n, 1)
            with pytest.raises(RuntimeError, match="PWLU_ERR_DTYPE"):
                cpu_build.check(rc, fn.__name__)
        assert not y.any(), "nothing is written on an error"
        right = cpu_build._DTYPE_CODES[dtype]
        cpu_build.check(fn(x.data_ptr(), y.data_ptr(), right, outer, c, inner, *tables, n, 1), fn.__name__)
        assert y.any()
