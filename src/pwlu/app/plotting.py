"""Figures: learned PWLU shapes over their input histograms (paper Fig. 7) and IOU distributions (Fig. 6)."""

from __future__ import annotations

import math
import pathlib

import torch
from torch import Tensor, nn

from pwlu import PWLU, npwlu, pwlu

from .launcher import require


def _pyplot():
    """``matplotlib.pyplot`` with the Agg backend; :class:`~pwlu.app.launcher.MissingExtraError` without matplotlib."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot")


@torch.no_grad()
def collect_inputs(model: nn.Module, batches, max_per_module: int = 20000) -> dict[str, Tensor]:
    """A random subsample of every PWLU's inputs (layer-wide) over ``batches`` in eval mode."""
    samples: dict[str, list[Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, PWLU):

            def hook(mod, args, name=name):
                x = args[0].detach().float().reshape(-1)
                keep = torch.randperm(x.numel())[: max_per_module // 4]
                samples.setdefault(name, []).append(x[keep])

            handles.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: torch.cat(v)[:max_per_module] for k, v in samples.items()}


@torch.no_grad()
def plot_shapes(model: nn.Module, inputs: dict[str, Tensor], path: str | pathlib.Path, channels: int = 4) -> None:
    """A grid with one panel per PWLU: the learned function (up to ``channels`` channels) over
    its input histogram, with the boundaries marked (and, for an N-PWLU, its learned breakpoints
    as dots on each curve)."""
    plt = _pyplot()
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, PWLU)]
    if not modules:
        raise ValueError("the model has no PWLU modules to plot")
    cols = min(4, len(modules))
    rows = math.ceil(len(modules) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, modules):
        xs = inputs.get(name)
        lo = min(m.left_bound.min().item(), xs.quantile(0.001).item() if xs is not None else 0.0)
        hi = max(m.right_bound.max().item(), xs.quantile(0.999).item() if xs is not None else 0.0)
        pad = 0.1 * (hi - lo)
        grid = torch.linspace(lo - pad, hi + pad, 400)
        if xs is not None:
            hax = ax.twinx()
            hax.hist(xs.numpy(), bins=60, range=(lo - pad, hi + pad), color="0.85")
            hax.set_yticks([])
            ax.set_zorder(hax.get_zorder() + 1)
            ax.patch.set_visible(False)
        curves = _evaluate(m, grid)  # (L, C) or (L, 1)
        breakpoints = _breakpoints(m)  # (C, N+1) for an N-PWLU, else None
        for c in range(min(channels, curves.shape[1])):
            (line,) = ax.plot(grid.numpy(), curves[:, c].numpy(), lw=1.2)
            if breakpoints is not None:
                values = m.points.detach().float().reshape(-1, m.num_intervals + 1)[c]
                ax.plot(breakpoints[c].numpy(), values.numpy(), "o", ms=2.5, color=line.get_color())
        for b in (m.left_bound.min().item(), m.right_bound.max().item()):
            ax.axvline(b, color="0.5", ls=":", lw=0.8)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(modules) :]:
        ax.axis("off")
    fig.suptitle("Learned PWLU shapes (curves: first channels; grey: input histogram)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _breakpoints(m: PWLU) -> Tensor | None:
    """An N-PWLU's breakpoints as ``(C, N+1)`` float32 (``(1, N+1)`` layer-wise); ``None`` for a PWLU."""
    if getattr(m, "width_logits", None) is None:
        return None
    return m.breakpoints().float().reshape(-1, m.num_intervals + 1)


def _evaluate(m: PWLU, grid: Tensor) -> Tensor:
    """Every channel of ``m`` on ``grid``: ``(L, C)`` (``(L, 1)`` layer-wise)."""
    fn, params = pwlu, (m.points, m.left_bound, m.right_bound, m.left_slope, m.right_slope)
    if getattr(m, "width_logits", None) is not None:  # N-PWLU (SPEC section 9)
        fn, params = npwlu, (m.points, m.width_logits, *params[1:])
    if not m.channel_wise:
        return fn(grid, *params).reshape(-1, 1)
    x = grid.reshape(-1, 1).expand(-1, m.num_channels).contiguous()
    return fn(x, *params, channel_dim=1)


def plot_iou(ious: dict[str, dict[str, Tensor]], path: str | pathlib.Path) -> None:
    """Histograms of per-channel IOUs, one series per run (paper Fig. 6 style)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, per_module in ious.items():
        values = torch.cat([v.reshape(-1) for v in per_module.values()]).numpy()
        ax.hist(values, bins=20, range=(0, 1), alpha=0.55, label=f"{label} (mean {values.mean():.2f})")
    ax.set_xlabel("IOU of [B_L, B_R] with the input range (0.1%-99.9%)")
    ax.set_ylabel("channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
