"""Model-level speed, the paper's Table 4 at CPU scale: resnet18 and mobilenet_v3_small with
ReLU, Swish, PWLU, APL, PAU and FReLU, side by side in one run.

Every variant is a torchvision model (``weights=None``) whose activations are replaced with
:func:`pwlu.convert_activations` (``"relu"`` included, so for mobilenet_v3 the ReLU row
replaces its Hardswish too, as in the paper's comparison; the SE blocks keep theirs, and
mobilenet_v3's 2-D classifier keeps its Hardswish in every variant, since FReLU needs NCHW). PWLU is channel-wise with N=16, in
phase II (no statistics collection), i.e. what a trained model runs. Two measurements:

* ``inference``: eval mode, ``torch.no_grad()``, one forward of a batch (PWLU: the folded
  one-multiply-add form, SPEC section 5);
* ``train_step``: training mode, forward, cross-entropy, ``backward`` and an SGD (momentum
  0.9) step.

Timing: interleaved repetitions. One round times every variant of a model once, in rotating
order, and the reported time is the median over rounds, so machine noise (here: 2 CPU
cores shared with other jobs) hits all variants alike. Ratios are to ReLU.

Memory (``memory_mb``): for ``train_step``, the bytes autograd saves for the backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), i.e. the
activation memory of training, which is what the activation choice changes. For
``inference`` on CPU there are no allocator statistics, so nothing is reported; on CUDA both
modes also report ``torch.cuda.max_memory_allocated`` above the model's own memory
(``peak_mb``).

Appends rows to ``benchmarks/results/models.csv`` and writes the table to
``benchmarks/results/models_latest.md``.

Usage::

    python benchmarks/bench_models.py            # full run (~5 min on 2 CPU cores)
    python benchmarks/bench_models.py --quick    # smaller inputs, 3 rounds
    python benchmarks/bench_models.py --device cuda --batch 32 --size 224
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pwlu

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["resnet18", "mobilenet_v3_small"]
ACTIVATIONS = ["relu", "swish", "pwlu", "apl", "pau", "frelu"]
#: mobilenet_v3's classifier (Linear -> Hardswish on (B, C)) keeps its Hardswish in every variant:
#: FReLU needs NCHW, and the classifier is a tiny part of the cost.
EXCLUDE = {"mobilenet_v3_small": "classifier*"}
LABELS = {"relu": "ReLU", "swish": "Swish", "pwlu": "PWLU", "apl": "APL", "pau": "PAU", "frelu": "FReLU"}


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


def build(model_name: str, activation: str, size: int, device: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the example input sets the channel counts; 224 keeps resnet18's last stage 7x7, not 1x1
        model = pwlu.convert_activations(
            model, activation=activation, example_input=torch.randn(1, 3, 224, 224), exclude=EXCLUDE.get(model_name)
        )
    return model.to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Variant:
    """One (model, activation): the module, its optimizer and its two timed calls."""

    def __init__(self, model_name: str, activation: str, args: argparse.Namespace) -> None:
        self.activation = activation
        self.model = build(model_name, activation, args.size, args.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        self.x_inf = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
        self.x_train = torch.randn(args.train_batch, 3, args.train_size, args.train_size, generator=g).to(args.device)
        self.y_train = torch.randint(0, 1000, (args.train_batch,), generator=g).to(args.device)

    def inference(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(self.x_inf)

    def train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x_train), self.y_train).backward()
        self.optimizer.step()

    def saved_bytes(self) -> int:
        """Bytes autograd saves in one training forward (each storage once)."""
        seen: dict[tuple[int, str], int] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
            return t

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(self.model(self.x_train), self.y_train)
        del loss
        return sum(seen.values())

    def cuda_peak_bytes(self, mode: str, device: str) -> int | None:
        if not device.startswith("cuda"):
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        getattr(self, mode)()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def time_call(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0)


def bench_model(model_name: str, args: argparse.Namespace) -> list[dict]:
    variants = [Variant(model_name, act, args) for act in args.activations]
    rows = []
    for mode in ("inference", "train_step"):
        for v in variants:  # warm-up: first-call allocations, the CPU kernel's compilation
            for _ in range(args.warmup):
                getattr(v, mode)()
        times: dict[str, list[float]] = {v.activation: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                times[v.activation].append(time_call(getattr(v, mode), args.device))
        medians = {a: statistics.median(t) for a, t in times.items()}
        base = medians.get("relu")
        for v in variants:
            ms = medians[v.activation]
            memory = v.saved_bytes() / 2**20 if mode == "train_step" else None
            peak = v.cuda_peak_bytes(mode, args.device)
            rows.append(
                {
                    "model": model_name,
                    "activation": LABELS[v.activation],
                    "mode": mode,
                    "shape": f"{args.batch if mode == 'inference' else args.train_batch}x3x"
                    + (f"{args.size}" if mode == "inference" else f"{args.train_size}") + "^2",
                    "ms": round(ms, 3),
                    "ratio": round(ms / base, 3) if base else "",
                    "memory_mb": round(memory, 2) if memory is not None else "",
                    "peak_mb": round(peak / 2**20, 2) if peak is not None else "",
                    "rounds": args.rounds,
                }
            )
            print(
                f"{model_name:20s} {mode:10s} {LABELS[v.activation]:6s} {ms:9.2f} ms  "
                f"x{ms / base if base else float('nan'):5.2f}"
                + (f"  saved {memory:8.1f} MB" if memory is not None else ""),
                flush=True,
            )
    return rows


def write_csv(rows: list[dict], meta: dict, path: Path) -> None:
    fields = ["date", "device", "threads", "torch", "model", "activation", "mode", "shape", "ms", "ratio",
              "memory_mb", "peak_mb", "rounds"]  # fmt: skip
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**{k: meta[k] for k in ("date", "device", "threads", "torch")}, **r})


def write_markdown(rows: list[dict], meta: dict, path: Path, args: argparse.Namespace) -> None:
    lines = [
        "# Model-level timing (the paper's Table 4, CPU scale)",
        "",
        f"{meta['date']} UTC · {meta['device']} · threads {meta['threads']} · torch {meta['torch']}"
        + (" · **quick run**" if args.quick else ""),
        "",
        f"Inference: eval, no_grad, batch {args.batch}x3x{args.size}x{args.size}. Training step: forward + "
        f"cross-entropy + backward + SGD step, batch {args.train_batch}x3x{args.train_size}x{args.train_size}. "
        f"Median of {args.rounds} interleaved rounds; ratio to ReLU in parentheses; `saved` = autograd "
        "saved-tensor MB of one training forward.",
        "",
    ]
    acts = [LABELS[a] for a in args.activations]
    lines.append("| model | mode | " + " | ".join(acts) + " |")
    lines.append("|---|---|" + "---|" * len(acts))
    for model_name in args.models:
        for mode in ("inference", "train_step"):
            cells = []
            for a in acts:
                r = next(r for r in rows if r["model"] == model_name and r["mode"] == mode and r["activation"] == a)
                cells.append(f"{r['ms']:.1f} ms ({r['ratio']:.2f}x)")
            lines.append(f"| {model_name} | {mode} | " + " | ".join(cells) + " |")
        cells = []
        for a in acts:
            r = next(r for r in rows if r["model"] == model_name and r["mode"] == "train_step" and r["activation"] == a)
            cells.append(f"{r['memory_mb']:.1f} MB")
        lines.append(f"| {model_name} | saved (train) | " + " | ".join(cells) + " |")
    lines += ["", "Paper (Table 4, CUDA, inference): ResNet-18 ReLU 17.1 / Swish 18.8 / PWLU 19.9 ms (1.16x); "
              "MobileNet-V3 15.4 / 15.7 / 16.2 ms (1.05x); APL and PAU 2-4x ReLU; PWLU training ~1.2x.", ""]  # fmt: skip
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--activations", nargs="+", default=ACTIVATIONS)
    parser.add_argument("--batch", type=int, default=None, help="inference batch (CPU 4, CUDA 32)")
    parser.add_argument("--size", type=int, default=None, help="inference image side (CPU 128, CUDA 224)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (CPU 4, CUDA 32)")
    parser.add_argument("--train-size", type=int, default=None, help="training image side (CPU 112, CUDA 224)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small inputs and 3 rounds (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the results files")
    args = parser.parse_args()
    if "relu" not in args.activations:
        args.activations = ["relu", *args.activations]
    cuda = args.device.startswith("cuda")
    small = args.quick and not cuda
    args.batch = args.batch or (32 if cuda else 2 if small else 4)
    args.size = args.size or (224 if cuda else 96 if small else 128)
    args.train_batch = args.train_batch or (32 if cuda else 2 if small else 4)
    args.train_size = args.train_size or (224 if cuda else 96 if small else 112)
    args.rounds = args.rounds or (3 if args.quick else 9)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_name(args.device),
        "threads": torch.get_num_threads() if not cuda else "-",
        "torch": torch.__version__,
    }
    print(f"{meta['device']} | threads {meta['threads']} | torch {meta['torch']} | "
          f"inference {args.batch}x3x{args.size}^2, train {args.train_batch}x3x{args.train_size}^2")  # fmt: skip
    t0 = time.perf_counter()
    rows = []
    for model_name in args.models:
        rows += bench_model(model_name, args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        write_csv(rows, meta, RESULTS / "models.csv")
        write_markdown(rows, meta, RESULTS / "models_latest.md", args)
        print(f"appended to {RESULTS / 'models.csv'}; wrote {RESULTS / 'models_latest.md'}")


if __name__ == "__main__":
    main()
