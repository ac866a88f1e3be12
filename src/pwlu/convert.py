"""Model surgery: put PWLU (or a baseline) in place of every activation of a model.

:func:`convert_activations` works on any ``nn.Module``. It runs one forward pass with an example
input to see every activation *call site* and the shape of its input, so channel counts are
measured, never guessed. :class:`LazyPWLU` (alias ``TimmPWLU``) is the other route: a PWLU that
takes its channel count from its first input, usable as timm's ``act_layer=``.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode

from .baselines import APL, Swish, call_factory, get_activation
from .baselines import PReLU as ChannelPReLU
from .matching import FITS, HF_ACTIVATION_NAMES, Calibration, MatchTarget, activation_target, fit_pwlu
from .modules import PWLU, LazyPWLU, TimmPWLU

__all__ = [
    "ACTIVATION_TYPES",
    "SE_CLASS_NAMES",
    "ConversionError",
    "LazyPWLU",
    "TimmPWLU",
    "convert_activations",
    "is_activation",
]

# Activations that are replaced. Gates (Sigmoid, Hardsigmoid, Tanh, Softmax) never are.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
    Swish,  # this package's baselines (pwlu train --activation swish|prelu|apl)
    ChannelPReLU,
    APL,
)
# timm's own activation classes (timm.layers.activations*), matched by name so that timm is
# not imported here.
_TIMM_ACTIVATION_NAMES = frozenset(
    {"Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "HardMish", "HardMishMe",
     "GELU", "GELUTanh", "QuickGELU", "PReLU"}
)  # fmt: skip
# Squeeze-and-excitation style blocks: activations inside them stay as they are (SPEC section 7).
SE_CLASS_NAMES = frozenset(
    {"SqueezeExcitation", "SqueezeExcite", "SEModule", "EffectiveSEModule", "EffectiveSqueezeExcite",
     "SqueezeExcite2d", "SELayer", "SEBlock", "GatherExcite", "EcaModule", "CecaModule"}
)  # fmt: skip
_CHANNEL_FIRST_PRODUCERS = (_ConvNd, _BatchNorm, nn.GroupNorm, _InstanceNorm, nn.LocalResponseNorm)
_CHANNEL_LAST_PRODUCERS = (nn.Linear, nn.LayerNorm, nn.Bilinear)


class ConversionError(RuntimeError):
    """A model whose activations :func:`convert_activations` cannot convert safely."""


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation that :func:`convert_activations` replaces: one of
    :data:`ACTIVATION_TYPES`, timm's own classes, or transformers' (``transformers.activations``:
    ``GELUActivation``, ``NewGELUActivation``, ``FastGELUActivation``, ``QuickGELUActivation``,
    ``SiLUActivation``, ...; see :data:`pwlu.matching.HF_ACTIVATION_NAMES`)."""
    if isinstance(module, ACTIVATION_TYPES):
        return True
    cls = type(module)
    if cls.__module__.startswith("transformers.") and cls.__name__ in HF_ACTIVATION_NAMES:
        return True
    return cls.__module__.startswith("timm.") and cls.__name__ in _TIMM_ACTIVATION_NAMES


# ----------------------------------------------------------------------------- profiling


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer on the last axis, despite its name."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _layer_channels(block: nn.Module) -> set[int]:
    """The channel counts that ``block``'s layers declare: convolutions' in/out channels, norms'
    features, linear layers' in/out features."""
    counts: set[int] = set()
    for m in block.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            counts.update((m.in_channels, m.out_channels))
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            counts.add(m.num_features if hasattr(m, "num_features") else m.num_channels)
        elif isinstance(m, nn.LayerNorm) and m.normalized_shape:
            counts.add(m.normalized_shape[-1])
        elif isinstance(m, nn.Linear):
            counts.update((m.in_features, m.out_features))
        elif is_hf_conv1d(m) and getattr(m, "weight", None) is not None:
            counts.update(m.weight.shape)  # a linear layer, weight (in, out)
    return counts


@dataclass(frozen=True)
class _Call:
    shape: tuple[int, ...] | None  # None: the first argument was not a tensor
    producer: type | None  # class of the module whose output is the input, if known

    def channel_dim(self, forced: int | None, layer_channels: set[int] = frozenset()) -> int:
        """Channel axis: forced, else from the producing layer, else axis 1 or -1, the one whose
        size is a channel count of the owner's layers (``layer_channels``; a ``(B, C, L)`` input
        that a padding-trim module passed on from a ``Conv1d``), else 1 for 2-D/4-D/5-D, -1 for 3-D."""
        if forced is not None:
            return forced
        assert self.shape is not None
        if self.producer is not None and issubclass(self.producer, _CHANNEL_LAST_PRODUCERS):
            return -1
        if self.producer is not None and issubclass(self.producer, _CHANNEL_FIRST_PRODUCERS):
            return 1
        if len(self.shape) >= 3:
            first, last = self.shape[1] in layer_channels, self.shape[-1] in layer_channels
            if first != last:
                return 1 if first else -1
        return -1 if len(self.shape) == 3 else 1


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, Mapping):  # keyword arguments (also a transformers BatchEncoding)
        return model(**example_input)
    return model(example_input)


def _rng_devices(model: nn.Module, example_input: Any = None) -> list[int]:
    """The CUDA devices whose RNG a forward pass of ``model`` on ``example_input`` may draw from
    (dropout there): those of its parameters and buffers and of the input's tensors, for
    ``torch.random.fork_rng`` (whose ``devices=[]`` forks the CPU's RNG only)."""
    tensors = [*model.parameters(), *model.buffers()]
    for item in example_input.values() if isinstance(example_input, Mapping) else (
        example_input if isinstance(example_input, (tuple, list)) else [example_input]
    ):  # fmt: skip
        if isinstance(item, Tensor):
            tensors.append(item)
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _functional_activations() -> dict[Any, str]:
    """The functional forms of :data:`ACTIVATION_TYPES` (``F.relu``, ``torch.relu``,
    ``x.relu()``...), by the name to report."""
    names = {
        "relu": [F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_],
        "relu6": [F.relu6],
        "leaky_relu": [F.leaky_relu, F.leaky_relu_],
        "prelu": [F.prelu, torch.prelu],
        "rrelu": [F.rrelu, F.rrelu_],
        "silu": [F.silu],
        "hardswish": [F.hardswish],
        "gelu": [F.gelu],
        "elu": [F.elu, F.elu_],
        "celu": [F.celu, F.celu_, torch.celu],
        "selu": [F.selu, F.selu_, torch.selu],
        "mish": [F.mish],
        "softplus": [F.softplus],
    }
    return {fn: name for name, fns in names.items() for fn in fns}


class _FunctionalCalls(TorchFunctionMode):
    """Counts functional activation calls made outside any activation module (and outside
    squeeze-and-excitation blocks, whose activations stay by design), by the function's name and
    the innermost module running it (``stack``: the modules being run, kept by :func:`_profile`'s
    hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.known = _functional_activations()
        self.inside = 0  # depth of activation modules being run
        self.stack: list[nn.Module] = []
        self.counts: dict[tuple[str, nn.Module | None], int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.inside:
            try:
                name = self.known.get(func)
            except TypeError:  # an unhashable callable
                name = None
            if name is not None and not any(type(m).__name__ in SE_CLASS_NAMES for m in self.stack):
                key = (name, self.stack[-1] if self.stack else None)
                self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def _functional_report(model: nn.Module, counts: dict[tuple[str, nn.Module | None], int]) -> tuple[str, str]:
    """The functional calls of :class:`_FunctionalCalls`, in two phrases: those in forward code
    (``"relu x2, gelu x1 in 'head' (MLPHead)"``; none named for the model's own forward), and those
    that make up a module without submodules, an activation of a type that is not replaced
    (``"'1' (ReLUSquaredActivation: relu x1)"``). Either is ``""`` when there are none."""
    names = {id(m): n for n, m in model.named_modules()}
    code: list[str] = []
    leaves: dict[int, list[str]] = {}
    for (fn, where), n in counts.items():
        if where is not None and where is not model and next(where.children(), None) is None:
            leaves.setdefault(id(where), [f"{type(where).__name__}: "]).append(f"{fn} x{n}")
        elif where is None or where is model:
            code.append(f"{fn} x{n}")
        else:
            code.append(f"{fn} x{n} in {names.get(id(where), '?')!r} ({type(where).__name__})")
    leaf = ", ".join(f"{names.get(i, '?')!r} ({head}{', '.join(calls)})" for i, (head, *calls) in leaves.items())
    return ", ".join(code), leaf


def _profile(
    model: nn.Module, example_input: Any, source: str = "example_input"
) -> tuple[dict[int, list[_Call]], dict[int, int], dict[tuple[str, nn.Module | None], int]]:
    """One forward pass, side-effect free: the calls of every activation (by ``id``), the
    number of calls of every module, and the functional activation calls (``F.relu``...) made
    outside activation modules, by name. Buffers (batch-norm statistics) and the RNG are restored."""
    modules = {id(m): m for m in model.modules()}
    calls: dict[int, list[_Call]] = {i: [] for i, m in modules.items() if is_activation(m)}
    counts: dict[int, int] = dict.fromkeys(modules, 0)
    producers: dict[int, tuple[weakref.ref, type]] = {}
    functional = _FunctionalCalls()

    def pre_hook(module: nn.Module, args: tuple) -> None:
        counts[id(module)] += 1
        functional.stack.append(module)
        if id(module) in calls:
            functional.inside += 1
            x = args[0] if args else None
            if isinstance(x, Tensor):
                entry = producers.get(id(x))
                producer = entry[1] if entry is not None and entry[0]() is x else None
                calls[id(module)].append(_Call(tuple(x.shape), producer))
            else:
                calls[id(module)].append(_Call(None, None))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        if functional.stack and functional.stack[-1] is module:
            functional.stack.pop()
        if id(module) in calls:
            functional.inside -= 1
        if isinstance(output, Tensor) and not is_activation(module):
            entry = producers.get(id(output))
            if entry is None or entry[0]() is not output:  # innermost module wins
                producers[id(output)] = (weakref.ref(output), type(module))

    handles = []
    for m in modules.values():
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(post_hook))
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(model, example_input)), functional:
            _run(model, example_input)
    except ConversionError:
        raise
    except Exception as e:
        what = "an example_input" if source == "example_input" else "calibration batches"
        raise ConversionError(
            f"convert_activations: the forward pass with {source} failed ({type(e).__name__}: {e}); "
            f"pass {what} that the model accepts in its current train/eval mode"
        ) from e
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return calls, counts, functional.counts


def _default_input(model: nn.Module) -> Tensor:
    param = next(model.parameters(), None)
    kw = dict(device=param.device, dtype=param.dtype) if param is not None and param.is_floating_point() else {}
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        size = tuple(cfg["input_size"])
    else:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError(
                "convert_activations: cannot derive an example input for a model without a timm "
                "pretrained_cfg or a Conv2d; pass example_input="
            )
        size = (conv.in_channels, 224, 224)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *size, generator=generator).to(**kw)


# ----------------------------------------------------------------------------- surgery


class _ShallowTracer(fx.Tracer):
    """Traces only the root's own forward: every submodule call is one opaque node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _own_channel_dim(m: nn.Module) -> int | None:
    """The channel axis of an activation with per-channel parameters (``nn.PReLU`` with more than
    one slope: 1; this package's ``PReLU``/``APL`` with ``num_channels``: their ``channel_dim``);
    ``None`` for the rest."""
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        return 1
    if isinstance(m, (ChannelPReLU, APL)) and m.num_channels is not None:
        return m.channel_dim
    return None


def _split_name(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = _split_name(name)
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _rewritten(owner: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``owner`` as an ``fx.GraphModule`` of ``graph``, with its class name, mode and plain
    attributes: the public values that are neither callables, modules, tensors nor properties
    (``stride``, ``expansion``, ``use_res_connect``...), which init loops and user code read; kept
    through ``copy.deepcopy`` too (the GraphModule's preserved attributes). Its class and methods
    are not carried over (``isinstance(block, BasicBlock)`` is False)."""
    rewritten = fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    rewritten.train(owner.training)
    klasses = [k for k in type(owner).__mro__ if k not in (nn.Module, object)]
    names = {*vars(owner), *(n for k in klasses for n in vars(k))}
    preserved = {}
    for name in sorted(names):
        if name.startswith("_") or hasattr(rewritten, name):
            continue
        if any(isinstance(vars(k).get(name), property) for k in klasses):
            continue  # computed on access (a device, a dtype): a frozen copy would go stale
        try:
            value = getattr(owner, name)
        except Exception:  # noqa: BLE001 - an attribute that cannot be read on this instance
            continue
        if not callable(value) and not isinstance(value, (nn.Module, Tensor)):
            setattr(rewritten, name, value)
            preserved[name] = value
    if preserved:
        rewritten.meta["_user_preserved_attributes"] = preserved
    return rewritten


def _free_attr(owner: nn.Module, base: str) -> str:
    i = 1
    while hasattr(owner, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def _split_call_sites(root: nn.Module, name: str, num_calls: int, owner_calls: int) -> nn.Module:
    """Give every call site of the activation ``name`` in its owner's forward its own copy, by an
    fx rewrite of the owner. Returns the (possibly new) root."""
    owner_name, attr = _split_name(name)
    owner = root.get_submodule(owner_name) if owner_name else root
    where = f"{type(owner).__name__} {owner_name or '(the model itself)'}"
    try:
        graph = _ShallowTracer().trace(owner)
    except Exception as e:
        raise ConversionError(
            f"convert_activations: activation {name!r} is called {num_calls} times per forward pass but "
            f"its owner {where} only {owner_calls} times, so it is reused at several call sites; torch.fx "
            f"cannot trace {where} to separate them ({type(e).__name__}: {e}). Give each call site its own "
            f"module, or exclude {name!r}"
        ) from e
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == attr]
    if len(nodes) < 2:
        raise ConversionError(
            f"convert_activations: activation {name!r} is called {num_calls} times per forward pass but its "
            f"owner {where} only {owner_calls} times, and the owner's forward has {len(nodes)} call site(s) "
            f"of it; it is called from elsewhere. Give each call site its own module, or exclude {name!r}"
        )
    act = owner.get_submodule(attr)
    for node in nodes[1:]:
        new_attr = _free_attr(owner, attr)
        owner.add_module(new_attr, copy.deepcopy(act))
        node.target = new_attr
    rewritten = _rewritten(owner, graph)
    if not owner_name:
        return rewritten
    _set_submodule(root, owner_name, rewritten)
    return root


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(a, p) for a in _ancestors(name) for p in patterns)


def _untie(root: nn.Module, patterns: list[str]) -> None:
    """An activation object registered under several names gets one copy per name; an excluded
    name keeps the object itself (else the first name does), so that excluding one of the names
    leaves that one as it is."""
    names: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in root.named_modules(remove_duplicate=False):
        if is_activation(m):
            names.setdefault(id(m), []).append((name, m))
    for group in names.values():
        if len(group) < 2:
            continue
        keep = next((name for name, _ in group if _excluded(name, patterns)), group[0][0])
        for name, m in group:
            if name != keep:
                _set_submodule(root, name, copy.deepcopy(m))


def _inside_se(root: nn.Module, name: str) -> bool:
    return any(type(root.get_submodule(a)).__name__ in SE_CLASS_NAMES for a in _ancestors(name)[:-1])


def _is_spatially_1x1(calls: list[_Call], channel_dims: list[int]) -> bool:
    return all(
        c.shape is not None and len(c.shape) >= 3 and cd % len(c.shape) == 1 and math.prod(c.shape[2:]) == 1
        for c, cd in zip(calls, channel_dims, strict=True)
    )


def _exclude_patterns(exclude: Any, caller: str) -> list[str]:
    """``exclude=`` as a list of patterns; a ``TypeError`` naming it for anything else."""
    if exclude is None or isinstance(exclude, str):
        return [exclude] if exclude else []
    patterns = list(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{caller}: exclude must be a pattern or a list of patterns, but got {exclude!r}")
    return patterns


def _check_not_scripted(model: nn.Module, caller: str = "convert_activations", what: str = "activations") -> None:
    """TorchScript modules run compiled code: their activations (or merges) cannot be replaced."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and not isinstance(m, torch.jit.TracedModule):
            where = f"submodule {name!r}" if name else "the model"
            raise ConversionError(
                f"{caller}: {where} is a TorchScript module ({type(m).__name__}, made by "
                f"torch.jit.script): its forward is compiled code, so its {what} cannot be replaced. "
                "Convert the eager model, then script it"
            )


def _why_nothing(model: nn.Module, functional: dict[tuple[str, nn.Module | None], int]) -> str:
    """The warning when the model has no activation module to convert: what was found instead."""
    reasons = []
    if any(isinstance(m, torch.jit.TracedModule) for m in model.modules()):
        reasons.append(
            "it is (or contains) a torch.jit.trace result, whose submodules are traced graphs, not activation "
            "modules; convert the eager model before tracing it"
        )
    code, leaves = _functional_report(model, functional)
    if code:
        reasons.append(
            f"its forward calls activations as functions ({code}), which are not modules and cannot be "
            "replaced; write them as modules (e.g. self.act = nn.ReLU() in __init__, self.act(x) in forward)"
        )
    if leaves:
        reasons.append(
            f"its activation modules are of types that are not replaced, and call activation functions inside "
            f"({leaves}); they stay as they are"
        )
    if not reasons:
        reasons.append(
            "it has no activation module of the replaced types (pwlu.convert.ACTIVATION_TYPES or timm's), "
            "and its forward called none as a function"
        )
    return f"convert_activations converted nothing in {type(model).__name__}: " + "; ".join(reasons)


# ----------------------------------------------------------------------------- function matching

#: Inputs kept per channel and call site for the least-squares fit of ``init="match"``.
MATCH_SAMPLES = 4096


def _describe(value: Any) -> str:
    """A short description of a model input for error messages: shapes, not values."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "a dict of " + ", ".join(f"{k}: {_describe(v)}" for k, v in list(value.items())[:4])
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of " + ", ".join(_describe(v) for v in value[:4])
    return type(value).__name__


def _model_input(batch: Any) -> Any:
    """The model input of one calibration batch: the first element of an ``(input, target, ...)``
    tuple or list (a DataLoader's ``[x, y]``), else the batch itself (a tensor, or a mapping of
    keyword arguments: a dict, a transformers ``BatchEncoding``)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("convert_activations: a calibration batch is an empty tuple/list")
        return batch[0]
    return batch


def _calibrate(model: nn.Module, sites: dict[int, tuple[str, Calibration]], batches: Iterable[Any]) -> int:
    """Run every calibration batch through ``model`` in eval mode under ``no_grad`` (modes, buffers
    and the RNG restored afterwards), feeding each call site's input to its :class:`Calibration`.
    Returns the number of batches."""

    def pre_hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.is_floating_point():
            sites[id(module)][1].record(x)

    modules = {id(m): m for m in model.modules()}
    handles = [modules[i].register_forward_pre_hook(pre_hook) for i in sites]
    training = {id(m): m.training for m in model.modules()}
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    count = 0
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(model)):
            for batch in batches:
                _run(model, _model_input(batch))
                count += 1
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = training.get(id(m), m.training)
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return count


def _match(
    model: nn.Module, plan: list[tuple[str, nn.Module]], batches: Iterable[Any], fit: str, num_sigmas: float = 3.0
) -> None:
    """``init="match"``: calibrate every planned PWLU on ``batches`` at its call site, then fit it to
    the activation it replaces (:mod:`pwlu.matching`)."""
    generator = torch.Generator().manual_seed(0)
    sites: dict[int, tuple[str, Calibration]] = {}
    targets: dict[str, MatchTarget] = {}
    for name, new in plan:
        old = model.get_submodule(name)
        if type(new) is not PWLU:
            raise ValueError(
                f"convert_activations: init='match' fits a PWLU (activation='pwlu'), but the factory made a "
                f"{type(new).__name__} for {name!r}"
            )
        target = activation_target(old, new.num_channels)
        if target is None:
            raise ConversionError(
                f"convert_activations: init='match' cannot fit a PWLU to {name!r} ({type(old).__name__} with one "
                f"parameter per channel, replaced by a PWLU with num_channels={new.num_channels}, channel_dim="
                f"{new.channel_dim}: another channel count or axis); use mode='channel' and its own channel axis, "
                "or exclude it"
            )
        new.reset_running_stats()
        sites[id(old)] = (name, Calibration(new, MATCH_SAMPLES, generator))
        targets[name] = target
    if not sites:
        return
    if _calibrate(model, sites, batches) == 0:
        raise ValueError("convert_activations: calibration= yielded no batch")
    constant = []
    for name, calib in sites.values():
        if calib.calls == 0:
            raise ConversionError(
                f"convert_activations: activation {name!r} was not called by the calibration batches, so no PWLU "
                "can be fitted to it; use batches that run the whole model (calibration runs it in eval mode: "
                "branches taken only in training are not run), or exclude it"
            )
        if calib.batches == 0:
            raise ConversionError(
                f"convert_activations: activation {name!r} received only empty inputs from the calibration "
                f"batches ({calib.calls} call(s) with 0 elements), so no PWLU can be fitted to it"
            )
        dead = calib.finish()
        if dead:
            constant.append(f"{name!r} channel(s) {dead[:8]}{' ...' if len(dead) > 8 else ''}")
        fit_pwlu(calib.pwlu, targets[name], calib.samples, fit=fit, num_sigmas=num_sigmas, name=name)
    if constant:
        warnings.warn(
            "convert_activations: the calibration inputs of " + "; ".join(constant) + " are constant (std 0), so "
            "their range has the minimum width and the match holds only near that value; calibrate with "
            "varied batches",
            stacklevel=3,
        )


def convert_activations(
    model: nn.Module,
    activation: str | Callable[..., nn.Module] = "pwlu",
    num_intervals: int = 16,
    mode: str = "channel",
    exclude: str | Iterable[str] | None = None,
    example_input: Any = None,
    *,
    channel_dim: int | None = None,
    activation_kwargs: dict[str, Any] | None = None,
    init: str = "relu",
    calibration: Iterable[Any] | None = None,
    fit: str = "lstsq",
    max_calibration_batches: int | None = None,
) -> nn.Module:
    """Replace every activation of ``model`` by PWLU or a baseline, one new module per call site.

    Paper: https://arxiv.org/abs/2104.03693 (section 4.1: every activation except those on tiny
    feature maps such as inside squeeze-and-excitation blocks).

    Replaced: :data:`ACTIVATION_TYPES` (ReLU, ReLU6, LeakyReLU, PReLU, RReLU, SiLU, Hardswish,
    GELU, ELU, CELU, SELU, Mish, Softplus) and timm's own activation classes. Never replaced:
    gates (Sigmoid, Hardsigmoid, Tanh, ...); activations inside a block whose class is in
    :data:`SE_CLASS_NAMES` (torchvision ``SqueezeExcitation``, timm ``SqueezeExcite``,
    ``SEModule``, ...); any activation whose input was spatially 1x1 (channel axis 1, product of
    the dimensions after it equal to 1); activations the example forward pass never called (a
    warning names them). Activations called as functions inside a ``forward`` (``F.relu(x)``, as
    in torchvision's ``TwoMLPHead`` and ``LastLevelP6P7``) are not modules and are not seen.
    A 2-D ``(B, C)`` input (a classifier MLP, e.g. MobileNetV3's ``Linear -> Hardswish``) is
    converted; the same layer written as a 1x1 convolution after global pooling (timm's
    ``conv_head``) has a spatially 1x1 input and is kept.

    How it works: one forward pass with ``example_input``, in the model's current train/eval
    mode, under ``no_grad``, with hooks that record the input shape of every activation call
    (buffers such as batch-norm statistics and the RNG state are restored afterwards). An
    activation called more often than its owner (torchvision's ResNet blocks call ``self.relu``
    two or three times, at different channel counts in ``Bottleneck``) is split by a torch.fx
    rewrite of the owner: each call site gets its own copy (``relu``, ``relu_1``, ``relu_2``) and
    the owner becomes an ``fx.GraphModule`` with the same class name and the same state-dict keys
    plus the new ones. An owner that fx cannot trace raises :class:`ConversionError`. Then every
    activation gets its replacement, built from the measured channel count.

    The example input must have a realistic spatial size: with 32x32 images a ResNet's last
    stage is 1x1, and its activations would be treated like those of an SE block.

    Channel axis (``channel_dim=None``): -1 when the input comes from ``nn.Linear`` or
    ``nn.LayerNorm`` (transformer MLPs, ConvNeXt's NHWC MLP), 1 when it comes from a
    convolution or a norm over channels; otherwise 1 for 2-D, 4-D and 5-D inputs and -1 for
    3-D inputs ``(B, T, C)``. Pass an int to force it.

    Args:
        model (nn.Module): modified in place.
        activation (str or callable): a name from :data:`pwlu.baselines.ACTIVATIONS` (``"relu"``,
            ``"swish"``, ``"prelu"``, ``"apl"``, ``"pau"``, ``"frelu"``, ``"pwlu"``, ``"npwlu"``) or a factory
            called as ``factory(num_channels)``, with ``channel_dim=`` too when it has a parameter of
            that name. ``num_channels`` is ``None`` in layer mode.
        num_intervals (int): ``N`` for PWLU and N-PWLU (ignored by the other activations).
        mode (str): ``"channel"`` (one set of parameters per channel) or ``"layer"``.
        exclude (str or iterable of str): ``fnmatch`` patterns of module names; an activation is
            left alone when its name or the name of one of its ancestors matches, e.g.
            ``"layer4.*"`` or ``"*.downsample"``. Names are those after splitting (``relu_1``...).
        example_input: passed to the model as ``model(*example_input)`` for a tuple,
            ``model(**example_input)`` for a dict, ``model(example_input)`` otherwise (a tensor, or
            the list of images of a torchvision detection model). Default: a random
            ``(1, *pretrained_cfg["input_size"])`` tensor for timm models, else
            ``(1, C, 224, 224)`` with ``C`` the input channels of the first ``Conv2d``.
        channel_dim (int, optional): force the channel axis, see above.
        activation_kwargs (dict, optional): extra keyword arguments for the factory (for PWLU e.g.
            ``bound`` or ``init``).
        init (str): ``"relu"`` (default; the paper's from-scratch setting: each PWLU starts as
            ReLU on ``[-bound, bound]``, or as ``activation_kwargs["init"]``, and needs a
            :class:`~pwlu.BoundaryRealigner`) or ``"match"`` (SPEC section 11, ``activation="pwlu"``
            only): each PWLU is fitted to the activation it replaces, so the converted model
            computes (almost) what the trained one did, see "Function matching" below.
        calibration (iterable, optional): for ``init="match"`` (required there): model inputs, or
            ``(input, target)`` pairs, or a ``DataLoader`` yielding either; each input is passed as
            ``example_input`` is. Iterated once. Its first input is the example input when
            ``example_input`` is not given. A few batches (~1-2k samples) suffice.
        fit (str): for ``init="match"``: ``"lstsq"`` (default) or ``"interpolate"``.
        max_calibration_batches (int, optional): for ``init="match"``: calibrate on at most this
            many batches (none is drawn past them). Default: all of them, so an endless iterator
            (``itertools.cycle``, a DataLoader with an infinite sampler) needs it.

    Function matching (``init="match"``): the calibration batches run through the *original*
    model in eval mode under ``no_grad`` (batch norm uses its running statistics, dropout is
    off; modes, buffers and the RNG are restored). At every converted call site, the per-channel
    input mean and standard deviation of all the calibration inputs are recorded (pooled over the
    batches, in the new PWLU's ``running_mean``/``running_std`` buffers; per process: under
    ``torch.distributed`` every rank should calibrate on the same batches) with a uniform sample of up to
    :data:`MATCH_SAMPLES` inputs per channel. Each PWLU gets the range ``mean ± 3·std`` (Eq. 6),
    the outer slopes of the replaced function far from 0 (GELU, SiLU, Hardswish, Mish, ELU,
    Softplus, QuickGELU...: 0 and 1; ReLU6 and transformers' clipped GELU: 0 and 0; LeakyReLU,
    PReLU, RReLU: their negative slope and 1; SELU: 0 and its scale) and breakpoint values
    fitted to it (:func:`pwlu.matching.fit_pwlu`): ``fit="lstsq"`` minimises the squared error
    over the recorded inputs of the channel, those outside the range included;
    ``fit="interpolate"`` takes ``f`` at the breakpoints. The default is the fit that measured
    better (README, "Converting a trained model"). Matched PWLUs are in phase II
    (``module.matched`` names the function): train them directly. A
    :class:`~pwlu.BoundaryRealigner` attached anyway warns and leaves matched PWLUs out of its
    phase I (no freeze, no Eq. 6 reset to ReLU).

    Returns:
        nn.Module: ``model``, converted (a new ``fx.GraphModule`` only in the rare case where the
        model's own top-level forward reuses an activation, so use the return value).

    Raises:
        ValueError: unknown activation name, bad mode or num_intervals, a model without a
            derivable example input; ``init="match"`` without ``calibration`` or with an
            activation other than PWLU, an empty ``calibration``, a bad ``init`` or ``fit``,
            ``calibration``, another ``fit`` or ``max_calibration_batches`` without ``init="match"``,
            a ``max_calibration_batches`` that is not a positive int.
        ConversionError: the example forward pass fails, an activation is reused in a way that
            cannot be split, one call site sees different channel counts, or the model (or a
            submodule) is a ``torch.jit.script`` module, whose compiled forward cannot change;
            with ``init="match"``, a converted activation that the calibration batches never call.

    Warns:
        UserWarning: when the model has no activation module to convert, saying why: a
        ``torch.jit.trace`` result (its submodules are traced graphs), activations called as
        functions in ``forward`` (``F.relu(x)``: the warning names them and how often they ran),
        or none at all. (Activation modules that the rules above leave alone warn only when
        never called.) Also when some activations were converted but the forward calls others
        as functions, which stay as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_activations: model must be an nn.Module, but got {type(model).__name__}")
    factory = get_activation(activation)
    if mode not in ("channel", "layer"):
        raise ValueError(f"convert_activations: mode must be 'channel' or 'layer', but got {mode!r}")
    if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
        raise ValueError(f"convert_activations: num_intervals must be an int >= 1, but got {num_intervals!r}")
    if channel_dim is not None and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
        raise TypeError(f"convert_activations: channel_dim must be None or an int, but got {channel_dim!r}")
    patterns = _exclude_patterns(exclude, "convert_activations")
    _check_not_scripted(model)
    kwargs = dict(activation_kwargs or {})
    if factory is get_activation("pwlu") or factory is get_activation("npwlu"):
        kwargs.setdefault("num_intervals", num_intervals)
    if init not in ("relu", "match"):
        raise ValueError(f"convert_activations: init must be 'relu' or 'match', but got {init!r}")
    if fit not in FITS:
        raise ValueError(f"convert_activations: fit must be one of {FITS}, but got {fit!r}")
    if max_calibration_batches is not None and (
        isinstance(max_calibration_batches, bool)
        or not isinstance(max_calibration_batches, int)
        or max_calibration_batches < 1
    ):
        raise ValueError(
            f"convert_activations: max_calibration_batches must be None or an int >= 1, but got {max_calibration_batches!r}"
        )
    if init != "match" and (calibration is not None or fit != "lstsq" or max_calibration_batches is not None):
        given = (
            "calibration=" if calibration is not None
            else f"fit={fit!r}" if fit != "lstsq"
            else f"max_calibration_batches={max_calibration_batches!r}"
        )  # fmt: skip
        raise ValueError(
            f"convert_activations: {given} is used only with init='match' (fitting each PWLU to the activation it "
            f"replaces), but init is {init!r}; pass init='match', or drop it"
        )
    source = "example_input"  # what the profiling forward pass runs on, for its error
    if init == "match":
        if factory is not get_activation("pwlu"):
            raise ValueError(f"convert_activations: init='match' needs activation='pwlu', but got {activation!r}")
        if "init" in kwargs:
            raise ValueError("convert_activations: init='match' and activation_kwargs['init'] exclude each other")
        if calibration is None:
            raise ValueError(
                "convert_activations: init='match' needs calibration= (model inputs, (input, target) pairs or a "
                "DataLoader) to record each activation's input statistics"
            )
        if isinstance(calibration, (Tensor, Mapping)):
            raise TypeError(
                "convert_activations: calibration must be an iterable of batches (e.g. [x1, x2] or a DataLoader), "
                f"not a single {type(calibration).__name__}"
            )
        batches = iter(calibration)
        try:
            first = next(batches)
        except StopIteration:
            raise ValueError("convert_activations: calibration= yielded no batch") from None
        calibration = itertools.chain([first], batches)
        if max_calibration_batches is not None:
            calibration = itertools.islice(calibration, max_calibration_batches)
        if example_input is None:
            example_input = _model_input(first)
            source = f"the first calibration batch's model input ({_describe(example_input)})"
    if example_input is None:
        example_input = _default_input(model)
        source = f"the default example input ({_describe(example_input)})"

    # 1. one module per name, then one module per call site.
    _untie(model, patterns)
    calls, counts, functional = _profile(model, example_input, source)
    modules = dict(model.named_modules())
    reused = []
    for name, m in modules.items():
        if id(m) not in calls or _excluded(name, patterns):
            continue
        owner = modules[_split_name(name)[0]]
        if len(calls[id(m)]) > counts[id(owner)]:
            reused.append((name, len(calls[id(m)]), counts[id(owner)]))
    for name, num_calls, owner_calls in reused:
        model = _split_call_sites(model, name, num_calls, owner_calls)
    if reused:
        calls, counts, functional = _profile(model, example_input, source)

    # 2. plan every replacement before changing anything.
    param = next(model.parameters(), None)
    to_kw = dict(device=param.device, dtype=param.dtype) if param is not None and param.is_floating_point() else {}
    plan: list[tuple[str, nn.Module]] = []
    never_called: list[str] = []
    for name, m in model.named_modules():
        if id(m) not in calls or _excluded(name, patterns) or _inside_se(model, name):
            continue
        site_calls = calls[id(m)]
        if not site_calls:
            never_called.append(name)
            continue
        if any(c.shape is None or len(c.shape) == 0 for c in site_calls):
            raise ConversionError(f"convert_activations: activation {name!r} was called without a tensor input")
        owner_channels = _layer_channels(model.get_submodule(_split_name(name)[0])) if channel_dim is None else set()
        dims = [c.channel_dim(channel_dim, owner_channels) for c in site_calls]
        own = _own_channel_dim(m)
        if channel_dim is None and own is not None:  # a per-channel PReLU/APL: its channels are its own
            dims = [own % len(c.shape) for c in site_calls]
        if _is_spatially_1x1(site_calls, dims):
            continue
        specs = {(cd % len(c.shape), c.shape[cd % len(c.shape)]) if mode == "channel" else None
                 for c, cd in zip(site_calls, dims, strict=True)}  # fmt: skip
        if len(specs) > 1:
            raise ConversionError(
                f"convert_activations: activation {name!r} sees inputs of shapes "
                f"{sorted({c.shape for c in site_calls})} at one call site, so no single channel count fits it"
            )
        num_channels = site_calls[0].shape[dims[0]] if mode == "channel" else None
        new = call_factory(factory, num_channels, dims[0], **kwargs)
        new.to(**to_kw).train(m.training)
        plan.append((name, new))
    if not plan and not calls:  # (activation modules all left alone by the rules: no warning)
        warnings.warn(_why_nothing(model, functional), stacklevel=2)
    elif plan and functional:
        code, leaves = _functional_report(model, functional)
        also = [f"its forward also calls activations as functions ({code}), which are not modules"] if code else []
        if leaves:
            also.append(f"it also has activation modules of types that are not replaced ({leaves})")
        warnings.warn(
            f"convert_activations: {type(model).__name__}: " + "; ".join(also) + ": they are not converted and "
            "stay as they are",
            stacklevel=2,
        )
    if never_called:
        warnings.warn(
            f"convert_activations: {len(never_called)} activation(s) were not called by the example forward "
            f"pass and are left unchanged: {never_called}",
            stacklevel=2,
        )
    if init == "match":
        _match(model, plan, calibration, fit)
    for name, new in plan:
        _set_submodule(model, name, new)
    return model
