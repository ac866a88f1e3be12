"""Deployment: ONNX (onnxruntime parity, standard ops only), TorchScript, torch.export,
bf16 autocast training with realignment, channels_last, and the ``pwlu export`` CLI.

torch.compile (fullgraph, training and eval) is covered in ``test_compile.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.app.cli import main
from pwlu.export import ONNX_OPSET, max_relative_error

torchvision = pytest.importorskip("torchvision")

#: Standard-domain ONNX operators a converted CNN may contain (the PWLU part is the first block).
ONNX_ALLOWED = {
    # the folded PWLU
    "Sub", "Mul", "Add", "Div", "Floor", "Clip", "Max", "Min", "Cast", "Gather", "GatherND", "GatherElements",
    "Where", "Less", "Greater", "GreaterOrEqual", "IsInf", "IsNaN", "Equal", "And", "Not", "Reshape",
    "Unsqueeze", "Squeeze", "Expand", "Concat", "Constant", "Identity", "Range", "Shape", "Slice",
    # the rest of resnet18 / mobilenet_v3_small
    "Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "AveragePool", "ReduceMean",
    "Flatten", "Gemm", "MatMul", "HardSigmoid", "HardSwish", "Sigmoid", "Transpose",
}  # fmt: skip

IMAGE = (1, 3, 64, 64)


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random PWLU parameters (breakpoints, outer slopes, a shifted range), so no PWLU is a ReLU.

    Scale 0.1: with random conv weights, much larger perturbations make resnet18 so
    ill-conditioned that eager fp32 itself is 3e-4 (relative) away from fp64 at scale 0.3,
    and no fp32 runtime could match it to 1e-5; at 0.1 fp32 vs fp64 is 1.3e-6.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pwlu.PWLU):
                m.points.add_(0.1 * torch.randn(m.points.shape, generator=gen))
                m.left_slope.copy_(0.1 * torch.randn(m.left_slope.shape, generator=gen))
                m.right_slope.add_(0.1 * torch.randn(m.right_slope.shape, generator=gen))
                m.left_bound.add_(0.1 * torch.rand(m.left_bound.shape, generator=gen))
    return model


_MODELS: dict[str, nn.Module] = {}


def converted(name: str) -> nn.Module:
    """A torchvision model (weights=None) with every activation converted to PWLU, perturbed, eval."""
    if name not in _MODELS:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None)
        model = pwlu.convert_activations(model, activation="pwlu", example_input=torch.randn(IMAGE))
        _MODELS[name] = _perturb(model).eval()
    return _MODELS[name]


def _image(seed: int = 1, shape=IMAGE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- ONNX

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _onnx_roundtrip(model: nn.Module, x: torch.Tensor, path, dynamo: bool) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = dict(external_data=False, verbose=False) if dynamo else {}
        torch.onnx.export(model, (x,), str(path), opset_version=ONNX_OPSET, dynamo=dynamo, **kwargs)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}, graph.opset_import
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert not graph.functions, [f.name for f in graph.functions]
    nodes = [(n.domain, n.op_type) for n in graph.graph.node]
    assert {d for d, _ in nodes} <= {"", "ai.onnx"}, f"non-standard domains: {set(nodes)}"
    assert {t for _, t in nodes} <= ONNX_ALLOWED, f"unexpected ops: {({t for _, t in nodes} - ONNX_ALLOWED)}"
    assert "Floor" in {t for _, t in nodes}  # the PWLU is really in the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(y)


@pytest.mark.parametrize(
    "name,dynamo",
    [  # full models through the TorchScript-based exporter (4 s each; the default exporter takes 30 s on resnet18)
        pytest.param("resnet18", False, id="resnet18-torchscript_exporter"),
        pytest.param("mobilenet_v3_small", False, id="mobilenet_v3_small-torchscript_exporter"),
    ],
)
def test_onnx_export_matches_onnxruntime(tmp_path, name, dynamo):
    model = converted(name)
    x = _image()
    with torch.no_grad():
        expected = model(x)
    actual = _onnx_roundtrip(model, x, tmp_path / f"{name}.onnx", dynamo)
    err = max_relative_error(actual, expected)
    assert err <= 1e-5, f"{name}: max relative error {err:.3g} between onnxruntime and PyTorch"


def test_onnx_default_exporter_mobilenet_v3_blocks(tmp_path):
    """The default (torch.export-based) exporter on mobilenet_v3_small's stem and first blocks (SE, Hardswish PWLUs)."""
    block = copy.deepcopy(converted("mobilenet_v3_small").features[:5]).eval()
    x = _image()
    with torch.no_grad():
        expected = block(x)
    err = max_relative_error(_onnx_roundtrip(block, x, tmp_path / "block.onnx", True), expected)
    assert err <= 1e-5, f"max relative error {err:.3g}"


# ----------------------------------------------------------------------------- TorchScript, torch.export


class SmallNet(nn.Module):
    """Channel-wise NCHW PWLU, a (B, T, C) one with channel_dim=-1, and a layer-wise one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = pwlu.PWLU(8, num_intervals=8)
        self.proj = nn.Linear(8, 6)
        self.act2 = pwlu.PWLU(6, num_intervals=4, channel_dim=-1, init="silu")
        self.act3 = pwlu.PWLU(None, num_intervals=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv(x))
        h = self.act2(self.proj(h.flatten(2).transpose(1, 2)))
        return self.act3(h).mean(1)


def _jit_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("which", ["small", "resnet18"])
def test_torchscript_roundtrip_through_file(tmp_path, how, which):
    torch.manual_seed(0)
    model = _perturb(SmallNet()).eval() if which == "small" else converted("resnet18")
    x = _image(2, (2, 3, 9, 9)) * 3 if which == "small" else _image(2)
    with torch.no_grad():
        expected = model(x)
        jitted = _jit_quiet(torch.jit.script, model) if how == "script" else _jit_quiet(torch.jit.trace, model, (x,), check_trace=False)
        jitted.save(str(tmp_path / "m.pt"))
        loaded = _jit_quiet(torch.jit.load, str(tmp_path / "m.pt"))
        actual = loaded(x)
        again = loaded(_image(3, x.shape))  # a traced graph is not specialised to x's values
        fresh = model(_image(3, x.shape))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, fresh, rtol=1e-5, atol=1e-6)
    graph = str(loaded.inlined_graph if how == "script" else loaded.graph)
    assert "pwlu::" not in graph, "the TorchScript graph must not call the custom op"


def test_torch_export_keeps_the_custom_op_and_matches(tmp_path):
    model = converted("resnet18")
    x = _image()
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "pwlu.pwlu.default" in targets, sorted(targets)
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), model(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mixed precision, layouts


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), pwlu.PWLU(8, num_intervals=8),
        nn.Conv2d(8, 8, 3, padding=1), pwlu.PWLU(None), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def test_autocast_bf16_training_with_realignment():
    torch.manual_seed(0)
    model = _tiny_cnn()
    acts = [m for m in model.modules() if isinstance(m, pwlu.PWLU)]
    optimizer = torch.optim.SGD(pwlu.parameter_groups(model, 1e-4), lr=0.05, momentum=0.9)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=2)
    x, y = torch.randn(8, 3, 10, 10) * 2 + 0.5, torch.randint(0, 4, (8,))
    left_before = [a.left_bound.detach().clone() for a in acts]
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            loss = F.cross_entropy(logits, y)
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), f"step {step}: d{name}"
        if step >= 2:  # phase II: every PWLU parameter gets a gradient
            assert all(a.points.grad is not None and a.points.grad.abs().sum() > 0 for a in acts)
        optimizer.step()
        realigner.step()
        if step == 0:
            assert all(a.num_batches_tracked.item() == 1 for a in acts)
            assert all(torch.equal(a.left_bound, lb) for a, lb in zip(acts, left_before))  # frozen in phase I
        if step == 1:  # realigned to the bf16 batches' statistics (mean - 3 std)
            for a in acts:
                torch.testing.assert_close(a.left_bound, a.running_mean - 3 * a.running_std)
                assert torch.isfinite(a.running_std).all() and (a.running_std > 0).all()
    assert realigner.phase == "learning"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_channels_last_matches_contiguous(training):
    torch.manual_seed(0)
    model = _perturb(_tiny_cnn()).train(training)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 12, 12) * 2
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = model(x)
    y_cl = model_cl(x_cl)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-6)
    if training:
        y.square().sum().backward()
        y_cl.square().sum().backward()
        for (name, p), p_cl in zip(model.named_parameters(), model_cl.parameters()):
            torch.testing.assert_close(p_cl.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    # the PWLU alone is layout-exact: same values bit for bit, layout preserved
    act = model[2]
    h = torch.randn(2, 8, 5, 7) * 3
    out_cl = act(h.contiguous(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_cl, act(h))


def test_channels_last_converted_resnet18():
    model = converted("resnet18")
    x = _image()
    with torch.no_grad():
        expected = model(x)
        actual = copy.deepcopy(model).to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert max_relative_error(actual, expected) <= 1e-5


# ----------------------------------------------------------------------------- the export CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pwlu.app.config import TrainConfig
    from pwlu.app.train import train

    out = tmp_path_factory.mktemp("ckpt")
    train(TrainConfig(model="cnn", dataset="synthetic", epochs=2, warmup_epochs=1, batch_size=64, out=str(out),
                      progress=False))  # fmt: skip
    return out / "checkpoint.pt"


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_cli_export_writes_and_verifies(checkpoint, tmp_path, capsys, fmt, suffix):
    out = tmp_path / f"model{suffix}"
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    text = capsys.readouterr().out
    assert "max relative error" in text and str(out) in text
    err = float(text.rsplit("max relative error", 1)[1].split()[0])
    assert err <= 1e-5
    if fmt == "torchscript":  # independent check: the file runs and matches the rebuilt model
        from pwlu.app.checkpoint import model_from_checkpoint
        from pwlu.export import run_exported

        model, example = model_from_checkpoint(checkpoint)
        with torch.no_grad():
            torch.testing.assert_close(run_exported(out, fmt, example), model(example), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,extra", [("vit", {}), ("resnet", {"merges": "pwlu2d"})])
def test_cli_export_vit_and_merges(tmp_path, capsys, model, extra):
    """Found by an adversarial review: the export rebuilt a ViT for 28 x 28 images whatever its
    dataset (synthetic: 16), and a --merges pwlu2d model without its merges: both refused as
    "does not match its config"."""
    from pwlu.app.config import TrainConfig
    from pwlu.app.train import train

    run = tmp_path / "run"
    train(TrainConfig(model=model, dataset="synthetic", epochs=2, warmup_epochs=1, batch_size=32, train_subset=64,
                      test_subset=32, out=str(run), progress=False, **extra))  # fmt: skip
    out = tmp_path / "model.pt"
    assert main(["export", str(run / "checkpoint.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert float(text.rsplit("max relative error", 1)[1].split()[0]) <= 1e-5


def test_cli_export_errors(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pwlu: error:") and "corrupt" in err and err.count("\n") == 1
    assert not (tmp_path / "model.onnx").exists()
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "torchscript"]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"config": {"model": "cnn", "dataset": "synthetic"}, "model": {"bogus": torch.zeros(2)}}, bad)
    assert main(["export", str(bad), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.startswith("pwlu: error:")
    with pytest.raises(SystemExit) as e:
        main(["export", str(bad), "--format", "tflite"])
    assert e.value.code == 2
