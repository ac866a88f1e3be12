"""The paper's baseline activations (SPEC section 7) and a name registry for all of them.

Each activation is a function plus an ``nn.Module`` with the same parameters, in the style of
timm's ``layers/activations.py``. Channel-wise modules take ``num_channels`` (``None`` means one
set of parameters for the whole layer) and ``channel_dim`` (1 for NCHW, -1 for ``(B, T, C)``).

``ACTIVATIONS`` maps the names ``"relu"``, ``"swish"``, ``"gelu"`` (the transformers' activation, for
the ViT), ``"prelu"``, ``"apl"``, ``"pau"``, ``"frelu"`` and ``"pwlu"`` to factories ``factory(num_channels, channel_dim=1, **kwargs)``;
:func:`get_activation` looks one up (it also accepts a callable, returned unchanged).

Defaults that the papers leave open, or that the PWLU paper did not record:

- APL: ``S = 1`` hinge (the PWLU paper's S is lost; S = 1 is the smallest APL and the setting
  Agostinelli et al. report for CIFAR-10 with other settings reported close).
  ``a_s = 0`` at init, so an APL starts as exactly ReLU; hinge points ``b_s`` start evenly
  spread on ``[-1, 1]`` (``b = 0`` for ``S = 1``). The papers' L2 penalty on ``a, b`` is left
  to the optimizer's weight decay.
- PAU: one rational function per layer (as in Molina et al.), initialised to leaky ReLU
  (negative slope 0.01) by a linearised least-squares fit on ``[-3, 3]`` (see :class:`PAU`).
- PReLU: slope 0.25 at init (He et al.).
- FReLU: the depthwise 3x3 convolution has no bias (the batch norm after it has one).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import PWLU

__all__ = [
    "ACTIVATIONS",
    "APL",
    "FReLU",
    "PAU",
    "PReLU",
    "Swish",
    "apl",
    "get_activation",
    "pau",
    "pau_leaky_relu_init",
    "prelu",
    "swish",
]


def _check_channels(name: str, num_channels: int | None) -> None:
    if num_channels is not None and (
        isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1
    ):
        raise ValueError(f"{name}: num_channels must be None or an int >= 1, but got {num_channels!r}")


def _channel_view(p: Tensor, x: Tensor, channel_dim: int) -> Tensor:
    """View a ``Tensor[C, ...]`` parameter so that it broadcasts against ``x`` on ``channel_dim``."""
    if p.dim() == 0 or (p.dim() == 1 and p.shape[0] == 1):
        return p.reshape(())
    cd = channel_dim % x.dim()
    if x.shape[cd] != p.shape[0]:
        raise ValueError(
            f"input has {x.shape[cd]} channels on axis {channel_dim} (shape {tuple(x.shape)}), "
            f"but the parameters have {p.shape[0]}"
        )
    shape = [1] * x.dim()
    shape[cd] = p.shape[0]
    return p.reshape(shape)


# ----------------------------------------------------------------------------- Swish


def swish(x: Tensor, beta: float | Tensor = 1.0) -> Tensor:
    """Swish ``x * sigmoid(beta * x)`` (https://arxiv.org/abs/1710.05941); beta = 1 is SiLU."""
    if not isinstance(beta, Tensor) and beta == 1.0:
        return F.silu(x)
    return x * torch.sigmoid(beta * x)


class Swish(nn.Module):
    """Swish / SiLU, ``x * sigmoid(beta * x)`` (https://arxiv.org/abs/1710.05941).

    Args:
        beta (float): initial beta (default 1, which is SiLU).
        learnable_beta (bool): make beta a (scalar) parameter; off by default, as in the paper's
            baseline (EfficientNet's Swish is SiLU).
    """

    def __init__(self, beta: float = 1.0, learnable_beta: bool = False) -> None:
        super().__init__()
        self.learnable_beta = learnable_beta
        if learnable_beta:
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.beta = float(beta)

    def forward(self, x: Tensor) -> Tensor:
        return swish(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={float(self.beta):.4g}, learnable_beta={self.learnable_beta}"


# ----------------------------------------------------------------------------- PReLU


def prelu(x: Tensor, weight: Tensor, channel_dim: int = 1) -> Tensor:
    """PReLU ``x if x > 0 else weight * x`` (https://arxiv.org/abs/1502.01852).

    Args:
        x (Tensor[...]): input.
        weight (Tensor[] or Tensor[C]): negative slopes, per channel on ``channel_dim``.
    """
    w = _channel_view(weight, x, channel_dim)
    return torch.where(x > 0, x, w * x)


class PReLU(nn.Module):
    """Parametric ReLU, channel-wise on any axis (https://arxiv.org/abs/1502.01852).

    Args:
        num_channels (int, optional): ``None`` for one slope per layer.
        channel_dim (int): channel axis (1 for NCHW, -1 for ``(B, T, C)``).
        init (float): initial negative slope (0.25, as in the paper).
    """

    def __init__(self, num_channels: int | None = None, channel_dim: int = 1, init: float = 0.25) -> None:
        super().__init__()
        _check_channels("PReLU", num_channels)
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        self.weight = nn.Parameter(torch.full(() if num_channels is None else (num_channels,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return prelu(x, self.weight, self.channel_dim)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, channel_dim={self.channel_dim}"


# ----------------------------------------------------------------------------- APL


def apl(x: Tensor, a: Tensor, b: Tensor, channel_dim: int = 1) -> Tensor:
    """Adaptive piecewise linear unit ``max(0, x) + sum_s a_s * max(0, -x + b_s)``
    (https://arxiv.org/abs/1412.6830).

    Args:
        x (Tensor[...]): input.
        a, b (Tensor[S] or Tensor[C, S]): hinge slopes and hinge points, per channel on
            ``channel_dim`` when 2-D.
    """
    if a.shape != b.shape or a.dim() not in (1, 2):
        raise ValueError(f"apl: a and b must both be (S,) or (C, S), but got {tuple(a.shape)} and {tuple(b.shape)}")
    y = F.relu(x)
    for s in range(a.shape[-1]):
        if a.dim() == 1:
            a_s, b_s = a[s], b[s]
        else:
            a_s, b_s = _channel_view(a[:, s], x, channel_dim), _channel_view(b[:, s], x, channel_dim)
        y = y + a_s * F.relu(b_s - x)
    return y


class APL(nn.Module):
    """Adaptive Piecewise Linear unit (https://arxiv.org/abs/1412.6830).

    Args:
        num_channels (int, optional): ``None`` for one set of hinges per layer.
        num_hinges (int): ``S`` (default 1; the PWLU paper's value is lost, see the module doc).
        channel_dim (int): channel axis.

    ``a`` starts at 0 (exactly ReLU) and ``b`` evenly spread on ``[-1, 1]`` (0 when S = 1).
    """

    def __init__(self, num_channels: int | None = None, num_hinges: int = 1, channel_dim: int = 1) -> None:
        super().__init__()
        _check_channels("APL", num_channels)
        if isinstance(num_hinges, bool) or not isinstance(num_hinges, int) or num_hinges < 1:
            raise ValueError(f"APL: num_hinges must be an int >= 1, but got {num_hinges!r}")
        self.num_channels = num_channels
        self.num_hinges = num_hinges
        self.channel_dim = channel_dim
        shape = (num_hinges,) if num_channels is None else (num_channels, num_hinges)
        hinges = torch.linspace(-1.0, 1.0, num_hinges) if num_hinges > 1 else torch.zeros(1)
        self.a = nn.Parameter(torch.zeros(shape))
        self.b = nn.Parameter(hinges.expand(shape).clone())

    def forward(self, x: Tensor) -> Tensor:
        return apl(x, self.a, self.b, self.channel_dim)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, num_hinges={self.num_hinges}, channel_dim={self.channel_dim}"


# ----------------------------------------------------------------------------- PAU


def pau(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """Padé activation unit with the "safe" denominator (https://arxiv.org/abs/1907.06732).

    ``P(x) / Q(x)`` with ``P(x) = sum_{j=0..m} numerator[j] x^j`` and
    ``Q(x) = 1 + |sum_{k=1..n} denominator[k-1] x^k|``.

    Args:
        x (Tensor[...]): input.
        numerator (Tensor[m+1]), denominator (Tensor[n]).
    """
    p = torch.zeros_like(x) + numerator[-1]
    for c in numerator.flip(0)[1:]:  # Horner
        p = p * x + c
    q = torch.zeros_like(x) + denominator[-1]
    for c in denominator.flip(0)[1:]:
        q = q * x + c
    q = 1 + (q * x).abs()
    return p / q


@functools.lru_cache(maxsize=16)
def pau_leaky_relu_init(
    num_degree: int = 5, den_degree: int = 4, negative_slope: float = 0.01, bound: float = 3.0, num_points: int = 2001
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients of a Padé ``num_degree/den_degree`` rational close to leaky ReLU on ``[-bound, bound]``.

    Linearised least squares in float64 (``torch.linalg.lstsq``): with ``y = leaky_relu(x)`` on
    ``num_points`` evenly spaced points, solve ``P(x) - y * (1 + sum_k b_k x^k) ~= 0`` for the
    ``a_j`` and ``b_k``. The fit ignores the absolute value of the safe denominator; the fitted
    denominator sum is checked to be >= 0 on the grid, where the two then agree. Returns
    ``(numerator, denominator)`` as tuples of floats. The maximum error of the resulting PAU
    against leaky ReLU on ``[-3, 3]`` is 0.064, at the kink x = 0
    (tested in ``tests/test_baselines.py``).
    """
    x = torch.linspace(-bound, bound, num_points, dtype=torch.float64)
    y = F.leaky_relu(x, negative_slope)
    powers_p = torch.stack([x**j for j in range(num_degree + 1)], dim=1)
    powers_q = torch.stack([-y * x**k for k in range(1, den_degree + 1)], dim=1)
    design = torch.cat([powers_p, powers_q], dim=1)
    coeffs = torch.linalg.lstsq(design, y.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    numerator, denominator = coeffs[: num_degree + 1], coeffs[num_degree + 1 :]
    den_sum = sum(denominator[k - 1] * x**k for k in range(1, den_degree + 1))
    assert bool((den_sum >= -1e-9).all()), "PAU init: fitted denominator changes sign; the safe form would differ"
    return tuple(numerator.tolist()), tuple(denominator.tolist())


class PAU(nn.Module):
    """Padé Activation Unit, 5/4 with the safe denominator (https://arxiv.org/abs/1907.06732).

    One learnable rational function per layer (as in the PAU paper), initialised to approximate
    leaky ReLU (negative slope 0.01) by :func:`pau_leaky_relu_init`.

    Args:
        num_degree (int): numerator degree ``m`` (5).
        den_degree (int): denominator degree ``n`` (4).
    """

    def __init__(self, num_degree: int = 5, den_degree: int = 4) -> None:
        super().__init__()
        if num_degree < 0 or den_degree < 1:
            raise ValueError(f"PAU: need num_degree >= 0 and den_degree >= 1, but got {num_degree}, {den_degree}")
        self.num_degree, self.den_degree = num_degree, den_degree
        num, den = pau_leaky_relu_init(num_degree, den_degree)
        self.numerator = nn.Parameter(torch.tensor(num, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(den, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return pau(x, self.numerator, self.denominator)

    def extra_repr(self) -> str:
        return f"num_degree={self.num_degree}, den_degree={self.den_degree}"


# ----------------------------------------------------------------------------- FReLU


class FReLU(nn.Module):
    """Funnel activation ``max(x, BN(depthwise_conv3x3(x)))`` (https://arxiv.org/abs/2007.11824).

    Channel-wise by construction; input ``Tensor[B, C, H, W]``.

    Args:
        num_channels (int): ``C``.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"FReLU: num_channels must be an int >= 1 (it is channel-wise), but got {num_channels!r}")
        self.num_channels = num_channels
        self.conv = nn.Conv2d(num_channels, num_channels, 3, padding=1, groups=num_channels, bias=False)
        self.bn = nn.BatchNorm2d(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"FReLU: expected a 4-D (B, C, H, W) input, but got shape {tuple(x.shape)}")
        return torch.maximum(x, self.bn(self.conv(x)))

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


# ----------------------------------------------------------------------------- registry


def _relu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return nn.ReLU(**kwargs)


def _swish(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return Swish(**kwargs)


def _gelu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return nn.GELU(**kwargs)


def _prelu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return PReLU(num_channels, channel_dim=channel_dim, **kwargs)


def _apl(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return APL(num_channels, channel_dim=channel_dim, **kwargs)


def _pau(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return PAU(**kwargs)  # one function per layer, as in the PAU paper


def _frelu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    if num_channels is None:
        raise ValueError("FReLU is channel-wise by construction (a depthwise conv): it needs num_channels")
    if channel_dim not in (1, -3):
        raise ValueError(f"FReLU needs NCHW inputs (channel_dim=1), but got channel_dim={channel_dim}")
    return FReLU(num_channels, **kwargs)


def _pwlu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    return PWLU(num_channels, channel_dim=channel_dim, **kwargs)


def _npwlu(num_channels: int | None = None, channel_dim: int = 1, **kwargs) -> nn.Module:
    from .nonuniform import NPWLU  # (imported here: pwlu.nonuniform needs the functional layer)

    return NPWLU(num_channels, channel_dim=channel_dim, **kwargs)


ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": _relu,
    "swish": _swish,
    "gelu": _gelu,
    "prelu": _prelu,
    "apl": _apl,
    "pau": _pau,
    "frelu": _frelu,
    "pwlu": _pwlu,
    "npwlu": _npwlu,
}


def get_activation(name: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """The factory ``factory(num_channels, channel_dim=1, **kwargs) -> nn.Module`` for ``name``.

    Args:
        name: one of ``ACTIVATIONS`` (case-insensitive), or a callable, returned unchanged.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(name, str):
        key = name.lower()
        if key not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} or a callable")
        return ACTIVATIONS[key]
    if callable(name):
        return name
    raise TypeError(f"activation must be a name or a callable, but got {type(name).__name__}: {name!r}")


def call_factory(factory: Callable[..., nn.Module], num_channels: int | None, channel_dim: int, **kwargs) -> nn.Module:
    """``factory(num_channels, channel_dim=channel_dim, **kwargs)``, passing ``channel_dim`` only when
    the factory has a parameter of that name (user factories may take ``num_channels`` alone)."""
    try:
        takes_dim = "channel_dim" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_dim = False
    kwargs = {**kwargs, "channel_dim": channel_dim} if takes_dim else kwargs
    module = factory(num_channels, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation factory {factory!r} returned {type(module).__name__}, not an nn.Module")
    return module
