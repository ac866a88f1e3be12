"""Small-input variants of the paper's architectures, for CPU-scale experiments (28x28 or 32x32).

Every activation call site is built by an activation factory ``act(num_channels)``, so the
same network runs with ReLU, Swish, PReLU, APL, PAU, FReLU or PWLU. As in the paper, the
activations inside squeeze-and-excitation blocks are not replaced (ReLU + hard sigmoid).

* ``cnn``: a 3-layer conv net (16-32-64 channels, 4x4 average-pooled linear head), the demo network.
* ``resnet``: a CIFAR-style ResNet-8 (3 stages of one BasicBlock, 16-32-64 channels).
* ``mobilenet_v2``: MobileNetV2 at reduced width (stride-2 stem, inverted residuals, expansion 4).
* ``mobilenet_v3``: MobileNetV3-small-like: stride-2 stem, inverted residuals with SE blocks, 5x5 depthwise.
* ``vit``: a small Vision Transformer: a 4x4 grid of patches (7x7 pixels on 28x28 inputs, 8x8 on 32x32,
  16 tokens), width 64, 4 pre-norm
  blocks of 4-head attention and an MLP (ratio 2) whose activation sees ``(B, T, C)`` tokens, so it is
  built with ``act(hidden, channel_dim=-1)``; learned position embeddings, mean-pooled tokens.

Activation factories are called ``act(num_channels)`` for NCHW call sites and ``act(num_channels,
channel_dim=-1)`` for token layouts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

Act = Callable[..., nn.Module]

#: Per-architecture weight decay (SPEC section 7: 1e-4 for ResNets, 4e-5 for MobileNets).
WEIGHT_DECAY = {"cnn": 1e-4, "resnet": 1e-4, "mobilenet_v2": 4e-5, "mobilenet_v3": 4e-5, "vit": 1e-4}


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class SmallCNN(nn.Module):
    def __init__(self, act: Act, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w), act(w),
            conv_bn(w, 2 * w, stride=2), act(2 * w),
            conv_bn(2 * w, 4 * w, stride=2), act(4 * w),
        )  # fmt: skip
        # a 4x4 pooled map rather than global pooling: three 3x3 convolutions see only 15x15
        # pixels, and a global average of such local features underfits Fashion-MNIST
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * w, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: Act) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.act1 = act(cout)
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride)
        self.act2 = act(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))


class ResNetSmall(nn.Module):
    def __init__(self, act: Act, in_channels: int = 1, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, widths[0]), act(widths[0]))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1, act))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


class SqueezeExcite(nn.Module):
    """SE block; its ReLU and hard-sigmoid gate are never replaced (paper, Sec. 4.1)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: Act, kernel: int = 3, se: bool = False):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [conv_bn(cin, hidden, 1), act(hidden)]
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden), act(hidden)]
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetSmall(nn.Module):
    # (expansion, out channels, repeats, stride, kernel, se)
    V2 = [(1, 16, 1, 1, 3, False), (4, 24, 2, 2, 3, False), (4, 32, 2, 2, 3, False), (4, 64, 1, 1, 3, False)]
    V3 = [(1, 16, 1, 1, 3, True), (4, 24, 2, 2, 3, False), (4, 40, 2, 2, 5, True), (4, 48, 1, 1, 5, True)]

    def __init__(self, act: Act, config, in_channels: int = 1, num_classes: int = 10, last: int = 128) -> None:
        super().__init__()
        stem = config[0][1]
        self.stem = nn.Sequential(conv_bn(in_channels, stem, 3, 2), act(stem))  # 28x28 -> 14x14
        layers, cin = [], stem
        for t, c, n, s, k, se in config:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act, k, se))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.final = nn.Sequential(conv_bn(cin, last, 1), act(last))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.final(self.layers(self.stem(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``; the MLP's activation is channel-last."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, act: Act) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act(hidden, channel_dim=-1), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTSmall(nn.Module):
    """A small ViT: ``(B, C, S, S)`` -> ``grid**2`` tokens of ``(S/grid)``-pixel patches -> ``depth`` blocks -> logits.

    On Fashion-MNIST (``S = 28``) the patches are 7x7 and there are 16 tokens."""

    def __init__(
        self, act: Act, in_channels: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 4, heads: int = 4,
        image: int = 28, grid: int = 4, mlp_ratio: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        if image % grid:
            raise ValueError(f"ViTSmall: image size {image} is not a multiple of the patch grid {grid}")
        patch = image // grid
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_ratio, act) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, dim)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


ARCHITECTURES = ("cnn", "resnet", "mobilenet_v2", "mobilenet_v3", "vit")


def build_model(arch: str, act: Act, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """One of :data:`ARCHITECTURES` with activation factory ``act(num_channels)`` (the convolutional
    networks take any input size; the ViT is built for square ``image_size`` inputs)."""
    if arch == "cnn":
        return SmallCNN(act, in_channels, num_classes)
    if arch == "resnet":
        return ResNetSmall(act, in_channels, num_classes)
    if arch == "mobilenet_v2":
        return MobileNetSmall(act, MobileNetSmall.V2, in_channels, num_classes)
    if arch == "mobilenet_v3":
        return MobileNetSmall(act, MobileNetSmall.V3, in_channels, num_classes)
    if arch == "vit":
        return ViTSmall(act, in_channels, num_classes, image=image_size)
    raise ValueError(f"unknown model {arch!r}; expected one of {ARCHITECTURES}")
