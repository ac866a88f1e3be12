"""N-PWLU and 2-D PWLU merges under FSDP2 (``fully_shard``): 2 CPU processes, gloo backend.

The same training (phase I, the Eq. 6 reset of every range, phase II with function-preserving
re-bounds) on the same global batches, in this process and under FSDP2 with each residual block
sharded: the same parameters (relative difference <= 1e-4), every rank identical, and the same
``boundary_iou``. Channel-wise and layer-wise modules (whose scalars
:func:`pwlu.prepare_fully_shard` makes shardable). Before the fix, the realignment of a sharded
N-PWLU failed with "got mixed torch.Tensor and DTensor" and ``fully_shard`` refused a layer-wise
PWLU2D's scalar parameters.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pwlu
from pwlu.distributed import full

WORLD = 2
ROWS = 16
WARMUP = 3
STEPS = 8
TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


class Block(nn.Module):
    """``merge(act(lin(x)), x)``: a residual block with a learned activation and a learned merge."""

    def __init__(self, act: nn.Module, merge: nn.Module) -> None:
        super().__init__()
        self.lin, self.act, self.merge = nn.Linear(6, 6), act, merge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(self.act(self.lin(x)), x)


def make_model(channel_wise: bool) -> nn.Sequential:
    torch.manual_seed(0)
    c = 6 if channel_wise else None
    return nn.Sequential(
        nn.Linear(4, 6),
        Block(pwlu.NPWLU(c, num_intervals=4, channel_dim=-1), pwlu.PWLU2D(c, num_intervals=4, channel_dim=-1)),
        Block(pwlu.NPWLU(c, num_intervals=3, channel_dim=-1), pwlu.PWLU2D(c, num_intervals=3, channel_dim=-1)),
        nn.Linear(6, 1),
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(ROWS, 4, generator=g) * 1.5 + 0.5
    return x, x[:, :1].sin() + 0.1 * torch.randn(ROWS, 1, generator=g)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole (a collective for sharded parameters), scalars as ``()``."""
    out = {n: full(p).clone().reshape(p.shape if p.dim() != 1 or p.numel() != 1 else ()) for n, p in
           model.named_parameters()}  # fmt: skip
    out.update({n: b.clone() for n, b in model.named_buffers()})
    return out


def train(model: nn.Module, rank: int, world: int) -> dict[str, Any]:
    opt = torch.optim.SGD(pwlu.parameter_groups(model, weight_decay=1e-3), lr=0.05, momentum=0.9)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=WARMUP, rebound_every=2)
    record: dict[str, Any] = {"initial": state(model)}
    rows = ROWS // world
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        realigner.step()
        record[f"step{step + 1}"] = state(model)
    record["iou"] = pwlu.boundary_iou(model, [global_batch(100)[0], global_batch(101)[0]])
    return record


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        results = {}
        for channel_wise in (True, False):
            model = make_model(channel_wise)
            prepared = pwlu.prepare_fully_shard(model)
            for block in model[1:3]:
                fully_shard(block)
            fully_shard(model)
            record = train(model, rank, WORLD)
            record["prepared"] = prepared
            record["kinds"] = {n: type(p).__name__ for n, p in model.named_parameters()}
            results[channel_wise] = record
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed_ext")
    single = {cw: train(make_model(cw), 0, 1) for cw in (True, False)}
    ctx = mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("FSDP2 workers did not finish within 240 s")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"single": single, "ranks": ranks}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("channel_wise", [True, False], ids=["channel", "layer"])
def test_npwlu_and_pwlu2d_train_under_fsdp2_as_in_one_process(runs, channel_wise):
    single = runs["single"][channel_wise]
    first, second = (r[channel_wise] for r in runs["ranks"])
    learned = [n for n in first["kinds"] if ".act." in n or ".merge." in n]
    assert learned and all(first["kinds"][n] == "DTensor" for n in learned), first["kinds"]
    assert bool(first["prepared"]) == (not channel_wise)  # layer-wise scalars made (1,) for fully_shard
    for key in ["initial"] + [f"step{s}" for s in range(1, STEPS + 1)]:
        for name, ref in single[key].items():
            assert torch.equal(first[key][name], second[key][name]), f"{key}: {name} differs between the ranks"
            diff = rel_diff(first[key][name], ref)
            assert diff <= TOL, f"{key}: {name} differs from one process by {diff:.3g} (relative)"
    # the schedule happened: frozen in phase I, ranges and widths reset at WARMUP, everything trained after
    for name in ("1.merge.x_left_bound", "2.act.left_bound"):
        assert torch.equal(single[f"step{WARMUP - 1}"][name], single["initial"][name])
        assert not torch.equal(single[f"step{WARMUP}"][name], single["initial"][name]), f"{name}: no realignment"
    for name in ("1.act.width_logits", "2.merge.values"):
        assert not torch.equal(single[f"step{STEPS}"][name], single[f"step{WARMUP}"][name]), f"{name}: no phase II"
    for rank_record in (first, second):
        assert rank_record["iou"].keys() == single["iou"].keys()
        for name, iou in single["iou"].items():
            assert rel_diff(rank_record["iou"][name], iou) <= TOL, f"boundary_iou of {name}"


def test_prepared_state_dicts_load_either_way_round():
    """A layer-wise model prepared for FSDP2 holds (1,)-shaped scalars; its state dict loads into an
    unprepared model and back, and both compute the same function."""
    prepared, plain = make_model(False), make_model(False)
    with torch.no_grad():
        for p in prepared.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert pwlu.prepare_fully_shard(prepared) == ["1.act", "2.act", "1.merge", "2.merge"]
    assert prepared[1].merge.x_left_slope.shape == (1,) and plain[1].merge.x_left_slope.shape == ()
    plain.load_state_dict(prepared.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(plain(x), prepared(x))
    again = make_model(False)
    pwlu.prepare_fully_shard(again)
    again.load_state_dict(plain.state_dict())
    assert torch.equal(again(x), prepared(x))
    assert pwlu.prepare_fully_shard(prepared) == []  # idempotent
