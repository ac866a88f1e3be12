"""Numerics and API edges (issue 11, "Numerics and API edges"): each case ends in the right
answer or a clear error that names the offending value or module."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu.ops import dispatch

BACKENDS = ["torch", "cpu", "triton", "reference"]


def _backend_or_skip(name: str) -> str:
    if name != "reference" and not dispatch.is_available(name, torch.device("cpu")):
        pytest.skip(f"backend {name!r} is not available for CPU tensors here")
    return name


# ----------------------------------------------------------------------------------------
# realign_boundaries on float16 with a huge spread: never ±inf bounds, never NaN


def _fp16_module_with_stats(mean: float, std: float) -> pwlu.PWLU:
    m = pwlu.PWLU(3, num_intervals=8).half()
    m.running_mean.fill_(mean)
    m.running_std.fill_(std)
    m.num_batches_tracked.fill_(1)
    return m


@pytest.mark.parametrize("preserve_function", [False, True])
@pytest.mark.parametrize("mean,std", [(100.0, 2.2e4), (-3e4, 2e4), (6e4, 3e3), (0.0, float("inf"))])
def test_realign_float16_huge_std_stays_finite(mean, std, preserve_function):
    """mean ± 3·std beyond float16's 65504 is clamped to what float16 holds (an overflowed
    running_std of +inf means the whole float16 range); outputs are never NaN."""
    m = _fp16_module_with_stats(mean, std)
    pwlu.realign_boundaries(m, preserve_function=preserve_function)
    big = torch.finfo(torch.float16).max
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), f"{name} = {p}"
    assert (m.left_bound >= -big).all() and (m.right_bound <= big).all()
    assert (m.right_bound.float() - m.left_bound.float() >= pwlu.DEFAULT_MIN_WIDTH).all()
    x = torch.linspace(-big, big, 4001).reshape(1, 1, -1).expand(2, 3, -1).half()
    y = m(x)
    assert not torch.isnan(y).any()
    if not preserve_function:  # still Eq. 6's ReLU at the breakpoints
        steps = torch.arange(9, dtype=torch.float64) / 8
        left, right = m.left_bound.double().unsqueeze(-1), m.right_bound.double().unsqueeze(-1)
        torch.testing.assert_close(m.points.double(), torch.relu(left + steps * (right - left)), rtol=1e-3, atol=0)


def test_realign_float16_narrow_range_at_the_top_keeps_min_width():
    m = _fp16_module_with_stats(65504.0, 0.0)
    pwlu.realign_boundaries(m)
    width = m.right_bound.float() - m.left_bound.float()
    assert torch.isfinite(m.right_bound).all() and (width >= pwlu.DEFAULT_MIN_WIDTH).all()


def test_realign_float16_refit_that_overflows_names_the_module():
    model = nn.Sequential(nn.Linear(4, 4), pwlu.PWLU(2, num_intervals=4, init=lambda t: 1000 * t)).half()
    model[1].running_std.fill_(2e4)
    model[1].num_batches_tracked.fill_(1)
    before = [p.detach().clone() for p in model[1].parameters()]
    with pytest.raises(ValueError, match=r"'1'.*overflows its float16"):
        pwlu.realign_boundaries(model, preserve_function=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model[1].parameters()))  # unchanged


def test_fix_init_bound_beyond_float16_names_the_module():
    model = nn.Sequential(nn.Linear(4, 4), pwlu.PWLU(4)).half()
    with pytest.raises(ValueError, match=r"'1'.*float16"):
        pwlu.fix_init(model, 1e5)


# ----------------------------------------------------------------------------------------
# non-finite parameters: rejected by every backend and the reference, naming the parameter


def _params(**overrides):
    p = {
        "points": torch.linspace(-1.0, 1.0, 5),
        "left_bound": torch.tensor(-1.0),
        "right_bound": torch.tensor(2.0),
        "left_slope": torch.tensor(0.5),
        "right_slope": torch.tensor(1.0),
    }
    p.update(overrides)
    return [p[name] for name in ("points", "left_bound", "right_bound", "left_slope", "right_slope")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,value",
    [("right_bound", float("inf")), ("left_bound", float("-inf")), ("right_bound", float("nan")),
     ("left_slope", float("inf")), ("points", float("nan"))],
)  # fmt: skip
def test_non_finite_parameters_are_rejected(backend, name, value):
    _backend_or_skip(backend)
    params = _params()
    index = ("points", "left_bound", "right_bound", "left_slope", "right_slope").index(name)
    params[index] = params[index].clone()
    params[index].view(-1)[-1] = value
    x = torch.linspace(-3, 3, 13)
    for requires_grad in (False, True):
        args = [p.clone().requires_grad_(requires_grad) for p in params]
        with pwlu.use_backend(backend), pytest.raises(ValueError, match=rf"{name}.*(inf|nan)"):
            pwlu.pwlu(x, *args)
    with pytest.raises(ValueError, match=rf"{name}.*(inf|nan)"):
        pwlu.pwlu_reference(x, *params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_range_that_overflows_the_compute_dtype_is_rejected(backend):
    _backend_or_skip(backend)
    params = _params(left_bound=torch.tensor(-3e38), right_bound=torch.tensor(3e38))
    with pwlu.use_backend(backend), pytest.raises(ValueError, match="overflows float32"):
        pwlu.pwlu(torch.randn(10), *params)
    # float64 parameters that float32 inputs cannot hold
    params = _params(right_bound=torch.tensor(1e300, dtype=torch.float64))
    with pwlu.use_backend(backend), pytest.raises(ValueError, match="right_bound.*float32"):
        pwlu.pwlu(torch.randn(10), *params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_points_whose_fold_overflows_are_rejected(backend):
    """Regression: finite points whose interval slopes (P[i+1] - P[i]) * N / width overflow the
    compute dtype gave NaN from finite input in the fast paths (inf * 0) while the reference was
    finite; now every backend and the reference raise, naming the points and the channel."""
    _backend_or_skip(backend)
    points = torch.zeros(65)
    points[::2] = 1e34
    params = _params(points=points, left_bound=torch.tensor(0.0), right_bound=torch.tensor(1e-3))
    x = torch.linspace(-1e-3, 2e-3, 11)
    with pwlu.use_backend(backend), pytest.raises(ValueError, match=r"points.*overflow float32"):
        pwlu.pwlu(x, *params)
    with pytest.raises(ValueError, match=r"points.*overflow float32"):
        pwlu.pwlu_reference(x, *params)
    # channel-wise: the error names the channel; float64 holds the same fold
    cw = [points.expand(3, 65).clone(), torch.zeros(3), torch.full((3,), 1e-3), torch.zeros(3), torch.zeros(3)]
    cw[0][0] = 0.0
    cw[0][1] = 0.0
    with pwlu.use_backend(backend), pytest.raises(ValueError, match=r"points of channel 2 .*overflow float32"):
        pwlu.pwlu(x.expand(2, 3, 11), *cw, channel_dim=1)
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x.double(), *(p.double() for p in params))
    assert torch.isfinite(y).all()
    # an outer slope whose intercept overflows: a range around 0 reaching far (B_L = -1e30, the
    # intercept at x = 0 is K_L * 1e30) times a huge K_L; the error names the slope
    big = _params(left_bound=torch.tensor(-1e30), right_bound=torch.tensor(3e30), left_slope=torch.tensor(1e10))
    with pwlu.use_backend(backend), pytest.raises(ValueError, match="left_slope = 1e.10 .*overflow float32"):
        pwlu.pwlu(x, *big)
    # the same slope on a range far from 0 folds without overflow (intercepts at x = B_L): accepted,
    # and the outputs, -1e40 in exact arithmetic, are -inf as the reference's (no NaN)
    far = _params(left_bound=torch.tensor(1e30), right_bound=torch.tensor(3e30), left_slope=torch.tensor(1e10))
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *far)
    assert torch.equal(y, pwlu.pwlu_reference(x, *far)) and bool((y == -float("inf")).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_range_written_through_data_gives_nan(backend):
    """Regression: a NaN bound written through ``.data`` (which the finiteness check cannot see)
    was floored to a valid minimum-width range: finite, wrong outputs with no error. NaN
    range now gives NaN out, for PWLU, N-PWLU (also NaN width logits) and PWLU2D."""
    _backend_or_skip(backend)
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0, 5.0])
    act = pwlu.PWLU(None, 4)
    with pwlu.use_backend(backend):
        act(x)  # checked and remembered
        act.right_bound.data.fill_(float("nan"))
        assert torch.isnan(act(x)).all()
        act.eval()
        with torch.no_grad():
            assert torch.isnan(act(x)).all()
        nact = pwlu.NPWLU(None, 4)
        nact(x)
        nact.right_bound.data.fill_(float("nan"))
        assert torch.isnan(nact(x)).all()
        # NaN width logits: the breakpoints inside are NaN, the outer pieces stay defined
        nact = pwlu.NPWLU(None, 4)
        nact(x)
        nact.width_logits.data.fill_(float("nan"))
        inside = nact(x)[:4]
        assert torch.isnan(inside).all() and nact(torch.tensor([5.0])).item() == 5.0
        merge = pwlu.PWLU2D(None, 4)
        merge(x, x)
        merge.x_right_bound.data.fill_(float("nan"))
        assert torch.isnan(merge(x, x)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_inputs_still_work_with_finite_parameters(backend):
    """NaN in x gives NaN out and ±inf in x the function's limits, in every backend."""
    _backend_or_skip(backend)
    x = torch.tensor([float("nan"), float("-inf"), float("inf"), -2.0, 0.5, 3.0])
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *_params())
    assert math.isnan(y[0].item())
    assert y[1:3].tolist() == [float("-inf"), float("inf")]
    torch.testing.assert_close(y[3:], pwlu.pwlu_reference(x[3:], *_params()))


def test_module_parameters_edited_to_inf_are_rejected_in_every_path():
    m = pwlu.PWLU(3)
    x = torch.randn(2, 3, 5)
    m(x)  # training path: parameters checked (and remembered as finite)
    with torch.no_grad():
        m.eval()
        m(x)  # inference plan made
        m.right_bound[1] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match=r"right_bound.*inf"):
        m(x)
    m.train()
    with pytest.raises(ValueError, match=r"right_bound.*inf"):
        m(x)


# ----------------------------------------------------------------------------------------
# float32 with many intervals on a range far from 0: the documented error bound


def _error_bound(x, params, eps):
    """README, Conventions, "Rounding": |error| <= 4·eps·(max|Y_P| + (B_R - B_L)·max|K_i|
    + |K_o|·(|x - s| + B_R - B_L)), K_o the outer slope of x's side, s = clamp(0, B_L, B_R)."""
    points, left, right, kl, kr = (p.double() for p in params)
    n = points.shape[-1] - 1
    width = right - left
    k_inner = ((points[1:] - points[:-1]) * n / width).abs().max()
    s = torch.clamp(torch.zeros(()), left, right)
    outer = torch.where(x < left, kl.abs(), torch.where(x >= right, kr.abs(), torch.zeros(())))
    return 4 * eps * (points.abs().max() + width * k_inner + outer * ((x - s).abs() + width))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "reference"])
@pytest.mark.parametrize("lo,hi", [(100.0, 101.0), (100.1, 100.8), (-0.3, 0.4), (1000.0, 1001.0), (-1e4, -9999.0)])
def test_float32_many_intervals_far_from_zero_within_documented_bound(backend, lo, hi):
    _backend_or_skip(backend)
    n = 1000
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(n + 1, generator=g),
        torch.tensor(lo),
        torch.tensor(hi),
        torch.tensor(0.5),
        torch.tensor(-2.0),
    ]
    width = hi - lo
    x = (lo - 0.2 * width + 1.4 * width * torch.rand(20000, generator=g, dtype=torch.float64)).float()
    exact = pwlu.pwlu_reference(x.double(), *(p.double() for p in params))
    with pwlu.use_backend(backend):
        y = pwlu.pwlu(x, *params)
    err = (y.double() - exact).abs()
    bound = _error_bound(x.double(), params, torch.finfo(torch.float32).eps)
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


# ----------------------------------------------------------------------------------------
# the meta device


@pytest.mark.parametrize("num_channels", [None, 8])
def test_meta_device_construction_repr_and_materialisation(num_channels):
    with torch.device("meta"):
        m = pwlu.PWLU(num_channels, num_intervals=4, channel_dim=1)
        lazy = pwlu.LazyPWLU(4)
    assert m.points.is_meta and m.running_mean.is_meta
    assert "meta" in repr(m) and "num_intervals=4" in repr(m)
    assert "lazy" in repr(lazy)
    # a module built on meta, then materialised, is the same as one built directly
    m.to_empty(device="cpu")
    m.reset_parameters()
    want = pwlu.PWLU(num_channels, num_intervals=4, channel_dim=1)
    for (name, a), (_, b) in zip(m.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 8, 3)
    assert torch.equal(m(x), torch.relu(x))


def test_meta_device_forward_gives_shapes():
    with torch.device("meta"):
        m = pwlu.PWLU(8)
        y = m(torch.empty(2, 8, 4, 4))
    assert y.is_meta and y.shape == (2, 8, 4, 4)


# ----------------------------------------------------------------------------------------
# init= callables are validated


@pytest.mark.parametrize(
    "init,error,match",
    [
        (lambda t: t.sum(), ValueError, r"shape \(\) .*\(4, 17\)|\(4, 17\).*shape \(\)"),
        (lambda t: t[..., :-1], ValueError, r"shape"),
        (torch.log, ValueError, r"log.*non-finite.*nan"),
        (lambda t: 1.0 / t, ValueError, r"non-finite.*inf"),
        (lambda t: t.tolist(), TypeError, r"tensor"),
        (lambda t: torch.where(t.abs() >= 3, torch.full_like(t, float("nan")), t), ValueError, r"non-finite"),
    ],
)
def test_init_callable_output_is_validated(init, error, match):
    with pytest.raises(error, match=match):
        pwlu.PWLU(4, init=init)


def test_init_callable_with_non_finite_slope_is_rejected():
    # finite at every breakpoint of [-3, 3], but no finite slope at the left boundary
    with pytest.raises(ValueError, match=r"slope.*-3"):
        pwlu.PWLU(2, init=lambda t: torch.sqrt(t + 3))


def test_valid_init_callables_still_work():
    m = pwlu.PWLU(4, init=lambda t: 0.5 * t)
    torch.testing.assert_close(m.left_slope, torch.full((4,), 0.5))
    m = pwlu.PWLU(None, init=torch.exp)
    assert torch.isfinite(m.points).all()


# ----------------------------------------------------------------------------------------
# convert_activations on scripted, traced and functional models


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class _FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return F.gelu(self.fc(x.mean((2, 3))))


X = torch.randn(1, 3, 16, 16)


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's own deprecation warning
        return torch.jit.script(module)


def test_convert_scripted_model_raises_conversion_error():
    with pytest.raises(pwlu.ConversionError, match=r"RecursiveScriptModule.*script"):
        pwlu.convert_activations(_script(_Net()), example_input=X)


def test_convert_model_with_scripted_submodule_names_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _script(nn.ReLU()))
    with pytest.raises(pwlu.ConversionError, match=r"'1'.*RecursiveScriptModule"):
        pwlu.convert_activations(model, example_input=X)


def test_convert_traced_model_warns_that_nothing_was_converted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's own deprecation warning
        traced = torch.jit.trace(_Net(), X)
    with pytest.warns(UserWarning, match=r"converted nothing.*torch\.jit\.trace"):
        out = pwlu.convert_activations(traced, example_input=X)
    assert out is traced


def test_convert_functional_activations_warns_naming_them():
    model = _FunctionalNet()
    with pytest.warns(UserWarning, match=r"converted nothing.*relu.*gelu"):
        pwlu.convert_activations(model, example_input=X)


def test_convert_warns_about_functional_calls_also_when_something_was_converted():
    """Issue 13: activations called as functions in ``forward`` (``F.relu``, ``F.gelu``), which
    cannot be converted, warn also when other activations were converted (they used to convert
    silently, leaving the model half converted); a model of activation modules only converts
    without a warning."""

    class Mixed(_FunctionalNet):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.SiLU()

        def forward(self, x):
            return super().forward(self.act(x))

    with pytest.warns(UserWarning) as record:
        model = pwlu.convert_activations(Mixed(), example_input=X)
    assert isinstance(model.act, pwlu.PWLU)
    assert len(record) == 1, [str(w.message) for w in record]
    message = str(record[0].message)
    assert "relu" in message and "gelu" in message and "not converted" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = pwlu.convert_activations(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()), example_input=X)
    assert isinstance(model[1], pwlu.PWLU)


class _SquaredReLU(nn.Module):  # an activation module of a type convert_activations does not replace
    def forward(self, x):
        return F.relu(x) ** 2


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.gelu(self.fc(x))


class SqueezeExcitation(nn.Module):  # by name an SE block: what runs inside stays, without a word
    def forward(self, x):
        return x * torch.sigmoid(F.relu(x))


def test_functional_call_warnings_say_where_the_calls_are():
    """Regression: a model whose activations were modules of types that are not replaced
    (transformers' ReLUSquaredActivation calls F.relu inside) was told that "its forward calls
    activations as functions ... write them as modules", which they already were. The warning now
    tells calls in forward code (naming the submodule) from modules of types not replaced, and
    ignores calls inside squeeze-and-excitation blocks (left alone by design)."""
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning) as record:
        pwlu.convert_activations(nn.Sequential(nn.Linear(4, 4), _SquaredReLU()), example_input=x)
    (message,) = [str(w.message) for w in record]
    assert "converted nothing" in message and "'1' (_SquaredReLU: relu x1)" in message, message
    assert "not replaced" in message and "write them as modules" not in message, message
    with pytest.warns(UserWarning) as record:
        model = pwlu.convert_activations(
            nn.Sequential(nn.Linear(4, 4), nn.SiLU(), _Head(), _SquaredReLU(), SqueezeExcitation()), example_input=x
        )
    assert isinstance(model[1], pwlu.PWLU)
    (message,) = [str(w.message) for w in record]
    assert "gelu x1 in '2' (_Head)" in message and "'3' (_SquaredReLU: relu x1)" in message, message
    assert "SqueezeExcitation" not in message and "relu x2" not in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only SE-block calls besides modules: no warning
        pwlu.convert_activations(nn.Sequential(nn.Linear(4, 4), nn.SiLU(), SqueezeExcitation()), example_input=x)


# ----------------------------------------------------------------------------------------
# BoundaryRealigner: an unmaterialised LazyPWLU; pickling


def test_realigner_with_unmaterialised_lazy_pwlu_says_run_a_forward_first():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pwlu.LazyPWLU())
    with pytest.raises(ValueError, match=r"'1'.*not materiali[sz]ed.*forward"):
        pwlu.BoundaryRealigner(model, warmup_steps=3)
    with pytest.raises(ValueError, match=r"'1'.*forward"):
        pwlu.fix_init(model, 3.0)
    model(X)
    pwlu.BoundaryRealigner(model, warmup_steps=3)  # fine once materialised


def test_realigner_collects_per_channel_statistics_of_a_lazy_pwlu():
    """A materialised LazyPWLU has per-channel statistics buffers (they used to stay scalars,
    and the first collecting forward failed), also when loaded from a state dict."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pwlu.LazyPWLU(4))
    model(X)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        _train_step(model, opt, realigner, torch.randn(2, 3, 16, 16))
    pw = model[1]
    assert type(pw) is pwlu.PWLU and pw.running_mean.shape == (4,) and int(pw.num_batches_tracked) == 2
    assert not torch.equal(pw.left_bound, torch.full((4,), -3.0))  # realigned per channel
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), pwlu.LazyPWLU(4))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh[1].running_mean, pw.running_mean)


def _train_step(model, opt, realigner, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    realigner.step()


def test_realigner_pickles_and_resumes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pwlu.PWLU(4))
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _train_step(model, opt, realigner, X)
    blob = pickle.dumps(realigner)
    buffer = io.BytesIO()
    torch.save({"realigner": realigner, "model": model}, buffer)
    clone = pickle.loads(blob)
    assert clone.num_steps == 1 and clone.phase == "collecting" and clone.state_dict() == realigner.state_dict()
    # the unpickled realigner freezes the unpickled model's PWLU in phase I
    opt2 = torch.optim.SGD(clone.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = [p.detach().clone() for p in clone.model[1].parameters()]
    _train_step(clone.model, opt2, clone, X)
    assert all(torch.equal(a, b) for a, b in zip(before, clone.model[1].parameters()))
    assert int(clone.model[1].num_batches_tracked) == 2
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded["realigner"].model is loaded["model"]
    copy.deepcopy(realigner)  # still works


def test_realigner_with_process_group_refuses_to_pickle_clearly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pwlu.PWLU(4))
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=3)
    realigner.process_group = object()  # stands in for a torch.distributed group
    with pytest.raises(TypeError, match=r"state_dict"):
        pickle.dumps(realigner)


# ----------------------------------------------------------------------------------------
# the parameter check's one-call summary in C (run after every optimizer step)


def _torch_summary(params, pairs):
    """(all finite, largest magnitude, smallest width floored at MIN_WIDTH), in torch, written
    from the check's definition: every value and every width right - left (float32 differences)."""
    from pwlu.ops.folding import MIN_WIDTH

    widths = [params[hi] - params[lo] for lo, hi in pairs]
    flat = torch.cat([p.detach().reshape(-1) for p in params] + [w.detach().reshape(-1) for w in widths])
    narrow = min(w.clamp(min=MIN_WIDTH).amin().item() for w in widths)
    return bool(torch.isfinite(flat).all()), flat.abs().max().item(), narrow


@pytest.mark.parametrize("kind", ["pwlu", "pwlu2d"])
def test_native_parameter_summary_matches_torch(kind):
    """The C summary (``validation.native_summary``) against the same quantities in torch, on
    sane parameters, parameters with NaN or ±inf, a range whose width overflows float32 (finite
    bounds), and widths below the floor, negative and zero; then the error messages with the
    library loaded (the check takes the C summary first and torch only to name the value)."""
    from pwlu.ops import validation
    from pwlu.ops.cpu.build import PWLU_CPU
    from pwlu.ops.pwlu2d_cpu_backend import PWLU2D_CPU

    lib = (PWLU_CPU if kind == "pwlu" else PWLU2D_CPU).get()
    if lib is None:
        pytest.skip("the C library cannot be built here")
    name = f"{kind}_param_summary_f32"
    pairs = ((1, 2),) if kind == "pwlu" else ((1, 2), (3, 4))
    gen = torch.Generator().manual_seed(3)
    if kind == "pwlu":
        base = [torch.randn(5, 17, generator=gen), torch.full((5,), -3.0), torch.full((5,), 3.0)]
        base += [torch.randn(5, generator=gen) for _ in range(2)]
    else:
        base = [torch.randn(5, 9, 9, generator=gen), torch.full((5,), -3.0), torch.full((5,), 3.0)]
        base += [torch.full((5,), -2.0), torch.full((5,), 4.0)] + [torch.randn(5, generator=gen) for _ in range(4)]
    cases = {"sane": {}, "nan point": {(0, 7): float("nan")}, "inf slope": {(len(base) - 1, 2): float("inf")},
             "-inf bound": {(1, 4): -float("inf")}, "width overflows": {(1, 1): -3e38, (2, 1): 3e38},
             "narrow": {(2, 0): -3.0 + 1e-9}, "negative width": {(2, 3): -4.0},
             "largest is a width": {(1, 2): -9.0, (2, 2): 8.0}}  # fmt: skip
    if kind == "pwlu2d":
        cases["y width overflows"] = {(3, 4): -2e38, (4, 4): 2e38}
    for case, writes in cases.items():
        params = [p.clone() for p in base]
        for (k, index), value in writes.items():
            params[k].view(-1)[index] = value  # (parameter, flat index)
        native = validation.native_summary(torch.float32, tuple(params), pairs, lib, name)
        finite, big, narrow = _torch_summary(params, pairs)
        assert native is not None, case
        assert native[0] == finite, case
        if finite:
            assert native[1:] == (big, narrow), case
    # the checks raise the same errors with the library loaded
    if kind == "pwlu":
        x = torch.randn(2, 5, 4)
        bad = [p.clone() for p in base]
        bad[1][1], bad[2][1] = -3e38, 3e38
        with pytest.raises(ValueError, match="range right_bound - left_bound.*overflows float32"):
            pwlu.pwlu(x, *bad)
        bad = [p.clone() for p in base]
        bad[0][2, 5] = float("nan")
        with pytest.raises(ValueError, match=r"points holds nan at index \(2, 5\)"):
            pwlu.pwlu(x, *bad)
        assert torch.isfinite(pwlu.pwlu(x, *base)).all()
    else:
        x, y = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
        bad = [p.clone() for p in base]
        bad[3][4], bad[4][4] = -2e38, 2e38
        with pytest.raises(ValueError, match="range y_right_bound - y_left_bound.*at index \\(4,\\) overflows"):
            pwlu.pwlu2d(x, y, *bad)
        bad = [p.clone() for p in base]
        bad[8][1] = -float("inf")
        with pytest.raises(ValueError, match="y_right_slope holds -inf at index"):
            pwlu.pwlu2d(x, y, *bad)
        assert torch.isfinite(pwlu.pwlu2d(x, y, *base)).all()


# ----------------------------------------------------------------------------------------
# finite parameters whose folded tables overflow: N-PWLU's narrow intervals, 2-D PWLU's vertex
# differences, outer pieces; and parameters far out that fold fine


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_npwlu_points_over_a_narrow_interval_whose_fold_overflows(backend):
    """Regression: an interval 1.7e-6 wide (learned widths) under a rise of 1e33 folds to a
    slope of 6e38, which overflows float32; the CPU path returned NaN for finite inputs in that
    interval (inf * 0), though PWLU's check (uniform intervals) passed. Now every path raises,
    naming the points and the interval; float64 holds the same fold."""
    _backend_or_skip(backend)
    points = torch.tensor([[0.0, 0.0, 1e33, 1e33, 0.0]])
    logits = torch.tensor([[0.0, -14.0, 0.0, 0.0]])
    lb, rb, ks = torch.tensor([-3.0]), torch.tensor([3.0]), torch.zeros(1)
    b = pwlu.ops.npwlu_reference.npwlu_breakpoints(logits, lb, rb)[0][0]
    x = torch.linspace(b[1].item(), b[2].item(), 5).reshape(1, 1, 5)
    args = (points, logits, lb, rb, ks, ks)
    match = r"npwlu: the points \(largest 1e\+33, rise 1e\+33 over interval 1 of width 1\.6.*overflow float32"
    with pytest.raises(ValueError, match=match):
        if backend == "reference":
            pwlu.npwlu_reference(x, *args)
        else:
            with pwlu.use_backend(backend):
                pwlu.npwlu(x, *args)
    if backend != "reference":
        with pwlu.use_backend(backend):
            y = pwlu.npwlu(x.double(), *(a.double() for a in args))
        assert torch.isfinite(y).all()
        # the same rise over wide intervals folds: accepted, finite
        with pwlu.use_backend(backend):
            y = pwlu.npwlu(x, points, torch.zeros(1, 4), lb, rb, ks, ks)
        assert torch.isfinite(y).all()


def test_npwlu_width_logits_that_overflow_the_compute_dtype():
    """Regression: float64 width logits of 1e39 (finite there) with a float32 input gave NaN;
    now they are rejected as points that overflow the compute dtype are."""
    m = pwlu.NPWLU(None, num_intervals=4).double()
    with torch.no_grad():
        m.width_logits[1] = 1e39
    with pytest.raises(ValueError, match=r"width_logits holds 1e\+39 at index \(1,\), which overflows float32"):
        m(torch.linspace(-4, 4, 9))
    assert torch.isfinite(m(torch.linspace(-4, 4, 9, dtype=torch.float64))).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_pwlu2d_vertex_values_whose_differences_overflow(backend):
    """Regression: finite vertex values 2e38 and -2e38 at neighbouring vertices gave NaN and -inf
    for finite inputs inside the grid (their difference, in the kernels' tables, overflows
    float32). Now rejected, naming the two vertices, along x, y and the diagonal; values as
    large whose differences fit are accepted and finite."""
    _backend_or_skip(backend)
    x = torch.tensor([[-3.0, -1.5, -2.0, 1.0]]).expand(3, 4).reshape(1, 3, 4)
    y = torch.tensor([[-3.0, -3.0, -1.0, 2.0]]).expand(3, 4).reshape(1, 3, 4)

    def call(m):
        if backend == "reference":
            params = [getattr(m, name) for name in pwlu.ops.pwlu2d_reference.PWLU2D_PARAMETER_NAMES]
            return pwlu.pwlu2d_reference(x, y, *params)
        with pwlu.use_backend(backend):
            return m(x, y)

    for (i, j), neighbour, name in (((0, 0), (1, 0), "x"), ((0, 1), (0, 2), "y"), ((1, 0), (2, 1), "diagonal")):
        m = pwlu.PWLU2D(3, num_intervals=2)
        with torch.no_grad():
            m.values[1, i, j], m.values[1, neighbour[0], neighbour[1]] = 2e38, -2e38
        match = rf"values of channel 1 hold 2e\+38 at vertex \({i}, {j}\) and -2e\+38 at its {name} neighbour"
        with pytest.raises(ValueError, match=match + r".*overflows float32"):
            call(m)
    m = pwlu.PWLU2D(3, num_intervals=2)
    with torch.no_grad():
        m.values[1].fill_(1.5e38)
        m.values[1, 1, 1] = -1.5e38
    assert torch.isfinite(call(m)).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_fold_check_names_the_outer_slope_and_accepts_far_ranges_that_fold(backend):
    """Regression: the check's per-channel bound blamed the points (advising a wider range) when an
    outer slope times the range overflowed, and rejected a range of [0, 1e38] whose fold is
    finite. It now folds exactly past its fast bound."""
    _backend_or_skip(backend)
    run = pwlu.pwlu_reference if backend == "reference" else pwlu.pwlu
    bad = _params(
        points=torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0]), left_bound=torch.tensor(-1e37),
        right_bound=torch.tensor(1e37), right_slope=torch.tensor(40.0),
    )  # fmt: skip
    with pwlu.use_backend(backend if backend != "reference" else "torch"):
        with pytest.raises(ValueError, match=r"right_slope = 40 over the range \[-1e\+37, 1e\+37\].*overflow float32"):
            run(torch.randn(4), *bad)
        far = _params(
            points=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), left_bound=torch.tensor(0.0),
            right_bound=torch.tensor(1e38), left_slope=torch.tensor(4.0), right_slope=torch.tensor(1.0),
        )  # fmt: skip
        x = torch.tensor([-1.0, 0.0, 5e37])
        y = run(x, *far)
    torch.testing.assert_close(y, torch.tensor([-4.0, 0.0, 2.0]))


@pytest.mark.parametrize("op", ["pwlu", "npwlu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the check's torch path
def test_zero_channels(op, dtype):
    """Regression: a channel-wise call with no channels raised a raw RuntimeError from the check
    (amax of an empty tensor; in float32 only before the C library was loaded); it returns the
    empty output, as pwlu2d does."""
    x = torch.randn(2, 0, 5, dtype=dtype)
    empty = [torch.zeros(0, dtype=dtype) for _ in range(4)]
    if op == "pwlu":
        y = pwlu.pwlu(x, torch.zeros(0, 5, dtype=dtype), *empty)
    else:
        y = pwlu.npwlu(x, torch.zeros(0, 5, dtype=dtype), torch.zeros(0, 4, dtype=dtype), *empty)
    assert y.shape == (2, 0, 5)


# ----------------------------------------------------------------------------------------
# x - B overflowing on a flat outer piece


def _far_params(op: str, slope: float):
    """Layer-wise parameters of ``op`` whose range lies near the float32 limit, so that ``x - B``
    overflows to ±inf for finite inputs far on the other side, with outer slopes ``slope``."""
    s = torch.tensor(slope)
    if op == "pwlu2d":
        n = 3
        grid = torch.linspace(0.0, 3.0, n + 1)
        values = grid[:, None] + 2 * grid[None, :]
        bounds = [torch.tensor(3e37), torch.tensor(3.1e37), torch.tensor(-3.1e37), torch.tensor(-3e37)]
        return [values, *bounds, s, s, s, s]
    points = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    bounds = [torch.tensor(3e37), torch.tensor(3.1e37)]
    if op == "npwlu":
        return [points, torch.zeros(4), *bounds, s, s]
    return [points, *bounds, s, s]


@pytest.mark.parametrize("op", ["pwlu", "npwlu", "pwlu2d"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_overflowing_offset_on_a_flat_piece_is_not_nan(op, backend, slope):
    """Regression: with the range near the float32 limit ([3e37, 3.1e37]) and a finite input far
    on the other side (-3.4e38), ``x - B`` overflows to -inf; on a flat outer piece (slope 0) the
    folded ``a (x - shift) + b`` gave 0 * inf = NaN from finite input in the torch and Triton
    backends and TorchScript (PWLU), and in every N-PWLU backend. The reference gives the
    piece's value; a nonzero slope gives ±inf, as the reference does."""
    from pwlu.ops.dispatch import PWLU2D_BACKENDS, PWLU_BACKENDS
    from pwlu.ops.npwlu_backends import NPWLU_BACKENDS

    table = {"pwlu": PWLU_BACKENDS, "npwlu": NPWLU_BACKENDS, "pwlu2d": PWLU2D_BACKENDS}[op]
    if not table.is_available(backend, torch.device("cpu")):
        pytest.skip(f"{backend} backend not available here")  # triton: run in its interpreter process
    params = _far_params(op, slope)
    x = torch.tensor([-3.4e38, -1e38, 0.0, 3.05e37, 3.4e38, float("nan"), float("inf"), -float("inf")])
    y = torch.tensor([-3.4e38, 3.05e37, 0.0, -1e38, 3.4e38, 0.5, float("nan"), float("inf")])
    args = (x, y) if op == "pwlu2d" else (x,)
    fast, reference = getattr(pwlu, op), getattr(pwlu, op + "_reference")
    expected = reference(*args, *params, channel_dim=None)
    assert not expected[:5].isnan().any()
    with pwlu.use_backend(backend):
        out = fast(*args, *params, channel_dim=None)
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-6, atol=0)
    if op != "pwlu2d" and backend == "torch":  # TorchScript and eval mode: the folded form
        module = (pwlu.NPWLU if op == "npwlu" else pwlu.PWLU)(num_intervals=4)
        with torch.no_grad():
            for name, p in zip(_names(module), params):
                getattr(module, name).copy_(p)
        module.eval()
        torch.testing.assert_close(module(x).detach(), expected, equal_nan=True, rtol=1e-6, atol=0)
        if op in ("pwlu", "npwlu"):  # their TorchScript forms (also the ONNX export path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
                scripted = torch.jit.script(module)
            torch.testing.assert_close(scripted(x).detach(), expected, equal_nan=True, rtol=1e-6, atol=0)


def _names(module) -> list[str]:
    return [n for n in ("points", "width_logits", "left_bound", "right_bound", "left_slope", "right_slope")
            if hasattr(module, n)]  # fmt: skip


# ----------------------------------------------------------------------------------------
# the backward runs on the forward's backend


@pytest.mark.parametrize("op", ["pwlu", "npwlu", "pwlu2d"])
def test_backward_runs_on_the_backend_of_its_forward(op, monkeypatch):
    """Regression: the backward selected its backend when it ran, so a forward under
    ``use_backend("torch")`` whose ``.backward()`` was called after the ``with`` block (as a
    training loop does, and as the 2-D PWLU test helpers and ``gradcheck`` did) ran the default
    backend's backward: the tests said "torch" or "triton" and checked the C backward. The
    backward now runs under the setting its forward ran under."""
    from pwlu.ops.dispatch import PWLU2D_BACKENDS, PWLU_BACKENDS
    from pwlu.ops.npwlu_backends import NPWLU_BACKENDS

    table = {"pwlu": PWLU_BACKENDS, "npwlu": NPWLU_BACKENDS, "pwlu2d": PWLU2D_BACKENDS}[op]
    backend = table.load("torch")
    calls = []
    original = type(backend).backward

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(type(backend), "backward", staticmethod(recording))
    params = [p.requires_grad_() for p in _far_params(op, 0.5)]
    params[1 if op != "npwlu" else 2].data.fill_(-2.0)  # an ordinary range: [-2, B_R]
    x = torch.randn(2, 8, requires_grad=True)
    args = (x, torch.randn(2, 8, requires_grad=True)) if op == "pwlu2d" else (x,)
    with pwlu.use_backend("torch"):
        out = getattr(pwlu, op)(*args, *params, channel_dim=None)
    out.sum().backward()  # outside the block
    assert len(calls) == 1, calls
    assert x.grad is not None and all(p.grad is not None for p in params)


def test_modules_made_under_inference_mode_run_outside_it():
    """Regression: a PWLU, NPWLU or PWLU2D constructed under ``torch.inference_mode()`` (whose
    parameters are then inference tensors, without version counters) failed on every later call
    outside it, even under ``no_grad`` ("Inference tensors do not track version counter", from
    the parameter check's cache); ``nn.Linear`` made the same way works. They are checked on
    every call instead of remembered."""
    torch.manual_seed(0)
    normal = [pwlu.PWLU(3), pwlu.NPWLU(3), pwlu.PWLU2D(3)]
    with torch.inference_mode():
        torch.manual_seed(0)
        made = [pwlu.PWLU(3), pwlu.NPWLU(3), pwlu.PWLU2D(3)]
    assert made[0].points.is_inference()
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for train in (True, False):
        with torch.no_grad():
            for a, b in zip(made, normal):
                args = (x, y) if isinstance(a, pwlu.PWLU2D) else (x,)
                torch.testing.assert_close(a.train(train)(*args), b.train(train)(*args))


def test_backward_setting_is_per_thread():
    """Review: running a backward under its forward's setting wrote the global setting, so two
    backwards on two autograd threads (nn.DataParallel) could interleave their save/restore and
    leave a forced backend in place for good. The backward's setting is per thread."""
    import threading

    from pwlu.ops import dispatch

    before = dispatch.get_backend_name()  # "auto" unless PWLU_BACKEND says otherwise
    forced = "reference" if before != "reference" else "torch"
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with dispatch.backward_setting(forced):
            seen["worker"] = dispatch.get_backend_name()
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen["main"] = dispatch.get_backend_name()  # while the worker's backward runs
    release.set()
    t.join()
    assert seen == {"worker": forced, "main": before} and dispatch.get_backend_name() == before
