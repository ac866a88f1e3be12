"""Function-matching conversion (SPEC sections 11-12): convert_activations(init="match")."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import pathlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.convert import ConversionError
from pwlu.matching import Calibration, activation_target, fit_pwlu, max_abs_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(act: nn.Module, channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), act, nn.Conv2d(channels, 4, 3))


def _batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 10, 10, generator=g) for _ in range(n)]


def _trained_bn(model: nn.Module) -> nn.Module:
    """Give the batch norm non-trivial running statistics (shifted, scaled channels), then eval."""
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-0.5, 0.5, bn.num_features))
        bn.running_var.copy_(torch.linspace(0.3, 2.0, bn.num_features))
        bn.weight.copy_(torch.linspace(0.5, 2.0, bn.num_features))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, bn.num_features))
    return model.eval()


# Independent closed forms of the replaced functions (not read from the modules).
def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


CASES = [
    (nn.GELU(), _gelu, 0.0, 1.0),
    (nn.GELU(approximate="tanh"), _gelu_tanh, 0.0, 1.0),
    (nn.SiLU(), lambda x: x / (1 + torch.exp(-x)), 0.0, 1.0),
    (nn.Hardswish(), lambda x: x * torch.clamp(x + 3, 0, 6) / 6, 0.0, 1.0),
    (nn.ReLU(), lambda x: torch.clamp(x, min=0), 0.0, 1.0),
    (nn.ReLU6(), lambda x: torch.clamp(x, 0, 6), 0.0, 0.0),
    (nn.LeakyReLU(0.2), lambda x: torch.where(x > 0, x, 0.2 * x), 0.2, 1.0),
    (nn.ELU(alpha=0.7), lambda x: torch.where(x > 0, x, 0.7 * (torch.exp(x) - 1)), 0.0, 1.0),
    (nn.Mish(), lambda x: x * torch.tanh(torch.log1p(torch.exp(x))), 0.0, 1.0),
    (nn.Softplus(), lambda x: torch.log1p(torch.exp(x)), 0.0, 1.0),
]


@pytest.mark.parametrize("fit", ["lstsq", "interpolate"])
@pytest.mark.parametrize("act,fn,k_l,k_r", CASES, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "")
def test_matched_pwlu_fits_the_function(act, fn, k_l, k_r, fit):
    torch.manual_seed(0)
    model = _trained_bn(_net(copy.deepcopy(act)))
    batches = _batches()
    ref = model(batches[0])
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches, fit=fit)
    p = conv[2]
    assert isinstance(p, pwlu.PWLU) and p.num_channels == 8 and p.matched is not None
    # the range is mean ± 3 std of the recorded inputs (Eq. 6), per channel, pooled over the batches
    with torch.no_grad():
        inputs = torch.cat([model[1](model[0](x)) for x in batches]).transpose(0, 1).reshape(8, -1).double()
    mean, std = inputs.mean(1).float(), inputs.std(1).float()
    torch.testing.assert_close(p.left_bound, mean - 3 * std, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.right_bound, mean + 3 * std, rtol=1e-4, atol=1e-4)
    # the function's own outer slopes
    torch.testing.assert_close(p.left_slope, torch.full((8,), k_l))
    torch.testing.assert_close(p.right_slope, torch.full((8,), k_r))
    # close to the function over the range, and beyond it along the asymptotes
    lo, hi = p.left_bound.detach().unsqueeze(-1), p.right_bound.detach().unsqueeze(-1)
    x = lo + torch.linspace(-1, 2, 301) * (hi - lo)  # from one range-width left to one right
    with torch.no_grad():
        y = p(x.t().unsqueeze(-1).unsqueeze(-1))[..., 0, 0].t()
    scale = (fn(x).amax(1) - fn(x).amin(1)).clamp(min=1.0).unsqueeze(-1)
    inside = (x >= lo) & (x <= hi)
    assert ((y - fn(x)).abs() / scale)[inside].max() < 0.03
    # the whole model stays close to the original
    out = conv(batches[0])
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    # interpolation: exact at the breakpoints
    if fit == "interpolate":
        bps = lo + torch.arange(17) / 16 * (hi - lo)
        torch.testing.assert_close(p.points.detach(), fn(bps.double()).float(), rtol=1e-5, atol=1e-5)


def test_lstsq_beats_interpolation_on_the_recorded_inputs():
    model = _trained_bn(_net(nn.GELU()))
    batches = _batches()
    errs = {}
    for fit in ("lstsq", "interpolate"):
        conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches, fit=fit)
        with torch.no_grad():
            errs[fit] = sum(((conv(x) - model(x)) ** 2).sum().item() for x in batches)
    assert errs["lstsq"] < errs["interpolate"]


def test_layer_mode_channels_last_and_pairs():
    model = nn.Sequential(nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 3)).eval()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(4, 5, 6, generator=g), torch.zeros(4)) for _ in range(3)]  # (input, target)
    conv = pwlu.convert_activations(copy.deepcopy(model), mode="layer", num_intervals=8, init="match",
                                    calibration=pairs)  # fmt: skip
    assert conv[1].num_channels is None and conv[1].matched == "SiLU"
    x = pairs[0][0]
    assert ((conv(x) - model(x)).norm() / model(x).norm()).item() < 0.03
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=iter(pairs))  # a generator
    assert conv[1].num_channels == 12 and conv[1].channel_dim == -1
    assert ((conv(x) - model(x)).norm() / model(x).norm()).item() < 0.01


def test_dataloader_and_prelu_per_channel():
    model = _trained_bn(_net(nn.PReLU(8)))
    with torch.no_grad():
        model[2].weight.copy_(torch.linspace(-0.3, 0.6, 8))
    ds = torch.utils.data.TensorDataset(torch.cat(_batches()), torch.zeros(64))
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=loader)
    torch.testing.assert_close(conv[2].left_slope, torch.linspace(-0.3, 0.6, 8))
    x = _batches(1, seed=5)[0]
    assert ((conv(x) - model(x)).norm() / model(x).norm()).item() < 0.05
    with pytest.raises(ConversionError, match="PReLU"):
        pwlu.convert_activations(copy.deepcopy(model), mode="layer", init="match", calibration=_batches())


def test_max_calibration_batches_ends_an_endless_iterator():
    """Regression: calibration= was iterated to its end, so an endless iterator (``itertools.cycle``,
    an infinite sampler's DataLoader) never returned. ``max_calibration_batches`` stops it; the
    PWLUs equal those calibrated on exactly those batches, and no batch past the limit is drawn."""
    model = _trained_bn(_net(nn.GELU()))
    batches = _batches(2)
    drawn = []

    def endless():
        for b in itertools.cycle(batches):
            drawn.append(b)
            yield b

    conv = pwlu.convert_activations(
        copy.deepcopy(model), init="match", calibration=endless(), max_calibration_batches=3
    )
    assert len(drawn) == 3
    ref = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[*batches, batches[0]])
    for key, value in ref.state_dict().items():
        assert torch.equal(conv.state_dict()[key], value), key
    # a limit above the batches there are takes them all
    more = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches, max_calibration_batches=9)
    fewer = pwlu.convert_activations(
        copy.deepcopy(model), init="match", calibration=batches[:1], max_calibration_batches=1
    )
    two = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    assert torch.equal(more[2].running_std, two[2].running_std)
    assert not torch.equal(fewer[2].running_std, two[2].running_std)
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ValueError, match=f"max_calibration_batches.*{re.escape(repr(bad))}"):
            pwlu.convert_activations(
                copy.deepcopy(model), init="match", calibration=batches, max_calibration_batches=bad
            )
    with pytest.raises(ValueError, match="max_calibration_batches.*init='match'"):
        pwlu.convert_activations(copy.deepcopy(model), example_input=batches[0], max_calibration_batches=2)


def test_calibration_restores_modes_buffers_and_rng():
    model = _trained_bn(_net(nn.GELU())).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    conv = pwlu.convert_activations(model, init="match", calibration=_batches())
    assert torch.equal(torch.rand(3), expected)
    assert all(m.training for m in conv.modules())
    for k, v in conv.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    # calibration ran in eval mode: the range is that of the running-statistics batch norm
    p = conv[2]
    with torch.no_grad():
        x = torch.cat([model[1].eval()(model[0](b)) for b in _batches()])
    model[1].train()
    assert abs(p.running_mean.mean().item() - x.mean().item()) < 1e-3


def test_bad_arguments_and_default_stays_relu():
    model = _trained_bn(_net(nn.GELU()))
    conv = pwlu.convert_activations(copy.deepcopy(model), example_input=_batches(1)[0])
    assert conv[2].matched is None
    torch.testing.assert_close(conv[2].right_bound, torch.full((8,), 3.0))  # init="relu": ReLU on [-3, 3]
    with pytest.raises(ValueError, match="calibration"):
        pwlu.convert_activations(copy.deepcopy(model), init="match")
    with pytest.raises(ValueError, match="no batch"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[])
    with pytest.raises(TypeError, match="iterable of batches"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=_batches(1)[0])
    with pytest.raises(ValueError, match="'gelu2'"):
        pwlu.convert_activations(copy.deepcopy(model), init="gelu2", calibration=_batches())
    with pytest.raises(ValueError, match="'spline'"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=_batches(), fit="spline")
    with pytest.raises(ValueError, match="activation='pwlu'"):
        pwlu.convert_activations(copy.deepcopy(model), activation="relu", init="match", calibration=_batches())
    with pytest.raises(ValueError, match="exclude each other"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=_batches(),
                                 activation_kwargs={"init": "silu"})  # fmt: skip
    # calibration or a fit without init="match" was silently ignored (a ReLU-initialised model)
    with pytest.raises(ValueError, match=r"calibration= is used only with init='match'.*init is 'relu'"):
        pwlu.convert_activations(copy.deepcopy(model), calibration=_batches())
    with pytest.raises(ValueError, match=r"fit='interpolate' is used only with init='match'"):
        pwlu.convert_activations(copy.deepcopy(model), example_input=_batches(1)[0], fit="interpolate")
    with pytest.raises(ValueError, match="'no-such-fit'"):
        pwlu.convert_activations(copy.deepcopy(model), calibration=_batches(), fit="no-such-fit")


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 4, 1), nn.GELU(), nn.GELU()

    def forward(self, x):
        return self.b(self.conv(x)) if x.shape[0] == 1 else self.a(self.conv(x))


@pytest.mark.filterwarnings("ignore:.*not called by the example")
def test_call_site_missed_by_calibration_is_an_error():
    with pytest.raises(ConversionError, match="'a'.*calibration"):
        pwlu.convert_activations(TwoPaths(), init="match", calibration=[torch.randn(1, 3, 4, 4)],
                                 example_input=torch.randn(2, 3, 4, 4))  # fmt: skip


def test_fit_pwlu_direct_and_half_precision():
    p = pwlu.PWLU(3, num_intervals=8).to(torch.bfloat16)
    target = activation_target(nn.GELU(), 3)
    calib = Calibration(p, 512, torch.Generator().manual_seed(0))
    x = torch.randn(64, 3, 5) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1) + 0.3
    calib.record(x.to(torch.bfloat16))
    assert calib.samples.shape == (3, 320)
    assert calib.finish() == []  # no constant channel
    fit_pwlu(p, target, calib.samples)
    assert p.points.dtype == torch.bfloat16 and torch.isfinite(p.points).all()
    p32 = pwlu.PWLU(3, num_intervals=8)
    for name in ("running_mean", "running_std", "num_batches_tracked"):
        getattr(p32, name).copy_(getattr(p, name))
    fit_pwlu(p32, target, calib.samples)
    err32 = max_abs_error(p32, target, calib.samples)
    assert err32 < 0.3  # N = 8 over a range of width ~19: d ~ 2.4, GELU's curvature
    # bfloat16 only adds the rounding of the stored parameters (8 bits of |Y_P| <= 10)
    assert max_abs_error(p, target, calib.samples) <= err32 + 2 * 10 * 2**-8
    with pytest.raises(ValueError, match="no recorded statistics"):
        fit_pwlu(pwlu.PWLU(3), target, None)


def test_sample_is_uniform_over_batches():
    p = pwlu.PWLU(None)
    calib = Calibration(p, 1000, torch.Generator().manual_seed(0))
    for k in range(10):  # batch k holds only the value k
        calib.record(torch.full((5000,), float(k)))
    counts = torch.bincount(calib.samples.reshape(-1).long(), minlength=10)
    assert calib.samples.shape == (1, 1000) and counts.min() > 60 and counts.max() < 140


def test_nan_in_calibration_is_reported():
    model = _trained_bn(_net(nn.GELU()))
    bad = _batches()
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'.*NaN or inf"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=bad)


def test_pooled_statistics_batches_of_one_overflow_and_constant_inputs():
    """Bugs found by an adversarial review: calibration batches of one sample recorded std 0 for a
    (B, C) input (the average of per-batch std's, Eq. 5) and gave a 0.15 relative error against
    0.004 for the same samples in one batch; float32 moments overflowed for inputs of 1e20; a
    constant batch gave a degenerate range without a word; a batch of zero rows was reported as
    'not called'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    samples = [torch.randn(1, 8) for _ in range(64)]
    one = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=samples)
    pooled = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[torch.cat(samples)])
    with torch.no_grad():
        h = model[0](torch.cat(samples)).double()
    for conv in (one, pooled):
        torch.testing.assert_close(conv[1].running_mean, h.mean(0).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(conv[1].running_std, h.std(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one[1].left_bound, pooled[1].left_bound)
    assert int(one[1].num_batches_tracked) == 64
    x = torch.randn(512, 8)
    with torch.no_grad():
        assert ((one(x) - model(x)).norm() / model(x).norm()).item() < 0.02
    # float64 moments: inputs of 1e20 are finite, and so is their range
    big = nn.Sequential(nn.Identity(), nn.GELU()).eval()
    conv = pwlu.convert_activations(copy.deepcopy(big), init="match", calibration=[torch.randn(64, 8) * 1e20])
    assert torch.isfinite(conv[1].left_bound).all() and (conv[1].running_std > 1e19).all()
    with pytest.warns(UserWarning, match=r"'1' channel\(s\) \[0, 1, 2, 3, 4, 5, 6, 7\] ... are constant"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[torch.ones(16, 8)])
    with pytest.raises(ConversionError, match="'1' received only empty inputs"):
        pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=[torch.randn(0, 8)],
                                 example_input=torch.randn(2, 8))  # fmt: skip


def test_baseline_swish_prelu_and_apl_are_matched():
    """pwlu.baselines' Swish, PReLU and APL (what pwlu train --activation swish|prelu|apl builds)
    were not activations to convert_activations: nothing converted, a misleading warning."""
    from pwlu.baselines import APL, PReLU, Swish

    torch.manual_seed(0)
    apl = APL(16, num_hinges=2, channel_dim=-1)
    prelu = PReLU(16, channel_dim=-1)
    with torch.no_grad():
        apl.a.copy_(torch.rand(16, 2) * 0.5)
        prelu.weight.copy_(torch.linspace(-0.3, 0.6, 16))
    for act, slopes in [(Swish(), (0.0, 1.0)), (Swish(beta=-1.5), (1.0, 0.0)), (prelu, (prelu.weight, 1.0)),
                        (apl, (-apl.a.sum(1), 1.0))]:  # fmt: skip
        model = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4)).eval()
        batches = [torch.randn(64, 8) for _ in range(4)]
        conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
        p = conv[1]
        assert isinstance(p, pwlu.PWLU) and p.matched == type(act).__name__ + f"({act.extra_repr()})"
        torch.testing.assert_close(p.left_slope, torch.as_tensor(slopes[0]).float().expand(16).detach())
        torch.testing.assert_close(p.right_slope, torch.full((16,), float(slopes[1])))
        x = torch.randn(256, 8)
        with torch.no_grad():
            rel = ((conv(x) - model(x)).norm() / model(x).norm()).item()
        assert rel < 0.02, (act, rel)
    # the default init (ReLU, phase I) converts them too
    conv = pwlu.convert_activations(nn.Sequential(nn.Linear(4, 4), Swish()), example_input=torch.randn(2, 4))
    assert len(pwlu.pwlu_modules(conv)) == 1


def test_per_channel_activation_keeps_its_own_axis():
    """Found by review: a per-channel PReLU/APL on (B, 8, 8) with channel_dim=1 got the rank's
    axis (-1, also 8 wide) and was fitted with another channel's slopes (error 0.8)."""
    from pwlu.baselines import APL, PReLU

    torch.manual_seed(0)
    for act in (PReLU(8, channel_dim=1), APL(8, num_hinges=2, channel_dim=1), nn.PReLU(8)):
        with torch.no_grad():
            for p in act.parameters():
                p.copy_(torch.rand_like(p) * 0.8 - 0.4)
        model = nn.Sequential(nn.Identity(), act).eval()
        batches = [torch.randn(16, 8, 8) for _ in range(3)]
        conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
        assert (conv[1].num_channels, conv[1].channel_dim) == (8, 1), type(act).__name__
        x = torch.randn(32, 8, 8)
        with torch.no_grad():
            rel = ((conv(x) - model(x)).norm() / model(x).norm()).item()
        assert rel < 0.02, (type(act).__name__, rel)


def test_exclude_one_name_of_a_tied_activation():
    """An activation registered under two names, one of them excluded: the excluded one was
    converted anyway (split off as '1_1', the model became a GraphModule)."""
    g = nn.GELU()
    model = nn.Sequential(nn.Linear(8, 16), g, nn.Linear(16, 16), g, nn.Linear(16, 4)).eval()
    for init, kwargs in (("relu", {}), ("match", {"calibration": [torch.randn(32, 8)]})):
        conv = pwlu.convert_activations(copy.deepcopy(model), exclude="3", example_input=torch.randn(2, 8), init=init,
                                        **kwargs)  # fmt: skip
        assert type(conv) is nn.Sequential and [n for n, _ in pwlu.pwlu_modules(conv)] == ["1"], init
        assert isinstance(conv[3], nn.GELU)


# ----------------------------------------------------------------------------- BoundaryRealigner


def test_realigner_leaves_matched_pwlus_in_phase_two():
    model = _trained_bn(_net(nn.GELU()))
    conv = pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=_batches()).train()
    p = conv[2]
    before = [t.detach().clone() for t in (p.points, p.left_bound, p.right_bound)]
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="function-matched"):
        realigner = pwlu.BoundaryRealigner(conv, warmup_steps=2)
    assert not p.collecting  # no phase I for it
    for x in _batches(3, seed=7):
        loss = conv(x).square().mean()
        opt.zero_grad()
        loss.backward()
        assert p.points.grad is not None and p.points.grad.abs().sum() > 0  # not frozen
        opt.step()
        realigner.step()
    # trained from the matched function, never reset to ReLU at warmup_steps
    assert p.matched is not None
    assert (p.points.detach() - before[0]).abs().max() < 0.05
    torch.testing.assert_close(p.left_bound.detach(), before[1], atol=0.05, rtol=0)


def test_realigner_still_runs_phase_one_for_fresh_pwlus():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU(), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    conv = pwlu.convert_activations(model, init="match", calibration=_batches(), exclude="3")
    conv[3] = pwlu.PWLU(4)
    with pytest.warns(UserWarning, match="1 of 2"):
        realigner = pwlu.BoundaryRealigner(conv.train(), warmup_steps=1)
    assert conv[3].collecting and not conv[1].collecting
    opt = torch.optim.SGD(conv.parameters(), lr=0.0)
    conv(_batches(1)[0]).sum().backward()
    opt.step()
    realigner.step()
    assert not torch.equal(conv[3].right_bound.detach(), torch.full((4,), 3.0))  # realigned (Eq. 6)
    assert conv[1].matched is not None  # untouched


# ----------------------------------------------------------------------------- accuracy bar (SPEC section 12)

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _fashion():
    from pwlu.app.data import DataError, load_fashion_mnist

    try:
        return load_fashion_mnist(download=False)
    except DataError as e:
        pytest.skip(
            f"Fashion-MNIST is not installed ({e}); `make test` installs it with apt-get install "
            "dataset-fashion-mnist. This test cannot run without it."
        )


@pytest.fixture(scope="module")
def fashion():
    return _fashion()


def _train_small_cnn(act: type[nn.Module], data, n_train: int = 4000):
    """One epoch of a small CNN on ``n_train`` Fashion-MNIST images (the app's ``cnn``)."""
    from pwlu.app.data import channel_stats, normalise
    from pwlu.app.models import SmallCNN

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(data.train_y), generator=g)[:n_train]
    x, y = data.train_x[idx], data.train_y[idx]
    mean, std = channel_stats(x)
    model = SmallCNN(lambda c: act())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(0, n_train, 100):
        loss = F.cross_entropy(model(normalise(x[i : i + 100], mean, std)), y[i : i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
    calibration = [(normalise(x[i : i + 128], mean, std), y[i : i + 128]) for i in range(0, 1024, 128)]
    return model.eval(), calibration, (mean, std)


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU, nn.Hardswish], ids=lambda a: a.__name__)
def test_accuracy_bar_fashion_mnist(act, fashion):
    from pwlu.app.data import normalise

    model, calibration, (mean, std) = _train_small_cnn(act, fashion)
    conv = pwlu.convert_activations(copy.deepcopy(model), num_intervals=16, mode="channel", init="match",
                                    calibration=calibration)  # fmt: skip
    assert sum(isinstance(m, pwlu.PWLU) for m in conv.modules()) == 3
    x, y = normalise(fashion.test_x[:2000], mean, std), fashion.test_y[:2000]  # 1 disagreement = 0.05 points
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)]).argmax(1)
        out = torch.cat([conv(x[i : i + 1000]) for i in range(0, len(x), 1000)]).argmax(1)
    acc_ref = (ref == y).float().mean().item()
    assert acc_ref > 0.75  # a trained network, not a chance-level one
    agreement = (out == ref).float().mean().item()
    assert agreement >= 0.99, agreement
    assert abs((out == y).float().mean().item() - acc_ref) <= 0.002


# ----------------------------------------------------------------------------- README


def test_readme_conversion_snippet_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Converting a trained model", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'init="match"' in snippet
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the snippet's model converts cleanly
        exec(compile(snippet, "README.md", "exec"), {})


# ----------------------------------------------------------------------------- pwlu train --init-from


def test_cli_finetune_from_checkpoint(tmp_path, capsys):
    from pwlu.app.cli import main
    from pwlu.app.config import TrainConfig
    from pwlu.app.data import make_synthetic
    from pwlu.app.train import load_checkpoint, model_from_checkpoint

    fast = ["--dataset", "synthetic", "--batch-size", "64", "--no-progress", "--epochs", "1"]
    src = tmp_path / "gelu"
    assert main(["train", *fast, "--activation", "gelu", "--warmup-epochs", "0", "--out", str(src)]) == 0
    ckpt = str(src / "checkpoint.pt")
    # the converted model before fine-tuning: matched PWLUs, close to the trained GELU network
    cfg = TrainConfig(dataset="synthetic", init_from=ckpt, init="match", epochs=1)
    data = make_synthetic()
    conv, (mean, std) = model_from_checkpoint(cfg, data)
    gelu, _ = model_from_checkpoint(TrainConfig(dataset="synthetic", activation="gelu", init_from=ckpt), data)
    pw = pwlu.pwlu_modules(conv)
    assert len(pw) == 3 and all(p.matched and p.num_intervals == 16 for _, p in pw)
    from pwlu.app.data import normalise

    x = normalise(data.test_x, mean, std)
    with torch.no_grad():
        ref, out = gelu.eval()(x), conv.eval()(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.99
    # fine-tuning: one epoch, no realigner (no phase I: the PWLUs train from the first step)
    out_dir = tmp_path / "ft"
    assert main(["train", *fast, "--init-from", ckpt, "--init", "match", "--out", str(out_dir)]) == 0
    tuned = load_checkpoint(out_dir / "checkpoint.pt")
    assert tuned["realigner"] is None and tuned["config"]["init"] == "match"
    assert not torch.equal(tuned["model"]["features.1.points"], conv.state_dict()["features.1.points"])
    # resuming a fine-tuning run rebuilds the converted structure and loads its own weights
    assert main(["train", *fast, "--epochs", "2", "--init-from", ckpt, "--init", "match", "--stop-after", "1",
                 "--out", str(tmp_path / "ft2")]) == 0  # fmt: skip
    assert main(["train", *fast, "--epochs", "2", "--init-from", ckpt, "--init", "match", "--resume",
                 "--out", str(tmp_path / "ft2")]) == 0  # fmt: skip
    capsys.readouterr()
    # refusals: one line, exit status 2
    assert main(["train", *fast, "--init", "match", "--out", str(tmp_path / "x")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(["train", *fast, "--model", "resnet", "--init-from", ckpt, "--init", "match",
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "--model cnn" in capsys.readouterr().err
    assert main(["train", *fast, "--activation", "relu", "--warmup-epochs", "0", "--init-from", ckpt,
                 "--out", str(tmp_path / "z")]) == 2  # fmt: skip
    assert "--activation gelu" in capsys.readouterr().err
    # refusals write nothing (an empty --out directory was left behind)
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_cli_init_from_refuses_what_it_cannot_honour(tmp_path):
    """Found by an adversarial review: a checkpoint whose activation cannot be converted was
    fine-tuned unchanged as "--activation pwlu"; --init match with --fix-init silently overwrote the
    fit; --merges pwlu2d with --init-from was recorded but not applied; --activation gelu with the
    default --warmup-epochs 1 and --epochs 1 was refused although nothing warms up."""
    from pwlu.app.config import ConfigError, TrainConfig
    from pwlu.app.data import make_synthetic
    from pwlu.app.train import model_from_checkpoint, train

    TrainConfig(dataset="synthetic", activation="gelu", epochs=1).validate()  # no warm-up to check
    with pytest.raises(ConfigError, match="--warmup-epochs must be in"):
        TrainConfig(dataset="synthetic", activation="pwlu", epochs=1).validate()
    with pytest.raises(ConfigError, match="--fix-init 3.0 would overwrite"):
        TrainConfig(dataset="synthetic", init_from="x.pt", init="match", fix_init=3.0).validate()
    data = make_synthetic()
    common = dict(dataset="synthetic", epochs=1, warmup_epochs=0, batch_size=64, train_subset=256, progress=False)
    train(TrainConfig(model="resnet", activation="gelu", out=str(tmp_path / "res"), **common), data=data)
    train(TrainConfig(model="cnn", activation="pau", out=str(tmp_path / "pau"), **common), data=data)
    res, pau = str(tmp_path / "res" / "checkpoint.pt"), str(tmp_path / "pau" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="--activation pau modules cannot be converted"):
        model_from_checkpoint(TrainConfig(dataset="synthetic", model="cnn", init_from=pau, init="match"), data)
    # an N-PWLU checkpoint converts to nothing either (an NPWLU is a PWLU subclass: it passed)
    train(TrainConfig(model="cnn", activation="npwlu", out=str(tmp_path / "np"), **common), data=data)
    with pytest.raises(ConfigError, match="--activation npwlu modules cannot be converted"):
        model_from_checkpoint(
            TrainConfig(dataset="synthetic", init_from=str(tmp_path / "np" / "checkpoint.pt"), init="match"), data
        )
    # --merges pwlu2d: the trained additions become PWLU2D at init (addition), the function kept
    cfg = TrainConfig(dataset="synthetic", model="resnet", init_from=res, init="match", merges="pwlu2d")
    merged, (mean, std) = model_from_checkpoint(cfg, data)
    matched, _ = model_from_checkpoint(dataclasses.replace(cfg, merges="add"), data)
    count = lambda m: sum(isinstance(x, pwlu.PWLU2D) for x in m.modules())  # noqa: E731
    assert count(merged) > 0 and count(matched) == 0
    x = normalise_first(data, mean, std)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), matched.eval()(x), rtol=1e-4, atol=1e-4)
    # a fine-tuned pwlu checkpoint keeps its N: another --intervals is refused, not ignored
    train(TrainConfig(model="cnn", activation="pwlu", out=str(tmp_path / "pw"), **common), data=data)
    with pytest.raises(ConfigError, match="--intervals 16"):
        model_from_checkpoint(
            TrainConfig(dataset="synthetic", init_from=str(tmp_path / "pw" / "checkpoint.pt"), intervals=8), data
        )


def normalise_first(data, mean, std):
    from pwlu.app.data import normalise

    return normalise(data.test_x[:16], mean, std)


def test_calibration_forward_failure_names_the_calibration_batch():
    """Regression: a forward pass that failed on the first calibration batch (here BatchNorm in
    training mode on a batch of one) blamed an ``example_input`` the user never passed."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 2)).train()
    match = r"first calibration batch's model input \(a tensor of shape \(1, 4\)\) failed .*pass calibration batches"
    with pytest.raises(ConversionError, match=match):
        pwlu.convert_activations(model, init="match", calibration=[torch.randn(1, 4)])
    with pytest.raises(ConversionError, match=r"the forward pass with example_input failed"):
        pwlu.convert_activations(model, example_input=torch.randn(1, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_conversion_restores_the_cuda_rng():
    """Regression (found by reading; needs a GPU to run): profiling and calibration forked only the
    CPU's RNG (``fork_rng(devices=[])``), so a model in train mode on CUDA drew its dropout masks
    from the CUDA RNG and left it advanced. Converting must not change any RNG."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5), nn.GELU(), nn.Conv2d(8, 4, 1)).cuda().train()
    batches = [torch.randn(4, 3, 12, 12, device="cuda") for _ in range(2)]
    state = torch.cuda.get_rng_state()
    pwlu.convert_activations(copy.deepcopy(model), example_input=batches[0])
    assert torch.equal(torch.cuda.get_rng_state(), state)
    pwlu.convert_activations(copy.deepcopy(model), init="match", calibration=batches)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    pwlu.convert_merges(torchvision_resnet_cuda(), example_input=torch.randn(2, 3, 32, 32, device="cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert pwlu.convert._rng_devices(model) == [torch.cuda.current_device()]
    assert pwlu.convert._rng_devices(model.cpu(), batches[0]) == [batches[0].device.index]
    assert pwlu.convert._rng_devices(model.cpu(), {"x": batches[0].cpu()}) == []


def torchvision_resnet_cuda() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    model.layer1[0].bn2 = nn.Sequential(model.layer1[0].bn2, nn.Dropout(0.5))
    return model.cuda().train()
