"""The two-phase learning schedule (SPEC section 4) and optimizer parameter groups.

Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3.

* :class:`BoundaryRealigner` -- the two-phase schedule, one ``.step()`` per optimizer step.
* :func:`parameter_groups` -- optimizer parameter groups with separate PWLU weight decay.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .merge import merge_modules
from .ops.folding import MIN_WIDTH
from .realign import DEFAULT_MIN_WIDTH, _check_positive, _params, check_materialised, pwlu_modules, realign_boundaries

__all__ = ["BoundaryRealigner", "parameter_groups"]


class _ZeroSwappedInGrads:
    """Phase-I forward pre-hook on a PWLU: FSDP2 swaps unsharded parameters in for the forward
    pass (the sharded ones, hooked by :meth:`BoundaryRealigner._freeze`, are not in the autograd
    graph), so hook the parameters found at forward time whose gradients are not zeroed yet.

    A module-level class, so that a model pickled (or deep-copied) in phase I can be: the copy
    gets an inert hook (``handles`` is ``None``), which removes itself at its first eager call;
    the copy's realigner, if it has one, registers its own (``BoundaryRealigner.__setstate__``).
    """

    def __init__(self, handles: list[Any] | None = None, hooked: set[int] | None = None) -> None:
        self.handles = handles  # the realigner's hook handles: the new gradient hooks go there
        self.hooked = hooked if hooked is not None else set()

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.handles is None:  # unpickled: not the copy's freeze; drop out of the module
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is self]:
                del module._forward_pre_hooks[key]
            return
        if not torch.is_grad_enabled():
            return
        for p in _params(module):
            if id(p) not in self.hooked and p.requires_grad:
                self.hooked.add(id(p))
                self.handles.append(p.register_hook(torch.zeros_like))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ZeroSwappedInGrads, ())  # inert in the copy (the handles and ids are this process's)


class BoundaryRealigner:
    """Two-phase statistic-based realignment, a one-line addition to a training loop.

    Paper: https://arxiv.org/abs/2104.03693, Sec. 3.3 and SPEC section 4.

    * **Phase I** (steps ``0 .. warmup_steps - 1``): every PWLU in ``model`` collects running
      statistics of its input in training-mode forward passes (Eq. 5, all-reduced across
      ranks under ``torch.distributed``), and its parameters stay bit-identical: their
      gradients are zeroed as they are computed (so gradient clipping and DDP see zeros)
      and set to ``None`` just before every ``torch.optim`` optimizer step (a global
      optimizer step pre-hook), so the optimizer skips them entirely -- no weight decay, no
      momentum, no Adam state. The optimizer is not rebuilt and its state stays clean, so
      phase II starts as if the PWLU parameters were new to it.
    * **At step** ``warmup_steps``: :func:`realign_boundaries` (Eq. 6), then phase II.
    * **Function-matched PWLUs** (``convert_activations(init="match")``, ``module.matched`` set)
      are already in phase II: a warning at construction, then no freeze, no collecting (unless
      ``rebound_every``) and no Eq. 6 reset for them; other PWLUs follow the schedule.
    * **Phase II**: all PWLU parameters train. With ``rebound_every=k``, statistics keep
      being collected and every ``k`` steps the boundaries move to them with
      ``realign_boundaries(preserve_function=True)`` (beyond the paper). The optimizer's
      state (momentum, Adam moments) for the PWLU parameters is kept across a re-bound.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. With gradient
    accumulation that is once per ``accumulation`` micro-batches; every micro-batch's
    forward pass counts towards the statistics. For a warm-up in epochs use
    :meth:`from_epochs` or ``warmup_steps = warmup_epochs * steps_per_epoch`` with
    ``steps_per_epoch = ceil(len(loader) / accumulation)``. ``warmup_steps=0`` means no
    phase I and no reset.

    Checkpoints: save ``model.state_dict()`` (which holds the statistics buffers and the
    collecting flag), ``optimizer.state_dict()`` and ``realigner.state_dict()`` (step
    counter and settings); load all three into a fresh model, optimizer and realigner to
    continue exactly. A realigner can also be pickled (``torch.save``, ``copy.deepcopy``),
    together with its model; the copy makes its own hooks (not with a ``process_group``).

    Args:
        model (nn.Module): the model (may be wrapped in DDP) containing PWLU modules.
        warmup_steps (int): ``T_s``, the number of phase-I optimizer steps.
        momentum (float, optional): Eq. 5 momentum ``m`` (default 0.1, as batch norm);
            ``None`` for a cumulative average over all phase-I batches.
        num_sigmas (float): half-width of the realigned range in standard deviations.
        rebound_every (int, optional): in phase II, re-bound every this many steps.
        min_width (float): smallest realigned width (see :func:`realign_boundaries`).
        process_group: the ``torch.distributed`` group to all-reduce statistics over
            (default: the world).

    Example::

        realigner = pwlu.BoundaryRealigner(model, warmup_steps=5 * len(loader))
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            realigner.step()
    """

    def __init__(
        self,
        model: nn.Module,
        warmup_steps: int,
        momentum: float | None = 0.1,
        num_sigmas: float = 3.0,
        rebound_every: int | None = None,
        min_width: float = DEFAULT_MIN_WIDTH,
        process_group: Any = None,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"BoundaryRealigner: warmup_steps must be an int >= 0, but got {warmup_steps!r}")
        if momentum is not None:
            _check_positive("BoundaryRealigner: momentum", momentum)
            if momentum > 1:
                raise ValueError(f"BoundaryRealigner: momentum must be in (0, 1] or None, but got {momentum!r}")
        _check_positive("BoundaryRealigner: num_sigmas", num_sigmas)
        if rebound_every is not None and (
            isinstance(rebound_every, bool) or not isinstance(rebound_every, int) or rebound_every < 1
        ):
            raise ValueError(f"BoundaryRealigner: rebound_every must be None or an int >= 1, but got {rebound_every!r}")
        if min_width < MIN_WIDTH:
            raise ValueError(f"BoundaryRealigner: min_width must be >= pwlu.MIN_WIDTH={MIN_WIDTH}, but got {min_width}")
        self.model = model
        # PWLUs, and PWLU2D merges (SPEC section 10: frozen as addition in phase I, both ranges reset)
        self.modules = pwlu_modules(model) + merge_modules(model)
        if not self.modules:
            raise ValueError(f"BoundaryRealigner: no PWLU (or PWLU2D) module in {type(model).__name__}")
        check_materialised(self.modules, "BoundaryRealigner")
        matched = [name for name, m in self.modules if getattr(m, "matched", None) is not None]
        if matched and warmup_steps > 0:
            warnings.warn(
                f"BoundaryRealigner: {len(matched)} of {len(self.modules)} PWLUs are function-matched "
                "(convert_activations(init='match')) and already in phase II; they skip phase I (not frozen, not "
                "reset to ReLU at warmup_steps) and train from the first step. A matched model needs no realigner",
                stacklevel=2,
            )
        self.warmup_steps = warmup_steps
        self.momentum = momentum
        self.num_sigmas = float(num_sigmas)
        self.rebound_every = rebound_every
        self.min_width = float(min_width)
        self.process_group = process_group
        self.num_steps = 0
        self._hooks: list[Any] = []
        for _, module in self.modules:
            module.stats_momentum = momentum
            module.stats_process_group = process_group
        self._apply_phase()

    @classmethod
    def from_epochs(
        cls, model: nn.Module, warmup_epochs: float, steps_per_epoch: int, **kwargs: Any
    ) -> BoundaryRealigner:
        """A realigner with ``warmup_steps = round(warmup_epochs * steps_per_epoch)``.

        ``steps_per_epoch`` counts optimizer steps: ``ceil(len(loader) / accumulation)``.
        The paper uses ``warmup_epochs=5``.
        """
        _check_positive("BoundaryRealigner.from_epochs: warmup_epochs", warmup_epochs, allow_zero=True)
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(
                f"BoundaryRealigner.from_epochs: steps_per_epoch must be an int >= 1, but got {steps_per_epoch!r}"
            )
        return cls(model, int(round(warmup_epochs * steps_per_epoch)), **kwargs)

    # -- phase ---------------------------------------------------------------------------

    @property
    def in_warmup(self) -> bool:
        """Whether phase I (collecting, PWLU parameters frozen) is in force."""
        return self.num_steps < self.warmup_steps

    @property
    def phase(self) -> str:
        """``"collecting"`` (phase I) or ``"learning"`` (phase II)."""
        return "collecting" if self.in_warmup else "learning"

    def _apply_phase(self) -> None:
        """Put every PWLU and the hooks in the state that ``num_steps`` implies."""
        warm = self.in_warmup
        collect = warm or self.rebound_every is not None
        for _, module in self.modules:  # function-matched PWLUs have no phase I
            module.set_collecting(
                collect if getattr(module, "matched", None) is None else self.rebound_every is not None
            )
        if warm and not self._hooks:
            self._freeze()
        elif not warm and self._hooks:
            self.remove_hooks()

    def _freeze(self) -> None:
        params = [p for _, m in self.modules if getattr(m, "matched", None) is None for p in _params(m)]
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_hook(torch.zeros_like))
        zero_swapped_in = _ZeroSwappedInGrads(self._hooks, {id(p) for p in params})
        for _, m in self.modules:
            if getattr(m, "matched", None) is None:
                self._hooks.append(m.register_forward_pre_hook(zero_swapped_in))
        ref = weakref.ref(self)
        holder: list[Any] = []

        def drop_pwlu_grads(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # an optimizer skips a parameter whose .grad is None: no decay, no state
            realigner = ref()
            if realigner is None:
                holder[0].remove()
                return
            # the modules' parameters now (fully_shard, applied after this hook, replaces them)
            for p in [p for _, m in realigner.modules for p in _params(m)]:
                p.grad = None

        handle = register_optimizer_step_pre_hook(drop_pwlu_grads)
        holder.append(handle)
        self._hooks.append(handle)

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``pickle``, ``torch.save``, ``copy.deepcopy``) keeps the model and the
        schedule, not the hooks: :meth:`__setstate__` makes them again for the copy's model.
        A realigner pickled on its own carries its own copy of the model; pickle it in one
        object with the model (``torch.save({"model": model, "realigner": realigner})``) to keep
        them linked. For checkpoints, ``realigner.state_dict()`` is the way (see the class
        docstring)."""
        if self.process_group is not None:
            raise TypeError(
                "BoundaryRealigner: a realigner with a torch.distributed process_group cannot be pickled; "
                "save realigner.state_dict() (with model.state_dict()) and load it into a new realigner"
            )
        state = self.__dict__.copy()
        state["_hooks"] = []
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hooks = []
        self._apply_phase()

    def __del__(self) -> None:
        # a realigner dropped during phase I must not leave the PWLUs frozen
        try:
            self.remove_hooks()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def remove_hooks(self) -> None:
        """Unfreeze the PWLU parameters (remove the gradient and optimizer hooks)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- schedule ------------------------------------------------------------------------

    def step(self) -> None:
        """Advance one optimizer step; realign at ``warmup_steps``, re-bound in phase II."""
        self.num_steps += 1
        if self.num_steps == self.warmup_steps:
            realign_boundaries(self.model, self.num_sigmas, min_width=self.min_width, skip_matched=True)
        elif (
            self.rebound_every is not None
            and self.num_steps > self.warmup_steps
            and (self.num_steps - self.warmup_steps) % self.rebound_every == 0
        ):
            realign_boundaries(self.model, self.num_sigmas, preserve_function=True, min_width=self.min_width)
        self._apply_phase()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step counter and settings (the statistics are in ``model.state_dict()``)."""
        return {
            "num_steps": self.num_steps,
            "warmup_steps": self.warmup_steps,
            "momentum": self.momentum,
            "num_sigmas": self.num_sigmas,
            "rebound_every": self.rebound_every,
            "min_width": self.min_width,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter and settings, and the phase they imply."""
        missing = {"num_steps", "warmup_steps"} - set(state_dict)
        if missing:
            raise KeyError(f"BoundaryRealigner.load_state_dict: missing keys {sorted(missing)}")
        self.num_steps = int(state_dict["num_steps"])
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.momentum = state_dict.get("momentum", self.momentum)
        self.num_sigmas = float(state_dict.get("num_sigmas", self.num_sigmas))
        self.rebound_every = state_dict.get("rebound_every", self.rebound_every)
        self.min_width = float(state_dict.get("min_width", self.min_width))
        for _, module in self.modules:
            module.stats_momentum = self.momentum
        self._apply_phase()

    def __repr__(self) -> str:
        return (
            f"BoundaryRealigner(step={self.num_steps}, warmup_steps={self.warmup_steps}, phase={self.phase}, "
            f"momentum={self.momentum}, num_sigmas={self.num_sigmas}, rebound_every={self.rebound_every}, "
            f"modules={len(self.modules)})"
        )


def parameter_groups(model: nn.Module, weight_decay: float, pwlu_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: PWLU parameters apart from the rest (those of
    :class:`pwlu.PWLU2D` merges count as PWLU parameters).

    Recommended: ``pwlu_weight_decay=0`` (the default). Weight decay pulls every PWLU
    parameter towards 0: the breakpoint values and outer slopes towards the zero function,
    and both boundaries towards 0, which shrinks the learnable range that realignment has
    just fitted to the data. Like batch-norm scales and biases, PWLU parameters are few
    and shape the function rather than adding capacity, so decay regularises little and
    distorts much.

    Args:
        model (nn.Module): the model.
        weight_decay (float): decay for every non-PWLU parameter.
        pwlu_weight_decay (float): decay for the PWLU parameters.

    Returns:
        list[dict]: ``[{"params": others, "weight_decay": weight_decay},
        {"params": pwlu_params, "weight_decay": pwlu_weight_decay}]``, empty groups left
        out; pass to any ``torch.optim`` optimizer.
    """
    _check_positive("parameter_groups: weight_decay", weight_decay, allow_zero=True)
    _check_positive("parameter_groups: pwlu_weight_decay", pwlu_weight_decay, allow_zero=True)
    pwlu_ids = {id(p) for _, m in pwlu_modules(model) + merge_modules(model) for p in _params(m)}
    seen: set[int] = set()
    pwlu_params, others = [], []
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (pwlu_params if id(p) in pwlu_ids else others).append(p)
    groups = [
        {"params": others, "weight_decay": float(weight_decay)},
        {"params": pwlu_params, "weight_decay": float(pwlu_weight_decay)},
    ]
    return [g for g in groups if g["params"]]
