"""Generic exporters for models that contain PWLUs: ONNX and TorchScript, and running the exported file.

In eval mode a :class:`pwlu.PWLU` computes the folded form of SPEC section 5
(``y = a[k] * (x - shift) + b[k]``). While it is scripted, traced or exported to ONNX it
takes a pure-torch copy of that path (:func:`pwlu.ops.folded.pwlu_folded`) instead of
its custom op, so the exported graph holds only standard operators: ONNX opset
:data:`ONNX_OPSET` (domain ``""``: ``Where``, ``GatherND``/``Gather``, ``Floor``, ``Clip``,
``Less``, ``GreaterOrEqual``, ``IsInf``, ``IsNaN``, ``Mul``, ``Add``, ``Sub``, ``Cast``...).
``torch.export.export`` and ``torch.compile`` keep the custom op (it has a fake kernel).

:func:`run_exported` runs an exported file (onnxruntime or ``torch.jit.load``) and
:func:`max_relative_error` compares it with eager PyTorch. Rebuilding and exporting a model
from a training checkpoint is the application's job (``pwlu export``, :mod:`pwlu.app.checkpoint`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

#: ONNX opset of :func:`export_onnx` (standard domain only).
ONNX_OPSET = 18

FORMATS = ("onnx", "torchscript")
#: The default file suffix of each format.
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(RuntimeError):
    """Export or verification failed; the message is one line (``pwlu export`` prints it as its error)."""


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = ONNX_OPSET) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch axis.

    Needs ``onnx`` and ``onnxscript`` (``pip install 'pwlu[onnx]'``).
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'pwlu[onnx]'") from None
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},),
            input_names=["input"], output_names=["output"], verbose=False, external_data=False,
        )  # fmt: skip
    program.save(str(path))


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> str:
    """``torch.jit.script`` the model, or ``torch.jit.trace`` it on ``example`` where the model's own
    code does not script; saved with ``torch.jit.save``. A PWLU takes its pure-torch folded path
    either way. Returns ``"script"`` or ``"trace"``.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, but still the TorchScript route
        try:
            module, how = torch.jit.script(model), "script"
        except Exception:  # noqa: BLE001 - the frontend raises many types for unsupported Python
            with torch.no_grad():
                module, how = torch.jit.trace(model, (example,)), "trace"
    module.save(str(path))
    return how


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x`` with onnxruntime (ONNX) or ``torch.jit.load`` (TorchScript)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("verifying an ONNX file needs onnxruntime: pip install 'pwlu[onnx]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        return torch.from_numpy(y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(x)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max(max |expected|, tiny)``."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.to(expected.dtype) - expected).abs().max() / scale)

