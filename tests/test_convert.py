"""convert_activations: counts and channel sizes on the model zoo, SE blocks, equivalence, errors.

Expected counts and channel sizes are derived from the architectures (block counts and
widths, or the layers around each activation of the untouched original), not from the code
under test.
"""

import copy
import functools

import pytest
import torch
from torch import nn

import pwlu
from pwlu.convert import ConversionError

torchvision = pytest.importorskip("torchvision")
from torchvision.ops.misc import SqueezeExcitation  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The CI box is small and shared: one intra-op thread is faster than oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
ACTS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)


def pwlus(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, pwlu.PWLU)]


def resnet_expected_channels(blocks, bottleneck):
    """Stem 64, then per block: BasicBlock (w, w), Bottleneck (w, w, 4w); widths 64..512."""
    channels = [64]
    for width, n in zip((64, 128, 256, 512), blocks, strict=True):
        channels += ([width, width, 4 * width] if bottleneck else [width, width]) * n
    return channels


@pytest.mark.parametrize(
    "arch,blocks,bottleneck", [("resnet18", (2, 2, 2, 2), False), ("resnet50", (3, 4, 6, 3), True)]
)
def test_resnet_one_pwlu_per_call_site(arch, blocks, bottleneck):
    model = getattr(torchvision.models, arch)().eval()
    expected = resnet_expected_channels(blocks, bottleneck)
    assert len(expected) == {"resnet18": 17, "resnet50": 49}[arch]
    out = pwlu.convert_activations(model, example_input=X64)
    assert out is model
    found = pwlus(model)
    assert [m.num_channels for _, m in found] == expected  # in forward order
    assert all(m.channel_dim == 1 and m.num_intervals == 16 for _, m in found)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert len({id(m) for _, m in found}) == len(expected)
    assert type(model.layer1[0]).__name__ == ("Bottleneck" if bottleneck else "BasicBlock")  # fx keeps the name
    with torch.no_grad():
        assert model(X64).shape == (1, 1000)


def _orig_activation_sites(model):
    """(name, type, expected channels, inside SE) for every activation module of a torchvision
    model without reuse: channels from the conv / linear just before it in its parent."""
    sites = []
    se_names = [n for n, m in model.named_modules() if isinstance(m, SqueezeExcitation)]
    for name, m in model.named_modules():
        if not isinstance(m, ACTS):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        children = list(parent.named_children())
        idx = [n for n, _ in children].index(attr)
        prev = [c for _, c in children[:idx] if isinstance(c, (nn.Conv2d, nn.Linear))]
        channels = None
        if prev:
            channels = prev[-1].out_channels if isinstance(prev[-1], nn.Conv2d) else prev[-1].out_features
        in_se = any(name.startswith(s + ".") for s in se_names)
        sites.append((name, type(m), channels, in_se))
    return sites


@pytest.mark.parametrize(
    "arch,num_se,se_act",
    [("mobilenet_v2", 0, None), ("mobilenet_v3_small", 9, nn.ReLU), ("mobilenet_v3_large", 8, nn.ReLU),
     ("efficientnet_b0", 16, nn.SiLU)],
)  # fmt: skip
def test_mobile_models_keep_se_activations(arch, num_se, se_act):
    model = getattr(torchvision.models, arch)().eval()
    sites = _orig_activation_sites(model)
    se_sites = [s for s in sites if s[3]]
    # one activation per SE block: 9 in V3-small, 8 in V3-large, one per MBConv (16) in B0
    assert len(se_sites) == num_se == sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    se_objects = {name: model.get_submodule(name) for name, *_ in se_sites}
    pwlu.convert_activations(model, example_input=X64)
    for name, _cls, channels, in_se in sites:
        new = model.get_submodule(name)
        if in_se:
            assert new is se_objects[name] and type(new) is se_act
        else:
            assert isinstance(new, pwlu.PWLU), name
            assert new.num_channels == channels, name
    assert len(pwlus(model)) == len(sites) - num_se
    # gates untouched
    assert sum(isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)) for m in model.modules()) == num_se
    with torch.no_grad():
        assert model(X64).shape == (1, 1000)


def _bn_eval(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def test_relu_init_equivalence_exact():
    original = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BN statistics so that inputs cross the boundaries
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.05, 0.5)
    converted = pwlu.convert_activations(copy.deepcopy(original).eval(), example_input=X64)
    x = torch.randn(2, 3, 32, 32) * 4
    original.eval()
    with torch.no_grad():
        assert torch.equal(converted(x), original(x))
    # train mode with BN in eval (dropout-free ResNet): outputs and input gradients identical
    _bn_eval(converted.train())
    _bn_eval(original.train())
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [converted(xs[0]), original(xs[1])]
    assert torch.equal(outs[0], outs[1])
    outs[0].square().sum().backward()
    outs[1].square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_converted_model_copies_and_state_dict():
    model = torchvision.models.resnet50()
    keys = set(model.state_dict())
    pwlu.convert_activations(model, example_input=X64)
    new_keys = set(model.state_dict())
    assert keys <= new_keys
    assert all(".relu" in k or k.startswith("relu.") for k in new_keys - keys)
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(clone(X64), model(X64))
    assert model.training is False and clone.layer1[0].training is False


def test_profile_has_no_side_effects():
    model = torchvision.models.resnet18().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pwlu.convert_activations(model, example_input=torch.randn(2, 3, 64, 64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("activation", ["relu", "swish", "prelu", "apl", "pau", "frelu", "pwlu"])
def test_baselines_swap_in(activation):
    model = torchvision.models.resnet18().eval()
    pwlu.convert_activations(model, activation=activation, example_input=X64)
    cls = type(pwlu.get_activation(activation)(8))
    found = [(n, m) for n, m in model.named_modules() if type(m) is cls]
    assert len(found) == 17
    if activation in ("prelu", "apl", "frelu", "pwlu"):
        assert [m.num_channels for _, m in found] == resnet_expected_channels((2, 2, 2, 2), False)
    with torch.no_grad():
        assert model(X64).shape == (1, 1000)


def test_layer_mode_and_options():
    model = torchvision.models.resnet18()
    pwlu.convert_activations(model, mode="layer", num_intervals=8, example_input=X64,
                             activation_kwargs={"bound": 5.0})  # fmt: skip
    found = pwlus(model)
    assert len(found) == 17
    assert all(m.num_channels is None and m.num_intervals == 8 and m.bound == 5.0 for _, m in found)


def test_callable_factory():
    model = torchvision.models.resnet18()
    pwlu.convert_activations(model, activation=lambda c: nn.PReLU(c), example_input=X64)
    found = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert [m.num_parameters for m in found] == resnet_expected_channels((2, 2, 2, 2), False)


def test_exclude_patterns():
    model = torchvision.models.resnet18()
    pwlu.convert_activations(model, exclude="layer4.*", example_input=X64)
    # layer4: 2 BasicBlocks x 2 call sites stay ReLU (the shared module is not split)
    assert len(pwlus(model)) == 17 - 4
    assert all(isinstance(b.relu, nn.ReLU) for b in model.layer4)
    model = torchvision.models.resnet18()
    pwlu.convert_activations(model, exclude=["relu", "layer1.0*"], example_input=X64)
    assert isinstance(model.relu, nn.ReLU) and isinstance(model.layer1[0].relu, nn.ReLU)
    assert len(pwlus(model)) == 17 - 1 - 2


def test_detection_retinanet_train_step():
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=96)
    # ResNet-50 body: 49 call sites; each head (classification, regression) has 4 conv+ReLU
    head_relus = sum(isinstance(m, nn.ReLU) for m in model.head.modules())
    assert head_relus == 8
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]) * 0.75, "labels": torch.tensor([1])} for _ in range(2)
    ]
    model.train()
    pwlu.convert_activations(model, example_input=(images, targets))
    found = pwlus(model)
    assert len(found) == 49 + 8
    assert all(m.num_channels == 256 for n, m in found if n.startswith("head."))
    params = [p for n, p in model.named_parameters() if "relu" in n or n.startswith("head.")]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(m.points.grad is not None for _, m in found)
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_detection_maskrcnn_train_step():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=96)
    # activation modules outside the backbone body: RPN head conv, 4 mask-head convs, mask predictor
    others = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU) and not n.startswith("backbone.body")]
    assert len(others) == 1 + 4 + 1
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[:, 15:68, 8:53] = 1
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]) * 0.75, "labels": torch.tensor([1]), "masks": masks}
               for _ in range(2)]  # fmt: skip
    model.train()
    pwlu.convert_activations(model, example_input=(images, targets))
    found = dict(pwlus(model))
    assert len(found) == 49 + len(others)
    assert all(n in found for n in others)
    assert found["roi_heads.mask_predictor.relu"].num_channels == 256
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()


def test_timm_resnet18_converts():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False).eval()
    pwlu.convert_activations(model, example_input=X64)
    # timm's BasicBlock has its own act1, act2; stem act1
    assert [m.num_channels for _, m in pwlus(model)] == resnet_expected_channels((2, 2, 2, 2), False)


@pytest.mark.parametrize("arch,se_class", [("seresnet18", "SEModule"), ("efficientnet_b0", "SqueezeExcite")])
def test_timm_se_blocks_untouched(arch, se_class):
    timm = pytest.importorskip("timm")
    model = timm.create_model(arch, pretrained=False).eval()
    se_names = [n for n, m in model.named_modules() if type(m).__name__ == se_class]
    se_acts = {
        n: m for n, m in model.named_modules() if pwlu.convert.is_activation(m) and n.rpartition(".")[0] in se_names
    }
    acts = [n for n, m in model.named_modules() if pwlu.convert.is_activation(m)]
    assert len(se_acts) == len(se_names) > 0
    pwlu.convert_activations(model, example_input=X64)
    assert all(model.get_submodule(n) is m for n, m in se_acts.items())
    # no reuse in timm blocks: every other activation module is one call site
    assert sorted(n for n, _ in pwlus(model)) == sorted(set(acts) - set(se_acts))


def test_timm_vit_and_convnext_channels_last():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    pwlu.convert_activations(vit, example_input=torch.randn(1, 3, 32, 32))
    found = pwlus(vit)
    assert len(found) == len(vit.blocks) == 12
    assert all(m.channel_dim == -1 and m.num_channels == 4 * 192 for _, m in found)
    convnext = timm.create_model("convnext_atto", pretrained=False, conv_mlp=False).eval()
    dims = [stage.blocks[0].mlp.fc1.out_features for stage in convnext.stages]
    depths = [len(stage.blocks) for stage in convnext.stages]
    pwlu.convert_activations(convnext, example_input=X64)
    found = pwlus(convnext)
    assert [m.num_channels for _, m in found] == [d for d, n in zip(dims, depths, strict=True) for _ in range(n)]
    assert all(m.channel_dim == -1 for _, m in found)  # NHWC MLP after a Linear
    with torch.no_grad():
        assert convnext(X64).shape == (1, 1000)


def test_timm_act_layer_lazy_pwlu():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, act_layer=pwlu.TimmPWLU)
    assert sum(isinstance(m, pwlu.LazyPWLU) for m in model.modules()) == 17
    model.eval()
    with torch.no_grad():
        model(X64)
    found = pwlus(model)
    assert not any(isinstance(m, pwlu.LazyPWLU) for m in model.modules())
    assert [m.num_channels for _, m in found] == resnet_expected_channels((2, 2, 2, 2), False)
    # a fresh lazy model loads the state dict of an initialised one
    fresh = timm.create_model("resnet18", pretrained=False, act_layer=functools.partial(pwlu.TimmPWLU))
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(X64), model(X64))


# ----------------------------------------------------------------------------- custom models and errors


class SharedAct(nn.Module):
    """One ReLU object registered in two places, at different widths."""

    def __init__(self):
        super().__init__()
        act = nn.ReLU()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), act)
        self.b = nn.Sequential(nn.Conv2d(4, 6, 1), act)

    def forward(self, x):
        return self.b(self.a(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.ReLU()

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: not fx-traceable
            x = self.act(self.c1(x))
        return self.act(self.c2(x))


class Looped(nn.Module):
    """One call site inside a Python loop at one width; tanh and sigmoid gates stay."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.GELU()
        self.gate = nn.Sigmoid()
        self.tanh = nn.Tanh()

    def forward(self, x):
        for _ in range(3):
            x = self.act(self.conv(x))
        return self.tanh(x) * self.gate(x)


def test_shared_module_is_untied():
    model = pwlu.convert_activations(SharedAct(), example_input=torch.randn(1, 3, 8, 8))
    assert model.a[1].num_channels == 4 and model.b[1].num_channels == 6


def test_loop_is_split_per_unrolled_call():
    model = pwlu.convert_activations(Looped(), example_input=torch.randn(1, 3, 8, 8))
    assert [m.num_channels for _, m in pwlus(model)] == [3, 3, 3]
    assert isinstance(model.gate, nn.Sigmoid) and isinstance(model.tanh, nn.Tanh)


def test_untraceable_reuse_raises_clear_error():
    with pytest.raises(ConversionError, match=r"'act' is called 2 times.*cannot trace"):
        pwlu.convert_activations(Untraceable(), example_input=torch.randn(1, 3, 8, 8))
    # excluding it is the way out
    model = pwlu.convert_activations(Untraceable(), exclude="act", example_input=torch.randn(1, 3, 8, 8))
    assert isinstance(model.act, nn.ReLU)


def test_one_by_one_inputs_stay():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
                          nn.ReLU())  # fmt: skip
    pwlu.convert_activations(model, example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model[2], nn.ReLU)  # spatially 1x1
    assert isinstance(model[5], pwlu.PWLU) and model[5].num_channels == 4


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.used, self.unused = nn.Conv2d(3, 4, 1), nn.ReLU(), nn.ReLU()

    def forward(self, x, branch=False):
        return self.unused(x) if branch else self.used(self.conv(x))


class _Trim(nn.Module):  # as transformers' Wav2Vec2SamePadLayer: no channel semantics of its own
    def forward(self, x):
        return x[:, :, :-1]


class _TrimTime(nn.Module):
    def forward(self, x):
        return x[:, :-1]


def test_channel_axis_past_a_module_without_channel_semantics():
    """Found by an adversarial review: a (B, C, L) activation whose input came from a module
    that does not say where its channels are (a padding trim after a Conv1d; Wav2Vec2's
    positional convolution) got channel_dim=-1 from the rank, one PWLU per time step, and failed
    on any other length. The owner's layers (Conv1d 4 -> 8) now decide: axis 1."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), _Trim(), nn.GELU())
    pwlu.convert_activations(model, example_input=torch.randn(2, 4, 20))
    assert (model[2].num_channels, model[2].channel_dim) == (8, 1)
    x = torch.randn(2, 4, 30)  # another length
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.relu(model[1](model[0](x))))
    # (B, T, C) through a module that trims the time axis: the linear layer's features are last
    seq = nn.Sequential(nn.Linear(4, 6), _TrimTime(), nn.GELU())
    pwlu.convert_activations(seq, example_input=torch.randn(2, 9, 4))
    assert (seq[2].num_channels, seq[2].channel_dim) == (6, -1)


def test_never_called_activation_warns():
    model = Branchy()
    with pytest.warns(UserWarning, match="unused"):
        pwlu.convert_activations(model, example_input=torch.randn(1, 3, 4, 4))
    assert isinstance(model.used, pwlu.PWLU) and isinstance(model.unused, nn.ReLU)


def test_bad_arguments():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="'pwlu2'"):
        pwlu.convert_activations(model, activation="pwlu2", example_input=X64)
    with pytest.raises(ValueError, match="mode"):
        pwlu.convert_activations(model, mode="pixel", example_input=X64)
    with pytest.raises(ValueError, match="num_intervals"):
        pwlu.convert_activations(model, num_intervals=0, example_input=X64)
    with pytest.raises(ConversionError, match="example_input"):
        pwlu.convert_activations(model, example_input=torch.randn(1, 5, 64, 64))
    with pytest.raises(ValueError, match="example_input"):
        pwlu.convert_activations(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(TypeError):
        pwlu.convert_activations("resnet18")
    assert isinstance(model.relu, nn.ReLU) and not pwlus(model)  # nothing changed by the failed calls
