"""Agreement of function-matched PWLU models with the trained originals (SPEC section 12).

A small CNN (pwlu.app.models.SmallCNN, 16-32-64 channels) is trained for one epoch on 10k
Fashion-MNIST training images with GELU, SiLU or Hardswish; it is then converted with
``convert_activations(init="match")`` (channel-wise, N in {4, 8, 16, 32}, both fits), calibrated
on 8 batches of 128 training images, and compared with the original on the 10k test images:
agreement of the top-1 predictions, top-1 accuracy, relative L2 error of the logits.

    OMP_NUM_THREADS=1 python experiments/finetune/match_agreement.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.app.data import channel_stats, load_fashion_mnist, normalise
from pwlu.app.models import SmallCNN

ACTS = {"gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


def train_one_epoch(act: str, seed: int, data, n_train: int = 10_000) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(data.train_y), generator=g)[:n_train]
    x, y = data.train_x[idx], data.train_y[idx]
    mean, std = channel_stats(x)
    model = SmallCNN(lambda c: ACTS[act]())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    for i in range(0, n_train, 128):
        loss = F.cross_entropy(model(normalise(x[i : i + 128], mean, std)), y[i : i + 128])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib = [normalise(x[i : i + 128], mean, std) for i in range(0, 8 * 128, 128)]
    return model, calib, (mean, std)


@torch.no_grad()
def logits_of(model, x, mean, std):
    return torch.cat([model(normalise(x[i : i + 1000], mean, std)) for i in range(0, len(x), 1000)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--intervals", nargs="+", type=int, default=[4, 8, 16, 32])
    args = p.parse_args()
    data = load_fashion_mnist()
    print("| activation | seed | N | fit | agreement (%) | top-1 original (%) | top-1 matched (%) | rel. logit error |")
    print("|---|---|---|---|---|---|---|---|")
    for act in ACTS:
        for seed in args.seeds:
            model, calib, (mean, std) = train_one_epoch(act, seed, data)
            ref = logits_of(model, data.test_x, mean, std)
            acc0 = (ref.argmax(1) == data.test_y).float().mean().item() * 100
            for n in args.intervals:
                for fit in ("lstsq", "interpolate"):
                    t0 = time.perf_counter()
                    conv = pwlu.convert_activations(copy.deepcopy(model), num_intervals=n, init="match",
                                                    calibration=calib, fit=fit)  # fmt: skip
                    t = time.perf_counter() - t0
                    out = logits_of(conv, data.test_x, mean, std)
                    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100
                    acc = (out.argmax(1) == data.test_y).float().mean().item() * 100
                    err = ((out - ref).norm() / ref.norm()).item()
                    print(f"| {act} | {seed} | {n} | {fit} | {agree:.2f} | {acc0:.2f} | {acc:.2f} | {err:.4f} |"
                          f" <!-- {t:.2f}s -->", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
