"""N-PWLU's claim at CPU scale: PWLU with N = 4 and N = 16 against N-PWLU with N = 4.

Run from the repository root (after ``make install``)::

    OMP_NUM_THREADS=1 .venv/bin/python experiments/npwlu/run.py train      # the runs (finished ones are reused)
    OMP_NUM_THREADS=1 .venv/bin/python experiments/npwlu/run.py summarize  # RESULTS.md, widths.png

The recipe is the one of ``experiments/run_all.sh`` (Fashion-MNIST, 10000 training images, 10000
test images, 5 epochs, phase I = 0.5 epoch, channel-wise, seeds 0, 1, 2); every variant is trained
from the same seeds, so the differences are paired by seed. ``summarize`` adds the parameter
counts, the eval-mode forward time of each model (measured side by side in one process) and a
plot of the learned interval widths.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

from pwlu import PWLU
from pwlu.app.config import TrainConfig
from pwlu.app.train import build, prepare_data, train

HERE = pathlib.Path(__file__).resolve().parent
RUNS = HERE / "runs"
DATA_DIR = "/usr/share/datasets/fashion-mnist"
MODELS = ("cnn", "mobilenet_v3")
#: (label, activation, N); the first is the baseline of the paired differences
VARIANTS = (("PWLU N=4", "pwlu", 4), ("PWLU N=16", "pwlu", 16), ("N-PWLU N=4", "npwlu", 4))
SEEDS = (0, 1, 2)


def config(model: str, activation: str, n: int, seed: int) -> TrainConfig:
    return TrainConfig(
        model=model, activation=activation, intervals=n, seed=seed, dataset="fashion-mnist", data_dir=DATA_DIR,
        train_subset=10000, test_subset=10000, epochs=5, warmup_epochs=0.5, progress=False,
        out=str(RUNS / f"{model}_{activation}{n}_s{seed}"),
    )  # fmt: skip


def finished(cfg: TrainConfig) -> dict | None:
    path = pathlib.Path(cfg.out) / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("finished") else None


def cmd_train(_: argparse.Namespace) -> None:
    data = None
    for seed in SEEDS:  # seed-major: an interrupted sweep still has complete, paired seeds
        for model in MODELS:
            for label, activation, n in VARIANTS:
                cfg = config(model, activation, n, seed)
                if finished(cfg):
                    continue
                data = data if data is not None else prepare_data(cfg)
                t0 = time.perf_counter()
                result = train(cfg, data, overwrite=True)
                print(f"{model} {label} seed {seed}: {100 * result['final_test_acc']:.2f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


def _activation_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, PWLU) for p in m.parameters(recurse=False))


@torch.no_grad()
def _eval_times(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int = 15) -> dict[str, float]:
    """Median seconds of one eval forward on ``x``, the models interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)  # warm-up (plans, caches)
    for _ in range(repeats):
        for key, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _plot_widths(path: pathlib.Path) -> list[str]:
    """Learned widths of a few channels of the seed-0 N-PWLU runs: one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes = []
    fig, axes = plt.subplots(1, len(MODELS), figsize=(5.2 * len(MODELS), 3.4), squeeze=False)
    for ax, model in zip(axes.flat, MODELS, strict=False):
        cfg = config(model, "npwlu", 4, 0)
        ckpt = pathlib.Path(cfg.out) / "checkpoint.pt"
        if not ckpt.exists():
            ax.axis("off")
            continue
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
        layers = [k[: -len(".width_logits")] for k in state if k.endswith(".width_logits")]
        rows = []
        for layer in (layers[0], layers[len(layers) // 2], layers[-1]):
            theta = state[layer + ".width_logits"].double()
            omega = torch.softmax(theta, -1)
            spread = omega.max(-1).values - omega.min(-1).values
            for c in spread.argsort(descending=True)[:2].tolist():  # the two most non-uniform channels
                rows.append((f"{layer}[{c}]", omega[c]))
            notes.append(
                f"{model} {layer}: widths (fractions of B_R - B_L) span {omega.min().item():.3f}..{omega.max().item():.3f} "
                f"over its {theta.shape[0]} channels; max-min per channel: median {spread.median().item():.3f}, "
                f"max {spread.max().item():.3f}"
            )
        left = torch.zeros(len(rows), dtype=torch.float64)
        n = rows[0][1].numel()
        for j in range(n):
            widths = torch.stack([w[j] for _, w in rows])
            ax.barh(range(len(rows)), widths.numpy(), left=left.numpy(), edgecolor="white", label=f"interval {j}")
            left += widths
        ax.axvline(0.25, color="0.3", ls=":", lw=0.8)
        ax.axvline(0.5, color="0.3", ls=":", lw=0.8)
        ax.axvline(0.75, color="0.3", ls=":", lw=0.8)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of [B_L, B_R] (dotted: uniform)", fontsize=8)
        ax.set_title(f"{model}, N-PWLU N=4, seed 0", fontsize=9)
    axes.flat[0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.08), ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return notes


def cmd_summarize(_: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    acc: dict[tuple[str, str], dict[int, float]] = {}
    epoch_s: dict[tuple[str, str], list[float]] = {}
    for model in MODELS:
        for label, activation, n in VARIANTS:
            for seed in SEEDS:
                metrics = finished(config(model, activation, n, seed))
                if metrics is None:
                    continue
                acc.setdefault((model, label), {})[seed] = 100 * metrics["final_test_acc"]
                seconds = [h["seconds"] for h in metrics["history"]]
                epoch_s.setdefault((model, label), []).append(statistics.median(seconds))
    data = prepare_data(config(MODELS[0], "pwlu", 4, 0))
    x = (data.test_x[:256].float() - data.test_x.float().mean()) / data.test_x.float().std()
    lines = [
        "# N-PWLU (learned interval widths) against PWLU at CPU scale",
        "",
        "Generated by `experiments/npwlu/run.py summarize` from the runs of `experiments/npwlu/run.py train`.",
        "",
        "Recipe (as `experiments/run_all.sh`): Fashion-MNIST, 10000 training images (a fixed random subset), "
        "10000 test images, 5 epochs, batch 128, SGD momentum 0.9, one-cycle cosine (peak lr 0.1), "
        "per-architecture weight decay (none on the activation parameters), random crop + flip; "
        "channel-wise activations, realignment after a phase I of 0.5 epoch (for N-PWLU the Eq. 6 reset "
        "also sets the width logits back to 0). Seeds 0, 1, 2; every variant uses the same seeds, so "
        "Δ is paired by seed. Top-1 is the final-epoch test accuracy, mean ± std over seeds.",
        "",
        "Parameters: the whole model / the activations alone. Eval forward: median time of one "
        "eval-mode forward pass of a 256-image batch, one thread, all models of an architecture "
        "measured side by side in one process (interleaved, 15 rounds), on this shared 2-core machine "
        "(indicative). s / epoch: median training epoch, median over seeds (other jobs shared the machine).",
        "",
        "| model | activation | top-1 (%) | Δ vs PWLU N=4 (pp, paired) | Δ vs PWLU N=16 (pp, paired) | seeds | "
        "parameters (activations) | eval forward (ms / 256 images) | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        built = {}
        for label, activation, n in VARIANTS:
            torch.manual_seed(0)
            built[label] = build(config(model, activation, n, 0), data)
            ckpt = pathlib.Path(config(model, activation, n, 0).out) / "checkpoint.pt"
            if ckpt.exists():  # the trained weights (the eval path does not depend on them, but be honest)
                built[label].load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
        times = _eval_times(built, x)
        for label, _, _ in VARIANTS:
            mine = acc.get((model, label), {})
            cells = []
            for base in ("PWLU N=4", "PWLU N=16"):
                other = acc.get((model, base), {})
                common = sorted(set(mine) & set(other))
                cells.append("–" if base == label or not common else _mean_std([mine[s] - other[s] for s in common]))
            m = built[label]
            total = sum(p.numel() for p in m.parameters())
            speed = f"{1000 * times[label]:.1f}"
            lines.append(
                f"| {model} | {label} | {_mean_std(list(mine.values()))} | {cells[0]} | {cells[1]} | {len(mine)} | "
                f"{total} ({_activation_params(m)}) | {speed} | "
                f"{statistics.median(epoch_s[(model, label)]) if (model, label) in epoch_s else float('nan'):.1f} |"
            )
    notes = _plot_widths(HERE / "widths.png")
    lines += ["", "## Learned widths", "", "![learned widths](widths.png)", ""]
    lines += [f"- {note}" for note in notes]
    conclusion = HERE / "conclusion.md"  # written by hand from the numbers above
    if conclusion.exists():
        lines += ["", conclusion.read_text().strip()]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train").set_defaults(func=cmd_train)
    sub.add_parser("summarize").set_defaults(func=cmd_summarize)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
