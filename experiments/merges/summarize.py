"""Summarise issue 15's experiment (``experiments/merges/run.sh``) into ``experiments/merges/RESULTS.md``.

Reads every finished run under ``experiments/merges/runs`` (their ``metrics.json``): top-1 of
each model x activation x merge (mean ± std over seeds), the paired differences 2-D PWLU minus
addition by seed (same data order, augmentation and initial weights apart from the merges,
which draw no random numbers), the training cost (epoch time from ``metrics.json``, parameter
counts of the models as built) and, for every run directory (under ``runs/`` or ``surface/``)
that holds a ``checkpoint.pt``, plots of its learned merges: the surface ``F`` over the range
its inputs take on the test set, ``F - (x + y)`` (its departure from addition) and the joint
histogram of the two inputs, for the channel of each merge that departs most from addition.

Usage (from the repository root, after ``experiments/merges/run.sh``)::

    .venv/bin/python experiments/merges/summarize.py
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent
RUNS = ROOT / "runs"
COST = ROOT / "cost.json"  # experiments/merges/cost.py
DEPARTURES = ROOT / "departures.json"  # the surface table, kept for clones without checkpoints
MODELS = ["resnet", "mobilenet_v3"]
ACTIVATIONS = ["relu", "pwlu"]
MERGES = ["add", "pwlu2d"]
SEEDS = [0, 1, 2]


def _shared():
    """``experiments/summarize.py`` (the reproduction's summary), for its run-reading helpers."""
    spec = importlib.util.spec_from_file_location("experiments_summarize", ROOT.parent / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SHARED = _shared()
_load, _acc = _SHARED._load, _SHARED._acc  # metrics.json of a finished run (else None); its top-1 in %
_epoch_seconds = _SHARED._epoch_seconds  # a run's median epoch (robust to the odd epoch slowed by another job)


def _ms(values: list[float], signed: bool = False) -> str:
    """mean ± std (sample) with two decimals, signed for differences."""
    return (_SHARED._signed if signed else _SHARED._ms)(values)


def _steps_per_epoch(config: dict) -> int:
    return math.ceil(config["train_subset"] / config["batch_size"])


def _runs(model: str, act: str, merge: str) -> dict[int, dict]:
    found = {s: _load(RUNS / f"{model}_{act}_{merge}_s{s}") for s in SEEDS}
    return {s: m for s, m in found.items() if m is not None}


def _build(config: dict) -> torch.nn.Module:
    """The model of a run's config as training builds it (merges converted), on 1x28x28 inputs."""
    from pwlu.app.config import TrainConfig
    from pwlu.app.data import TensorData
    from pwlu.app.train import build

    shape = TensorData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), torch.zeros(0), torch.zeros(0),
                       10, "fashion-mnist")  # fmt: skip
    return build(TrainConfig(**config), shape)


def _counts(config: dict) -> tuple[int, int, int]:
    """(parameters, of which in PWLU2D merges, number of merges) of a run's model."""
    from pwlu import PWLU2D

    model = _build(config)
    merges = [m for m in model.modules() if isinstance(m, PWLU2D)]
    return (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for m in merges for p in m.parameters()),
        len(merges),
    )


def _groups():
    """``(model, activation, merge, runs, addition's runs)`` of every group with a finished run;
    ``runs`` is ``{seed: metrics}``."""
    for model in MODELS:
        for act in ACTIVATIONS:
            base = _runs(model, act, "add")
            for merge in MERGES:
                found = _runs(model, act, merge)
                if found:
                    yield model, act, merge, found, base


def accuracy_table() -> list[str]:
    lines = ["| model | activation | merge | top-1 (%) | Δ pwlu2d − add (pp, paired) | seeds | parameters (merges: count, params) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, act, merge, found, base in _groups():
        accs = [_acc(m) for m in found.values()]
        delta = "–"
        if merge == "pwlu2d":
            delta = _ms([_acc(m) - _acc(base[s]) for s, m in found.items() if s in base], signed=True)
        total, in_merges, n = _counts(next(iter(found.values()))["config"])
        params = f"{total:,} ({n}, {in_merges:,})" if n else f"{total:,}"
        lines.append(f"| {model} | {act} | {merge} | {_ms(accs)} | {delta} | {len(accs)} | {params} |")
    return lines


def paired_table() -> tuple[list[str], list[float]]:
    """Per-seed differences pwlu2d − add, and all of them (for the overall reading)."""
    head = " | ".join(f"seed {s}" for s in SEEDS)
    lines = [f"| model | activation | {head} | mean ± std | pwlu2d better |", "|---|---|" + "---|" * (len(SEEDS) + 2)]
    every: list[float] = []
    for model in MODELS:
        for act in ACTIVATIONS:
            base, found = _runs(model, act, "add"), _runs(model, act, "pwlu2d")
            deltas = {s: _acc(found[s]) - _acc(base[s]) for s in SEEDS if s in base and s in found}
            if not deltas:
                continue
            every += deltas.values()
            cells = " | ".join(f"{deltas[s]:+.2f}" if s in deltas else "–" for s in SEEDS)
            wins = sum(d > 0 for d in deltas.values())
            lines.append(
                f"| {model} | {act} | {cells} | {_ms(list(deltas.values()), signed=True)} | {wins} of {len(deltas)} |"
            )
    return lines, every


def cost_table() -> list[str]:
    """The measured step cost (``cost.json``, from ``cost.py``) and the runs' own epoch times."""
    lines = []
    if COST.exists():
        cost = json.loads(COST.read_text())
        lines += [
            f"Measured by `experiments/merges/cost.py` ({cost['date']}, {cost['device']}, torch {cost['torch']}): one",
            f"phase-II training step (forward, loss, backward, SGD and realigner step) on a batch of {cost['batch']},",
            f"each configuration built as `pwlu train` builds it; median of {cost['rounds']} interleaved rounds, so the",
            "machine's noise hits all configurations alike. Ratios are to addition with the same model and activation.",
            "",
            "| model | activation | merge | ms / step | pwlu2d / add |",
            "|---|---|---|---|---|",
        ]
        for row in cost["rows"]:
            ratio = f"{row['ratio_to_add']:.2f}x" if row["merge"] != "add" else "–"
            lines.append(
                f"| {row['model']} | {row['activation']} | {row['merge']} | {row['ms_per_step']:.1f} | {ratio} |"
            )
        lines.append("")
    else:
        lines += ["No `cost.json`: run `experiments/merges/cost.py` for the measured step cost.", ""]
    lines += [
        "The runs' own epoch times (median epoch per run, including the evaluation of the 10k test images)",
        "are not a cost measurement: the runs shared two cores with other jobs, and the pwlu2d runs were",
        "retrained with newer code while other work ran, whereas the add runs ran earlier on a quieter machine.",
        "",
        "| model | activation | merge | s / epoch (median over seeds) | epochs per run (s) |",
        "|---|---|---|---|---|",
    ]
    for model, act, merge, found, _ in _groups():
        secs = {s: _epoch_seconds(m) for s, m in found.items()}
        per_run = ", ".join(f"s{s}: {v:.1f}" for s, v in sorted(secs.items()))
        lines.append(f"| {model} | {act} | {merge} | {statistics.median(secs.values()):.1f} | {per_run} |")
    return lines


# -- learned surfaces -------------------------------------------------------------------------


@torch.no_grad()
def _merge_inputs(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both inputs of every PWLU2D over ``batches`` in eval mode, as ``(C, n)`` per input."""
    from pwlu import PWLU2D

    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, PWLU2D):

            def hook(mod, args, name=name):
                x, y = (a.detach().float().movedim(1, 0).reshape(a.shape[1], -1) for a in args)
                seen.setdefault(name, []).append((x, y))

            handles.append(m.register_forward_pre_hook(hook))
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {k: (torch.cat([a for a, _ in v], 1), torch.cat([b for _, b in v], 1)) for k, v in seen.items()}


def _channel_surface(m, c: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F`` of channel ``c`` of merge ``m`` at the points ``(x, y)`` (1-D tensors), by the reference."""
    from pwlu import pwlu2d_reference

    params = [p.detach().float() for p in m._op_parameters()]
    if m.num_channels is not None:
        params = [p[c] for p in params]
    return pwlu2d_reference(x, y, *params)


def _departure(m, c: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """RMS of ``F - (x + y)`` over the inputs, and of its non-constant part (``F - (x + y)`` minus its
    mean), both relative to the RMS of ``x + y``."""
    diff = _channel_surface(m, c, x, y) - (x + y)
    scale = (x + y).pow(2).mean().sqrt().clamp_min(1e-12)
    return (diff.pow(2).mean().sqrt() / scale).item(), ((diff - diff.mean()).pow(2).mean().sqrt() / scale).item()


def departures(run: pathlib.Path, cache: dict) -> tuple[torch.nn.Module, dict, dict[str, list[tuple[float, float]]]]:
    """A checkpoint's model, its merges' inputs on 2048 test images, and each merge's per-channel
    :func:`_departure`."""
    from pwlu.app.config import TrainConfig
    from pwlu.app.train import load_trained, prepare_data

    if "data" not in cache:  # every run uses the same data
        cache["data"] = prepare_data(TrainConfig(**_load(run)["config"]))
    model, _, batches = load_trained(run / "checkpoint.pt", data=cache["data"], test_batches=8)
    inputs = _merge_inputs(model, batches)
    modules = dict(model.named_modules())
    found = {
        name: [_departure(modules[name], c, xs[c], ys[c]) for c in range(xs.shape[0])]
        for name, (xs, ys) in inputs.items()
    }
    return model, inputs, found


def plot_surfaces(run_name: str, model, inputs: dict, found: dict, out: pathlib.Path) -> None:
    """One row per merge (its channel departing most from addition): ``F`` with the input density,
    ``F - (x + y)``, and the joint histogram of the inputs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = dict(model.named_modules())
    fig, axes = plt.subplots(len(inputs), 3, figsize=(13, 3.6 * len(inputs)), squeeze=False)
    for row, (name, (xs, ys)) in enumerate(inputs.items()):
        m = modules[name]
        c = max(range(len(found[name])), key=lambda k: found[name][k][0])
        x, y = xs[c], ys[c]
        box = [getattr(m, f"{a}_{side}_bound").detach().float().reshape(-1) for a in "xy" for side in ("left", "right")]
        box = [b[c if b.numel() > 1 else 0].item() for b in box]
        lo_x, hi_x = min(box[0], x.quantile(0.001).item()), max(box[1], x.quantile(0.999).item())
        lo_y, hi_y = min(box[2], y.quantile(0.001).item()), max(box[3], y.quantile(0.999).item())
        pad_x, pad_y = 0.05 * (hi_x - lo_x), 0.05 * (hi_y - lo_y)
        gx = torch.linspace(lo_x - pad_x, hi_x + pad_x, 201)
        gy = torch.linspace(lo_y - pad_y, hi_y + pad_y, 201)
        mx, my = torch.meshgrid(gx, gy, indexing="xy")
        f = _channel_surface(m, c, mx.reshape(-1), my.reshape(-1)).reshape(mx.shape)
        extent = (gx[0].item(), gx[-1].item(), gy[0].item(), gy[-1].item())
        hist, (ex, ey) = torch.histogramdd(torch.stack([x, y], 1), bins=[gx[::4].contiguous(), gy[::4].contiguous()])
        density = hist.T.log1p()
        diff = f - (mx + my)
        lim = diff.abs().max().item() or 1.0
        panels = [
            (f, {"cmap": "viridis"}, f"F (channel {c}), contours: input density"),
            (diff, {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}, "F − (x + y)"),
            (density, {"cmap": "Greys"}, "log(1 + count) of test inputs (x, y)"),
        ]
        for col, (image, style, title) in enumerate(panels):
            ax = axes[row][col]
            im = ax.imshow(image, origin="lower", extent=extent, aspect="auto", **style)
            fig.colorbar(im, ax=ax, fraction=0.046)
            if col == 0:
                centres_x, centres_y = (ex[:-1] + ex[1:]) / 2, (ey[:-1] + ey[1:]) / 2
                ax.contour(centres_x, centres_y, density, levels=4, colors="white", linewidths=0.6)
            ax.add_patch(plt.Rectangle((box[0], box[2]), box[1] - box[0], box[3] - box[2], fill=False, ec="k", ls="--"))
            ax.set_xlabel("x (first operand of the +)")
            ax.set_ylabel("y (second operand)")
            ax.set_title(f"{name}: {title}", fontsize=8)
    fig.suptitle(f"{run_name}: learned merges (dashed: the grid [X_L, X_R] x [Y_L, Y_R])", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _departure_lines(rows: list[dict]) -> tuple[list[str], list[float]]:
    lines = [
        "| run | merge | channels | departure: median over channels | of which non-constant | largest (channel) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | `{r['merge']}` | {r['channels']} | {r['median']:.3f} | {r['median_non_constant']:.3f} | "
            f"{r['largest']:.3f} ({r['largest_channel']}) |"
        )
    return lines, [r["median"] for r in rows]


def _figures(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if name.endswith("_s0") and (ROOT / f"surfaces_{name}.png").exists():
            out += [f"### {name}", "", f"![{name}](surfaces_{name}.png)", ""]
    return out


def surface_section(measure: bool = True) -> tuple[list[str], list[float]]:
    """Departure-from-addition table of every pwlu2d checkpoint and the plots of the seed-0 runs;
    and each merge's median departure over its channels. The table is also written to
    ``departures.json``; without checkpoints (``*.pt`` is not committed) it is read from there."""
    runs = sorted(p.parent for p in RUNS.glob("*_pwlu2d_s*/checkpoint.pt") if _load(p.parent) is not None)
    if not measure:  # --no-measure: the committed table, whatever checkpoints lie here
        runs = []
    if not runs:
        if not DEPARTURES.exists():
            return ["No run directory holds a checkpoint (`*.pt` is not committed), so no surface is measured or",
                    "plotted; rerun `experiments/merges/run.sh` in a fresh `runs/` folder to get them.", ""], []  # fmt: skip
        saved = json.loads(DEPARTURES.read_text())
        lines, medians = _departure_lines(saved["rows"])
        note = [
            f"No run directory holds a checkpoint now, so this table and the figures are those {saved['source']}.",
            "",
        ]
        return [*note, *lines, "", *_figures(sorted({r["run"] for r in saved["rows"]}))], medians
    rows: list[dict] = []
    cache: dict = {}
    for run in runs:
        model, inputs, found = departures(run, cache)
        for name, per_channel in found.items():
            total = [d for d, _ in per_channel]
            c = max(range(len(total)), key=total.__getitem__)
            rows.append({"run": run.name, "merge": name, "channels": len(total),
                         "median": round(statistics.median(total), 3),
                         "median_non_constant": round(statistics.median(r for _, r in per_channel), 3),
                         "largest": round(total[c], 3), "largest_channel": c})  # fmt: skip
        if run.name.endswith("_s0"):
            plot_surfaces(run.name, model, inputs, found, ROOT / f"surfaces_{run.name}.png")
    source = (
        "measured by summarize.py on the runs' checkpoints (2048 test images) on "
        f"{datetime.date.today()}; the checkpoints are not committed (*.pt), so these rows are read from here "
        "until a rerun of run.sh leaves checkpoints to measure again"
    )
    DEPARTURES.write_text(json.dumps({"source": source, "rows": rows}, indent=1) + "\n")
    lines, medians = _departure_lines(rows)
    return [*lines, "", *_figures([r.name for r in runs])], medians


def reading(every: list[float], medians: list[float]) -> list[str]:
    """The plain answer to the issue's question, from the paired differences (and the merges'
    median departures from addition)."""
    mean = statistics.mean(every)
    sd = statistics.stdev(every) if len(every) > 1 else 0.0
    sem = sd / math.sqrt(len(every))
    verdict = (
        "do **not** help measurably at this scale: the mean paired difference is within two standard errors of zero"
        if abs(mean) < 2 * sem
        else ("help" if mean > 0 else "hurt")
        + " at this scale: the mean paired difference is beyond two standard errors"
    )
    return [
        f"Over all {len(every)} paired runs, pwlu2d − add = {mean:+.2f} ± {sd:.2f} pp (standard error "
        f"{sem:.2f}), pwlu2d better in {sum(d > 0 for d in every)} of {len(every)}. The learned merges {verdict}.",
        "They add the parameters counted in the accuracy table and cost training time (table below); the",
        "departure table shows how far the learned surfaces moved from addition on the test inputs.",
        *(
            [
                f"They stay close to it: per merge, the median channel's `F − (x + y)` is {min(medians):.1%} to "
                f"{max(medians):.1%} of the RMS of `x + y` ({len(medians)} merges with a checkpoint)."
            ]  # fmt: skip
            if medians
            else []
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Summarise experiments/merges into RESULTS.md")
    parser.add_argument("--out", default=str(ROOT / "RESULTS.md"), help="where to write (default: RESULTS.md here)")
    parser.add_argument("--no-measure", action="store_true",
                        help="do not measure checkpoints (nor rewrite departures.json and the plots): use departures.json")  # fmt: skip
    args = parser.parse_args(argv)
    first = next((m for m in (_load(p) for p in sorted(RUNS.glob("*"))) if m is not None), None)
    if first is None:
        print("no finished runs under experiments/merges/runs; run experiments/merges/run.sh first", file=sys.stderr)
        return 2
    config = first["config"]
    recipe = (
        f"Fashion-MNIST, {config['train_subset']} training images (a fixed random subset), "
        f"{config['test_subset'] or 10000} test images, {config['epochs']} epochs, batch {config['batch_size']} "
        f"({_steps_per_epoch(config)} steps per epoch), SGD momentum 0.9, one-cycle cosine (peak lr {config['lr']}), "
        f"random crop + flip; PWLU activations channel-wise with N = {config['intervals']}; PWLU2D merges "
        f"channel-wise with N = {config['merge_intervals']} per axis, initialised as addition; "
        f"phase I (statistics, merges frozen) = {config['warmup_epochs']} epoch(s). Seeds {', '.join(map(str, SEEDS))}."
    )
    paired, every = paired_table()
    surfaces, medians = surface_section(measure=not args.no_measure)
    text = [
        "# 2-D PWLU merges vs addition (issue 15): results",
        "",
        "Generated by `experiments/merges/summarize.py` from the runs of `experiments/merges/run.sh`.",
        "",
        f"Recipe: {recipe}",
        "",
        "The models are `pwlu.app.models`' `resnet` (3 BasicBlocks, widths 16/32/64) and `mobilenet_v3`",
        "(inverted residuals with SE); `--merges pwlu2d` replaces each residual addition by a `PWLU2D`",
        "(`pwlu.convert_merges`). Top-1 is the final-epoch test accuracy, mean ± std over seeds.",
        "",
        "## Reading",
        "",
        *reading(every, medians),
        "",
        "## Accuracy",
        "",
        *accuracy_table(),
        "",
        "## Paired differences, pwlu2d − add (top-1, percentage points)",
        "",
        *paired,
        "",
        "## Training cost",
        "",
        *cost_table(),
        "",
        "## Learned surfaces",
        "",
        "Departure from addition of each merge, per channel: the RMS of `F − (x + y)` over the channel's inputs",
        'on 2048 test images, relative to the RMS of `x + y`; "non-constant" is the same for `F − (x + y)`',
        "minus its mean (what is left once a constant shift, i.e. a bias, is removed). The figures show, for",
        "each merge of the seed-0 runs, its channel departing most: left `F` with the input density as",
        "contours, middle `F − (x + y)`, right the joint histogram of the two inputs. Dashed: the learned",
        "grid; outside it `F` is linear (the outer slopes).",
        "",
        *surfaces,
    ]
    out = pathlib.Path(args.out)
    out.write_text("\n".join(text))
    print("\n".join(reading(every, medians)) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
