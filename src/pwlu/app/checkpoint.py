"""Rebuild the model of a training checkpoint, and export it (ONNX or TorchScript) verified against PyTorch.

:func:`model_from_checkpoint` rebuilds the model of a :func:`pwlu.app.train.train` checkpoint
without loading a dataset; :func:`export_checkpoint` exports it with the library's generic
exporters (:mod:`pwlu.export`) and checks the exported file against eager PyTorch.

The exported model takes the *normalised* input that the training loop feeds it,
``(x / 255 - mean) / std`` with the checkpoint's per-channel ``normalisation``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import torch
from torch import nn

from pwlu.export import (
    FORMATS,
    SUFFIXES,
    ExportError,
    export_onnx,
    export_torchscript,
    max_relative_error,
    run_exported,
)

from .config import ConfigError, TrainConfig
from .models import build_model
from .train import check_writable_file, load_checkpoint, make_activation_factory, state_dict_error

#: Image side of the built-in datasets (checkpoints do not store it).
IMAGE_SIZES = {"fashion-mnist": 28, "cifar10": 32, "synthetic": 16}


def model_from_checkpoint(path: str | os.PathLike, image_size: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    """Rebuild the model of a :func:`pwlu.app.train.train` checkpoint, in eval mode, with an example input.

    The input channels come from the checkpoint's normalisation, the number of classes from
    the classifier weight, the image side from the dataset (or ``image_size``); no dataset is
    loaded.

    Returns:
        ``(model, example)``: ``example`` is a ``Tensor[2, C, S, S]`` of normalised-scale noise.
    """
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be >= 1, but got {image_size}")
    ckpt = load_checkpoint(path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
        state = ckpt["model"]
        classifier = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if "normalisation" in ckpt:
            in_channels = int(torch.as_tensor(ckpt["normalisation"][0]).numel())
        else:
            in_channels = int(next(v for k, v in state.items() if k.endswith("weight") and v.dim() == 4).shape[1])
        num_classes = int(classifier[-1].shape[0])
    except (TypeError, AttributeError, IndexError, StopIteration, KeyError) as e:
        raise ConfigError(f"checkpoint {path} has an unexpected layout ({type(e).__name__}: {e})") from None
    size = image_size or IMAGE_SIZES.get(cfg.dataset)
    if size is None:
        raise ConfigError(f"the image size of dataset {cfg.dataset!r} is unknown; pass --image-size")
    model = build_model(cfg.model, make_activation_factory(cfg), in_channels, num_classes, image_size=size)
    if cfg.merges == "pwlu2d":  # as pwlu.app.train.build
        from pwlu import convert_merges

        example = torch.zeros(2, in_channels, size, size)
        model = convert_merges(model, cfg.merge_intervals, mode=cfg.mode, example_input=example)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {path} does not match its config: {state_dict_error(e)}") from None
    model.eval()
    example = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
    return model, example


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    image_size: int | None = None,
    rtol: float = 1e-5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a checkpoint to ``fmt`` and verify it against eager PyTorch on a random batch.

    Args:
        checkpoint: a ``checkpoint.pt`` written by :func:`pwlu.app.train.train`.
        fmt (str): ``"onnx"`` or ``"torchscript"``.
        out: output file; default next to the checkpoint, ``model.onnx`` or ``model.pt``.
        image_size (int, optional): image side, needed only for ``imagefolder`` datasets.
        rtol (float): largest accepted max relative error of the exported file.
        overwrite (bool): replace an existing ``out`` (never the checkpoint itself).

    Returns:
        dict with ``path``, ``format``, ``method``, ``max_rel_err``, ``input_shape``.

    Raises:
        ValueError: unknown format. ConfigError: a bad ``image_size``, an unwritable ``out``, an
        existing ``out`` without ``overwrite``, ``out`` naming the checkpoint, or a checkpoint that
        does not match its config. ExportError: export failed or the outputs differ.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    model, example = model_from_checkpoint(checkpoint, image_size)
    path = pathlib.Path(out) if out is not None else pathlib.Path(checkpoint).with_name("model" + SUFFIXES[fmt])
    check_writable_file(path)
    if path.exists() and path.resolve() == pathlib.Path(checkpoint).resolve():
        raise ConfigError(f"--out {path} is the checkpoint being exported; choose another file")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ConfigError(f"--out {path} already exists; pass --overwrite to replace it, or choose another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    how = "torch.onnx.export (dynamo)"
    try:
        if fmt == "onnx":
            export_onnx(model, example, path)
        else:
            how = export_torchscript(model, example, path)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - exporters raise many types
        raise ExportError(f"{fmt} export failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    # verify on a batch of a different size than the example (the batch axis is dynamic)
    x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    err = max_relative_error(run_exported(path, fmt, x), expected)
    if not err <= rtol:  # also catches NaN
        raise ExportError(f"{path}: exported model differs from PyTorch (max relative error {err:.3g} > {rtol:g})")
    return {"path": str(path), "format": fmt, "method": how, "max_rel_err": err, "input_shape": list(x.shape)}
