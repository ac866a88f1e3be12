"""Hugging Face transformers (and timm) activations in convert_activations, built from small configs
(no downloads)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.convert import is_activation
from pwlu.matching import activation_target

transformers = pytest.importorskip("transformers")
from transformers import activations as hf_act  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n: int = 4, vocab: int = 128, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(n)]


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def _scale_mlps(model: nn.Module, factor: float) -> None:
    """Scale the weights feeding the activations, so that they see inputs of order 1 (a freshly
    initialised model's are ~0.1, where every GELU is almost linear and matching is trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("gate_proj", "up_proj", "c_fc")) and p.dim() == 2:
                p.mul_(factor)


@pytest.mark.parametrize("build,act_cls,site,channels", [
    (_llama, "SiLUActivation", "mlp.act_fn", 64),
    (_gpt2, "NewGELUActivation", "mlp.act", 128),
], ids=["llama", "gpt2"])  # fmt: skip
def test_hf_model_matched_then_trains(build, act_cls, site, channels):
    torch.manual_seed(0)
    model = build().eval()
    _scale_mlps(model, 8.0)
    acts = [m for n, m in model.named_modules() if n.endswith(site)]
    assert len(acts) == 2 and all(type(m).__name__ == act_cls for m in acts)
    batches = _tokens()
    with torch.no_grad():
        ref = model(batches[0]).logits
        # the activations see inputs of order 1: matching is not trivially a linear fit
        seen = []
        h = acts[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].std().item()))
        model(batches[0])
        h.remove()
    assert seen[0] > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no functional calls, something converted: no warning
        conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    pw = pwlu.pwlu_modules(conv)
    assert [n for n, _ in pw] == [n for n, m in model.named_modules() if n.endswith(site)]
    assert all(p.num_channels == channels and p.channel_dim == -1 and p.matched for _, p in pw)
    with torch.no_grad():
        out = conv(batches[0]).logits
        unseen = conv(_tokens(1, seed=9)[0]).logits
        unseen_ref = model(_tokens(1, seed=9)[0]).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert ((unseen - unseen_ref).norm() / unseen_ref.norm()).item() < 0.02
    # ... and it trains: one step, gradients reach every PWLU parameter
    conv.train()
    opt = torch.optim.AdamW(conv.parameters(), lr=1e-3)
    x = batches[1]
    loss = conv(x, labels=x).loss
    assert math.isfinite(loss.item())
    loss.backward()
    for name, p in pw:
        for pname in ("points", "left_bound", "right_bound", "left_slope", "right_slope"):
            grad = getattr(p, pname).grad
            assert grad is not None and torch.isfinite(grad).all(), (name, pname)
        assert p.points.grad.abs().sum() > 0, name
    opt.step()


def test_hf_calibration_with_keyword_batches():
    """Tokenizer-style batches: transformers' BatchEncoding (a mapping, not a dict) and plain dicts
    of keyword arguments are passed as ``model(**batch)``."""
    from transformers import BatchEncoding

    model = _gpt2().eval()
    _scale_mlps(model, 8.0)
    tokens = _tokens()
    batches = [BatchEncoding({"input_ids": t, "attention_mask": torch.ones_like(t)}) for t in tokens]
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    plain = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[{"input_ids": t} for t in tokens])
    assert len(pwlu.pwlu_modules(conv)) == 2
    for (_, a), (_, b) in zip(pwlu.pwlu_modules(conv), pwlu.pwlu_modules(plain)):  # the same inputs recorded
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.points, b.points)
    with torch.no_grad():
        ref, out = model(**batches[0]).logits, conv(**batches[0]).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    with pytest.raises(TypeError, match="iterable of batches"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches[0])


def test_hf_relu_init_default_converts_too():
    model = _gpt2().eval()
    conv = pwlu.convert_activations(model, example_input=_tokens(1)[0])
    assert len(pwlu.pwlu_modules(conv)) == 2 and all(p.matched is None for _, p in pwlu.pwlu_modules(conv))


HF_CASES = [
    ("GELUActivation", {}, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), (0.0, 1.0)),
    ("NewGELUActivation", {}, lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
     (0.0, 1.0)),
    ("FastGELUActivation", {}, lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
     (0.0, 1.0)),
    ("QuickGELUActivation", {}, lambda x: x * torch.sigmoid(1.702 * x), (0.0, 1.0)),
    ("SiLUActivation", {}, lambda x: x * torch.sigmoid(x), (0.0, 1.0)),
    ("MishActivation", {}, lambda x: x * torch.tanh(F.softplus(x)), (0.0, 1.0)),
    ("ClippedGELUActivation", {"min": -10.0, "max": 10.0},  # transformers' "gelu_10"
     lambda x: torch.clamp(0.5 * x * (1 + torch.erf(x / math.sqrt(2))), -10, 10), (0.0, 0.0)),
]  # fmt: skip


@pytest.mark.parametrize("cls,kwargs,fn,slopes", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_activation_classes_recognised_and_matched(cls, kwargs, fn, slopes):
    act = getattr(hf_act, cls)(**kwargs)
    assert is_activation(act)
    target = activation_target(act, 4)
    assert (target.left_slope, target.right_slope) == slopes
    x = torch.linspace(-12, 12, 481, dtype=torch.float64).reshape(1, -1)
    torch.testing.assert_close(target.fn(x), fn(x), rtol=1e-6, atol=1e-6)
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 10, 3, generator=g) * 3 for _ in range(3)]
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    assert isinstance(conv[1], pwlu.PWLU) and conv[1].channel_dim == -1
    with torch.no_grad():
        rel = ((conv(batches[0]) - model(batches[0])).norm() / model(batches[0]).norm()).item()
    assert rel < 0.02


def test_hf_unsupported_classes_are_left_alone():
    for act in (hf_act.ReLUSquaredActivation(), hf_act.LaplaceActivation(), hf_act.LinearActivation()):
        assert not is_activation(act)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("cls", ["GELU", "GELUTanh", "QuickGELU", "Swish", "SwishMe", "Mish", "MishMe", "HardSwish",
                                 "HardSwishMe", "HardMish", "HardMishMe"])  # fmt: skip
def test_timm_activation_classes_matched(cls):
    from timm.layers import activations, activations_me

    act = getattr(activations, cls, None) or getattr(activations_me, cls)
    act = act()
    assert is_activation(act)
    target = activation_target(act, 4)
    assert (target.left_slope, target.right_slope) == (0.0, 1.0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), act, nn.Conv2d(4, 2, 1)).eval()
    batches = [torch.randn(4, 3, 6, 6) * 2 for _ in range(3)]
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    with torch.no_grad():
        rel = ((conv(batches[0]) - model(batches[0])).norm() / model(batches[0]).norm()).item()
    assert conv[1].matched and rel < 0.03


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc3(F.silu(self.fc2(self.act(self.fc1(x)))))


def test_functional_calls_warn_when_partly_converted():
    with pytest.warns(UserWarning, match=r"also calls activations as functions \(silu x1\)"):
        model = pwlu.convert_activations(FunctionalMLP(), init="match", calibration=[torch.randn(8, 4)])
    assert isinstance(model.act, pwlu.PWLU)


class OnlyFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.gelu(self.fc(x))


def test_nothing_converted_warns():
    with pytest.warns(UserWarning, match="converted nothing.*gelu x1"):
        pwlu.convert_activations(OnlyFunctional(), init="match", calibration=[torch.randn(8, 4)])
