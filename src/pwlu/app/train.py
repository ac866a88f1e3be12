"""Training with the paper's recipe at CPU scale: SGD + one-cycle cosine, realignment, checkpoints.

The run's settings are a :class:`~pwlu.app.config.TrainConfig`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pwlu import NPWLU, PWLU, BoundaryRealigner, convert_merges, fix_init, get_activation, parameter_groups
from pwlu.baselines import call_factory

from .config import ConfigError, TrainConfig, config_differences, option_name
from .data import TensorData, augment, channel_stats, check_data_dir, load_dataset, normalise
from .models import WEIGHT_DECAY, build_model

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
#: What a run directory holds of one run: the files :func:`train` writes, and those that
#: ``pwlu export`` (its default ``--out``) and ``pwlu plot --out <run>`` derive from them.
#: ``--overwrite`` removes these (only these) before the new run starts.
RUN_FILES = (CHECKPOINT, METRICS, "metrics.csv", "model.onnx", "model.pt", "shapes.png", "iou.png")


def make_activation_factory(cfg: TrainConfig):
    """``act(num_channels, channel_dim=1) -> nn.Module`` for the configured activation (``channel_dim=-1``
    for token layouts ``(B, T, C)``, as in the ViT's MLPs)."""
    factory = get_activation(cfg.activation)
    if cfg.activation in ("pwlu", "npwlu"):  # N-PWLU: the same options, learned widths
        cls = NPWLU if cfg.activation == "npwlu" else PWLU
        return lambda c, channel_dim=1: cls(
            None if cfg.mode == "layer" else c, num_intervals=cfg.intervals, channel_dim=channel_dim
        )
    return lambda c, channel_dim=1: call_factory(factory, c, channel_dim)


def build(cfg: TrainConfig, data: TensorData) -> nn.Module:
    model = build_model(
        cfg.model, make_activation_factory(cfg), data.in_channels, data.num_classes, image_size=data.train_x.shape[-1]
    )
    if cfg.merges == "pwlu2d":  # every residual addition becomes a PWLU2D (uses no random numbers)
        example = torch.zeros(2, *data.train_x.shape[1:], dtype=next(model.parameters()).dtype)
        model = convert_merges(model, cfg.merge_intervals, mode=cfg.mode, example_input=example)
    return model


def prepare_data(cfg: TrainConfig) -> TensorData:
    data = load_dataset(cfg.dataset, cfg.data_dir)
    g = torch.Generator().manual_seed(1234)  # the subset does not depend on the run's seed
    if cfg.train_subset:
        idx = torch.randperm(len(data.train_y), generator=g)[: cfg.train_subset]
        data.train_x, data.train_y = data.train_x[idx], data.train_y[idx]
    if cfg.test_subset:
        idx = torch.randperm(len(data.test_y), generator=g)[: cfg.test_subset]
        data.test_x, data.test_y = data.test_x[idx], data.test_y[idx]
    return data


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _maybe_init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int = 512) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(normalise(x[i : i + batch_size], mean, std))
        loss_sum += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train()
    return loss_sum / len(y), correct / len(y)


def _atomic_save(obj: Any, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(out: pathlib.Path, cfg: TrainConfig, history: list[dict], done: bool) -> None:
    summary = {"config": dataclasses.asdict(cfg), "history": history, "finished": done}
    if history:
        summary["final_test_acc"] = history[-1]["test_acc"]
        summary["best_test_acc"] = max(h["test_acc"] for h in history)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "metrics.json")
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)


def clear_old_run(out: pathlib.Path) -> list[str]:
    """Remove the :data:`RUN_FILES` an earlier run left in ``out`` (``--overwrite``); returns their names.

    Without this, the old checkpoint and metrics stayed until the new run's first epoch ended (a
    run killed sooner left the old run to ``--resume``), and a ``model.pt`` or plot made from the
    old run stayed beside the new one as if made from it.
    """
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`train`, with a clear error for a corrupt file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise ConfigError(f"checkpoint {p} is corrupt or not a pwlu checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise ConfigError(f"checkpoint {p} is not a pwlu checkpoint (missing config/model)")
    return ckpt


def config_from_checkpoint(ckpt: dict, path: str | os.PathLike) -> TrainConfig:
    """The :class:`TrainConfig` recorded in a loaded checkpoint (fields this version does not know are dropped)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
        cfg.validate()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"checkpoint {path} has an invalid config: {e}") from None
    return cfg


def state_dict_error(e: BaseException) -> str:
    """The informative line of a ``load_state_dict`` error (the first mismatch, not the header)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1] + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return lines[0] if lines else type(e).__name__


def check_writable_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise :class:`ConfigError` unless directory ``path`` exists and is writable, or can be created.

    Checks without writing anything: ``path`` (or, when it does not exist yet, its nearest
    existing ancestor) must be a directory the process may write to.
    """
    p = pathlib.Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise ConfigError(f"cannot write to {option} {path}: it exists and is not a directory")
        target = p
    else:
        target = p.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            raise ConfigError(f"cannot create {option} {path}: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {option} {path}: {target} is not writable")


def check_writable_file(path: str | os.PathLike, option: str = "--out") -> None:
    """Like :func:`check_writable_dir` for a file to be (over)written: ``path`` must not be a
    directory, and its directory must be writable or creatable."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise ConfigError(f"cannot write to {option} {path}: it is a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"cannot write to {option} {path}: it is not writable")
    check_writable_dir(p.parent, option=f"{option} {path}: its directory")


def recorded_run(out: str | os.PathLike) -> dict | None:
    """What run directory ``out`` holds, without changing it: ``None`` when it holds no run, else
    ``{"config", "finished", "epochs_done", "has_checkpoint", "metrics"}`` read from ``metrics.json``
    (or, without one, from ``checkpoint.pt``; ``metrics`` is then ``None``)."""
    out = pathlib.Path(out)
    ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
    has_ckpt = ckpt_path.exists()
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text())
            config = metrics["config"]
            if not isinstance(config, dict):
                raise TypeError("config is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{metrics_path} is corrupt or not a pwlu metrics file ({type(e).__name__})") from None
        return {"config": config, "finished": bool(metrics.get("finished")), "epochs_done": len(metrics.get("history", [])),
                "has_checkpoint": has_ckpt, "metrics": metrics}  # fmt: skip
    if has_ckpt:
        ckpt = load_checkpoint(ckpt_path)
        done = int(ckpt.get("epoch", -1)) + 1
        return {"config": ckpt["config"], "finished": done >= int(ckpt["config"].get("epochs", 0)), "epochs_done": done,
                "has_checkpoint": True, "metrics": None}  # fmt: skip
    return None


def describe_run(run: dict) -> str:
    """``"a finished run (5 epochs)"`` / ``"an unfinished run (2 of 5 epochs done)"``."""
    total = run["config"].get("epochs", "?")
    if run["finished"]:
        return f"a finished run ({total} epoch{'' if total == 1 else 's'})"
    return f"an unfinished run ({run['epochs_done']} of {total} epochs done)"


def check_run_dir(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict | None:
    """The checks :func:`train` makes before it writes anything; returns the checkpoint to resume from.

    * a directory holding a run (``checkpoint.pt`` or ``metrics.json``) is continued only with
      ``resume`` and replaced only with ``overwrite``;
    * ``resume`` requires the checkpoint's configuration to equal ``cfg`` except for
      :data:`~pwlu.app.config.RUN_ONLY_FIELDS`;
    * ``cfg.out`` must be writable (or creatable), ``cfg.data_dir`` an existing directory.

    Raises:
        ConfigError: naming what is wrong and the option that overrides it, if any.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                          "--overwrite replaces it")  # fmt: skip
    out = pathlib.Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    check_writable_dir(out)
    ckpt = None
    if resume:
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path)
            diffs = config_differences(ckpt["config"], cfg)
            if diffs:
                raise ConfigError(
                    f"cannot resume {out}: the options differ from its checkpoint's ({'; '.join(diffs)}); "
                    "resume with the run's values, or start a new run with another --out (or --overwrite without --resume)"
                )
        elif (out / METRICS).exists():
            raise ConfigError(f"cannot resume {out}: it has {METRICS} but no {CHECKPOINT}; "
                              "pass --overwrite (without --resume) to start it again, or choose another --out")  # fmt: skip
    elif not overwrite and (ckpt_path.exists() or (out / METRICS).exists()):
        try:
            what = describe_run(recorded_run(out))
        except ConfigError:  # unreadable: still a run not to lose
            what = "a run"
        raise ConfigError(f"{out} already holds {what}; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")  # fmt: skip
    check_data_dir(cfg.data_dir)
    return ckpt


def _load_weights(model: nn.Module, ckpt: dict, path: str | os.PathLike) -> tuple:
    """Load a :func:`train` checkpoint's weights into ``model`` (built from its config); returns its
    normalisation ``(mean, std)``.

    Raises:
        ConfigError: the weights or the normalisation do not match (a corrupt checkpoint).
    """
    try:
        model.load_state_dict(ckpt["model"])
        mean, std = ckpt["normalisation"]
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} does not match its config: {state_dict_error(e)}") from None
    return mean, std


def model_from_checkpoint(
    cfg: TrainConfig, data: TensorData, match: bool = True, resume: dict | None = None, record: dict | None = None
) -> tuple[nn.Module, tuple]:
    """The model of ``cfg.init_from`` (a :func:`train` checkpoint) with its weights, for fine-tuning,
    and the normalisation it was trained with.

    With ``cfg.activation`` equal to the checkpoint's, the model is returned as trained. With
    ``--activation pwlu`` (the checkpoint's being another), its activations are converted by
    :func:`pwlu.convert_activations` (``cfg.intervals``, ``cfg.mode``): ``cfg.init == "match"``
    fits each PWLU to the activation it replaces, calibrated on 8 batches of 128 training images
    (SPEC section 11; no phase I follows), ``"relu"`` starts them as ReLU (phase I and realignment
    follow). ``match=False`` only converts (the structure of a run being resumed, whose checkpoint
    then replaces the weights).

    ``resume``: the checkpoint of the run being resumed. Where it records the source's configuration
    (``source_config``), the structure is built from that record, whether or not ``cfg.init_from``
    still exists or holds the same run (the weights come from ``resume`` anyway). ``record``, if given, receives the source's
    configuration as ``record["source_config"]``, for the run's checkpoints.

    Raises:
        ConfigError: the checkpoint was trained on another --model or --dataset, or a conversion to
            anything but pwlu.
    """
    from pwlu import convert_activations

    recorded = (resume or {}).get("source_config")
    if recorded is not None:  # a resume: the source as it was (the file may be gone or replaced since)
        ckpt, src = None, config_from_checkpoint({"config": recorded}, f"{cfg.out}/{CHECKPOINT} (its source)")
    else:
        ckpt = load_checkpoint(cfg.init_from)
        src = config_from_checkpoint(ckpt, cfg.init_from)
    if record is not None:
        record["source_config"] = dataclasses.asdict(src)
    for field in ("model", "dataset"):
        if getattr(src, field) != getattr(cfg, field):
            raise ConfigError(f"--init-from {cfg.init_from} was trained with --{field} {getattr(src, field)}, "
                              f"not {getattr(cfg, field)}; pass --{field} {getattr(src, field)}")  # fmt: skip
    if cfg.activation != src.activation and cfg.activation != "pwlu":
        raise ConfigError(f"--init-from {cfg.init_from} has --activation {src.activation}: fine-tune it with "
                          f"--activation {src.activation}, or convert it with --activation pwlu")  # fmt: skip
    kept = [("intervals", "mode")] if cfg.activation == src.activation and src.activation in ("pwlu", "npwlu") else []
    if src.merges == "pwlu2d":
        kept.append(("merges", "merge_intervals"))
    for field in (f for group in kept for f in group):  # what the trained model already has
        if getattr(src, field) != getattr(cfg, field):
            raise ConfigError(f"--init-from {cfg.init_from} was trained with --{option_name(field)[2:]} "
                              f"{getattr(src, field)}, which it keeps: pass {option_name(field)} "
                              f"{getattr(src, field)}, not {getattr(cfg, field)}")  # fmt: skip
    model = build(src, data)
    if ckpt is not None:
        mean, std = _load_weights(model, ckpt, cfg.init_from)
    else:  # resumed without the source: its normalisation, as the run recorded it; weights follow
        mean, std = resume["normalisation"]
    example = normalise(data.train_x[:2], mean, std)
    if cfg.activation != src.activation:
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(data.train_y), generator=g)[: 8 * 128]
        batches = [normalise(data.train_x[idx[i : i + 128]], mean, std) for i in range(0, len(idx), 128)]
        matching = match and cfg.init == "match"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = convert_activations(model, "pwlu", cfg.intervals, cfg.mode, example_input=batches[0],
                                        init="match" if matching else "relu", calibration=batches if matching else None)  # fmt: skip
        if not any(type(m) is PWLU for m in model.modules()):  # (an NPWLU is a PWLU subclass)
            raise ConfigError(f"--init-from {cfg.init_from}: its --activation {src.activation} modules cannot be "
                              "converted to PWLUs, so --activation pwlu would fine-tune the model unchanged")  # fmt: skip
        for w in caught:  # the others, as they were
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if cfg.merges == "pwlu2d" and src.merges == "add":  # additions of the trained model, as PWLU2D at init
        model = convert_merges(model, cfg.merge_intervals, mode=cfg.mode, example_input=example)
    return model, (mean, std)


def load_trained(
    path: str | os.PathLike, data_dir: str | None = None, data: TensorData | None = None, test_batches: int = 4
) -> tuple[nn.Module, TrainConfig, list[torch.Tensor]]:
    """The model of a :func:`train` checkpoint with its weights, its config, and up to
    ``test_batches`` normalised test batches of 256 images (``data`` is loaded from the
    checkpoint's dataset, in ``data_dir`` if given, unless passed in)."""
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, path)
    if data_dir:
        cfg.data_dir = data_dir
    data = data if data is not None else prepare_data(cfg)
    model = build(cfg, data)
    mean, std = _load_weights(model, ckpt, path)
    n = min(len(data.test_y), 256 * test_batches)
    return model, cfg, [normalise(data.test_x[i : i + 256], mean, std) for i in range(0, n, 256)]


def train(cfg: TrainConfig, data: TensorData | None = None, resume: bool = False, overwrite: bool = False) -> dict:
    """Train one model; returns the metrics summary (also written to ``cfg.out/metrics.json``).

    ``resume`` continues the run in ``cfg.out`` (whose checkpoint must have the same
    configuration, see :func:`check_run_dir`); ``overwrite`` replaces it. Without either, a
    ``cfg.out`` that already holds a run is refused. Every check is made before anything is
    written (:class:`~pwlu.app.config.ConfigError` / :class:`~pwlu.app.data.DataError`).
    """
    cfg.validate()
    ckpt = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    if overwrite and cfg.init_from is not None:
        source = pathlib.Path(cfg.init_from).resolve()
        if any(source == (pathlib.Path(cfg.out) / name).resolve() for name in RUN_FILES):
            raise ConfigError(f"--init-from {cfg.init_from} is a file of the run in --out {cfg.out}, which "
                              "--overwrite would delete; copy it elsewhere first, or choose another --out")  # fmt: skip
    _maybe_init_distributed()
    rank, world = _dist_info()
    data = data if data is not None else prepare_data(cfg)  # fails before anything is written
    out = pathlib.Path(cfg.out)
    mean, std = channel_stats(data.train_x)

    torch.manual_seed(cfg.seed)
    source: dict = {}  # fine-tuning: the source's configuration, kept in the run's checkpoints
    if cfg.init_from is not None:  # fine-tuning: the trained model, converted (matched) unless resuming
        model, (mean, std) = model_from_checkpoint(cfg, data, match=ckpt is None, resume=ckpt, record=source)
    else:
        model = build(cfg, data)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if (cfg.activation in ("pwlu", "npwlu") or cfg.merges == "pwlu2d") and cfg.fix_init is not None:
        fix_init(model, cfg.fix_init)
    steps_per_epoch = math.ceil(len(data.train_y) / (cfg.batch_size * world))
    total_steps = cfg.epochs * steps_per_epoch
    wd = WEIGHT_DECAY[cfg.model] if cfg.weight_decay is None else cfg.weight_decay
    optimizer = torch.optim.SGD(parameter_groups(model, wd), lr=cfg.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, anneal_strategy="cos", pct_start=0.15
    )
    realigner = None
    if cfg.uses_realignment:
        warmup_steps = max(1, round(cfg.warmup_epochs * steps_per_epoch))
        realigner = BoundaryRealigner(model, warmup_steps, rebound_every=cfg.rebound_every)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model)

    if rank == 0 and overwrite:  # every check has passed and everything is built: replace the old run
        removed = clear_old_run(out)
        if removed:
            print(f"pwlu: --overwrite: removed the previous run's {', '.join(removed)} from {out}", file=sys.stderr)
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if realigner is not None:
                realigner.load_state_dict(ckpt["realigner"])
            history = list(ckpt["history"])
            start_epoch = int(ckpt["epoch"]) + 1
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"cannot resume from {ckpt_path}: it does not match its config: {state_dict_error(e)}") from None

    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        tqdm = None

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        # data order and augmentation depend only on (seed, epoch): a resumed run sees the same batches
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        perm = torch.randperm(len(data.train_y), generator=g)[rank::world]
        batches = range(0, len(perm), cfg.batch_size)
        if tqdm is not None and cfg.progress and rank == 0:
            batches = tqdm(batches, desc=f"{cfg.model}/{cfg.activation} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        loss_sum, correct, seen = 0.0, 0, 0
        model.train()
        for i in batches:
            idx = perm[i : i + cfg.batch_size]
            x = normalise(augment(data.train_x[idx], g), mean, std)
            y = data.train_y[idx]
            logits = ddp_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if realigner is not None:
                realigner.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y, mean, std)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": round(loss_sum / seen, 6),
                "train_acc": round(correct / seen, 6),
                "test_loss": round(test_loss, 6),
                "test_acc": round(test_acc, 6),
                "lr": scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        if rank == 0:
            state = {
                "config": dataclasses.asdict(cfg),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "realigner": realigner.state_dict() if realigner is not None else None,
                "history": history,
                "normalisation": (mean, std),
                **source,
            }
            _atomic_save(state, ckpt_path)
            _write_metrics(out, cfg, history, done=epoch + 1 == cfg.epochs)
        if cfg.stop_after is not None and epoch + 1 >= cfg.stop_after and epoch + 1 < cfg.epochs:
            break
    return json.loads((out / "metrics.json").read_text()) if rank == 0 else {"history": history}
