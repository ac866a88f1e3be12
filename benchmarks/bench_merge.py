"""2-D PWLU merge (``pwlu.pwlu2d``) against ``torch.add`` and against PWLU on one input, side by side.

The issue's targets, at ``(32, 64, 56, 56)`` float32, ``N = 8``, channel-wise:

* eval forward (``torch.no_grad()``): ``pwlu2d(x, y)`` <= 1.5x ``torch.add(x, y)`` (both read two
  tensors and write one);
* forward+backward: ``pwlu2d`` <= 2.0x ``pwlu.pwlu`` on one input of the same size.

Every competitor is timed in the same run, in interleaved rounds (one round times each once,
in rotating order; the reported time is the median over rounds), so machine noise hits all
alike. Prints the times, the ratios and the parameter counts, appends rows with the device and
versions to ``benchmarks/results/merge.csv`` and writes the latest table to
``benchmarks/results/merge_latest.md``.

Usage::

    python benchmarks/bench_merge.py                 # the issue's shape (slow on 2 shared CPU cores)
    python benchmarks/bench_merge.py --quick         # (8, 64, 28, 28), for a smoke run
    python benchmarks/bench_merge.py --device cuda
    python benchmarks/bench_merge.py --steady-memory --rounds 201   # see below

On the shared 2-core VMs these benchmarks ran on, the page faults of each fresh 25.7 MB output
cost 0.3 to 6 ms, differently from run to run, and moved the ratios by up to 2x between runs
(fwd+bwd 1.57x to 2.58x for the same code). ``--steady-memory`` reruns the script with glibc
keeping freed memory mapped, so that outputs reuse pages. That removes the largest part of the
noise, not all of it: in two such runs in a row pwlu2d's times repeated within 1%, while
``torch.add``'s eval time moved from 2.0 to 1.3 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_activation import append_csv, device_name, steady_memory, triton_version  # this folder (run as a script)

import pwlu
from pwlu.ops.dispatch import PWLU2D_BACKENDS, PWLU_BACKENDS
from pwlu.ops.pwlu2d_reference import PWLU2D_PARAMETER_NAMES

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def merge_params(channels: int, n: int, device: str) -> list[torch.Tensor]:
    """Channel-wise 2-D PWLU parameters of ``x + y`` on [-3, 3]^2, requiring grad."""
    grid = torch.linspace(-3, 3, n + 1, device=device)
    values = (grid[:, None] + grid[None, :]).expand(channels, n + 1, n + 1).clone()
    others = [torch.full((channels,), v, device=device) for v in (-3.0, 3.0, -3.0, 3.0, 1.0, 1.0, 1.0, 1.0)]
    return [p.requires_grad_() for p in (values, *others)]


def pwlu_params(channels: int, n: int, device: str) -> list[torch.Tensor]:
    """Channel-wise PWLU parameters (ReLU on [-3, 3]), requiring grad."""
    grid = torch.linspace(-3, 3, n + 1, device=device)
    points = grid.clamp(min=0).expand(channels, n + 1).clone()
    others = [torch.full((channels,), v, device=device) for v in (-3.0, 3.0, 0.0, 1.0)]
    return [p.requires_grad_() for p in (points, *others)]


def time_rounds(fns: dict[str, Callable[[], object]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, in interleaved rotating rounds (one warm-up)."""
    names = list(fns)
    for name in names:
        fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of merge.csv and merge_latest.md")
    parser.add_argument(
        "--steady-memory", action="store_true",
        help="rerun with glibc keeping freed memory mapped (no page faults of fresh outputs in the timings)",
    )  # fmt: skip
    args = parser.parse_args()
    steady = steady_memory(args.steady_memory)
    device, n = args.device, args.n
    if n < 1:
        raise SystemExit(f"--n must be >= 1, but got {n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (8, 64, 28, 28) if args.quick else (32, 64, 56, 56)
    # one call per round and per competitor (2-25 ms each): many rounds, so that the median is stable
    rounds = args.rounds or (5 if args.quick else 41)
    channels = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 1.5).to(device)
    y = (torch.randn(shape, generator=gen) * 1.5).to(device)
    grad = torch.randn(shape, generator=gen).to(device)
    mp = merge_params(channels, n, device)
    pp = pwlu_params(channels, n, device)

    def leaves():
        """Fresh leaf inputs per call (as bench_activation.py): their gradients are stored, not
        added into earlier ones (a training loop's ``zero_grad(set_to_none=True)``), so the
        two-input merge does not pay two accumulations the one-input PWLU pays once."""
        return x.detach().requires_grad_(), y.detach().requires_grad_()

    def add_eval():
        with torch.no_grad():
            return torch.add(x, y)

    def merge_eval():  # the functional op on plain tensors: checked and folded on every call
        with torch.no_grad():
            return pwlu.pwlu2d(x, y, *mp)

    module = pwlu.PWLU2D(channels, num_intervals=n).to(device).eval()
    with torch.no_grad():
        for name, p in zip(PWLU2D_PARAMETER_NAMES, mp):
            getattr(module, name).copy_(p)

    def module_eval():  # a model's merge in eval: its parameters' inference plan, made once
        with torch.no_grad():
            return module(x, y)

    torch.testing.assert_close(module_eval(), merge_eval(), rtol=0, atol=0)  # the same computation

    def add_train():
        torch.add(*leaves()).backward(grad)

    def merge_train():
        pwlu.pwlu2d(*leaves(), *mp).backward(grad)

    def pwlu_train():
        pwlu.pwlu(leaves()[0], *pp).backward(grad)

    t = time_rounds(
        {
            "add eval": add_eval,
            "pwlu2d eval": merge_eval,
            "pwlu2d module eval": module_eval,
            "add fwd+bwd": add_train,
            "pwlu fwd+bwd": pwlu_train,
            "pwlu2d fwd+bwd": merge_train,
        },
        rounds,
        device,
    )
    merge_count = sum(p.numel() for p in mp)
    pwlu_count = sum(p.numel() for p in pp)
    dev = torch.device(device)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_name(device),
        "threads": torch.get_num_threads() if device == "cpu" else "-",
        "torch": torch.__version__,
        "triton": triton_version(),
        "shape": "x".join(map(str, shape)),
        "N": n,
        "backends": f"pwlu2d {PWLU2D_BACKENDS.select(dev).name}, pwlu {PWLU_BACKENDS.select(dev).name}"
        + (" (steady memory)" if steady else ""),
    }
    rows = [
        {
            "op": name,
            "measure": measure,
            "ms": t[name] * 1e3,
            "baseline": base,
            "ratio": t[name] / t[base] if base else None,
            "params": params,
        }  # fmt: skip
        for name, measure, base, params in (
            ("add eval", "eval fwd", None, 0),
            ("pwlu2d eval", "eval fwd", "add eval", merge_count),
            ("pwlu2d module eval", "eval fwd", "add eval", merge_count),
            ("add fwd+bwd", "fwd+bwd", None, 0),
            ("pwlu fwd+bwd", "fwd+bwd", None, pwlu_count),
            ("pwlu2d fwd+bwd", "fwd+bwd", "pwlu fwd+bwd", merge_count),
        )
    ]
    text = markdown(rows, meta, rounds, channels, args.quick)
    print(text)
    if args.no_write:
        return
    args.results.mkdir(parents=True, exist_ok=True)
    csv_path = args.results / "merge.csv"
    fields = ["date", "device", "threads", "torch", "triton", "shape", "N", "backends", "op", "measure", "ms",
              "baseline", "ratio", "params"]  # fmt: skip
    append_csv(
        csv_path,
        fields,
        [
            {
                **meta,
                **row,
                "ms": f"{row['ms']:.3f}",
                "baseline": row["baseline"] or "",
                "ratio": "" if row["ratio"] is None else f"{row['ratio']:.3f}",
            }
            for row in rows
        ],  # fmt: skip
    )
    (args.results / "merge_latest.md").write_text(text)
    print(f"appended {len(rows)} rows to {csv_path}; table in {args.results / 'merge_latest.md'}")


def markdown(rows: list[dict], meta: dict, rounds: int, channels: int, quick: bool) -> str:
    """The latest run as a markdown table, with the issue's targets."""
    lines = [
        "# 2-D PWLU merge benchmark (latest run)",
        "",
        f"{meta['date']} UTC · {meta['device']} · threads {meta['threads']} · torch {meta['torch']} · "
        f"triton {meta['triton']} · backends: {meta['backends']}",
        "",
        f"Input {meta['shape']} float32{' (--quick: not the issue shape)' if quick else ''}, N = {meta['N']}, "
        f"{channels} channels, channel-wise parameters; median of {rounds} interleaved rounds. `eval fwd` is under "
        "`torch.no_grad()` (each reads two tensors and writes one); `fwd+bwd` is one forward and one backward "
        "(`pwlu.pwlu` on one input of the same size as each of the merge's two), on fresh leaf inputs (their "
        "gradients stored, not accumulated). `pwlu2d eval` is the functional op on plain tensors, which checks "
        "and folds the parameters on every call; `pwlu2d module eval` is a `PWLU2D` module in eval mode, as in a "
        "model, whose nn.Parameters get an inference plan made once (checked byte for byte in C per call). "
        "Targets (issue 15): eval <= 1.5x torch.add (read on the module), pwlu2d fwd+bwd <= 2.0x pwlu. Generated "
        "by `benchmarks/bench_merge.py`; all rows are in `merge.csv`.",
        "",
        "| op | measure | ms | ratio | to | target | parameters |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    targets = {"pwlu2d module eval": "<= 1.5x", "pwlu2d fwd+bwd": "<= 2.0x"}
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"| {row['op']} | {row['measure']} | {row['ms']:.3f} | {ratio} | {row['baseline'] or ''} | "
            f"{targets.get(row['op'], '')} | {row['params']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
