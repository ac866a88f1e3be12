"""The main job (``make demo``): ReLU vs Swish vs PWLU on Fashion-MNIST, a table and the learned shapes.

Trains the small CNN of :mod:`pwlu.app.models` three times on the same Fashion-MNIST data with
the same seed and recipe (SGD momentum 0.9, one-cycle cosine; PWLU with one epoch of
statistic-based realignment), prints the test accuracies and writes the learned PWLU shapes
to ``runs/demo/shapes.png``. The full 60,000-image training set, 5 epochs: a few minutes on
a couple of CPU cores (``--train-subset``/``--epochs`` make it shorter).

Run it with ``python -m pwlu.app.demo`` (``make demo``); like ``pwlu``, it first checks the
``app`` extra (:mod:`pwlu.app.launcher`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from .launcher import require, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwlu.app.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many images (default: all)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)
    require("matplotlib")  # for the shapes figure: fail before training, not after

    import torch

    from .config import ConfigError, TrainConfig
    from .data import DataError
    from .plotting import collect_inputs, plot_shapes
    from .train import check_writable_dir, load_trained, prepare_data, train

    base = dict(model="cnn", dataset="fashion-mnist", data_dir=args.data_dir, epochs=args.epochs, warmup_epochs=1,
                train_subset=args.train_subset, lr=0.1, seed=0)  # fmt: skip
    try:
        TrainConfig(**base).validate()
        check_writable_dir(args.out)
        data = prepare_data(TrainConfig(**base))
    except (DataError, ConfigError) as e:
        print(f"pwlu demo: {e}", file=sys.stderr)
        return 2
    subset = " (subset)" if args.train_subset else ""
    print(f"Fashion-MNIST: {len(data.train_y)} training images{subset}, {len(data.test_y)} test images")
    rows = []
    for act in ("relu", "swish", "pwlu"):
        t0 = time.perf_counter()
        # the demo's own run directories: a rerun of the demo replaces them
        result = train(TrainConfig(**base, activation=act, out=f"{args.out}/{act}"), data=data, overwrite=True)
        rows.append((act, 100 * result["final_test_acc"], time.perf_counter() - t0))
        print(f"  {act:6s} test top-1 {rows[-1][1]:.2f}%  ({rows[-1][2]:.0f} s)")
    print("\n| activation | test top-1 (%) | train time (s) |\n|---|---|---|")
    for act, acc, secs in rows:
        print(f"| {act} | {acc:.2f} | {secs:.0f} |")
    best = max(rows, key=lambda r: r[1])
    print(f"\nBest: {best[0]} (one seed and {args.epochs} epochs: differences under ~0.5 points are within seed noise;")
    print("see experiments/ in the repository for 3 seeds x 3 architectures x 7 activations).")

    model, _, batches = load_trained(pathlib.Path(args.out) / "pwlu" / "checkpoint.pt", data=data, test_batches=4)
    with torch.no_grad():
        plot_shapes(model, collect_inputs(model, batches), pathlib.Path(args.out) / "shapes.png")
    print(f"Learned PWLU shapes: {args.out}/shapes.png")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
