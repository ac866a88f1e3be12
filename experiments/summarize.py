"""Summarise the CPU-scale reproduction in ``experiments/`` into ``experiments/RESULTS.md``.

Reads every finished run under ``experiments/compare/runs`` and ``experiments/ablate/runs``
(their ``metrics.json``) and, for the ablation checkpoints, measures the boundary IOU of
SPEC section 6 (``pwlu.boundary_iou``: 0.1%/99.9% input quantiles per channel over 2048 test
images). Differences to the baseline are paired by seed (same data order, augmentation and
initial weights apart from the activation), reported as mean ± std over the seeds.

Usage (from the repository root, after ``experiments/run_all.sh``)::

    .venv/bin/python experiments/summarize.py
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent
ACTIVATIONS = ["relu", "swish", "gelu", "prelu", "apl", "pau", "frelu", "pwlu"]
MODELS = ["cnn", "resnet", "mobilenet_v3", "vit"]
VARIANTS = ["fix-init-3", "fix-init-6", "fix-init-10", "stat-realign (channel)", "stat-realign (layer)",
            "N=4", "N=8", "N=12", "N=16", "N=20"]  # fmt: skip


def _load(run: pathlib.Path) -> dict | None:
    path = run / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("finished") else None


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _signed(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f}"


def _acc(metrics: dict) -> float:
    return 100 * metrics["final_test_acc"]


def _epoch_seconds(metrics: dict) -> float:
    return statistics.median(h["seconds"] for h in metrics["history"])


def _seeds(runs: pathlib.Path, stem: str, reference: str) -> tuple[dict[int, dict], list[float], list[float]]:
    """Finished runs ``{seed: metrics}`` of ``runs/{stem}_s{seed}``, their top-1, and the
    top-1 differences to ``runs/{reference}_s{seed}`` for the seeds both finished."""
    found = {s: _load(runs / f"{stem}_s{s}") for s in range(3)}
    found = {s: m for s, m in found.items() if m is not None}
    ref = {s: _load(runs / f"{reference}_s{s}") for s in found}
    deltas = [_acc(m) - _acc(ref[s]) for s, m in found.items() if ref[s] is not None]
    return found, [_acc(m) for m in found.values()], deltas


def compare_table() -> list[str]:
    runs = ROOT / "compare" / "runs"
    lines = ["| model | activation | top-1 (%) | Δ vs ReLU (pp, paired) | seeds | s / epoch (1 thread) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model in MODELS:
        for act in ACTIVATIONS:
            found, accs, deltas = _seeds(runs, f"{model}_{act}", f"{model}_relu")
            if not found:
                continue
            secs = statistics.median(_epoch_seconds(m) for m in found.values())
            delta = "–" if act == "relu" else _signed(deltas)
            lines.append(f"| {model} | {act} | {_ms(accs)} | {delta} | {len(accs)} | {secs:.1f} |")
    return lines


def _boundary_iou(checkpoint: pathlib.Path, data_cache: dict) -> torch.Tensor:
    """Per-channel boundary IOUs of every PWLU of a checkpoint over 2048 test images."""
    from pwlu import boundary_iou
    from pwlu.app.config import TrainConfig
    from pwlu.app.train import load_trained, prepare_data

    if "data" not in data_cache:  # every ablation run uses the same data
        config = json.loads((checkpoint.parent / "metrics.json").read_text())["config"]
        data_cache["data"] = prepare_data(TrainConfig(**config))
    model, _, batches = load_trained(checkpoint, data=data_cache["data"], test_batches=8)
    return torch.cat([v.reshape(-1) for v in boundary_iou(model, batches).values()])


def ablation_table() -> list[str]:
    from pwlu.app.cli import ablation_slug

    runs = ROOT / "ablate" / "runs"
    lines = ["| variant | top-1 (%) | Δ vs stat-realign (channel) (pp, paired) | seeds | boundary IOU, mean (median) over channels and seeds |",
             "|---|---|---|---|---|"]  # fmt: skip
    cache: dict = {}
    for name in VARIANTS:
        found, accs, deltas = _seeds(runs, ablation_slug(name), "stat-realign_channel")
        if not found:
            continue
        iou = "–"
        if not name.startswith("N="):
            values = torch.cat([_boundary_iou(runs / f"{ablation_slug(name)}_s{s}" / "checkpoint.pt", cache) for s in found])
            iou = f"{values.mean():.3f} ({values.median():.3f})"
        delta = "–" if name == "stat-realign (channel)" else _signed(deltas)
        lines.append(f"| {name} | {_ms(accs)} | {delta} | {len(accs)} | {iou} |")
    return lines


def main() -> int:
    torch.manual_seed(0)  # boundary_iou's reservoir sampling
    config = None
    for run in sorted((ROOT / "compare" / "runs").glob("*/metrics.json")):
        config = json.loads(run.read_text())["config"]
        break
    if config is None:
        print("no finished runs under experiments/compare/runs; run experiments/run_all.sh first", file=sys.stderr)
        return 2
    recipe = (
        f"Fashion-MNIST, {config['train_subset']} training images (a fixed random subset), "
        f"{config['test_subset'] or 10000} test images, {config['epochs']} epochs, batch {config['batch_size']}, "
        f"SGD momentum 0.9, one-cycle cosine (peak lr {config['lr']}), per-architecture weight decay "
        f"(none on PWLU parameters), random crop + flip; PWLU channel-wise, N = {config['intervals']}, "
        f"phase I = {config['warmup_epochs']} epoch(s). Seeds 0, 1, 2."
    )
    text = [
        "# CPU-scale reproduction: results",
        "",
        "Generated by `experiments/summarize.py` from the runs of `experiments/run_all.sh`.",
        "",
        f"Recipe: {recipe}",
        "",
        "Top-1 is the final-epoch test accuracy, mean ± std over seeds. Δ is paired by seed. Epoch times",
        "(median epoch of each run, median over seeds) come from a shared 2-core machine running two",
        "trainings at a time, paused now and then for benchmarks: indicative only.",
        "",
        "## Activation comparison (the paper's Table 2 at CPU scale)",
        "",
        *compare_table(),
        "",
        "## PWLU ablations on `cnn` (the paper's Tables 5 and 6, Figure 6)",
        "",
        *ablation_table(),
        "",
    ]
    (ROOT / "RESULTS.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
