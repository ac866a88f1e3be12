"""PWLU against ReLU, SiLU, PReLU and the public peers, side by side in one run.

N-PWLU (learned interval widths, ``pwlu.NPWLU``) is timed with N = 4, 8 and 16 on every backend.

For each shape/layout, every competitor is timed in the same run, in interleaved
repetitions (one round times every competitor once, in rotating order; the reported time is
the median over rounds), so machine noise hits all competitors alike. Three measurements:

* ``fwd``: eval mode, ``torch.no_grad()`` (PWLU: the folded one-multiply-add forward);
* ``fwd+bwd``: training mode, forward then ``backward`` with a fixed upstream gradient;
* ``saved``: bytes autograd saves for the backward (``torch.autograd.graph.saved_tensors_hooks``);
* ``call fwd`` / ``call fwd+bwd``: the same two calls on the case's layout with one element per
  channel (µs): the per-call overhead (Python, dispatch, autograd, the native call), apart from
  the per-element cost.

Ratios are to ReLU. Prints a table, appends rows to ``benchmarks/results/activation.csv``
and writes the latest table to ``benchmarks/results/activation_latest.md``.

Peers (skipped with a note when not importable): torchpwl (``pip install torchpwl``),
DeepSplines (``pip install deepsplines``), rational-activations / PAU
(``pip install --no-deps rational-activations``).

Usage::

    python benchmarks/bench_activation.py            # full run (~5 min on 2 CPU cores)
    python benchmarks/bench_activation.py --quick    # small shapes, a few rounds
    python benchmarks/bench_activation.py --device cuda
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.ops import dispatch

RESULTS = Path(__file__).resolve().parent / "results"
NUM_INTERVALS = 16
#: N of the N-PWLU rows (learned widths, SPEC section 9): its claim is that N = 4 does as well as
#: a uniform PWLU with 16, so the rows to compare are ``npwlu4`` against ``pwlu`` (N = 16).
NPWLU_INTERVALS = (4, 8, 16)


@dataclass
class Case:
    name: str  # e.g. "NCHW (32, 64, 56, 56)"
    layout: str  # NCHW, channels_last, BTC
    shape: tuple[int, ...]
    channel_dim: int

    @property
    def channels(self) -> int:
        return self.shape[self.channel_dim]

    def make_input(self, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(self.shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        if self.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


@dataclass
class Competitor:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]  # x -> y
    module: nn.Module | None = None
    backend: str | None = None  # PWLU backend forced around the call
    peer: bool = False  # slow public implementations: fewer rounds


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: ``--cpu-isa``: the kernels' build targets (``native``: the package's own flags)
CPU_ISAS = ("native", "avx2", "portable")


def select_cpu_isa(isa: str) -> str:
    """Build (in a temporary cache) and load the CPU kernels for ``isa``; the vector path it runs."""
    from pwlu.ops.cpu import build as cpu_build

    if isa != "native":
        import tempfile

        os.environ["PWLU_CPU_BUILD_DIR"] = tempfile.mkdtemp(prefix=f"pwlu-bench-{isa}-")
        cpu_build._FLAG_SETS = (cpu_build.TARGET_FLAGS[isa],)
        cpu_build._reset_for_tests()
    lib = cpu_build.library()
    if lib is None:
        raise SystemExit(f"--cpu-isa {isa}: the CPU kernels could not be built")
    found = "avx512" if lib.pwlu_cpu_has_avx512() else "avx2" if lib.pwlu_cpu_has_avx2() else "scalar"
    if isa != "native" and found != {"avx2": "avx2", "portable": "scalar"}[isa]:
        raise SystemExit(f"--cpu-isa {isa}: the build runs the {found} path")
    return found


#: glibc settings that keep freed memory mapped in the process (no munmap, no trim), so that
#: each large output reuses pages the process already has: the page faults of fresh memory,
#: large and erratic on shared VMs, then leave every competitor's timing alike.
STEADY_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def steady_memory(enabled: bool) -> bool:
    """``--steady-memory``: rerun this script with :data:`STEADY_MEMORY_ENV` (glibc reads it at
    start-up, so the process is replaced); returns whether the settings are in effect."""
    if not enabled:
        return False
    if all(os.environ.get(k) == v for k, v in STEADY_MEMORY_ENV.items()):
        return True
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **STEADY_MEMORY_ENV})  # with -u, -X, ...
    raise AssertionError("unreachable")  # execve does not return


def append_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV file ``path`` (its header first when the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "-"


def channels_first(fn: Callable[[torch.Tensor], torch.Tensor], channel_dim: int):
    """Adapt a peer that expects channels on axis 1: (..., C) inputs go through a (M, C) view."""
    if channel_dim == 1:
        return fn

    def adapted(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[channel_dim]
        return fn(x.reshape(-1, c)).reshape(x.shape)

    return adapted


def competitors(case: Case, device: str, backends: list[str], peers: bool) -> list[Competitor]:
    c, cd = case.channels, case.channel_dim
    out = [Competitor("ReLU", torch.relu), Competitor("SiLU", F.silu)]
    prelu = nn.PReLU(c if cd == 1 else 1).to(device)
    out.append(Competitor("PReLU", prelu, prelu))
    for backend in backends:
        m = pwlu.PWLU(c, NUM_INTERVALS, channel_dim=cd).to(device)
        if hasattr(m, "set_collecting"):  # time phase II (learning), not phase I's statistics
            m.set_collecting(False)
        out.append(Competitor(f"pwlu[{backend}]", m, m, backend=backend))
    for backend in backends:
        for n in NPWLU_INTERVALS:
            m = pwlu.NPWLU(c, n, channel_dim=cd).to(device)
            m.set_collecting(False)
            out.append(Competitor(f"npwlu{n}[{backend}]", m, m, backend=backend))
    ref = pwlu.PWLU(c, NUM_INTERVALS, channel_dim=cd).to(device)
    out.append(
        Competitor(
            "pwlu_reference",
            lambda x, m=ref: pwlu.pwlu_reference(
                x, m.points, m.left_bound, m.right_bound, m.left_slope, m.right_slope, m.channel_dim
            ),
            ref,
        )
    )
    if not peers:
        return out
    try:
        import torchpwl

        m = torchpwl.PWL(num_channels=c, num_breakpoints=NUM_INTERVALS).to(device)
        out.append(Competitor("torchpwl", channels_first(m, cd), m, peer=True))
    except Exception as e:  # noqa: BLE001 - any import/constructor failure: skip the peer
        print(f"note: torchpwl skipped ({type(e).__name__}: {e}); pip install torchpwl")
    try:
        from deepsplines.ds_modules.deepBspline import DeepBSpline

        mode = "conv" if cd == 1 and len(case.shape) == 4 else "fc"
        m = DeepBSpline(mode, c, size=NUM_INTERVALS + 1, range_=3.0).to(device)
        # its backward needs .view(-1): channels-last inputs are made contiguous first
        fn = (
            (lambda x, m=m: m(x.contiguous()))
            if mode == "conv"
            else (lambda x, m=m, c=c: m(x.reshape(-1, c)).reshape(x.shape))
        )
        if mode == "fc" and cd == 1:
            fn = lambda x, m=m, c=c: (
                m(x.movedim(1, -1).reshape(-1, c))
                .reshape(  # noqa: E731
                    x.movedim(1, -1).shape
                )
                .movedim(-1, 1)
            )
        out.append(Competitor("DeepSplines", fn, m, peer=True))
    except Exception as e:  # noqa: BLE001
        print(f"note: DeepSplines skipped ({type(e).__name__}: {e}); pip install deepsplines")
    try:
        from rational.torch import Rational

        m = Rational("leaky_relu", cuda=device.startswith("cuda")).to(device)
        # its torch path needs x.view(-1): channels-last inputs are made contiguous first
        out.append(Competitor("PAU (rational)", lambda x, m=m: m(x.contiguous()), m, peer=True))
    except Exception as e:  # noqa: BLE001
        print(f"note: PAU skipped ({type(e).__name__}: {e}); pip install --no-deps rational-activations")
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call(comp: Competitor, x: torch.Tensor) -> torch.Tensor:
    if comp.backend is None:
        return comp.fn(x)
    with pwlu.use_backend(comp.backend):
        return comp.fn(x)


def forward_eval(comp: Competitor, x: torch.Tensor, g: torch.Tensor) -> None:
    if comp.module is not None:
        comp.module.eval()
    with torch.no_grad():
        call(comp, x)


def forward_backward(comp: Competitor, x: torch.Tensor, g: torch.Tensor) -> None:
    if comp.module is not None:
        comp.module.train()
    xg = x.detach().requires_grad_(True)
    y = call(comp, xg)
    if comp.backend is None:
        y.backward(g)
    else:
        with pwlu.use_backend(comp.backend):
            y.backward(g)


def saved_bytes(comp: Competitor, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward (each storage counted once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    if comp.module is not None:
        comp.module.train()
    xg = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = call(comp, xg)
    del y
    return sum(seen.values())


def tiny_input(case: Case, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x and g of the case's layout with one element per channel (every other axis of size 1): timing
    a call on it measures the per-call overhead (Python, dispatch, autograd, the native call)."""
    cd = case.channel_dim % len(case.shape)
    shape = tuple(s if d == cd else 1 for d, s in enumerate(case.shape))
    x = Case(case.name, case.layout, shape, case.channel_dim).make_input(device, dtype)
    return x, torch.randn_like(x)


def time_once(fn, comp, x, g, device, inner: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn(comp, x, g)
    sync(device)
    return (time.perf_counter() - start) / inner


def measure(comps, x, g, device, fn, rounds: int, peer_rounds: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call; rounds interleave all competitors (rotating order)."""
    inner: dict[str, int] = {}
    for comp in comps:  # warm-up, and pick an inner count so one timing lasts ~budget_s
        fn(comp, x, g)
        t = time_once(fn, comp, x, g, device, 1)
        inner[comp.name] = 1 if comp.peer else max(1, min(50, int(budget_s / max(t, 1e-6))))
    times: dict[str, list[float]] = {c.name: [] for c in comps}
    for r in range(rounds):
        order = comps[r % len(comps) :] + comps[: r % len(comps)]
        for comp in order:
            if comp.peer and r >= peer_rounds:
                continue
            times[comp.name].append(time_once(fn, comp, x, g, device, inner[comp.name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--no-peers", action="store_true", help="skip torchpwl, DeepSplines and PAU")
    parser.add_argument("--no-save", action="store_true", help="print only; write no result files")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument("--case", default=None, help="run only the cases whose name contains this text, e.g. NCHW")
    parser.add_argument(
        "--cpu-isa", default="native", choices=CPU_ISAS,
        help="build the CPU kernels for this target (avx2: what CPUs without AVX-512 run; portable: the scalar "
        "loop), in a temporary cache; the tables go to activation_latest_<isa>.md",
    )  # fmt: skip
    parser.add_argument(
        "--steady-memory", action="store_true",
        help="rerun with glibc keeping freed memory mapped (no page faults of fresh outputs in the timings)",
    )  # fmt: skip
    args = parser.parse_args()
    steady = steady_memory(args.steady_memory)
    kernels = select_cpu_isa(args.cpu_isa) if args.device == "cpu" else "-"
    if steady:
        kernels += " (steady memory)"
    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    rounds = args.rounds or (3 if args.quick else 7)
    peer_rounds = min(rounds, 3)
    if args.quick:
        cases = [
            Case("NCHW (4, 16, 32, 32)", "NCHW", (4, 16, 32, 32), 1),
            Case("channels_last (4, 16, 32, 32)", "channels_last", (4, 16, 32, 32), 1),
            Case("BTC (4, 64, 128)", "BTC", (4, 64, 128), -1),
        ]
    else:
        cases = [
            Case("NCHW (32, 64, 56, 56)", "NCHW", (32, 64, 56, 56), 1),
            Case("NCHW (16, 64, 32, 32)", "NCHW", (16, 64, 32, 32), 1),
            Case("channels_last (16, 64, 32, 32)", "channels_last", (16, 64, 32, 32), 1),
            Case("BTC (16, 256, 256)", "BTC", (16, 256, 256), -1),
            # channels fastest at a size that leaves the cache (ReLU memory-bound, as NCHW (32, 64, 56, 56))
            Case("channels_last (32, 64, 56, 56)", "channels_last", (32, 64, 56, 56), 1),
            Case("BTC (32, 1024, 256)", "BTC", (32, 1024, 256), -1),
        ]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        cases = [c for c in cases if args.case in c.name]
    dev = torch.device(device)
    backends = [b for b in ("torch", "cpu", "triton") if dispatch.is_available(b, dev)]
    threads = torch.get_num_threads()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_name(device) + (f" · {kernels} kernels" if device == "cpu" else ""),
        "threads": threads if device == "cpu" else "-",
        "torch": torch.__version__,
        "triton": triton_version(),
    }
    print(f"{meta['device']} | threads {threads} | torch {meta['torch']} | triton {meta['triton']} | {args.dtype}")
    print(f"PWLU backends: {backends}; N = {NUM_INTERVALS}; {rounds} interleaved rounds (peers {peer_rounds})")
    rows = []
    for case in cases:
        torch.manual_seed(0)
        x = case.make_input(device, dtype)
        g = torch.randn_like(x)
        comps = competitors(case, device, backends, peers=not args.no_peers)
        if dtype != torch.float32:  # low precision: our modules follow the input dtype
            for comp in comps:
                if comp.module is not None and not comp.peer:
                    comp.module.to(dtype=dtype)
        budget = 0.02 if args.quick else 0.05
        fwd = measure(comps, x, g, device, forward_eval, rounds, peer_rounds, budget)
        fwd_bwd = measure(comps, x, g, device, forward_backward, rounds, peer_rounds, budget)
        saved = {c.name: saved_bytes(c, x) for c in comps}
        # the per-call cost apart from the elements: the same call path on one element per channel
        xt, gt = tiny_input(case, device, dtype)
        call_f = measure(comps, xt, gt, device, forward_eval, rounds, peer_rounds, budget)
        call_fb = measure(comps, xt, gt, device, forward_backward, rounds, peer_rounds, budget)
        print(f"\n{case.name} {args.dtype}; call us: the same call on {tuple(xt.shape)} (per-call overhead)")
        print(
            f"{'op':<16}{'fwd ms':>10}{'fwd/ReLU':>10}{'f+b ms':>10}{'f+b/ReLU':>10}{'saved MB':>10}{'saved/ReLU':>11}"
            f"{'call fwd us':>12}{'call f+b us':>12}"
        )
        for comp in comps:
            n = comp.name
            r_f, r_fb = fwd[n] / fwd["ReLU"], fwd_bwd[n] / fwd_bwd["ReLU"]
            r_s = saved[n] / saved["ReLU"] if saved["ReLU"] else float("nan")
            print(
                f"{n:<16}{fwd[n] * 1e3:>10.3f}{r_f:>10.2f}{fwd_bwd[n] * 1e3:>10.3f}{r_fb:>10.2f}"
                f"{saved[n] / 2**20:>10.2f}{r_s:>11.2f}{call_f[n] * 1e6:>12.1f}{call_fb[n] * 1e6:>12.1f}"
            )
            common = {**meta, "shape": "x".join(map(str, case.shape)), "layout": case.layout, "dtype": args.dtype}
            rows.append({**common, "op": n, "measure": "fwd", "ratio": r_f, "value": fwd[n] * 1e3, "unit": "ms"})
            rows.append(
                {**common, "op": n, "measure": "fwd+bwd", "ratio": r_fb, "value": fwd_bwd[n] * 1e3, "unit": "ms"}
            )
            rows.append({**common, "op": n, "measure": "saved", "ratio": r_s, "value": saved[n], "unit": "bytes"})
            for measure_name, call in (("call fwd", call_f), ("call fwd+bwd", call_fb)):
                r_c = call[n] / call["ReLU"]
                rows.append(
                    {**common, "op": n, "measure": measure_name, "ratio": r_c, "value": call[n] * 1e6, "unit": "us"}
                )
    if args.no_save:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields = ["date", "device", "threads", "torch", "triton", "shape", "layout", "dtype", "op", "measure", "ratio"]
    fields += ["value", "unit"]
    csv_path = RESULTS / "activation.csv"
    append_csv(csv_path, fields, [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    latest = RESULTS / ("activation_latest.md" if args.cpu_isa == "native" else f"activation_latest_{args.cpu_isa}.md")
    write_markdown(rows, meta, latest, args.quick)
    print(f"\nappended {len(rows)} rows to {csv_path}; table in {latest}")


def write_markdown(rows: list[dict], meta: dict, path: Path, quick: bool) -> None:
    lines = [
        "# Activation benchmark (latest run)",
        "",
        f"{meta['date']} UTC · {meta['device']} · threads {meta['threads']} · torch {meta['torch']} · "
        f"triton {meta['triton']}{' · --quick' if quick else ''}",
        "",
        "Ratios to ReLU in the same run (median of interleaved rounds); `fwd` is eval mode under no_grad,",
        "`fwd+bwd` is training mode, `saved` is what autograd keeps for the backward. N = 16, channel-wise;",
        "`npwluN` is N-PWLU (learned widths) with N intervals.",
        "`call` columns: the same call with one element per channel (the per-call overhead), in µs.",
        "Generated by `benchmarks/bench_activation.py`; all rows are in `activation.csv`.",
        "",
    ]
    cases = list(dict.fromkeys((r["layout"], r["shape"], r["dtype"]) for r in rows))
    for layout, shape, dtype in cases:
        sub = [r for r in rows if (r["layout"], r["shape"], r["dtype"]) == (layout, shape, dtype)]
        lines += [f"## {layout} {shape.replace('x', '×')} {dtype}", ""]
        lines += [
            "| op | fwd ms | fwd / ReLU | fwd+bwd ms | fwd+bwd / ReLU | saved / ReLU | call fwd µs | call fwd+bwd µs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for op in dict.fromkeys(r["op"] for r in sub):
            get = {r["measure"]: r for r in sub if r["op"] == op}
            lines.append(
                f"| {op} | {get['fwd']['value']:.3f} | {get['fwd']['ratio']:.2f} | {get['fwd+bwd']['value']:.3f} | "
                f"{get['fwd+bwd']['ratio']:.2f} | {get['saved']['ratio']:.2f} | {get['call fwd']['value']:.1f} | "
                f"{get['call fwd+bwd']['value']:.1f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
