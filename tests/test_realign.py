"""Statistic-based realignment (SPEC section 4) and the IOU metric (SPEC section 6).

Expected values are computed here independently (numpy float64 on the inputs recorded by
forward pre-hooks), never copied from the code under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pwlu
from pwlu import PWLU

PARAMS = ("points", "left_bound", "right_bound", "left_slope", "right_slope")


class Net(nn.Module):
    """Linear -> channel-wise PWLU (channel_dim=-1) -> Linear -> layer-wise PWLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act1 = PWLU(7, num_intervals=8, channel_dim=-1)
        self.fc2 = nn.Linear(7, 6)
        self.act2 = PWLU(None, num_intervals=6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, rows: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, 3, 5, generator=g) * 2.0 + 0.5


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if kind == "sgd-foreach":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=True)
    if kind == "adamw-fused":
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-2, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-2)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, realigner, step: int) -> None:
    loss = model(batch(step)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if realigner is not None:
        realigner.step()


def record_inputs(module: nn.Module) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double().numpy().copy()))
    return seen


def expected_running(inputs: list[np.ndarray], to_rows, momentum: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 5 by hand: the first batch sets the value, then r <- (1 - m) r + m b (unbiased std)."""
    mean = std = None
    for k, x in enumerate(inputs):
        rows = to_rows(x)  # (elements, channels)
        b_mean, b_std = rows.mean(0), rows.std(0, ddof=1)
        m = 1.0 if k == 0 else (1.0 / (k + 1) if momentum is None else momentum)
        mean = b_mean if mean is None else (1 - m) * mean + m * b_mean
        std = b_std if std is None else (1 - m) * std + m * b_std
    return mean, std


def snapshot(module: PWLU) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name).detach().clone() for name in PARAMS}


# ------------------------------------------------------------------------------------------
# phase I
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw", "sgd-foreach", "adamw-fused"])
def test_phase1_pwlu_parameters_bit_identical(kind: str) -> None:
    model = make_net()
    opt = make_optimizer(kind, model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=6)
    before = {name: snapshot(m) for name, m in (("act1", model.act1), ("act2", model.act2))}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("act")}
    for step in range(5):
        train_step(model, opt, realigner, step)
    assert realigner.phase == "collecting"
    for name, module in (("act1", model.act1), ("act2", model.act2)):
        for pname, value in before[name].items():
            assert torch.equal(getattr(module, pname), value), f"{name}.{pname} changed in phase I ({kind})"
    for n, p in model.named_parameters():
        if not n.startswith("act"):
            assert not torch.equal(p, others[n]), f"{n} did not train ({kind})"
    # the optimizer never touched the PWLU parameters: phase II starts with a clean state
    pwlu_ids = {id(p) for m in (model.act1, model.act2) for p in m.parameters()}
    assert not any(id(p) in pwlu_ids for p in opt.state), f"optimizer state for a frozen PWLU param ({kind})"


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_running_statistics_match_inputs_channel_and_layer_wise(momentum) -> None:
    model = make_net()
    opt = make_optimizer("sgd", model)
    seen1, seen2 = record_inputs(model.act1), record_inputs(model.act2)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=10, momentum=momentum)
    for step in range(4):
        train_step(model, opt, realigner, step)
    model.eval()
    model(batch(99))  # eval passes never update the statistics
    seen1.pop(), seen2.pop()
    mean1, std1 = expected_running(seen1, lambda x: x.reshape(-1, x.shape[-1]), momentum)
    mean2, std2 = expected_running(seen2, lambda x: x.reshape(-1, 1), momentum)
    assert model.act1.running_mean.shape == (7,) and model.act2.running_mean.shape == ()
    tol = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.act1.running_mean.numpy(), mean1, **tol, err_msg="channel mean")
    np.testing.assert_allclose(model.act1.running_std.numpy(), std1, **tol, err_msg="channel std")
    np.testing.assert_allclose(model.act2.running_mean.numpy(), mean2[0], **tol, err_msg="layer mean")
    np.testing.assert_allclose(model.act2.running_std.numpy(), std2[0], **tol, err_msg="layer std")
    assert int(model.act1.num_batches_tracked) == 4


def test_running_statistics_nchw_channel_dim_1() -> None:
    module = PWLU(3, channel_dim=1).train()
    module.set_collecting(True)
    seen = record_inputs(module)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        module(torch.randn(2, 3, 5, 7, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1))
    mean, std = expected_running(seen, lambda x: np.moveaxis(x, 1, -1).reshape(-1, 3), 0.1)
    np.testing.assert_allclose(module.running_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.running_std.numpy(), std, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_statistics_accumulate_stably_for_low_precision_and_offset_inputs(dtype) -> None:
    # a large mean next to a small spread: E[x^2] - E[x]^2 in float32 would lose it all
    g = torch.Generator().manual_seed(1)
    x = (300.0 + torch.randn(4, 2, 4096, generator=g)).to(dtype)
    module = PWLU(2, channel_dim=1).train()
    module.set_collecting(True)
    module(x)
    rows = x.double().transpose(1, 2).reshape(-1, 2).numpy()  # the exact values seen
    np.testing.assert_allclose(module.running_mean.numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(module.running_std.numpy(), rows.std(0, ddof=1), rtol=1e-4)


# ------------------------------------------------------------------------------------------
# the reset at warmup_steps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_reset_at_warmup_is_three_sigma_relu_then_params_train(kind: str) -> None:
    model = make_net()
    opt = make_optimizer(kind, model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=4)
    for step in range(4):
        stats_before = [(m.running_mean.clone(), m.running_std.clone()) for m in (model.act1, model.act2)]
        train_step(model, opt, realigner, step)
    assert realigner.phase == "learning"
    for module in (model.act1, model.act2):
        mean, std = module.running_mean.double(), module.running_std.double()
        assert not torch.equal(mean, stats_before[0][0].double()) or module is model.act2
        np.testing.assert_allclose(module.left_bound.detach().double(), mean - 3 * std, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(module.right_bound.detach().double(), mean + 3 * std, rtol=1e-6, atol=1e-6)
        assert torch.all(module.left_slope == 0) and torch.all(module.right_slope == 1)
        n = module.num_intervals
        left, right = module.left_bound.detach().double(), module.right_bound.detach().double()
        breakpoints = left.unsqueeze(-1) + torch.arange(n + 1, dtype=torch.float64) * ((right - left) / n).unsqueeze(-1)
        np.testing.assert_allclose(module.points.detach().double(), breakpoints.clamp(min=0), atol=1e-6)
        # the function itself is ReLU at every breakpoint
        xs = breakpoints.float()
        ys = module(xs.T.contiguous() if module.channel_wise else xs)
        expected = F.relu(xs.T if module.channel_wise else xs)
        torch.testing.assert_close(ys, expected, atol=1e-5, rtol=0)
    after_reset = {name: snapshot(m) for name, m in (("act1", model.act1), ("act2", model.act2))}
    model.train()
    for step in range(4, 7):
        train_step(model, opt, realigner, step)
    for name, module in (("act1", model.act1), ("act2", model.act2)):
        changed = [p for p in PARAMS if not torch.equal(getattr(module, p), after_reset[name][p])]
        assert "points" in changed and "left_bound" in changed, f"{name}: phase II did not train ({changed})"


def test_zero_std_channel_gets_minimum_width() -> None:
    module = PWLU(3, num_intervals=4, channel_dim=1).train()
    module.set_collecting(True)
    x = torch.randn(8, 3, 10)
    x[:, 1] = 2.5  # a dead channel: constant input, std 0
    module(x)
    assert module.running_std[1] == 0
    pwlu.realign_boundaries(module)
    width = (module.right_bound - module.left_bound).detach()
    assert torch.isfinite(width).all() and torch.all(width >= pwlu.MIN_WIDTH)
    assert math.isclose(width[1].item(), pwlu.DEFAULT_MIN_WIDTH, rel_tol=1e-3)
    assert math.isclose((module.left_bound[1] + module.right_bound[1]).item() / 2, 2.5, abs_tol=1e-6)
    xs = torch.linspace(2.4, 2.6, 33)
    y = module(xs.reshape(1, 1, -1).expand(1, 3, -1)).detach()
    assert torch.isfinite(y).all()
    left = module.left_bound[1].item()
    # Eq. 6: ReLU inside and right of the range, K_L = 0 (flat at Y_P[0] = B_L) left of it
    torch.testing.assert_close(y[0, 1], torch.where(xs >= left, xs, torch.full_like(xs, left)), atol=1e-5, rtol=0)


def test_realign_refuses_non_finite_statistics() -> None:
    module = PWLU(2, channel_dim=1).train()
    module.set_collecting(True)
    module(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        pwlu.realign_boundaries(module)


def test_module_without_statistics_is_left_unchanged_with_a_warning() -> None:
    module = PWLU(2, channel_dim=1)
    before = snapshot(module)
    with pytest.warns(UserWarning, match="no training batch"):
        pwlu.realign_boundaries(module)
    assert all(torch.equal(getattr(module, p), before[p]) for p in PARAMS)


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_mid_phase1_equals_uninterrupted_run(kind: str) -> None:
    warmup, total, stop = 5, 8, 2

    model_a = make_net()
    opt_a = make_optimizer(kind, model_a)
    realigner_a = pwlu.BoundaryRealigner(model_a, warmup_steps=warmup)
    for step in range(total):
        train_step(model_a, opt_a, realigner_a, step)

    model_b = make_net()
    opt_b = make_optimizer(kind, model_b)
    realigner_b = pwlu.BoundaryRealigner(model_b, warmup_steps=warmup)
    for step in range(stop):
        train_step(model_b, opt_b, realigner_b, step)
    buffer = io.BytesIO()
    state = {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "realign": realigner_b.state_dict()}
    torch.save(state, buffer)
    del model_b, opt_b, realigner_b
    buffer.seek(0)
    state = torch.load(buffer)

    model_c = make_net(seed=123)  # different init: everything must come from the checkpoint
    opt_c = make_optimizer(kind, model_c)
    realigner_c = pwlu.BoundaryRealigner(model_c, warmup_steps=warmup)
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["opt"])
    realigner_c.load_state_dict(state["realign"])
    assert realigner_c.num_steps == stop and realigner_c.phase == "collecting"
    for step in range(stop, total):
        train_step(model_c, opt_c, realigner_c, step)

    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), f"{name} differs after resume ({kind})"
    model_a.eval(), model_c.eval()
    assert torch.equal(model_a(batch(50)), model_c(batch(50)))


def test_state_dict_holds_phase_and_statistics_and_old_checkpoints_load() -> None:
    model = make_net()
    keys = set(model.state_dict())
    for name in ("running_mean", "running_std", "num_batches_tracked", "collecting"):
        assert f"act1.{name}" in keys and f"act2.{name}" in keys
    old = {k: v for k, v in model.state_dict().items() if k.split(".")[-1] in PARAMS or not k.startswith("act")}
    fresh = make_net(seed=5)
    fresh.load_state_dict(old)  # strict: a checkpoint from before realignment still loads
    assert torch.equal(fresh.act1.points, model.act1.points)
    assert fresh.act1.num_batches_tracked == 0 and not fresh.act1.collecting


def test_collecting_flag_round_trips_through_state_dict() -> None:
    model = make_net()
    pwlu.BoundaryRealigner(model, warmup_steps=3)
    fresh = make_net()
    fresh.load_state_dict(model.state_dict())
    fresh.train()
    fresh(batch(0))
    assert int(fresh.act1.num_batches_tracked) == 1  # it collects after loading the flag


# ------------------------------------------------------------------------------------------
# function-preserving re-bound
# ------------------------------------------------------------------------------------------


def _set_stats(module: PWLU, mean, std) -> None:
    with torch.no_grad():
        module.running_mean.copy_(torch.as_tensor(mean))
        module.running_std.copy_(torch.as_tensor(std))
        module.num_batches_tracked.fill_(1)


def _eval_on(module: PWLU, xs: torch.Tensor) -> torch.Tensor:
    """xs (C, G) -> outputs (C, G) with channel_dim=0 semantics via (G, C) input."""
    return module(xs.T.contiguous()).T if module.channel_wise else module(xs)


def test_preserve_function_unchanged_bounds_is_exact() -> None:
    module = PWLU(3, num_intervals=8, channel_dim=-1, init="silu")
    with torch.no_grad():
        module.points.add_(0.3 * torch.randn_like(module.points))
    # statistics whose 3-sigma range is the current range [-3, 3]
    _set_stats(module, [0.0] * 3, [1.0] * 3)
    xs = torch.linspace(-5, 5, 1001).expand(3, -1)
    before = _eval_on(module, xs).detach()
    pwlu.realign_boundaries(module, preserve_function=True)
    torch.testing.assert_close(_eval_on(module, xs).detach(), before, atol=2e-5, rtol=0)


def test_preserve_function_linear_shape_is_exact_anywhere() -> None:
    module = PWLU(None, num_intervals=16, init="identity")
    _set_stats(module, 2.0, 0.7)  # new range [-0.1, 4.1], overlapping the old [-3, 3]
    pwlu.realign_boundaries(module, preserve_function=True)
    assert math.isclose(module.left_bound.item(), 2.0 - 2.1, abs_tol=1e-6)
    xs = torch.linspace(-3, 3, 601)
    torch.testing.assert_close(module(xs).detach(), xs, atol=2e-5, rtol=0)


def test_preserve_function_smooth_shape_within_tolerance() -> None:
    # documented tolerance: when the new range is shifted or wider (channels 0, 1), the max
    # error on the old range is below 2% of the function's range there; a narrower range
    # (channel 2) makes the function linear outside it, still far closer than the ReLU reset
    module = PWLU(3, num_intervals=16, channel_dim=-1, init="tanh")
    _set_stats(module, [0.5, 0.0, -0.2], [0.7, 1.5, 0.4])  # shifted, wider, narrower
    old_range = torch.linspace(-3, 3, 2001).expand(3, -1)
    before = _eval_on(module, old_range).detach()
    reference = PWLU(3, num_intervals=16, channel_dim=-1, init="tanh")
    _set_stats(reference, [0.5, 0.0, -0.2], [0.7, 1.5, 0.4])
    pwlu.realign_boundaries(reference)  # the paper's reset, for comparison
    pwlu.realign_boundaries(module, preserve_function=True)
    np.testing.assert_allclose(module.left_bound.detach().numpy(), [0.5 - 2.1, -4.5, -0.2 - 1.2], atol=1e-6)
    np.testing.assert_allclose(module.right_bound.detach().numpy(), [0.5 + 2.1, 4.5, -0.2 + 1.2], atol=1e-6)
    after = _eval_on(module, old_range).detach()
    spread = (before.max(1).values - before.min(1).values).unsqueeze(1)
    err = ((after - before).abs() / spread).max(1).values
    assert torch.all(err[:2] < 0.02), f"relative max error {err.tolist()}"
    reset_err = ((_eval_on(reference, old_range).detach() - before).abs() / spread).max(1).values
    assert torch.all(err < reset_err / 5), f"{err.tolist()} vs reset {reset_err.tolist()}"


def test_rebound_every_moves_bounds_to_current_statistics_in_phase2() -> None:
    model = make_net()
    opt = make_optimizer("sgd", model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=2, rebound_every=3)
    for step in range(2):
        train_step(model, opt, realigner, step)
    tracked = int(model.act1.num_batches_tracked)
    for step in range(2, 4):
        train_step(model, opt, realigner, step)
    assert int(model.act1.num_batches_tracked) == tracked + 2  # still collecting in phase II
    before = snapshot(model.act1)
    train_step(model, opt, realigner, 4)  # step 5 = warmup + 3: re-bound
    mean, std = model.act1.running_mean.double(), model.act1.running_std.double()
    np.testing.assert_allclose(model.act1.left_bound.detach().double(), mean - 3 * std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.act1.right_bound.detach().double(), mean + 3 * std, rtol=1e-6, atol=1e-6)
    assert not torch.equal(model.act1.points, before["points"])
    assert not torch.all(model.act1.left_slope == 0)  # refitted, not reset to ReLU


# ------------------------------------------------------------------------------------------
# fix-init, parameter groups, helpers
# ------------------------------------------------------------------------------------------


def test_fix_init_is_relu_on_fixed_range_without_collecting() -> None:
    model = make_net()
    pwlu.fix_init(model, 6.0)
    for module in (model.act1, model.act2):
        assert torch.all(module.left_bound == -6) and torch.all(module.right_bound == 6)
        assert torch.all(module.left_slope == 0) and torch.all(module.right_slope == 1)
        xs = torch.linspace(-8, 8, 161)
        inputs = xs.unsqueeze(-1).expand(-1, 7) if module.channel_wise else xs
        torch.testing.assert_close(module(inputs), F.relu(inputs), atol=1e-6, rtol=0)
    model.train()
    model(batch(0))
    assert int(model.act1.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="bound"):
        pwlu.fix_init(model, 0.0)


def test_parameter_groups_split_and_train() -> None:
    model = make_net()
    groups = pwlu.parameter_groups(model, weight_decay=1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    pwlu_ids = {id(p) for m in (model.act1, model.act2) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == pwlu_ids
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - pwlu_ids
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=1)
    for step in range(2):
        train_step(model, opt, realigner, step)
    assert len(pwlu.parameter_groups(nn.Linear(2, 2), 0.1)) == 1


def test_from_epochs_and_argument_errors() -> None:
    model = make_net()
    assert pwlu.BoundaryRealigner.from_epochs(model, 5, steps_per_epoch=7).warmup_steps == 35
    with pytest.raises(ValueError, match="warmup_steps"):
        pwlu.BoundaryRealigner(model, warmup_steps=-1)
    with pytest.raises(ValueError, match="momentum"):
        pwlu.BoundaryRealigner(model, warmup_steps=3, momentum=1.5)
    with pytest.raises(ValueError, match="no PWLU"):
        pwlu.BoundaryRealigner(nn.Linear(2, 2), warmup_steps=3)
    with pytest.raises(ValueError, match="min_width"):
        pwlu.realign_boundaries(model, min_width=1e-5)


def test_dropping_the_realigner_unfreezes_the_pwlus() -> None:
    import gc

    model = make_net()
    opt = make_optimizer("sgd", model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=100)
    del realigner
    gc.collect()
    before = snapshot(model.act1)
    train_step(model, opt, None, 0)
    assert not torch.equal(model.act1.points, before["points"])


def test_warmup_zero_means_learning_from_the_start() -> None:
    model = make_net()
    opt = make_optimizer("sgd", model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=0)
    before = snapshot(model.act1)
    train_step(model, opt, realigner, 0)
    assert realigner.phase == "learning"
    assert not torch.equal(model.act1.points, before["points"])


# ------------------------------------------------------------------------------------------
# IOU (SPEC section 6)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0.0, 1.0), (2.0, 3.0), 0.0),  # disjoint
        ((0.0, 1.0), (1.0, 2.0), 0.0),  # touching
        ((-1.0, 2.0), (-1.0, 2.0), 1.0),  # identical
        ((2.0, 4.0), (0.0, 10.0), 0.2),  # nested
        ((0.0, 10.0), (2.0, 4.0), 0.2),  # nested, the other way
        ((0.0, 2.0), (1.0, 3.0), 1.0 / 3.0),  # partial overlap
        ((1.0, 1.0), (1.0, 1.0), 1.0),  # identical points
        ((1.0, 1.0), (0.0, 2.0), 0.0),  # a point inside an interval
    ],
)
def test_interval_iou_hand_cases(a, b, expected) -> None:
    assert math.isclose(pwlu.interval_iou(*a, *b).item(), expected, abs_tol=1e-12)
    assert math.isclose(pwlu.interval_iou(*b, *a).item(), expected, abs_tol=1e-12)


def test_interval_iou_broadcasts_and_validates() -> None:
    out = pwlu.interval_iou(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([1.0, 4.0, 6.0]), 0.0, 2.0)
    np.testing.assert_allclose(out.numpy(), [0.5, 0.5, 0.0])
    assert torch.isnan(pwlu.interval_iou(float("nan"), 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="lo <= hi"):
        pwlu.interval_iou(1.0, 0.0, 0.0, 1.0)


def test_boundary_iou_exact_quantiles_when_all_inputs_fit() -> None:
    model = make_net()
    with torch.no_grad():
        model.act1.left_bound.copy_(torch.linspace(-2.0, 1.0, 7))
        model.act1.right_bound.copy_(torch.linspace(1.0, 4.0, 7))
    model.train()
    pwlu.BoundaryRealigner(model, warmup_steps=5)  # collecting: eval passes must not count
    inputs1 = record_inputs(model.act1)
    inputs2 = record_inputs(model.act2)
    batches = [(batch(s, rows=4), torch.zeros(4)) for s in range(3)]  # (input, target), as a DataLoader
    ious = pwlu.boundary_iou(model, batches, reservoir_size=10_000)
    assert model.training and model.act1.training  # mode restored
    assert int(model.act1.num_batches_tracked) == 0  # evaluated in eval mode
    assert set(ious) == {"act1", "act2"} and ious["act1"].shape == (7,) and ious["act2"].shape == (1,)
    x1 = np.concatenate([x.reshape(-1, 7) for x in inputs1])
    x2 = np.concatenate([x.reshape(-1) for x in inputs2])
    bl, br = model.act1.left_bound.detach().double().numpy(), model.act1.right_bound.detach().double().numpy()
    for c in range(7):
        lo, hi = np.quantile(x1[:, c], [0.001, 0.999])
        inter = max(0.0, min(br[c], hi) - max(bl[c], lo))
        union = max(br[c], hi) - min(bl[c], lo)
        assert math.isclose(ious["act1"][c].item(), inter / union, rel_tol=1e-9, abs_tol=1e-12), c
    lo, hi = np.quantile(x2, [0.001, 0.999])
    inter, union = max(0.0, min(3.0, hi) - max(-3.0, lo)), max(3.0, hi) - min(-3.0, lo)
    assert math.isclose(ious["act2"].item(), inter / union, rel_tol=1e-9)


def test_boundary_iou_keyword_batches() -> None:
    """Batches that are mappings (a tokenizer's dict, as convert_activations' calibration takes)
    are fed as keyword arguments; they reached the model as one dict argument before."""

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(3, 5), pwlu.PWLU(5, channel_dim=-1)

        def forward(self, features, scale=1.0):
            return self.act(self.fc(features) * scale)

    model = Keyed()
    xs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    by_key = pwlu.boundary_iou(model, [{"features": x, "scale": 2.0} for x in xs])
    by_pair = pwlu.boundary_iou(model, [({"features": x, "scale": 2.0}, torch.zeros(8)) for x in xs])
    plain = pwlu.boundary_iou(model, xs, forward=lambda m, b: m(b, scale=2.0))
    torch.testing.assert_close(by_key["act"], plain["act"])
    torch.testing.assert_close(by_pair["act"], plain["act"])


def test_boundary_iou_memory_bounded_reservoir_estimate() -> None:
    module = PWLU(2, channel_dim=1)  # range [-3, 3]
    g = torch.Generator().manual_seed(3)
    # channel 0 uniform on [0, 3] -> IOU 0.5; channel 1 uniform on [-6, 6] -> IOU 0.5
    batches = [torch.rand(64, 2, 50, generator=g) * torch.tensor([3.0, 12.0]).view(1, 2, 1) for _ in range(10)]
    batches = [b - torch.tensor([0.0, 6.0]).view(1, 2, 1) for b in batches]
    ious = pwlu.boundary_iou(module, batches, reservoir_size=4096)
    np.testing.assert_allclose(ious[""].numpy(), [0.5, 0.5], atol=0.01)
    narrow = pwlu.boundary_iou(module, batches, 0.25, 0.75, reservoir_size=4096, forward=lambda m, b: m(b))
    # quartiles: channel 0 [0.75, 2.25] -> 1.5 / 6; channel 1 [-3, 3] -> 1
    np.testing.assert_allclose(narrow[""].numpy(), [0.25, 1.0], atol=0.05)


def test_readme_training_with_realignment_snippet_runs(monkeypatch) -> None:
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("no README.md")
    section = readme.read_text().split("## Training with realignment", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "BoundaryRealigner" in snippet and "torchrun" in section
    monkeypatch.delenv("RANK", raising=False)
    scope: dict = {}
    exec(compile(snippet, str(readme), "exec"), scope)
    assert scope["realigner"].phase == "learning"
