"""Ahead-of-time compile of the Triton PWLU kernels for real GPUs: registers, spills, shared memory.

No GPU or driver is needed: Triton compiles for a named target (``GPUTarget("cuda", 80|90, 32)``)
and its bundled ``ptxas`` turns the PTX into a cubin, reporting registers, stack frame and spill
stores/loads per kernel (the log of ``ptxas -v`` as Triton itself runs it, through
``triton.knobs.nvidia.dump_ptxas_log``).

The configurations compiled are the ones a CUDA launch would compile: the launchers
``pwlu.ops.triton_backend.forward`` / ``backward`` are called on CPU tensors of representative
shapes with the two ``@triton.jit`` kernels replaced by recorders, and every recorded launch is
specialized by Triton's own JIT binder (pointer alignment, integers divisible by 16, integers
equal to 1 made constants) and compiled with the options (``num_warps``) the launcher passed.
So the block sizes, ``num_warps`` and specializations in the table are the launchers' own, and a
change there shows up here.

Matrix: forward and backward kernels x sm_80 and sm_90 x float32, bfloat16, float16 inputs
(float32 tables) x NCHW, channels-last, ``(B, T, C)`` and layer-wise layouts (an aligned
representative of each and an odd shape that defeats the divisibility specialization) x
N in {4, 16, 64} (``--n`` to change; the 2-D PWLU kernels also at their default N = 8). Identical
configurations are compiled once.

Prints a markdown table and writes it to ``benchmarks/results/triton_resources.md`` (``--out``
to write elsewhere). Exit status 1 on a compile error or on any spill (stores or loads) at
N <= 64; spills at larger N are reported only.

Usage::

    python benchmarks/triton_resources.py                   # ~1-2 min on 2 cores
    python benchmarks/triton_resources.py --out /tmp/r.md --jobs 2 --n 4 16 64 256
"""

from __future__ import annotations

import os

# Ahead-of-time compilation needs the real compiler: Triton fixes interpreter mode when it is
# first imported, so drop the variable before anything imports triton (workers inherit this).
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
NUM_INTERVALS = (4, 16, 64)
SPILL_LIMIT_N = 64  # a spill at N <= this fails the run

# (layout, shape, channel_dim, channels-last memory format[, input 4 bytes past an aligned address])
CASES = [
    ("NCHW", (32, 64, 56, 56), 1, False),  # inner 3136: the benchmark's ResNet-stage shape
    ("NCHW", (16, 64, 32, 32), 1, False),  # inner 1024: the largest inner block
    ("NCHW", (16, 64, 32, 32), 1, False, True),  # the same, x not 16-byte aligned (a view at offset 1)
    ("NCHW", (4, 16, 25, 40), 1, False),  # inner 1000: the largest block, inner % 16 != 0
    ("NCHW", (8, 24, 7, 7), 1, False),  # inner 49: a small masked block
    ("channels-last", (16, 64, 32, 32), 1, True),  # C 64: full channel blocks
    ("channels-last", (8, 24, 7, 7), 1, True),  # C 24: partial channel block, C % 16 != 0
    ("BTC", (16, 256, 256), -1, False),  # C 256: several channel blocks
    ("BTC", (4, 100, 40), -1, False),  # C 40
    ("layer-wise", (16, 64, 32, 32), None, False),  # one table, C == 1 specialized away
    ("layer-wise", (3, 7, 33), None, False),  # 693 elements
]
LAYOUTS = ("NCHW", "channels-last", "BTC", "layer-wise")
KERNELS = {"_pwlu_forward_kernel": "forward", "_pwlu_backward_kernel": "backward"}
#: Kernels of the other ops' Triton backends: ``{kernel: (module, label)}``, recorded by
#: :func:`record_op_launches` through the module's entry in :data:`OP_LAUNCHES`.
OP_KERNELS = {
    "_pwlu2d_forward_kernel": ("pwlu.ops.pwlu2d_triton_backend", "pwlu2d forward"),
    "_pwlu2d_backward_kernel": ("pwlu.ops.pwlu2d_triton_backend", "pwlu2d backward"),
    # N-PWLU (SPEC section 9): the forward kernel serves training and eval (folded tables)
    "_npwlu_forward_kernel": ("pwlu.ops.npwlu_triton_backend", "npwlu forward"),
    "_npwlu_backward_kernel": ("pwlu.ops.npwlu_triton_backend", "npwlu backward"),
}
#: The label of every kernel in the tables.
LABELS = {**KERNELS, **{name: label for name, (_, label) in OP_KERNELS.items()}}

# Streaming-multiprocessor limits shared by sm_80 and sm_90, for the occupancy column
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM, REG_GRANULE = 65536, 64, 32, 256


@dataclass(frozen=True)
class Job:
    """One compilation: a recorded launch as Triton's binder specialized it, for one arch."""

    kernel: str
    arch: int
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, ((attr, value), ...)), ...)
    options: tuple  # ((name, value), ...): the launch's compile options (num_warps, ...)


@dataclass
class Row:
    kernel: str
    arch: int
    dtype: str
    layout: str
    shape: str
    n: int
    block: str
    job: Job


def _freeze(x):
    if isinstance(x, dict):
        return tuple((k, _freeze(v)) for k, v in x.items())
    if isinstance(x, list | tuple):
        return tuple(_freeze(v) for v in x)
    return x


def record_launches(cases, dtypes, ns, archs) -> list[Row]:
    """Run the launchers on CPU tensors with the kernels replaced by recorders; turn each launch
    into a compile job through Triton's JIT binder for each target."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from pwlu.ops import triton_backend as tb

    if tb._INTERPRETED:
        raise SystemExit("triton was imported with TRITON_INTERPRET=1: run this script in its own process")
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    kernels = {name: getattr(tb, name) for name in KERNELS}
    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    binders = {
        (name, arch): create_function_from_signature(fn.signature, fn.params, backends[arch])
        for name, fn in kernels.items()
        for arch in archs
    }
    rows = []
    try:
        for name, fn in kernels.items():
            setattr(tb, name, Recorder(fn))
        for layout, shape, channel_dim, channels_last, *offset in cases:
            offset = bool(offset and offset[0])
            for dtype_name in dtypes:
                for n in ns:
                    dtype = getattr(torch, dtype_name)
                    if offset:
                        x = torch.empty(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)
                    else:
                        x = torch.empty(shape, dtype=dtype)
                    if channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    c = 1 if channel_dim is None else shape[channel_dim]
                    slopes, intercepts = torch.empty(c, n + 2), torch.empty(c, n + 2)
                    left, right, inv_d, shift = (torch.empty(c) for _ in range(4))
                    launches.clear()
                    tb.forward(x, slopes, intercepts, left, right, inv_d, channel_dim, shift)
                    tb.backward(torch.empty_like(x), x, slopes, left, right, inv_d, channel_dim)
                    names = [fn.__name__ for fn, _, _ in launches]
                    # one forward launch, one backward launch per pass over the regions
                    assert names[0] == "_pwlu_forward_kernel" and len(names) >= 2, names
                    assert set(names[1:]) == {"_pwlu_backward_kernel"}, names
                    for fn, args, kwargs in launches:
                        kwargs = {**kwargs, "debug": bool(fn.debug)}
                        block = f"{kwargs['BLOCK_O']}x{kwargs['BLOCK_K']}"
                        if "SLOTS" in kwargs:  # backward: threads with a histogram, regions histogrammed
                            block += f", {kwargs['SLOTS']} slots, regions {kwargs['REGION_LO']}-{kwargs['REGION_HI']}"
                        for arch in archs:
                            bound, spec, opts = binders[fn.__name__, arch](*args, **kwargs)
                            options, signature, constexprs, attrs = fn._pack_args(
                                backends[arch], kwargs, bound, spec, opts
                            )
                            launch_options = {k: v for k, v in kwargs.items() if k in options.__dict__}
                            job = Job(
                                fn.__name__,
                                arch,
                                _freeze(signature),
                                _freeze(constexprs),
                                _freeze(attrs),
                                _freeze(launch_options),
                            )
                            label = "x".join(map(str, shape)) + (" +1 (unaligned)" if offset else "")
                            rows.append(Row(fn.__name__, arch, dtype_name, layout, label, n, block, job))
    finally:
        for name, fn in kernels.items():
            setattr(tb, name, fn)
    return rows


def _launch_pwlu2d(module, x, channel_dim, n) -> None:
    """One forward and one backward launch of the 2-D PWLU kernels on input ``x``."""
    import torch

    c = 1 if channel_dim is None else x.shape[channel_dim]
    values, geometry = torch.empty(c, n + 1, n + 1), torch.empty(c, 10)
    module.forward(x, x, values, geometry, channel_dim)
    module.backward(torch.empty_like(x), x, x, values, geometry, channel_dim)


def _launch_npwlu(module, x, channel_dim, n) -> None:
    """One forward launch and the backward's launches (one per pass over the regions) of the
    N-PWLU kernels on input ``x``, with float32 tables as :func:`pwlu.ops.npwlu_folding.npwlu_fold_tables`
    shapes them."""
    import torch

    c = 1 if channel_dim is None else x.shape[channel_dim]
    slopes, intercepts, breakpoints = torch.empty(c, n + 2), torch.empty(c, n + 2), torch.empty(c, n + 1)
    inv_widths, shift = torch.empty(c, n), torch.empty(c)
    module.forward(x, slopes, intercepts, breakpoints, shift, channel_dim)
    module.backward(torch.empty_like(x), x, slopes, breakpoints, inv_widths, channel_dim)


def _block_label(kwargs: dict) -> str:
    """The "block" column of a launch: tile, threads with a histogram, regions histogrammed."""
    if "BLOCK_O" in kwargs:  # PWLU-style (outer, channel/inner) tiles
        label = f"{kwargs['BLOCK_O']}x{kwargs['BLOCK_K']}"
    else:
        label = str(kwargs.get("BLOCK", "-"))
    if "SLOTS" in kwargs:
        label += f", {kwargs['SLOTS']} slots"
    if "REGION_LO" in kwargs:
        label += f", regions {kwargs['REGION_LO']}-{kwargs['REGION_HI']}"
    return label


#: ``{module: launch(module, x, channel_dim (non-negative or None), n)}`` for :func:`record_op_launches`.
OP_LAUNCHES = {"pwlu.ops.pwlu2d_triton_backend": _launch_pwlu2d, "pwlu.ops.npwlu_triton_backend": _launch_npwlu}
#: N values compiled for a module on top of ``--n``: PWLU2D's default N = 8 (``(N + 1)^2`` values per channel).
OP_EXTRA_NS = {"pwlu.ops.pwlu2d_triton_backend": (8,)}


def record_op_launches(cases, dtypes, ns, archs) -> list[Row]:
    """:func:`record_launches` for the kernels of :data:`OP_KERNELS`: each module's launchers,
    driven by its :data:`OP_LAUNCHES` entry, with its kernels replaced by recorders."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    rows = []
    for module_name, launch in OP_LAUNCHES.items():
        module = importlib.import_module(module_name)
        kernels = {name: getattr(module, name) for name, (m, _) in OP_KERNELS.items() if m == module_name}
        binders = {
            (name, arch): create_function_from_signature(fn.signature, fn.params, backends[arch])
            for name, fn in kernels.items()
            for arch in archs
        }
        try:
            for name, fn in kernels.items():
                setattr(module, name, Recorder(fn))
            for layout, shape, channel_dim, channels_last, *offset in cases:
                offset = bool(offset and offset[0])
                module_ns = sorted({*ns, *OP_EXTRA_NS.get(module_name, ())})
                for dtype_name, n in ((d, n) for d in dtypes for n in module_ns):
                    dtype = getattr(torch, dtype_name)
                    if offset:
                        x = torch.empty(math.prod(shape) + 1, dtype=dtype)[1:].view(shape)
                    else:
                        x = torch.empty(shape, dtype=dtype)
                    if channels_last:
                        x = x.to(memory_format=torch.channels_last)
                    launches.clear()
                    launch(module, x, None if channel_dim is None else channel_dim % x.dim(), n)
                    assert {fn.__name__ for fn, _, _ in launches} == set(kernels), launches
                    for fn, args, kwargs in launches:
                        kwargs = {**kwargs, "debug": bool(fn.debug)}
                        block = _block_label(kwargs)
                        for arch in archs:
                            bound, spec, opts = binders[fn.__name__, arch](*args, **kwargs)
                            options, signature, constexprs, attrs = fn._pack_args(
                                backends[arch], kwargs, bound, spec, opts
                            )
                            launch_options = {k: v for k, v in kwargs.items() if k in options.__dict__}
                            job = Job(
                                fn.__name__,
                                arch,
                                _freeze(signature),
                                _freeze(constexprs),
                                _freeze(attrs),
                                _freeze(launch_options),
                            )
                            label = "x".join(map(str, shape)) + (" +1 (unaligned)" if offset else "")
                            rows.append(Row(fn.__name__, arch, dtype_name, layout, label, n, block, job))
        finally:
            for name, fn in kernels.items():
                setattr(module, name, fn)
    return rows


def _parse_ptxas(log: str, kernel: str) -> dict:
    """Registers, spills and stack from the ``ptxas -v`` log of one kernel."""
    out = {"log": log}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    return out


def _compile(job: Job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pwlu.ops import triton_backend as tb

    fn = getattr(importlib.import_module(OP_KERNELS[job.kernel][0]) if job.kernel in OP_KERNELS else tb, job.kernel)
    attrs = {path: [list(a) for a in values] for path, values in job.attrs}
    return triton.compile(
        ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs),
        target=GPUTarget("cuda", job.arch, 32),
        options=dict(job.options),
    )


def compile_job(job: Job) -> dict:
    """Compile one job (in a worker process) and read ptxas's report of it."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            kernel = _compile(job)
    except Exception as e:  # a compile error is a result: reported and failed on
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    res = _parse_ptxas(buf.getvalue(), job.kernel)
    if "registers" not in res:  # served from a cache: no ptxas run to report
        return {"error": "no ptxas log (kernel cache hit?)"}
    res.pop("log")
    res.update(
        shared=kernel.metadata.shared,
        num_warps=kernel.metadata.num_warps,
        seconds=time.perf_counter() - t0,
    )
    return res


def sass_counts(job: Job) -> dict:
    """Instructions per element from the SASS (``cuobjdump -sass``, bundled with Triton): the
    forward's whole kernel (straight-line code) or the backward's tile loop (its widest
    backward branch), over the elements a thread handles per pass through it."""
    import subprocess

    from triton.backends.nvidia import compiler as nvc

    kernel = _compile(job)
    cuobjdump = Path(nvc.get_ptxas(job.arch).path).with_name("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)\S*\s*(.*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    constexprs = {path[0]: v for path, v in job.constexprs}
    names = dict(job.signature)
    values = dict(zip(names, [constexprs.get(i) for i in range(len(names))]))
    per_thread = values["BLOCK_O"] * values["BLOCK_K"] // (32 * kernel.metadata.num_warps)
    if job.kernel == "_pwlu_backward_kernel":
        loops = [
            (int(m.group(1), 16), addr)
            for addr, op, rest in ins
            if op == "BRA" and (m := re.match(r"0x([0-9a-f]+)", rest)) and int(m.group(1), 16) < addr
        ]
        lo, hi = max(loops, key=lambda loop: loop[1] - loop[0])
        body = [op for addr, op, _ in ins if lo <= addr <= hi and op != "NOP"]
    else:
        body = [op for _, op, _ in ins if op not in ("NOP", "EXIT", "BRA")]
    return {
        "instructions": len(body),
        "per_thread": per_thread,
        "barriers": body.count("BAR"),
        "shuffles": body.count("SHFL"),
        "regions": f"{values['REGION_LO']}-{values['REGION_HI']}" if "REGION_LO" in values else "-",
    }


SASS_CASES = [c for c in CASES if c[1] == (16, 64, 32, 32) and c[0] in ("NCHW", "channels-last")]


def sass_markdown(rows: list[Row], counts: dict) -> str:
    lines = [
        "",
        "## Instructions per element (sm_90a SASS, `--sass`)",
        "",
        "What `benchmarks/results/triton_cost_model.md` turns into time: instructions a thread "
        "executes per element, counted in the disassembly (the forward: its whole straight-line "
        "kernel; the backward: one pass through its tile loop, setup and final reduction left out). "
        "`BAR`/`SHFL`: barriers and warp shuffles inside that code.",
        "",
        "| kernel | dtype | layout | shape | N | regions | instructions | elements/thread | per element | BAR | SHFL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = counts[row.job]
        lines.append(
            f"| {KERNELS[row.kernel]} | {row.dtype} | {row.layout} | {row.shape} | {row.n} | {c['regions']} | "
            f"{c['instructions']} | {c['per_thread']} | {c['instructions'] / c['per_thread']:.1f} | "
            f"{c['barriers']} | {c['shuffles']} |"
        )
    return "\n".join(lines) + "\n"


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> int:
    """Resident warps per SM that registers, shared memory and the CTA limit allow."""
    per_warp = -(-registers * 32 // REG_GRANULE) * REG_GRANULE
    ctas = min(REGS_PER_SM // (per_warp * num_warps), MAX_WARPS_PER_SM // num_warps, MAX_CTAS_PER_SM)
    smem_per_sm = {80: 164 * 1024, 90: 228 * 1024}[arch]
    if shared:
        ctas = min(ctas, smem_per_sm // (shared + 1024))  # 1 KiB reserved per CTA
    return ctas * num_warps


def versions() -> dict:
    import torch
    import triton
    from triton.backends.nvidia import compiler as nvc

    ptxas = {}
    for arch in ARCHS:
        text = nvc.get_ptxas_version(arch)
        m = re.search(r"release ([\d.]+), (V[\d.]+)", text if isinstance(text, str) else "")
        ptxas[arch] = " ".join(m.groups()) if m else str(text).strip().splitlines()[-1]
    return {"triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas}


def markdown(rows: list[Row], results: dict, meta: dict, ns, seconds: float) -> tuple[str, list[str]]:
    """The report and the list of failures (compile errors, spills at N <= SPILL_LIMIT_N)."""
    failures = []
    for row in rows:
        res = results[row.job]
        label = f"{LABELS[row.kernel]} sm_{row.arch} {row.dtype} {row.layout} {row.shape} N={row.n}"
        if "error" in res:
            failures.append(f"{label}: compile error: {res['error']}")
        elif row.n <= SPILL_LIMIT_N and (res["spill_stores"] or res["spill_loads"]):
            failures.append(f"{label}: spills {res['spill_stores']} B stores / {res['spill_loads']} B loads")
    ok = [r for r in rows if "error" not in results[r.job]]
    ptxas = ", ".join(f"sm_{a}: {v}" for a, v in meta["ptxas"].items())
    lines = [
        "# Triton kernels compiled ahead of time: registers, spills, shared memory",
        "",
        f"{meta['date']} UTC · triton {meta['triton']} · torch {meta['torch']} · ptxas {ptxas} · "
        f"written by `benchmarks/triton_resources.py` in {seconds:.0f} s "
        f"({len(results)} distinct compilations for {len(rows)} rows)",
        "",
        "Every launch the launchers make for the shapes below, compiled for sm_80 (A100) and sm_90a "
        "(H100/H200) with Triton's JIT specialization and `ptxas -v` as Triton runs it. "
        "`regs`: registers per thread; `spill`: bytes of spill stores / loads per thread; "
        "`stack`: stack frame bytes; `smem`: shared memory per program (bytes); `warps/SM`: resident "
        "warps per SM that registers and shared memory allow (of 64); `block`: BLOCK_O x BLOCK_K "
        "(rows of outer indices x inner indices or channels), for the backward also its SLOTS (threads "
        "that each keep a histogram in registers) and the regions the launch histograms (more than 64 "
        f"regions, N > 62: equal passes of at most 64). A spill at N <= {SPILL_LIMIT_N} fails "
        "the run (and `tests/test_triton_aot.py`).",
        "",
        "## Summary",
        "",
        f"- compiled: {len(ok)} of {len(rows)} rows; compile errors: {len(rows) - len(ok)}; "
        f"failures (errors or spills at N <= {SPILL_LIMIT_N}): {len(failures)}",
    ]
    for kernel in LABELS:
        for arch in ARCHS:
            sel = [r for r in ok if r.kernel == kernel and r.arch == arch]
            if not sel:
                continue
            top = max(sel, key=lambda r: results[r.job]["registers"])
            spills = sum(1 for r in sel if results[r.job]["spill_stores"] or results[r.job]["spill_loads"])
            res = results[top.job]
            lines.append(
                f"- {LABELS[kernel]} sm_{arch}: max {res['registers']} registers ({top.dtype} {top.layout} "
                f"{top.shape} N={top.n}, {res['num_warps']} warps, {occupancy(res['registers'], res['num_warps'], res['shared'], arch)} "
                f"warps/SM); rows with spills: {spills}"
            )
    lines += ["", *(f"- FAIL {f}" for f in failures)] if failures else []
    lines += [
        "",
        "## All configurations",
        "",
        "| kernel | arch | dtype | layout | shape | N | block | warps | regs | spill st/ld | stack | smem | warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        res = results[row.job]
        head = (
            f"| {LABELS[row.kernel]} | sm_{row.arch} | {row.dtype} | {row.layout} | "
            f"{row.shape} | {row.n} | {row.block} |"
        )
        if "error" in res:
            lines.append(f"{head} - | ERROR | - | - | - | - |")
            continue
        occ = occupancy(res["registers"], res["num_warps"], res["shared"], row.arch)
        lines.append(
            f"{head} {res['num_warps']} | {res['registers']} | {res['spill_stores']}/{res['spill_loads']} | "
            f"{res['stack']} | {res['shared']} | {occ} |"
        )
    lines.append("")
    return "\n".join(lines), failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_resources.md", help="markdown file to write")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--n", type=int, nargs="+", default=list(NUM_INTERVALS), help="N values (default 4 16 64)")
    parser.add_argument("--quiet", action="store_true", help="print the summary only, not the full table")
    parser.add_argument(
        "--sass",
        action="store_true",
        help="also count instructions per element in the sm_90 SASS (NCHW, channels-last)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), **versions()}
    rows = record_launches(CASES, DTYPES, args.n, ARCHS) + record_op_launches(CASES, DTYPES, args.n, ARCHS)
    jobs = list(dict.fromkeys(r.job for r in rows))
    # a fresh kernel cache: every job is compiled (and ptxas run) here, none served from ~/.triton
    with tempfile.TemporaryDirectory(prefix="pwlu-triton-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                results = dict(zip(jobs, pool.map(compile_job, jobs, chunksize=4)))
        else:
            results = {job: compile_job(job) for job in jobs}
        if args.sass:
            sass_rows = record_launches(SASS_CASES, ["float32", "bfloat16"], args.n, [90])
            counts = {job: sass_counts(job) for job in dict.fromkeys(r.job for r in sass_rows)}
    seconds = time.perf_counter() - t0
    text, failures = markdown(rows, results, meta, args.n, seconds)
    if args.sass:
        text += sass_markdown(sass_rows, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.quiet:
        print(text.split("## All configurations")[0].rstrip())
    else:
        print(text)
    print(f"wrote {args.out} ({len(jobs)} compilations, {len(rows)} rows) in {seconds:.1f} s")
    if failures:
        print(f"FAILED: {len(failures)} compile errors or spills at N <= {SPILL_LIMIT_N}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
