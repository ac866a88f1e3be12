"""PWLU under DDP and FSDP2 (``fully_shard``): 2 CPU processes, gloo backend.

The same training (phase I with statistics, the Eq. 6 reset, phase II with function-preserving
re-bounds, SGD with momentum over :func:`pwlu.parameter_groups`) on the same global batches
runs in this process, under DDP and under FSDP2 (each block sharded, then the root; the FSDP2
model built on the meta device). Each rank takes its half of every global batch, so all three
must end with the same PWLU parameters and statistics, every rank identical. A run
checkpointed mid-phase-I with ``torch.distributed.checkpoint`` and resumed in fresh processes
must continue exactly as the uninterrupted one. ``torch.compile`` of a training step (DDP and
FSDP2, realigner collecting) must give no graph break in the PWLU op.

The processes are spawned once per scenario (DDP, FSDP2, FSDP2 resumed); the tests below read
what they saved.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
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
ROWS = 16  # global batch; each rank takes ROWS // WORLD rows
WARMUP = 3
REBOUND = 2  # phase II: preserve_function=True re-bounds every REBOUND steps
STEPS = 8
CHECKPOINT_AT = 2  # mid phase I
PARAMS = ("points", "left_bound", "right_bound", "left_slope", "right_slope")
STATS = ("running_mean", "running_std", "num_batches_tracked")
PWLUS = ("0.1", "1.1")  # channel-wise (B, C) with channel_dim=-1, layer-wise
TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


# ----------------------------------------------------------------------------------------
# the training, shared by the single process and the ranks


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), pwlu.PWLU(6, num_intervals=8, channel_dim=-1, init="silu")),
        nn.Sequential(nn.Linear(6, 5), pwlu.PWLU(num_intervals=6)),
        nn.Linear(5, 1),
    )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(ROWS, 4, generator=g) * 1.5 + 0.5
    return x, x[:, :1].sin() + 0.1 * torch.randn(ROWS, 1, generator=g)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    rows = ROWS // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(pwlu.parameter_groups(model, weight_decay=1e-3), lr=0.05, momentum=0.9)


def group_names(model: nn.Module, opt: torch.optim.Optimizer) -> dict[float, set[str]]:
    """The parameter names in each optimizer group, by its weight decay (DDP's prefix removed)."""
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


def make_realigner(model: nn.Module) -> pwlu.BoundaryRealigner:
    return pwlu.BoundaryRealigner(model, warmup_steps=WARMUP, rebound_every=REBOUND)


def pwlu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every PWLU parameter and statistic, whole (a collective for FSDP2 parameters)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        f"{name}.{p}": full(getattr(inner.get_submodule(name), p)).clone() for name in PWLUS for p in PARAMS + STATS
    }


def train(model, opt, realigner, rank: int, world: int, start: int, stop: int, record: dict[str, Any]) -> None:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    pwlu_params = [getattr(inner.get_submodule(n), p) for n in PWLUS for p in PARAMS]
    for step in range(start, stop):
        x, y = local_batch(step, rank, world)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if realigner.in_warmup:  # phase I: the PWLU gradients are zeroed as they are computed
            record.setdefault("phase1_grads_zero", True)
            record["phase1_grads_zero"] &= all(p.grad is None or not full(p.grad).any() for p in pwlu_params)
        opt.step()
        realigner.step()
        record[f"step{realigner.num_steps}"] = pwlu_state(model)


def evaluate(model: nn.Module, record: dict[str, Any]) -> None:
    """boundary_iou on the same batches on every rank, then fix_init (which ends the run)."""
    batches = [global_batch(100 + i)[0] for i in range(2)]
    record["iou"] = pwlu.boundary_iou(model, batches)
    pwlu.fix_init(model, 6.0)
    record["fix_init"] = pwlu_state(model)


def single_process_run() -> dict[str, Any]:
    model = make_model()
    opt = make_optimizer(model)
    realigner = make_realigner(model)
    record: dict[str, Any] = {"initial": pwlu_state(model), "groups": group_names(model, opt)}
    train(model, opt, realigner, 0, 1, 0, STEPS, record)
    evaluate(model, record)
    return record


# ----------------------------------------------------------------------------------------
# the ranks


def _fsdp_model(meta: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if meta:
        with torch.device("meta"):
            model = make_model()
    else:
        model = make_model()
    pwlu.prepare_fully_shard(model)  # the layer-wise PWLU's scalars become (1,): fully_shard needs a dim
    for block in model[:2]:
        fully_shard(block)
    fully_shard(model)
    if meta:
        model.to_empty(device="cpu")
        for module in model.modules():
            if isinstance(module, pwlu.PWLU):
                module.reset_parameters()  # writes into the shards
        reference = make_model()  # the Linear layers' weights of the other runs, into the shards
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.rpartition(".")[0] not in PWLUS:
                    pwlu.distributed.assign_(p, reference.get_parameter(name))
    return model


def _state_dicts(model, opt, realigner) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd, "realigner": realigner.state_dict()}


def _worker(rank: int, init_file: str, out_dir: str, scenario: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        ckpt = str(Path(out_dir) / "dcp")
        results: dict[str, Any] = {}
        for kind in ("ddp", "fsdp") if scenario == "main" else ("fsdp_resume",):
            record: dict[str, Any] = {}
            if kind == "ddp":
                model = nn.parallel.DistributedDataParallel(make_model())
            else:
                model = _fsdp_model(meta=kind == "fsdp")
            record["initial"] = pwlu_state(model)
            opt = make_optimizer(model)
            realigner = make_realigner(model)
            record["sharded"] = {n: type(p).__name__ for n, p in model.named_parameters()}
            record["groups"] = group_names(model, opt)
            if kind == "fsdp_resume":
                state = _state_dicts(model, opt, realigner)
                dcp.load(state, checkpoint_id=ckpt)
                set_model_state_dict(model, state["model"])
                # phase I: the frozen PWLU parameters have no optimizer state (by design), hence strict=False
                set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(strict=False))
                realigner.load_state_dict(state["realigner"])
                start = realigner.num_steps
            else:
                train(model, opt, realigner, rank, WORLD, 0, CHECKPOINT_AT, record)
                if kind == "fsdp":
                    dcp.save(_state_dicts(model, opt, realigner), checkpoint_id=ckpt)
                start = CHECKPOINT_AT
            train(model, opt, realigner, rank, WORLD, start, STEPS, record)
            evaluate(model, record)
            results[kind] = record
        if scenario == "main":
            for kind in ("ddp", "fsdp"):
                results[f"compile_{kind}"] = _compiled_training(kind, rank)
        torch.save(results, Path(out_dir) / f"{scenario}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def graph_break_log() -> Iterator[list[str]]:
    """Every graph break Dynamo logs inside the block: the ``graph_breaks`` artifact's records,
    each with its reason and user stack.

    ``torch._logging.set_logs`` gives the ``torch._dynamo`` logger torch's own handler and
    stops propagation there (``propagate=False``, torch 2.14), so a handler on ``torch`` sees
    nothing; the artifact loggers (``torch._dynamo.symbolic_convert.__graph_breaks``, ...) are
    children of ``torch._dynamo`` and propagate to it, so the handler goes there. Dynamo logs
    the user stack only the first time a break happens at a place (then "user stack
    suppressed"), process-wide: its record of places seen is cleared here."""
    import torch._dynamo.utils

    breaks: list[str] = []

    class Collect(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            if rec.name.endswith("__graph_breaks"):
                breaks.append(rec.getMessage())

    handler = Collect()
    logger = logging.getLogger("torch._dynamo")
    torch._dynamo.utils.reset_graph_break_dup_checker()
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(handler)  # after set_logs, which clears the handlers it owns
    try:
        yield breaks
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


PWLU_SOURCE = f'File "{Path(pwlu.__file__).parent}{os.sep}'
FULL_STACK = "User code traceback:"  # a logged break with its user stack


def pwlu_breaks(breaks: list[str]) -> list[str]:
    """The logged graph breaks with a frame in pwlu's source in their user stack."""
    return [b for b in breaks if PWLU_SOURCE in b]


def recording_backend(graphs: list[list[str]]):
    """``aot_eager`` that records the ``call_function`` targets of every graph Dynamo captures."""
    import torch._dynamo

    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return aot_eager(gm, example_inputs)

    return backend


def _compiled_training(kind: str, rank: int) -> dict[str, Any]:
    """A compiled training step with a realigner (phase I, the reset, phase II): which ops the
    captured graphs hold, every graph break Dynamo logged (with its user stack) and every reason
    Dynamo counted."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs: list[list[str]] = []
    backend = recording_backend(graphs)
    with graph_break_log() as breaks:
        if kind == "ddp":
            model = nn.parallel.DistributedDataParallel(make_model())
            step_fn = torch.compile(model, backend=backend)
        else:
            from torch.distributed.fsdp import fully_shard

            model = make_model()
            pwlu.prepare_fully_shard(model)
            for block in model[:2]:
                block.compile(backend=backend)  # compile each block, then shard it
                fully_shard(block)
            fully_shard(model)
            step_fn = model
        opt = make_optimizer(model)
        realigner = pwlu.BoundaryRealigner(model, warmup_steps=2)
        for step in range(4):
            x, y = local_batch(step, rank, WORLD)
            loss = (step_fn(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            realigner.step()
        state = pwlu_state(model)
        reasons = list(torch._dynamo.utils.counters["graph_break"])
    return {"graphs": graphs, "breaks": list(breaks), "reasons": reasons, "state": state}


def _spawn(scenario: str, out_dir: Path) -> list[dict[str, Any]]:
    init_file = out_dir / f"init_{scenario}"
    ctx = mp.spawn(_worker, args=(str(init_file), str(out_dir), scenario), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{scenario}: workers did not finish within 240 s")
    return [torch.load(out_dir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distributed")
    result = {"single": single_process_run()}
    main = _spawn("main", out)
    resumed = _spawn("resume", out)
    for kind in ("ddp", "fsdp", "compile_ddp", "compile_fsdp"):
        result[kind] = [r[kind] for r in main]
    result["fsdp_resume"] = [r["fsdp_resume"] for r in resumed]
    return result


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (``max|a - b|`` where ``b`` is all zeros)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    scale = b.abs().max().item() if b.numel() else 0.0
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0) if b.numel() else 0.0


def _max_rel(run: dict[str, Any], reference: dict[str, Any], key: str) -> tuple[float, str]:
    worst = (0.0, "")
    for name, ref in reference[key].items():
        worst = max(worst, (rel_diff(run[key][name], ref), name))
    return worst


# ----------------------------------------------------------------------------------------
# the checks


@pytest.mark.parametrize("scenario", ["ddp", "fsdp", "fsdp_resume"])
def test_ranks_hold_identical_pwlu_state(runs, scenario):
    a, b = runs[scenario]
    for key in [k for k in a if k.startswith("step")] + ["fix_init"]:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{scenario}, {key}: {name} differs between the ranks"


def test_fsdp_shards_the_pwlu_parameters(runs):
    for scenario in ("fsdp", "fsdp_resume"):
        kinds = runs[scenario][0]["sharded"]
        for name in PWLUS:
            for p in PARAMS:
                assert kinds[f"{name}.{p}"] == "DTensor", f"{scenario}: {name}.{p} is {kinds[f'{name}.{p}']}"
    assert set(runs["ddp"][0]["sharded"].values()) == {"Parameter"}


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_same_pwlu_training_as_one_process(runs, scenario):
    """Statistics, the Eq. 6 reset (step WARMUP), the refits (every REBOUND steps after it), the
    phase-II updates: within TOL of one process at every step."""
    single, run = runs["single"], runs[scenario][0]
    assert single["phase1_grads_zero"] and run["phase1_grads_zero"], "phase-I PWLU gradients were not zero"
    for key in ["initial"] + [f"step{s}" for s in range(1, STEPS + 1)]:
        worst, name = _max_rel(run, single, key)
        assert worst <= TOL, f"{scenario}, {key}: {name} differs from one process by {worst:.3g} (relative)"
    # the schedule really happened: frozen in phase I, reset at WARMUP, trained afterwards
    for name in PWLUS:
        for p in PARAMS:
            k = f"{name}.{p}"
            assert torch.equal(single[f"step{WARMUP - 1}"][k], single["initial"][k]), f"{k} changed in phase I"
        k = f"{name}.left_bound"
        assert not torch.equal(single[f"step{WARMUP}"][k], single["initial"][k]), f"{k}: no realignment"
        k = f"{name}.points"
        assert not torch.equal(single[f"step{STEPS}"][k], single[f"step{WARMUP}"][k]), f"{k}: no phase II"


@pytest.mark.parametrize("scenario", ["single", "ddp", "fsdp", "fsdp_resume"])
def test_phase_one_freezes_and_groups_the_sharded_parameters(runs, scenario):
    """Phase I leaves every PWLU parameter bit-identical (the statistics still move), and
    parameter_groups puts exactly the PWLU parameters (DTensors under FSDP2) in the no-decay group."""
    for rank, run in enumerate(runs[scenario] if scenario != "single" else [runs["single"]]):
        assert run["phase1_grads_zero"], f"{scenario} rank {rank}: phase-I PWLU gradients were not zero"
        for key in [f"step{s}" for s in range(1, WARMUP) if f"step{s}" in run]:  # (resumed: from CHECKPOINT_AT)
            for name in PWLUS:
                for p in PARAMS:
                    k = f"{name}.{p}"
                    assert torch.equal(run[key][k], run["initial"][k]), f"{scenario} rank {rank}, {key}: {k} moved"
                assert not torch.equal(run[key][f"{name}.running_mean"], run["initial"][f"{name}.running_mean"])
        pwlu_names = {f"{name}.{p}" for name in PWLUS for p in PARAMS}
        linear = {f"{i}.0.{p}" for i in range(2) for p in ("weight", "bias")} | {"2.weight", "2.bias"}
        assert run["groups"] == {1e-3: linear, 0.0: pwlu_names}, f"{scenario} rank {rank}: {run['groups']}"


@pytest.mark.parametrize("scenario", ["ddp", "fsdp"])
def test_boundary_iou_and_fix_init_match_one_process(runs, scenario):
    single = runs["single"]
    for rank, run in enumerate(runs[scenario]):
        ious = {name.removeprefix("module."): iou for name, iou in run["iou"].items()}  # DDP's prefix
        assert ious.keys() == single["iou"].keys()
        for name, iou in single["iou"].items():
            assert rel_diff(ious[name], iou) <= TOL, f"{scenario} rank {rank}: boundary_iou of {name}"
        worst, name = _max_rel(run, single, "fix_init")
        assert worst == 0.0, f"{scenario} rank {rank}: fix_init {name} differs by {worst:.3g}"
    lb = single["fix_init"]["1.1.left_bound"]
    assert lb.item() == -6.0  # fix_init really happened (ReLU on [-6, 6])


def test_dcp_resume_mid_phase_one_continues_exactly(runs):
    """Checkpointed after step CHECKPOINT_AT (phase I) with torch.distributed.checkpoint (model,
    optimizer, realigner), resumed in fresh processes: bit-identical to the uninterrupted run."""
    for rank in range(WORLD):
        full_run, resumed = runs["fsdp"][rank], runs["fsdp_resume"][rank]
        for key in [f"step{s}" for s in range(CHECKPOINT_AT + 1, STEPS + 1)] + ["fix_init"]:
            for name, value in full_run[key].items():
                assert torch.equal(resumed[key][name], value), f"rank {rank}, {key}: {name} differs after resume"


def _assert_breaks_captured(breaks: list[str], reasons: list[str], where: str) -> None:
    """Every graph-break reason Dynamo counted is among the logged breaks, with its user stack
    (later repeats of the same break at the same place are logged without one): a break in
    pwlu's code cannot escape :func:`pwlu_breaks`."""
    assert reasons, f"{where}: no graph break counted"
    for reason in reasons:
        first = reason.splitlines()[0]
        assert any(first in b and FULL_STACK in b for b in breaks), f"{where}: graph break not logged: {first!r}"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_compiled_training_step_has_no_graph_break_in_pwlu(runs, kind):
    """Phase I (statistics all-gathered in the forward), the reset and phase II under
    torch.compile: every PWLU forward is captured whole, the op and its statistics update in the
    graph, and no graph break Dynamo logged has pwlu's code in its user stack. DDP
    (``set_runtime_stats_and_log``) and FSDP2 (its ``torch._dynamo.disable``d hooks) break the
    graph on their own, by design: those breaks must be seen, and not blamed on pwlu."""
    for rank, run in enumerate(runs[f"compile_{kind}"]):
        _assert_breaks_captured(run["breaks"], run["reasons"], f"{kind} rank {rank}")
        in_pwlu = pwlu_breaks(run["breaks"])
        assert not in_pwlu, f"{kind} rank {rank}: graph break in pwlu:\n{in_pwlu[0]}"
        ops = [t for graph in run["graphs"] for t in graph]
        assert any("pwlu.pwlu" in t for t in ops), f"{kind} rank {rank}: the PWLU op is not in any graph"
        assert any("all_gather" in t for t in ops), f"{kind} rank {rank}: the statistics sync is not in any graph"
    a, b = runs[f"compile_{kind}"]
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), f"compiled {kind}: {name} differs between ranks"


@pytest.mark.parametrize("broken", [False, True])
def test_graph_break_in_pwlu_is_detected(monkeypatch, broken):
    """The check above can fail: the same capture, in one process, on a PWLU whose op is made to
    break the graph (``broken``), finds the break and blames pwlu; unbroken, it finds none."""
    import torch._dynamo

    import pwlu.modules

    if broken:
        op = pwlu.modules.pwlu

        def breaking_op(*args: Any) -> torch.Tensor:
            torch._dynamo.graph_break()
            return op(*args)

        monkeypatch.setattr(pwlu.modules, "pwlu", breaking_op)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_model()
    opt = make_optimizer(model)
    realigner = pwlu.BoundaryRealigner(model, warmup_steps=1)
    graphs: list[list[str]] = []
    step_fn = torch.compile(model, backend=recording_backend(graphs))
    try:
        with graph_break_log() as breaks:
            for step in range(2):
                x, y = local_batch(step, 0, 1)
                loss = (step_fn(x) - y).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                realigner.step()
            reasons = list(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert any("pwlu.pwlu" in t for graph in graphs for t in graph)
    if broken:
        _assert_breaks_captured(breaks, reasons, "broken op")
        assert pwlu_breaks(breaks), "a graph break inside PWLU.forward was not blamed on pwlu"
    else:
        assert not breaks and not reasons, f"graph breaks in a plain compiled PWLU model: {reasons}"


def _pre_hooks(model: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) for m in model.modules() if isinstance(m, pwlu.PWLU)]


def test_phase_one_hooks_pickle_without_freezing_a_copy():
    """The phase-I forward pre-hook (for FSDP2's swapped-in parameters) pickles; a model copied
    on its own is not frozen by the original's realigner (its copied hook drops out at the first
    forward), and a model copied with its realigner is frozen by the copy's own hooks only."""
    model = make_model()
    realigner = make_realigner(model)
    x, y = global_batch(0)
    assert _pre_hooks(model) == [1, 1]

    alone = pickle.loads(pickle.dumps(model))
    (alone(x) - y).pow(2).mean().backward()
    assert _pre_hooks(alone) == [0, 0], "the copied hook stayed in the copy"
    assert all(alone.get_submodule(n).points.grad.abs().sum() > 0 for n in PWLUS), "the copy is frozen"

    (model(x) - y).pow(2).mean().backward()
    assert all(not model.get_submodule(n).points.grad.any() for n in PWLUS), "the original is not frozen"

    both = copy.deepcopy({"model": model, "realigner": realigner})
    twin, twin_realigner = both["model"], both["realigner"]
    assert twin_realigner.model is twin and twin_realigner.in_warmup
    (twin(x) - y).pow(2).mean().backward()
    assert _pre_hooks(twin) == [1, 1]
    assert all(not twin.get_submodule(n).points.grad.any() for n in PWLUS), "the copy's realigner does not freeze"
    live = [h for m in (twin.get_submodule(n) for n in PWLUS) for h in m._forward_pre_hooks.values()]
    assert all(h.handles is twin_realigner._hooks for h in live), "a hook of the copy feeds the original realigner"
    twin_realigner.remove_hooks()
    assert _pre_hooks(twin) == [0, 0] and _pre_hooks(model) == [1, 1]


ROOT = Path(__file__).resolve().parents[1]


def test_readme_fsdp2_example_runs_as_written(tmp_path):
    """The README's "Distributed training" commands, as written, from a copy of the repository
    root (``examples/`` linked, the checkpoint written there): the first run stops mid-phase-I
    with a DCP checkpoint, the second resumes from it and trains phase II; the README's Python
    block is an excerpt of the script."""
    section = (ROOT / "README.md").read_text().split("\n## Distributed training\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^torchrun .*$", section, re.M)
    assert len(commands) == 2, commands
    script = (ROOT / "examples" / "fsdp2_train.py").read_text()
    excerpt = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    missing = [line for line in excerpt.splitlines() if line.strip() and line not in script.splitlines()]
    assert not missing, f"README lines not in examples/fsdp2_train.py: {missing}"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *argv[1:]],  # torchrun, from this interpreter
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        outputs.append(proc.stdout)
    first, second = outputs
    assert "epoch 1: " in first and "(collecting)" in first and "epoch 2" not in first, first
    assert (tmp_path / "fsdp2_ckpt" / ".metadata").exists()
    assert "resumed at epoch 2 (step 32, collecting)" in second, second
    assert "epoch 0" not in second and "epoch 3: " in second and "(learning)" in second, second
    accuracy = float(re.search(r"accuracy ([0-9.]+)", second).group(1))
    assert accuracy > float(re.search(r"accuracy ([0-9.]+)", first).group(1)), (first, second)
