"""The settings of one training run (:class:`TrainConfig`) and the error for a bad value (:class:`ConfigError`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pwlu import ACTIVATIONS

from .models import ARCHITECTURES


class ConfigError(ValueError):
    """A bad command-line or config value (the CLI prints it as a one-line error)."""


@dataclass
class TrainConfig:
    """One training run; the fields are the ``pwlu train`` options (``--warmup-epochs`` is ``warmup_epochs``)."""

    model: str = "cnn"
    activation: str = "pwlu"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 5
    warmup_epochs: float = 1  # may be fractional: warmup_steps = round(warmup_epochs * steps_per_epoch)
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float | None = None  # None: the per-architecture default (SPEC section 7)
    intervals: int = 16
    mode: str = "channel"
    merges: str = "add"  # "pwlu2d": every residual addition becomes a PWLU2D (SPEC section 10)
    merge_intervals: int = 8
    fix_init: float | None = None
    rebound_every: int | None = None
    init_from: str | None = None  # a `pwlu train` checkpoint to start from (fine-tuning, SPEC section 11)
    init: str = "relu"  # with init_from and activation pwlu: "match" fits each PWLU to the replaced activation
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    out: str = "runs/default"
    progress: bool = True
    stop_after: int | None = None  # stop (as if killed) after this many epochs; for resume tests

    def validate(self) -> None:
        if self.model not in ARCHITECTURES:
            raise ConfigError(f"unknown model {self.model!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if self.mode not in ("channel", "layer"):
            raise ConfigError(f"--mode must be 'channel' or 'layer', but got {self.mode!r}")
        if self.merges not in ("add", "pwlu2d"):
            raise ConfigError(f"--merges must be 'add' or 'pwlu2d', but got {self.merges!r}")
        for name in ("epochs", "batch_size", "intervals", "train_subset", "test_subset", "rebound_every", "stop_after",
                     "merge_intervals"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: unset (the optional ones)
                raise ConfigError(f"{option_name(name)} must be >= 1, but got {value}")
        if self.init not in ("relu", "match"):
            raise ConfigError(f"--init must be 'relu' or 'match', but got {self.init!r}")
        if self.init == "match" and (self.init_from is None or self.activation != "pwlu"):
            raise ConfigError("--init match fits PWLUs to a trained model's activations: it needs --init-from "
                              f"CHECKPOINT and --activation pwlu (got --activation {self.activation})")  # fmt: skip
        if not self.warmup_epochs >= 0:  # also rejects NaN
            raise ConfigError(f"--warmup-epochs must be >= 0, but got {self.warmup_epochs}")
        if self.uses_realignment and not self.warmup_epochs < self.epochs:  # a warm-up that never ends
            raise ConfigError(f"--warmup-epochs must be in [0, epochs), but got {self.warmup_epochs}")
        if self.fix_init is not None and not (math.isfinite(self.fix_init) and self.fix_init > 0):
            raise ConfigError(f"--fix-init must be a finite number > 0, but got {self.fix_init}")
        if self.fix_init is not None and self.init == "match":
            raise ConfigError(f"--fix-init {self.fix_init} would overwrite the PWLUs that --init match fits; "
                              "pass one of them")  # fmt: skip
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a finite number > 0, but got {self.lr}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay must be a finite number >= 0, but got {self.weight_decay}")

    @property
    def uses_realignment(self) -> bool:
        learned = self.activation in ("pwlu", "npwlu") or self.merges == "pwlu2d"
        # function-matched PWLUs (--init match) start in phase II: no realignment
        return learned and self.fix_init is None and self.warmup_epochs > 0 and self.init != "match"


#: Fields that may differ between a run and its continuation (``--resume``) or its reuse by
#: ``compare``/``ablate``: where the run is written (a run directory may be moved), where the
#: dataset's files are read from, and how the run reports and stops. Every other field
#: changes what is trained and must match the recorded configuration exactly.
RUN_ONLY_FIELDS = frozenset({"out", "data_dir", "progress", "stop_after"})


def option_name(field: str) -> str:
    """The command-line option of a :class:`TrainConfig` field: ``"warmup_epochs"`` -> ``"--warmup-epochs"``."""
    return "--" + field.replace("_", "-")


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


def config_differences(recorded: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """How ``cfg`` differs from a run's ``recorded`` configuration (its ``config`` dict), ignoring
    :data:`RUN_ONLY_FIELDS`: one ``"--lr was 0.1, now 0.001"`` entry per differing option.

    A field missing from ``recorded`` (a run written before the field existed) counts as its
    default; a recorded field that this version does not know counts as a difference.
    """
    defaults = dataclasses.asdict(TrainConfig())
    new = dataclasses.asdict(cfg)
    diffs = []
    for name, value in new.items():
        if name in RUN_ONLY_FIELDS:
            continue
        old = recorded.get(name, defaults[name])
        if old != value:  # 1 == 1.0: a JSON round trip may turn a float into an int
            diffs.append(f"{option_name(name)} was {_show(old)}, now {_show(value)}")
    for name in recorded:
        if name not in new:
            diffs.append(f"{name} (recorded, unknown to this version) was {_show(recorded[name])}")
    return diffs
