"""The settings of one training run (:class:`TrainConfig`) and the error for a bad value (:class:`ConfigError`)."""

from __future__ import annotations

from dataclasses import dataclass

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
    fix_init: float | None = None
    rebound_every: int | None = None
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
        for name in ("epochs", "batch_size", "intervals"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, epochs), but got {self.warmup_epochs}")
        if self.fix_init is not None and self.fix_init <= 0:
            raise ConfigError(f"--fix-init must be > 0, but got {self.fix_init}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, but got {self.lr}")

    @property
    def uses_realignment(self) -> bool:
        return self.activation == "pwlu" and self.fix_init is None and self.warmup_epochs > 0
