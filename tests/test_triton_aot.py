"""The Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90), without a GPU.

Runs ``benchmarks/triton_resources.py`` in its own process with the interpreter off (Triton
fixes interpreter mode when it is first imported, and this session may have it on), writing
its table to a temporary file so the committed ``benchmarks/results/triton_resources.md`` is
left alone. Every kernel x arch x dtype x layout x N in {4, 16, 64} (and the 2-D PWLU kernels at
N = 8) must compile, with no register spills; the committed table must list the configurations
the launchers pick today.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton, or the dev extra)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"
COMMITTED = ROOT / "benchmarks" / "results" / "triton_resources.md"
KERNELS = ("forward", "backward", "pwlu2d forward", "pwlu2d backward", "npwlu forward", "npwlu backward")
ARCHS = ("sm_80", "sm_90")
DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("NCHW", "channels-last", "BTC", "layer-wise")
NS = ("4", "16", "64")
PWLU2D_KERNELS, PWLU2D_NS = ("pwlu2d forward", "pwlu2d backward"), ("4", "8", "16")  # 8: its default N
COLUMNS = ("kernel", "arch", "dtype", "layout", "shape", "N", "block", "warps", "regs", "spill", "stack", "smem")


def parse_rows(text: str) -> list[dict]:
    """The rows of the report's "All configurations" table."""
    section = text.split("## All configurations", 1)[-1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in KERNELS:
            rows.append(dict(zip(COLUMNS, cells)))
    return rows


def configuration(row: dict) -> tuple:
    return tuple(row[c] for c in ("kernel", "arch", "dtype", "layout", "shape", "N", "block", "warps"))


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    """One test (one compile run, whichever xdist worker gets it): compile errors, spills, the
    matrix covered, then the committed table against the launchers' configurations (block
    sizes, warps, region passes); after changing those, rerun
    ``python benchmarks/triton_resources.py --sass`` and commit the table."""
    out = tmp_path / "triton_resources.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--jobs", "2", "--quiet"]
    # ~1200 compilations: about 8 min on 2 idle cores, longer beside the other xdist worker
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2700)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    rows = parse_rows(out.read_text())
    assert rows, log[-4000:]
    errors = [r for r in rows if r["regs"] == "-" or "ERROR" in r.values()]
    assert not errors, errors[:5]
    spills = [r for r in rows if r["spill"] != "0/0"]
    assert not spills, spills[:5]
    assert all(0 < int(r["regs"]) <= 255 for r in rows)
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["layout"], r["N"]) for r in rows}
    missing = set(itertools.product(KERNELS, ARCHS, DTYPES, LAYOUTS, NS)) - compiled
    missing |= set(itertools.product(PWLU2D_KERNELS, ARCHS, DTYPES, LAYOUTS, PWLU2D_NS)) - compiled
    assert not missing, sorted(missing)[:10]
    assert "failures (errors or spills at N <= 64): 0" in proc.stdout

    fresh = {configuration(r) for r in rows}
    committed = {configuration(r) for r in parse_rows(COMMITTED.read_text())}
    assert fresh == committed, (
        f"benchmarks/results/triton_resources.md is stale: only now {sorted(fresh - committed)[:5]}, "
        f"only committed {sorted(committed - fresh)[:5]}; rerun python benchmarks/triton_resources.py --sass"
    )
