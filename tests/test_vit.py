"""The small ViT of the reproduction (issue 13): token-layout activations, every activation, a CLI run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pwlu
from pwlu.app.cli import main
from pwlu.app.config import TrainConfig
from pwlu.app.models import ARCHITECTURES, ViTSmall, build_model
from pwlu.app.train import make_activation_factory


def _vit(activation: str, image_size: int = 28, **cfg) -> nn.Module:
    return build_model("vit", make_activation_factory(TrainConfig(model="vit", activation=activation, **cfg)),
                       image_size=image_size)  # fmt: skip


def test_vit_is_an_architecture_of_the_cli():
    assert "vit" in ARCHITECTURES
    TrainConfig(model="vit", activation="gelu").validate()


@pytest.mark.parametrize("activation", ["relu", "gelu", "swish", "prelu", "apl", "pwlu"])
def test_vit_runs_with_each_token_layout_activation(activation):
    torch.manual_seed(0)
    model = _vit(activation)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_vit_pwlu_is_channel_wise_over_the_last_dim():
    model = _vit("pwlu")
    found = [m for m in model.modules() if isinstance(m, pwlu.PWLU)]
    assert len(found) == 4  # one per block's MLP
    assert all(m.channel_dim == -1 and m.num_channels == 128 for m in found)
    # the same model in layer mode has one function per call site
    layer = [m for m in _vit("pwlu", mode="layer").modules() if isinstance(m, pwlu.PWLU)]
    assert all(m.num_channels is None for m in layer)


def test_vit_tokens_feed_the_pwlu_as_b_t_c():
    model = _vit("pwlu")
    seen = []
    model.blocks[0].mlp[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    model(torch.randn(2, 1, 28, 28))
    assert seen == [torch.Size([2, 16, 128])]  # 4x4 patches of 7x7 pixels


def test_vit_rejects_an_image_size_the_patch_grid_does_not_divide():
    with pytest.raises(ValueError, match="30"):
        ViTSmall(make_activation_factory(TrainConfig(model="vit", activation="relu")), image=30)


def test_frelu_in_a_vit_is_a_clear_error():
    with pytest.raises(ValueError, match="channel_dim=-1"):
        _vit("frelu")


def test_cli_trains_a_vit_with_pwlu_and_realigns(tmp_path):
    out = tmp_path / "vit"
    args = ["train", "--model", "vit", "--activation", "pwlu", "--dataset", "synthetic", "--batch-size", "64",
            "--epochs", "2", "--warmup-epochs", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and 0.0 <= metrics["final_test_acc"] <= 1.0
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    lefts = [v for k, v in state.items() if k.endswith("left_bound")]
    assert len(lefts) == 4 and all(v.shape == (128,) for v in lefts)
    assert not all(torch.all(v == -3.0) for v in lefts)  # phase I ended: the ranges moved
