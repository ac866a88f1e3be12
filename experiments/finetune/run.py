"""Fine-tuning a trained GELU network as PWLU (issue 13, SPEC section 11): the experiment and its table.

For each seed s in {0, 1, 2}, on Fashion-MNIST with the recipe of ``experiments/run_all.sh``
(the app's ``cnn``, 10k training images, 10k test images):

1. ``base_gelu_s{s}``: ``pwlu train --activation gelu`` for 5 epochs (lr 0.1, one-cycle cosine);
2. three fine-tunings of that checkpoint, each for ``FT_EPOCHS`` epochs at peak lr ``FT_LR``
   (one-cycle cosine), same seed, hence the same data order and augmentation:

   * ``ft_gelu_s{s}``: the GELU network itself (the control);
   * ``ft_match_s{s}``: ``--init-from CHECKPOINT --init match --activation pwlu`` (N = 16,
     channel-wise, each PWLU fitted to the GELU it replaces; no phase I);
   * ``ft_relu_s{s}``: ``--init-from CHECKPOINT --init relu --activation pwlu`` (the conversion
     before issue 13: PWLUs start as ReLU, phase I of 0.5 epoch, then realignment).

Finished runs are reused, so the script resumes. The summary (``--summarize`` only, or after the
runs) writes ``experiments/finetune/RESULTS.md``: the accuracy before fine-tuning (the checkpoint,
and the matched model evaluated before any step), after, and the paired differences to the GELU
control (mean ± std over seeds).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/finetune/run.py [--summarize]

About 20 minutes of wall time on one thread (11 minutes of training epochs; measured on a
2-core machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
RUNS = ROOT / "runs"
REPO = ROOT.parents[1]  # runs are started from the repository root, with relative paths
sys.path.insert(0, str(ROOT.parent))
from summarize import _load as _finished  # noqa: E402  (metrics.json of a finished run, else None)

SEEDS = (0, 1, 2)
COMMON = ["--model", "cnn", "--dataset", "fashion-mnist", "--train-subset", "10000", "--test-subset", "10000",
          "--no-progress"]  # fmt: skip
BASE = ["--activation", "gelu", "--epochs", "5", "--warmup-epochs", "0.5"]
FT_EPOCHS, FT_LR = 3, 0.01
ARMS = {
    "gelu": ["--activation", "gelu", "--warmup-epochs", "0"],
    "match": ["--activation", "pwlu", "--init", "match"],
    "relu": ["--activation", "pwlu", "--init", "relu", "--warmup-epochs", "0.5"],
}
READING = "## Reading"  # RESULTS.md from this heading on is written by hand and kept by a re-run
LABELS = {"gelu": "GELU (control)", "match": "PWLU, --init match", "relu": "PWLU, --init relu"}


def _train(out: pathlib.Path, args: list[str]) -> None:
    if _finished(out) is not None:
        print(f"reusing {out.relative_to(ROOT)}", flush=True)
        return
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    cmd = [sys.executable, "-m", "pwlu", "train", *COMMON, *args, "--out", str(out.relative_to(REPO)), *resume]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(
        cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )


def run_all() -> None:
    for seed in SEEDS:
        base = RUNS / f"base_gelu_s{seed}"
        _train(base, [*BASE, "--seed", str(seed)])
        for arm, extra in ARMS.items():
            _train(RUNS / f"ft_{arm}_s{seed}", [*extra, "--seed", str(seed), "--epochs", str(FT_EPOCHS),
                                                "--lr", str(FT_LR), "--init-from", str((base / "checkpoint.pt").relative_to(REPO))])  # fmt: skip


def before_finetuning(seed: int) -> dict[str, float]:
    """Test accuracy (%) of the GELU checkpoint and of its two conversions before any step, and the
    top-1 agreement (%) of the matched one with it, measured now from the checkpoint (it is not in
    the runs' metrics)."""
    import torch

    from pwlu.app.config import TrainConfig
    from pwlu.app.data import normalise
    from pwlu.app.train import model_from_checkpoint, prepare_data

    ckpt = str(RUNS / f"base_gelu_s{seed}" / "checkpoint.pt")
    cfg = TrainConfig(model="cnn", dataset="fashion-mnist", train_subset=10000, test_subset=10000, seed=seed,
                      init_from=ckpt, activation="pwlu")  # fmt: skip
    data = prepare_data(cfg)
    preds = {}
    for arm, overrides in {"gelu": {"activation": "gelu"}, "match": {"init": "match"}, "relu": {}}.items():
        model, (mean, std) = model_from_checkpoint(dataclasses.replace(cfg, **overrides), data)
        x = normalise(data.test_x, mean, std)
        with torch.no_grad():
            preds[arm] = torch.cat([model.eval()(x[i : i + 1000]) for i in range(0, len(x), 1000)]).argmax(1)
    out = {arm: 100 * (p == data.test_y).float().mean().item() for arm, p in preds.items()}
    out["agreement"] = 100 * (preds["match"] == preds["gelu"]).float().mean().item()
    return out


def _before_cached(seed: int) -> dict[str, float]:
    """:func:`before_finetuning`, kept in ``runs/before_s{seed}.json`` (committed: the checkpoints
    are not), so that the summary can be rebuilt from a checkout."""
    cache = RUNS / f"before_s{seed}.json"
    if (RUNS / f"base_gelu_s{seed}" / "checkpoint.pt").exists():
        values = before_finetuning(seed)
        cache.write_text(json.dumps(values, indent=1) + "\n")
        return values
    if cache.exists():
        return json.loads(cache.read_text())
    raise SystemExit(f"neither {cache} nor the checkpoint of base_gelu_s{seed}: re-run its base training")


def _ms(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f}" if signed else f"{statistics.mean(values):.2f} ± {sd:.2f}"


def summarize() -> str:
    rows, seeds = {arm: [] for arm in ARMS}, []
    before = {"gelu": [], "match": [], "relu": [], "agreement": []}
    for seed in SEEDS:
        runs = {arm: _finished(RUNS / f"ft_{arm}_s{seed}") for arm in ARMS}
        if _finished(RUNS / f"base_gelu_s{seed}") is None or any(m is None for m in runs.values()):
            continue
        seeds.append(seed)
        for key, value in _before_cached(seed).items():
            before[key].append(value)
        for arm, m in runs.items():
            rows[arm].append((100 * m["final_test_acc"], 100 * m["history"][0]["test_acc"]))
    if not seeds:
        raise SystemExit("no finished seed under experiments/finetune/runs: run the experiment first")
    lines = [
        "# Fine-tuning a trained GELU network as PWLU (issue 13)",
        "",
        "Tables generated by `experiments/finetune/run.py`; the reading below is written by hand. "
        f"Fashion-MNIST, the app's `cnn`, 10k training / 10k test images, seeds {', '.join(map(str, seeds))}. "
        "Each seed: a GELU network trained 5 epochs (lr 0.1, one-cycle cosine), then that checkpoint "
        f"fine-tuned {FT_EPOCHS} epochs at peak lr {FT_LR} (one-cycle cosine, same data order for every arm). "
        "Top-1 test accuracy in %, mean ± std over seeds; Δ is paired by seed against the GELU control.",
        "",
        "| before fine-tuning | top-1 (%) |",
        "|---|---|",
        f"| GELU checkpoint | {_ms(before['gelu'])} |",
        f"| its `--init match` conversion (N = 16, channel-wise), no step taken | {_ms(before['match'])} |",
        f"| top-1 agreement of the two | {_ms(before['agreement'])} |",
        f"| its `--init relu` conversion (PWLUs = ReLU on [-3, 3]), no step taken | {_ms(before['relu'])} |",
        "",
        f"| fine-tuned {FT_EPOCHS} epochs | top-1 after epoch 1 (%) | final top-1 (%) | Δ final vs GELU (points) |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        final = [f for f, _ in rows[arm]]
        first = [e for _, e in rows[arm]]
        delta = [f - g for f, (g, _) in zip(final, rows["gelu"])]
        lines.append(f"| {LABELS[arm]} | {_ms(first)} | {_ms(final)} | "
                     f"{'–' if arm == 'gelu' else _ms(delta, signed=True)} |")  # fmt: skip
    per_seed = " · ".join(
        f"s{s}: " + ", ".join(f"{arm} {rows[arm][i][0]:.2f}" for arm in ARMS) for i, s in enumerate(seeds)
    )
    lines += ["", f"Per seed (final top-1): {per_seed}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", action="store_true", help="only write RESULTS.md from the finished runs")
    args = p.parse_args()
    if not args.summarize:
        run_all()
    text = summarize()
    print(text)
    path = ROOT / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    reading = old[old.index(READING) :] if READING in old else f"{READING}\n\n(to be written)\n"
    path.write_text(text + "\n" + reading)


if __name__ == "__main__":
    main()
