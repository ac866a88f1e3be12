"""Baselines (SPEC section 7): each defining formula against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.baselines import ACTIVATIONS, apl, pau, pau_leaky_relu_init, prelu, swish

torch.manual_seed(0)


def _x(*shape, scale=3.0, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype) * scale


def test_swish_is_silu_by_default():
    x = _x(2, 3, 5, 7)
    m = pwlu.Swish()
    assert not list(m.parameters())
    expected = x / (1 + torch.exp(-x))
    torch.testing.assert_close(m(x), expected)


def test_swish_learnable_beta():
    x = _x(4, 6)
    m = pwlu.Swish(beta=2.0, learnable_beta=True).double()
    expected = x / (1 + torch.exp(-2 * x))
    torch.testing.assert_close(m(x), expected)
    m(x).sum().backward()
    assert m.beta.grad is not None and m.beta.grad.abs() > 0
    torch.testing.assert_close(swish(x, 0.5), x / (1 + torch.exp(-0.5 * x)))


@pytest.mark.parametrize("channel_dim,shape", [(1, (2, 3, 4, 5)), (-1, (2, 7, 3)), (1, (5, 3))])
def test_prelu_channelwise(channel_dim, shape):
    m = pwlu.PReLU(3, channel_dim=channel_dim).double()
    assert torch.equal(m.weight, torch.full((3,), 0.25, dtype=torch.float64))
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.1, -0.5, 2.0]))
    x = _x(*shape)
    expected = torch.empty_like(x)
    xm = x.movedim(channel_dim, 0)
    for c in range(3):
        v = xm[c]
        expected.movedim(channel_dim, 0)[c] = torch.where(v > 0, v, m.weight[c].item() * v)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    if channel_dim == 1:
        torch.testing.assert_close(m(x), F.prelu(x, m.weight))


def test_prelu_layerwise_and_grad():
    m = pwlu.PReLU().double()
    assert m.weight.shape == ()
    x = _x(3, 4, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: prelu(x, w), (x, m.weight.detach().clone().requires_grad_(True)))


@pytest.mark.parametrize("num_hinges", [1, 3])
def test_apl_formula(num_hinges):
    m = pwlu.APL(4, num_hinges=num_hinges).double()
    x = _x(2, 4, 3, 3)
    # at init a = 0: exactly ReLU
    assert torch.equal(m(x), torch.relu(x))
    with torch.no_grad():
        m.a.normal_()
        m.b.normal_()
    expected = torch.empty_like(x)
    for c in range(4):
        v = x[:, c]
        y = v.clamp(min=0)
        for s in range(num_hinges):
            y = y + m.a[c, s].item() * (-v + m.b[c, s].item()).clamp(min=0)
        expected[:, c] = y
    torch.testing.assert_close(m(x), expected)
    a = torch.randn(4, num_hinges, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, num_hinges, dtype=torch.float64, requires_grad=True)
    xg = (_x(2, 5, 4) + 0.01).requires_grad_(True)  # channels last
    assert torch.autograd.gradcheck(lambda x, a, b: apl(x, a, b, channel_dim=-1), (xg, a, b))


def test_apl_default_is_one_hinge():
    m = pwlu.APL(8)
    assert m.num_hinges == 1 and m.a.shape == (8, 1)


def test_pau_formula_safe_denominator():
    num = torch.randn(6, dtype=torch.float64)
    den = torch.randn(4, dtype=torch.float64)
    x = _x(1000)
    p = sum(num[j] * x**j for j in range(6))
    q = 1 + (sum(den[k - 1] * x**k for k in range(1, 5))).abs()
    torch.testing.assert_close(pau(x, num, den), p / q)
    m = pwlu.PAU().double()
    assert m.numerator.shape == (6,) and m.denominator.shape == (4,)
    args = (_x(20).requires_grad_(True), num.clone().requires_grad_(True), den.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(pau, args)


def test_pau_init_approximates_leaky_relu():
    m = pwlu.PAU()
    x = torch.linspace(-3, 3, 6001)
    with torch.no_grad():
        err = (m(x) - F.leaky_relu(x, 0.01)).abs()
    # documented: max error 0.064 on [-3, 3], at the kink; much smaller away from it
    assert err.max() < 0.07, err.max()
    assert err[x.abs() >= 1].max() < 0.02
    # the fit solves the linearised problem in float64; its denominator sum is >= 0 on the grid
    num, den = pau_leaky_relu_init()
    xs = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert (sum(den[k - 1] * xs**k for k in range(1, 5)) >= -1e-9).all()


def test_frelu_formula():
    m = pwlu.FReLU(3).double().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.normal_()
        m.bn.bias.normal_()
    x = _x(2, 3, 6, 5)
    w = m.conv.weight  # (3, 1, 3, 3)
    padded = F.pad(x, (1, 1, 1, 1))
    t = torch.zeros_like(x)
    for c in range(3):
        for i in range(3):
            for j in range(3):
                t[:, c] += w[c, 0, i, j] * padded[:, c, i : i + 6, j : j + 5]
    bn = m.bn
    t = (t - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + bn.eps)
    t = t * bn.weight.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.maximum(x, t))
    with pytest.raises(ValueError, match="4-D"):
        m(_x(2, 3, 4))


def test_registry_names_and_factories():
    assert set(ACTIVATIONS) >= {"relu", "swish", "gelu", "prelu", "apl", "pau", "frelu", "pwlu"}
    x = torch.randn(2, 5, 4, 4)
    expected_types = {"relu": nn.ReLU, "swish": pwlu.Swish, "gelu": nn.GELU, "prelu": pwlu.PReLU, "apl": pwlu.APL,
                      "pau": pwlu.PAU, "frelu": pwlu.FReLU, "pwlu": pwlu.PWLU}  # fmt: skip
    for name, cls in expected_types.items():
        m = pwlu.get_activation(name)(5, channel_dim=1)
        assert type(m) is cls, name
        assert m(x).shape == x.shape
    assert pwlu.get_activation("PWLU") is ACTIVATIONS["pwlu"]
    p = pwlu.get_activation("pwlu")(7, channel_dim=-1, num_intervals=8)
    assert (p.num_channels, p.channel_dim, p.num_intervals) == (7, -1, 8)
    assert pwlu.get_activation("prelu")(None).weight.shape == ()


def test_registry_errors():
    with pytest.raises(ValueError, match="'softsign'"):
        pwlu.get_activation("softsign")
    with pytest.raises(TypeError):
        pwlu.get_activation(3)
    with pytest.raises(ValueError, match="channel-wise"):
        pwlu.get_activation("frelu")(None)
    with pytest.raises(ValueError, match="num_channels"):
        pwlu.PReLU(0)
    with pytest.raises(ValueError, match="num_hinges"):
        pwlu.APL(3, num_hinges=0)
    with pytest.raises(ValueError, match="channels"):
        pwlu.PReLU(3)(torch.randn(2, 4, 5))


def test_nan_propagates():
    x = torch.tensor([[math.nan, 1.0, -1.0]]).view(1, 3, 1, 1)
    for m in (pwlu.Swish(), pwlu.PReLU(3), pwlu.APL(3), pwlu.PAU()):
        assert torch.isnan(m(x)[0, 0]).all(), type(m).__name__
