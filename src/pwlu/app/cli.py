"""The ``pwlu`` command line: train, compare, ablate, plot, export (also ``python -m pwlu``).

Started through :mod:`pwlu.app.launcher`, which checks the ``app`` extra first.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import statistics  # the standard library's
import sys

from pwlu import ACTIVATIONS

from .config import ConfigError, TrainConfig, config_differences
from .data import DataError
from .launcher import MissingExtraError
from .models import ARCHITECTURES

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _add_train_options(p: argparse.ArgumentParser, single: bool = True) -> None:
    d = TrainConfig()
    if single:
        p.add_argument("--model", default=d.model, help=", ".join(ARCHITECTURES))
        p.add_argument("--activation", default=d.activation, help=", ".join(ACTIVATIONS))
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--mode", default=d.mode, help="PWLU mode: channel or layer")
        p.add_argument("--intervals", type=int, default=d.intervals, help="PWLU intervals N")
        p.add_argument("--merges", default=d.merges,
                       help="residual merges: add, or pwlu2d (a learned 2-D PWLU per merge)")  # fmt: skip
        p.add_argument("--merge-intervals", type=int, default=d.merge_intervals, help="2-D PWLU intervals N per axis")
        p.add_argument(
            "--fix-init", type=float, default=None, metavar="X", help="fix-init-X: range [-X, X], no phase I"
        )
        p.add_argument("--rebound-every", type=int, default=None, help="function-preserving re-bound every k steps")
        p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                       help="fine-tune a `pwlu train` checkpoint (same --model and --dataset); with another "
                            "--activation (pwlu), its activations are converted")  # fmt: skip
        p.add_argument("--init", default=d.init, choices=["relu", "match"],
                       help="with --init-from and --activation pwlu: relu (PWLUs start as ReLU, phase I and "
                            "realignment follow) or match (fitted to the checkpoint's activations, no phase I)")  # fmt: skip
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same options required)")
        p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--dataset", default=d.dataset, help="fashion-mnist, cifar10, synthetic or imagefolder:PATH")
    p.add_argument("--data-dir", default=None, help="directory holding the dataset files")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=d.warmup_epochs,
        help="phase I length in epochs, may be fractional (paper: 5 of 100)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle cosine schedule")
    p.add_argument("--weight-decay", type=float, default=None, help="default: per architecture (SPEC section 7)")
    p.add_argument("--train-subset", type=int, default=None, help="use this many training images")
    p.add_argument("--test-subset", type=int, default=None, help="use this many test images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run in OUT (compare/ablate: the runs made with other options)")  # fmt: skip


def _config(args: argparse.Namespace, **overrides) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TRAIN_FIELDS}
    values.update(overrides)
    if values.get("init_from"):  # recorded absolute: a run resumes from any working directory
        values["init_from"] = os.path.abspath(values["init_from"])
    return TrainConfig(**values)


def _plan_runs(configs: list[TrainConfig], overwrite: bool) -> list[tuple[TrainConfig, str, str]]:
    """What to do with each run directory of a grid, decided before anything runs:
    ``(cfg, action, detail)`` with action ``train``, ``reuse`` (a finished run with the same
    configuration), ``resume`` (an unfinished one), ``restart`` (an unfinished one without a
    checkpoint) or ``retrain`` (one made with other options, only with ``overwrite``).

    Raises:
        ConfigError: some run was made with other options and ``overwrite`` is not set.
    """
    from .train import recorded_run

    plan, conflicts = [], []
    for cfg in configs:
        run = recorded_run(cfg.out)
        if run is None:
            plan.append((cfg, "train", ""))
            continue
        diffs = config_differences(run["config"], cfg)
        if diffs:
            conflicts.append((cfg, diffs))
            plan.append((cfg, "retrain", "; ".join(diffs)))
        elif run["finished"] and run["metrics"] is not None and "final_test_acc" in run["metrics"]:
            plan.append((cfg, "reuse", ""))
        elif run["has_checkpoint"]:
            plan.append((cfg, "resume", f"{run['epochs_done']} of {cfg.epochs} epochs done"))
        else:
            plan.append((cfg, "restart", "no checkpoint to resume from"))
    if conflicts and not overwrite:
        cfg, diffs = conflicts[0]
        more = f" (and {len(conflicts) - 1} more of the {len(configs)} runs)" if len(conflicts) > 1 else ""
        raise ConfigError(f"{cfg.out} holds a run made with other options ({'; '.join(diffs)}){more}; "
                          "pass --overwrite to retrain such runs, or choose another --out")  # fmt: skip
    return plan


def _run_grid(configs: list[TrainConfig], data, plan: list[tuple[TrainConfig, str, str]]) -> list[dict]:
    """Run (or reuse) every planned run; says on stderr what it does with each."""
    from .train import recorded_run, train

    results = []
    for cfg, action, detail in plan:
        if action == "reuse":
            print(f"reusing finished run {cfg.out} (same options)", file=sys.stderr)
            results.append(recorded_run(cfg.out)["metrics"])
            continue
        if action == "retrain":
            detail = f"--overwrite; it was made with other options: {detail}"
        verb = {"train": "training", "resume": "resuming", "restart": "restarting", "retrain": "retraining"}[action]
        print(f"{verb} {cfg.out}" + (f" ({detail})" if detail else ""), file=sys.stderr)
        results.append(train(cfg, data=data, resume=action == "resume", overwrite=action in ("restart", "retrain")))
    return results


def _write_table(rows: list[dict], group_keys: list[str], out: pathlib.Path, title: str) -> str:
    """Per group: mean ± std of the final test accuracy over seeds. Writes CSV and Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(100 * r["final_test_acc"])
    lines = [f"# {title}", "", "| " + " | ".join(group_keys) + " | top-1 (%) mean ± std | seeds |",
             "|" + "---|" * (len(group_keys) + 2)]  # fmt: skip
    summary = []
    for key, accs in groups.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean = statistics.mean(accs)
        lines.append("| " + " | ".join(str(k) for k in key) + f" | {mean:.2f} ± {sd:.2f} | {len(accs)} |")
        summary.append({**dict(zip(group_keys, key)), "mean": round(mean, 3), "std": round(sd, 3), "n": len(accs)})
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return text


def cmd_train(args) -> int:
    from .train import train

    result = train(_config(args, out=args.out), resume=args.resume, overwrite=args.overwrite)
    if "final_test_acc" in result:
        print(f"final test accuracy {100 * result['final_test_acc']:.2f}% ({args.out}/metrics.json)")
    return 0


def _no_repeats(option: str, values: list) -> None:
    """A grid option naming a value twice would train the same run directory twice: refused."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"{option} names {', '.join(repeated)} more than once; give each value once")


def cmd_compare(args) -> int:
    from .train import check_writable_dir, prepare_data

    for option, values in (("--models", args.models), ("--activations", args.activations), ("--seeds", args.seeds)):
        _no_repeats(option, values)
    configs = [
        _config(args, model=model, activation=act, seed=seed, out=f"{args.out}/runs/{model}_{act}_s{seed}")
        for model in args.models
        for act in args.activations
        for seed in args.seeds
    ]
    for cfg in configs:  # every bad value is reported before any run starts
        cfg.validate()
    check_writable_dir(args.out)
    plan = _plan_runs(configs, args.overwrite)
    data = prepare_data(configs[0])
    rows = []
    for cfg, res in zip(configs, _run_grid(configs, data, plan)):
        rows.append(
            {
                "model": cfg.model,
                "activation": cfg.activation,
                "seed": cfg.seed,
                "final_test_acc": res["final_test_acc"],
            }
        )
    print(_write_table(rows, ["model", "activation"], pathlib.Path(args.out), "Activation comparison"))
    return 0


ABLATIONS = {
    "fix-init-3": dict(fix_init=3.0),
    "fix-init-6": dict(fix_init=6.0),
    "fix-init-10": dict(fix_init=10.0),
    "stat-realign (channel)": dict(),
    "stat-realign (layer)": dict(mode="layer"),
    "N=4": dict(intervals=4),
    "N=8": dict(intervals=8),
    "N=12": dict(intervals=12),
    "N=16": dict(intervals=16),
    "N=20": dict(intervals=20),
}


def ablation_slug(name: str) -> str:
    """The run-directory name of an ablation variant: ``"stat-realign (channel)"`` -> ``"stat-realign_channel"``."""
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")


def cmd_ablate(args) -> int:
    from .train import check_writable_dir, prepare_data

    for name in args.variants:
        if name not in ABLATIONS:
            raise ConfigError(f"unknown ablation {name!r}; expected one of {', '.join(ABLATIONS)}")
    _no_repeats("--variants", args.variants)
    _no_repeats("--seeds", args.seeds)
    runs = []
    for name in args.variants:
        for seed in args.seeds:
            cfg = _config(args, model=args.model, activation="pwlu", seed=seed, out=f"{args.out}/runs/{ablation_slug(name)}_s{seed}",
                          **ABLATIONS[name])  # fmt: skip
            cfg.validate()
            runs.append((name, cfg))
    check_writable_dir(args.out)
    configs = [cfg for _, cfg in runs]
    plan = _plan_runs(configs, args.overwrite)
    data = prepare_data(configs[0])
    rows = []
    for (name, cfg), res in zip(runs, _run_grid(configs, data, plan)):
        rows.append({"variant": name, "seed": cfg.seed, "final_test_acc": res["final_test_acc"]})
    print(_write_table(rows, ["variant"], pathlib.Path(args.out), f"PWLU ablations ({args.model})"))
    return 0


def cmd_plot(args) -> int:
    import torch

    from pwlu import boundary_iou

    from .plotting import collect_inputs, plot_iou, plot_shapes
    from .train import check_writable_dir, load_trained

    if args.batches < 1:
        raise ConfigError(f"--batches must be >= 1, but got {args.batches}")
    check_writable_dir(args.out)
    runs = []
    for path in [args.checkpoint] + ([args.compare] if args.compare else []):
        model, _, batches = load_trained(path, args.data_dir, test_batches=args.batches)
        runs.append((pathlib.Path(path).parent.name or str(path), model, batches))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label, model, batches = runs[0]
    with torch.no_grad():
        plot_shapes(model, collect_inputs(model, batches), out / "shapes.png")
    ious = {lbl: boundary_iou(m, b) for lbl, m, b in runs}
    plot_iou(ious, out / "iou.png")
    for lbl, per_module in ious.items():
        values = torch.cat([v.reshape(-1) for v in per_module.values()])
        print(f"{lbl}: mean IOU {values.mean():.3f} over {values.numel()} channels")
    print(f"wrote {out / 'shapes.png'} and {out / 'iou.png'}")
    return 0


def cmd_export(args) -> int:
    from pwlu.export import ExportError

    from .checkpoint import export_checkpoint

    try:
        res = export_checkpoint(
            args.checkpoint, args.format, args.out, image_size=args.image_size, overwrite=args.overwrite
        )
    except ExportError as e:
        raise ValueError(str(e)) from None
    print(f"wrote {res['path']} ({res['format']}, {res['method']}); verified on input {tuple(res['input_shape'])}: "
          f"max relative error {res['max_rel_err']:.3g} vs PyTorch")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwlu", description="PWLU training and experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model")
    _add_train_options(p)
    p.add_argument("--out", default="runs/train", help="output directory (checkpoint, metrics)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="activations x architectures x seeds; Markdown + CSV table")
    _add_train_options(p, single=False)
    p.add_argument("--models", nargs="+", default=["cnn", "resnet", "mobilenet_v3"])
    p.add_argument("--activations", nargs="+", default=["relu", "swish", "prelu", "apl", "pau", "frelu", "pwlu"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="experiments/compare")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ablate", help="fix-init-{3,6,10} vs stat-realign (layer, channel) and the N sweep")
    _add_train_options(p, single=False)
    p.add_argument("--model", default="cnn")
    p.add_argument("--variants", nargs="+", default=list(ABLATIONS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="experiments/ablate")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("plot", help="learned shapes and IOU distributions of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--compare", default=None, help="a second checkpoint for the IOU comparison (e.g. fix-init-10)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=4, help="test batches of 256 used for histograms and IOUs")
    p.add_argument("--out", default="plots")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript and verify it against PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", default=None, help="output file (default: model.onnx / model.pt next to the checkpoint)")
    p.add_argument("--image-size", type=int, default=None, help="image side (needed for imagefolder datasets)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never the checkpoint)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MissingExtraError as e:
        print(f"pwlu: {e}", file=sys.stderr)
        return 2
    except (DataError, ConfigError, ValueError) as e:
        print(f"pwlu: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written (FileNotFoundError, PermissionError, ...)
        print(f"pwlu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pwlu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
