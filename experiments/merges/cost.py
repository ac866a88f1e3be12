"""Training cost of issue 15's experiment, measured: ms per training step of each model x
activation x merge of ``experiments/merges/run.sh``, side by side in one process.

The runs' epoch times (``metrics.json``) came from trainings that shared two cores with other
jobs, at different times and code versions, so their ratios are no cost measurement. Here every
configuration is built as ``pwlu train`` builds it (:func:`pwlu.app.train.build`, the run's own
config), with its optimizer (SGD with momentum, the run's parameter groups) and its
:class:`~pwlu.BoundaryRealigner` past the warm-up (phase II: merges and PWLUs learning, as for
90% of the run), and timed on one training step at a time (forward, cross-entropy, backward,
optimizer and realigner step) on a fixed batch of the runs' shape (128 x 1 x 28 x 28). Rounds
are interleaved (one round times one step of every configuration, in rotating order) and the
median over rounds is reported, so that the machine's noise hits all alike; ratios are to
addition with the same model and activation. One thread, as the runs.

Writes ``experiments/merges/cost.json`` (with the device and versions), which
``summarize.py`` turns into RESULTS.md's cost table.

Usage (from the repository root)::

    .venv/bin/python experiments/merges/cost.py            # 60 rounds, ~2 minutes
    .venv/bin/python experiments/merges/cost.py --rounds 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent
MODELS = ["resnet", "mobilenet_v3"]
ACTIVATIONS = ["relu", "pwlu"]
MERGES = ["add", "pwlu2d"]
BATCH = 128


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _config(model: str, act: str, merge: str) -> dict:
    """The run's config as ``run.sh`` makes it (seed 0): the recipe's values, this configuration's choices."""
    from pwlu.app.config import TrainConfig

    cfg = TrainConfig(
        model=model, activation=act, merges=merge, dataset="fashion-mnist", train_subset=10000, epochs=5,
        warmup_epochs=0.5, progress=False, seed=0,
    )  # fmt: skip
    cfg.validate()
    return cfg


def _step_fn(model_name: str, act: str, merge: str, x: torch.Tensor, y: torch.Tensor):
    """A closure running one phase-II training step of the configuration."""
    from pwlu import BoundaryRealigner, parameter_groups
    from pwlu.app.data import TensorData
    from pwlu.app.models import WEIGHT_DECAY
    from pwlu.app.train import build

    cfg = _config(model_name, act, merge)
    torch.manual_seed(0)
    data = TensorData(x, y, x[:0], y[:0], 10, "fashion-mnist")
    model = build(cfg, data).train()
    optimizer = torch.optim.SGD(parameter_groups(model, WEIGHT_DECAY[cfg.model]), lr=0.01, momentum=0.9)
    realigner = BoundaryRealigner(model, warmup_steps=1) if cfg.uses_realignment else None

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if realigner is not None:
            realigner.step()

    for _ in range(3):  # past the warm-up (phase II) and warm
        step()
    if realigner is not None and realigner.in_warmup:
        raise RuntimeError(f"{model_name}/{act}/{merge}: the realigner is still in phase I")
    return step


def measure(rounds: int) -> dict:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    names = [(m, a, k) for m in MODELS for a in ACTIVATIONS for k in MERGES]
    steps = {n: _step_fn(*n, x, y) for n in names}
    times: dict[tuple, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            start = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - start)
    rows = []
    for m, a, k in names:
        ms = 1000 * statistics.median(times[(m, a, k)])
        base = 1000 * statistics.median(times[(m, a, "add")])
        rows.append({"model": m, "activation": a, "merge": k, "ms_per_step": round(ms, 2),
                     "ratio_to_add": round(ms / base, 3)})  # fmt: skip
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{_cpu_name()} ({torch.get_num_threads()} thread)",
        "torch": torch.__version__,
        "batch": BATCH,
        "rounds": rounds,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "cost.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, but got {args.rounds}")
    result = measure(args.rounds)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['model']:>13} {row['activation']:>5} {row['merge']:>7} {row['ms_per_step']:8.2f} ms/step "
              f"{row['ratio_to_add']:.2f}x add")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
