"""Realignment under DistributedDataParallel: 2 CPU processes, gloo backend.

Each rank sees different data (different sizes and distributions). Both ranks must end
with identical statistics and boundaries, equal to the statistics of the union of the two
ranks' batches, computed here in numpy from the inputs the ranks recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pwlu

WORLD = 2
WARMUP = 3
PARAMS = ("points", "left_bound", "right_bound", "left_slope", "right_slope")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 5), pwlu.PWLU(5, num_intervals=8, channel_dim=-1), nn.Linear(5, 3), pwlu.PWLU(), nn.Linear(3, 1)
    )


def _rank_batch(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    rows = 6 if rank == 0 else 10  # unequal counts: the merge must weight by count
    return torch.randn(rows, 4, generator=g) * (1.0 + rank) + 3.0 * rank


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _make_model()
        seen: dict[int, list[np.ndarray]] = {1: [], 3: []}
        for i in seen:
            model[i].register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().double().numpy().copy()))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        realigner = pwlu.BoundaryRealigner(ddp, warmup_steps=WARMUP)
        initial = {f"{i}.{p}": getattr(model[i], p).detach().clone() for i in seen for p in PARAMS}
        result: dict[str, object] = {}
        for step in range(WARMUP + 2):
            loss = ddp(_rank_batch(rank, step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == WARMUP - 1:  # the last phase-I step, before the reset
                result["frozen"] = all(
                    torch.equal(getattr(model[i], p), initial[f"{i}.{p}"]) for i in seen for p in PARAMS
                )
                result["fc1_changed"] = not torch.equal(model[0].weight, _make_model()[0].weight)
            realigner.step()
            if step == WARMUP - 1:
                for i in seen:
                    for name in ("running_mean", "running_std", "left_bound", "right_bound", "points"):
                        result[f"{i}.{name}"] = getattr(model[i], name).detach().clone()
        for i in seen:
            result[f"{i}.after"] = {p: getattr(model[i], p).detach().clone() for p in PARAMS}
        result["inputs"] = {i: v[:WARMUP] for i, v in seen.items()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _union_running(per_rank: list[list[np.ndarray]], channels: int | None) -> tuple[np.ndarray, np.ndarray]:
    mean = std = None
    for step in range(WARMUP):
        rows = np.concatenate([inputs[step].reshape(-1, channels or 1) for inputs in per_rank])
        b_mean, b_std = rows.mean(0), rows.std(0, ddof=1)
        m = 1.0 if step == 0 else 0.1
        mean = b_mean if mean is None else (1 - m) * mean + m * b_mean
        std = b_std if std is None else (1 - m) * std + m * b_std
    return mean, std


def test_ddp_two_ranks_realign_to_union_statistics(tmp_path: Path) -> None:
    init_file = tmp_path / "init"
    ctx = mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert res["frozen"], f"rank {r}: PWLU parameters changed in phase I under DDP"
        assert res["fc1_changed"], f"rank {r}: the rest of the model did not train"
    for i, channels in ((1, 5), (3, None)):
        a, b = results
        for name in ("running_mean", "running_std", "left_bound", "right_bound", "points"):
            assert torch.equal(a[f"{i}.{name}"], b[f"{i}.{name}"]), f"module {i}: {name} differs between ranks"
        # the ranks saw different data...
        assert not np.allclose(a["inputs"][i][0].mean(), b["inputs"][i][0].mean())
        # ...and both hold the statistics of the union
        mean, std = _union_running([res["inputs"][i] for res in results], channels)
        mean, std = (mean, std) if channels else (mean[0], std[0])
        np.testing.assert_allclose(a[f"{i}.running_mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[f"{i}.running_std"].numpy(), std, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[f"{i}.left_bound"].numpy(), mean - 3 * std, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a[f"{i}.right_bound"].numpy(), mean + 3 * std, rtol=1e-5, atol=1e-5)
        # phase II under DDP: the PWLU parameters train, identically on both ranks
        for p in PARAMS:
            assert torch.equal(a[f"{i}.after"][p], b[f"{i}.after"][p]), f"module {i}: {p} diverged in phase II"
        assert not torch.equal(a[f"{i}.after"]["points"], a[f"{i}.points"]), f"module {i}: no phase-II update"
