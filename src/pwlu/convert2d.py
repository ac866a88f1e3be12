"""Model surgery for merges: put a :class:`~pwlu.PWLU2D` in place of every residual addition.

:func:`convert_merges` finds the residual blocks of a model by class name
(:data:`MERGE_BLOCK_NAMES`: torchvision's and timm's ResNet, MobileNet and EfficientNet blocks,
and the application's small models), traces each block's own ``forward`` with torch.fx (every
submodule one opaque node), and replaces each addition of two tensors that both depend on the
block's input (``out += identity``, ``x + self.conv(x)``, ``self.drop_path(x) + shortcut``) by a
call of a new ``PWLU2D`` submodule. One example forward pass measures every merge's shape, so
channel counts are measured; the channel axis is read from the block's layers (with a warning
where they do not tell it).
"""

from __future__ import annotations

import fnmatch
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from .convert import (
    _CHANNEL_FIRST_PRODUCERS,
    _CHANNEL_LAST_PRODUCERS,
    ConversionError,
    _check_not_scripted,
    _default_input,
    _exclude_patterns,
    _free_attr,
    _layer_channels,
    _rewritten,
    _rng_devices,
    _run,
    _set_submodule,
    _ShallowTracer,
    is_hf_conv1d,
)
from .merge import PWLU2D

__all__ = ["MERGE_BLOCK_NAMES", "Addition", "convert_merges", "merge_sites"]

#: Class names of the blocks whose residual additions :func:`convert_merges` replaces.
MERGE_BLOCK_NAMES = frozenset(
    {
        # torchvision: ResNet, MobileNetV2/V3, EfficientNet (V1: MBConv, V2: FusedMBConv)
        "BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv",
        # timm: ResNet (BasicBlock, Bottleneck), EfficientNet / MobileNet blocks, ConvNeXt
        "DepthwiseSeparableConv", "EdgeResidual", "CondConvResidual", "UniversalInvertedResidual",
        "ConvNeXtBlock",
        # pwlu.app.models
        "TransformerBlock",
    }
)  # fmt: skip

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


class Addition(nn.Module):
    """``x + y`` as a module: the stand-in of a merge while its shape is measured, and what stays
    in place of a merge that the example forward pass never reached."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.numbers = False  # called with a non-tensor (an int argument of the block's forward)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            if isinstance(x, Tensor) and isinstance(y, Tensor):
                self.shapes.append((tuple(x.shape), tuple(y.shape)))
            else:
                self.numbers = True
        return x + y


def _restore_addition(root: nn.Module, name: str) -> None:
    """Put ``a + b`` back in place of the stand-in ``name`` (a merge that added numbers)."""
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    assert isinstance(owner, fx.GraphModule)
    for node in list(owner.graph.nodes):
        if node.op == "call_module" and node.target == attr:
            with owner.graph.inserting_after(node):
                plain = owner.graph.call_function(operator.add, tuple(node.args))
            node.replace_all_uses_with(plain)
            owner.graph.erase_node(node)
    delattr(owner, attr)
    owner.recompile()


def _depends_on_input(node: fx.Node, memo: dict[fx.Node, bool], scalars: dict[fx.Node, bool] | None = None) -> bool:
    """Whether ``node`` is computed from the block's input tensors; sizes do not carry it
    (``self.pos[:, : x.size(1)]`` is a parameter, not a branch)."""
    scalars = {} if scalars is None else scalars
    if node in memo:
        return memo[node]
    stack, order = [node], []
    while stack:  # iterative: long blocks make deep graphs
        n = stack.pop()
        if n in memo:
            continue
        order.append(n)
        stack.extend(a for a in n.all_input_nodes if a not in memo)
    for n in reversed(order):  # inputs of n were pushed after n, so they are resolved first
        memo[n] = n.op == "placeholder" or any(
            memo.get(a, False) and not _scalar_valued(a, scalars) for a in n.all_input_nodes
        )
    return memo[node]


#: Methods and attributes that give Python numbers (sizes, ranks), not tensors.
_SCALAR_METHODS = {"size", "dim", "numel", "nelement", "item", "stride", "element_size", "tolist"}
_SCALAR_ATTRS = {"shape", "ndim", "dtype", "device"}


def _scalar_valued(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` computes a Python number from sizes (``x.size(2) + x.size(3)``,
    ``x.shape[-1] // 2``): such an addition is arithmetic, not a merge of two tensors."""
    if node in memo:
        return memo[node]
    if node.op == "call_method" and node.target in _SCALAR_METHODS:
        result = True
    elif node.op == "call_function" and node.target is getattr:
        result = len(node.args) > 1 and node.args[1] in _SCALAR_ATTRS
    elif node.op == "call_function" and node.target is len:
        result = True
    elif node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator", "math"):
        # arithmetic and indexing: a number when every node it reads is one
        inputs = node.all_input_nodes
        result = bool(inputs) and all(_scalar_valued(a, memo) for a in inputs)
    else:
        result = False
    memo[node] = result
    return result


def _operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two summands of an addition node (``a + b``, ``a += b``, ``torch.add(a, b)``,
    ``torch.add(input=a, other=b)``, ``a.add(b)``, ``a.add_(other=b)``; ``alpha`` must be 1);
    ``None`` for anything else."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        names = ("input", "other")
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        names = ("self", "other")
    else:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    for name in names[len(args) :]:
        if name in kwargs:
            args.append(kwargs.pop(name))
    if kwargs.pop("alpha", 1) != 1 or kwargs or len(args) != 2:
        return None
    return args[0], args[1]


def _is_merge(node: fx.Node, memo: dict[fx.Node, bool], scalars: dict[fx.Node, bool] | None = None) -> bool:
    """An addition of two tensors that both depend on the block's input."""
    operands = _operands(node)
    if operands is None:
        return False
    a, b = operands
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    scalars = {} if scalars is None else scalars
    if _scalar_valued(a, scalars) or _scalar_valued(b, scalars):
        return False
    return _depends_on_input(a, memo, scalars) and _depends_on_input(b, memo, scalars)


def merge_sites(block: nn.Module) -> list[str]:
    """The residual additions in ``block``'s own forward, as fx node names (empty: none), for
    inspection. Raises :class:`ConversionError` when fx cannot trace the block."""
    graph = _trace(block, "")
    memo: dict[fx.Node, bool] = {}
    scalars: dict[fx.Node, bool] = {}
    return [n.name for n in graph.nodes if _is_merge(n, memo, scalars)]


def _trace(block: nn.Module, name: str) -> fx.Graph:
    try:
        return _ShallowTracer().trace(block)
    except Exception as e:
        where = f"{type(block).__name__} {name or '(the model itself)'}"
        raise ConversionError(
            f"convert_merges: torch.fx cannot trace the residual block {where} to find its additions "
            f"({type(e).__name__}: {e}); exclude {name or '<the model>'!r}, or write its forward without "
            "data-dependent Python control flow"
        ) from e


def _rewrite(block: nn.Module, name: str) -> tuple[nn.Module, list[str]]:
    """``block`` as an ``fx.GraphModule`` (same class name, same state-dict keys) in which every
    residual addition calls a new :class:`Addition` submodule; and those submodules' names."""
    graph = _trace(block, name)
    memo: dict[fx.Node, bool] = {}
    scalars: dict[fx.Node, bool] = {}
    nodes = [n for n in graph.nodes if _is_merge(n, memo, scalars)]
    if not nodes:
        return block, []
    order = {n: i for i, n in enumerate(graph.nodes)}
    added = []
    for node in nodes:
        operands = _operands(node)
        assert operands is not None  # a merge
        first = operands[0]
        # x.add_(y) (fx records ``out += identity`` as an out-of-place add): later reads of x
        # see the sum, so they read the merge's output instead
        later = [u for u in first.users if u is not node and order[u] > order[node]] if node.target == "add_" else []
        attr = _free_attr(block, "merge") if hasattr(block, "merge") else "merge"
        block.add_module(attr, Addition())
        with graph.inserting_after(node):
            call = graph.call_module(attr, operands)
        node.replace_all_uses_with(call)
        for user in later:
            user.replace_input_with(first, call)
        graph.erase_node(node)
        added.append(attr)
    graph.lint()
    return _rewritten(block, graph), added


def _excluded(name: str, patterns: list[str]) -> bool:
    parts = name.split(".") if name else [""]
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(a, p) for a in ancestors for p in patterns)


def _layouts(block: nn.Module) -> set[int]:
    """The channel axes that ``block``'s channel-declaring layers work on: 1 for convolutions and
    norms over channels, -1 for linear layers and LayerNorm (transformers' ``Conv1D`` too)."""
    axes: set[int] = set()
    for m in block.modules():
        if isinstance(m, _CHANNEL_FIRST_PRODUCERS):
            axes.add(1)
        elif isinstance(m, _CHANNEL_LAST_PRODUCERS) or is_hf_conv1d(m):
            axes.add(-1)
    return axes


def _channel_dim(shape: tuple[int, ...], layer_channels: set[int], layouts: set[int] = frozenset()) -> tuple[int, bool]:
    """The channel axis of a merge's inputs, and whether it was a guess: axis 1 or -1, the one
    whose size is a channel count of the block's layers (a ``Conv1d`` block's ``(B, C, L)``, a
    Swin block's ``(B, H, W, C)``); where both are (``(2, 16, 16)``, Swin at 384 x 384 on
    ``(1, 96, 96, 96)``), the axis the layers work on when they all work on one (``layouts``);
    where that does not decide either, -1 for 3-D ``(B, T, C)``, else 1."""
    default = -1 if len(shape) == 3 else 1
    if len(shape) < 3:
        return default, False
    first, last = shape[1] in layer_channels, shape[-1] in layer_channels
    if first != last:
        return (1 if first else -1), False
    if first and len(layouts) == 1:
        return next(iter(layouts)), False
    return default, True  # both or neither are channel counts: a guess


def convert_merges(
    model: nn.Module,
    num_intervals: int = 8,
    mode: str = "channel",
    example_input: Any = None,
    exclude: str | Iterable[str] | None = None,
    *,
    blocks: Iterable[str | type] = (),
    channel_dim: int | None = None,
    merge_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace every residual addition of ``model`` by a :class:`~pwlu.PWLU2D`, one per merge.

    SPEC section 10. Found: in every submodule whose class name is in :data:`MERGE_BLOCK_NAMES`
    (torchvision ``BasicBlock``/``Bottleneck`` with their ``out += identity``, MobileNetV2/V3
    ``InvertedResidual`` and EfficientNet ``MBConv``/``FusedMBConv`` with ``x + block(x)``;
    timm's ResNet, EfficientNet/MobileNet and ConvNeXt blocks; ``pwlu.app.models``' blocks) or in
    ``blocks``, every addition (``+``, ``+=``, ``torch.add``, ``Tensor.add``/``add_``, no
    ``alpha``) of two tensors that both depend on the block's input. An addition of a constant or
    a parameter (a position embedding) is not a merge. ResNet-18 has 8 merges, ResNet-50 16,
    MobileNetV2 10.

    How it works: each such block is traced by torch.fx (only its own forward; submodules are
    opaque calls) and becomes an ``fx.GraphModule`` with the same class name and the same
    state-dict keys plus ``merge`` (``merge_1``... for a second merge in one block), called
    where the addition was. One forward pass with ``example_input`` (under ``no_grad``, in the
    model's current mode; batch-norm statistics and the RNG are restored) measures the shape of
    each merge's inputs; each merge then gets a ``PWLU2D`` with that channel count, initialised
    as addition, so the converted model computes the
    same outputs (up to rounding). A merge the example pass never reaches stays a plain
    :class:`Addition` module, with a warning. Blocks are converted in place; the model is
    returned (a new ``fx.GraphModule`` when the model itself is such a block). It composes with
    :func:`pwlu.convert_activations` in either order.

    In-place additions: after ``x.add_(y)`` the block's later reads of ``x`` read the merge's
    output. torch.fx itself records an augmented assignment ``out += identity`` as ``out + identity``
    (as in every fx rewrite); a block that reads the same tensor through a second name after
    ``+=`` would see the old value (none of the blocks above does).

    The channel axis (``mode="channel"``) is ``channel_dim`` where given; otherwise axis 1 or -1 of
    the merge's inputs, the one whose size is a channel count of the block's layers (the in/out
    channels of its convolutions, the features of its norms and linear layers): axis 1 for
    ``(B, C, H, W)`` and a ``Conv1d`` block's ``(B, C, L)``, -1 for ``(B, T, C)`` and a Swin
    block's ``(B, H, W, C)``. Where the layers do not tell, axis 1 (-1 for 3-D inputs), with a
    warning when the two axes differ in size.

    Args:
        model (nn.Module): modified in place.
        num_intervals (int): ``N`` of every ``PWLU2D``.
        mode (str): ``"channel"`` (one surface per channel) or ``"layer"``.
        example_input: as for :func:`pwlu.convert_activations` (default: a random
            ``(1, C, 224, 224)`` image, or timm's ``pretrained_cfg["input_size"]``).
        exclude (str or iterable of str): ``fnmatch`` patterns of block names (or of an ancestor),
            e.g. ``"layer4.*"``: their additions stay.
        blocks (iterable of str or type): further block classes (or class names) to search.
        channel_dim (int, optional): the channel axis of every merge's inputs (default: found
            from the block's layers, see above).
        merge_kwargs (dict, optional): extra keyword arguments of ``PWLU2D`` (``bound``, ``init``).

    Returns:
        nn.Module: ``model``, converted.

    Raises:
        ValueError: bad ``num_intervals``, ``mode``; a model without a derivable example input.
        ConversionError: a listed block that torch.fx cannot trace, a merge of two differently shaped tensors
            (broadcasting), the example forward pass failing, or a TorchScript model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_merges: model must be an nn.Module, but got {type(model).__name__}")
    if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
        raise ValueError(f"convert_merges: num_intervals must be an int >= 1, but got {num_intervals!r}")
    if mode not in ("channel", "layer"):
        raise ValueError(f"convert_merges: mode must be 'channel' or 'layer', but got {mode!r}")
    patterns = _exclude_patterns(exclude, "convert_merges")
    names = set(MERGE_BLOCK_NAMES)
    types_: tuple[type, ...] = ()
    for b in blocks:
        if isinstance(b, str):
            names.add(b)
        elif isinstance(b, type):
            types_ += (b,)
        else:
            raise TypeError(f"convert_merges: blocks must hold class names or classes, but got {b!r}")
    _check_not_scripted(model, "convert_merges", "residual additions")
    kwargs = dict(merge_kwargs or {})
    fixed = [k for k in ("num_channels", "num_intervals") if k in kwargs]
    if fixed:
        raise TypeError(
            f"convert_merges: merge_kwargs must not set {fixed}: the channel count is measured, and N is the "
            "num_intervals argument"
        )
    if "channel_dim" in kwargs:  # the same as the argument
        if channel_dim is not None and kwargs["channel_dim"] != channel_dim:
            raise TypeError(
                f"convert_merges: channel_dim={channel_dim!r} and merge_kwargs['channel_dim']="
                f"{kwargs['channel_dim']!r} disagree"
            )
        channel_dim = kwargs.pop("channel_dim")
    if channel_dim is not None and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
        raise TypeError(f"convert_merges: channel_dim must be an int or None, but got {channel_dim!r}")
    if example_input is None:
        example_input = _default_input(model)

    # 1. rewrite every block (deepest first) with Addition stand-ins; undo everything on failure
    found = [
        (name, m)
        for name, m in model.named_modules()
        if (type(m).__name__ in names or isinstance(m, types_)) and not _excluded(name, patterns)
        and not isinstance(m, PWLU2D)
    ]  # fmt: skip
    found.sort(key=lambda item: -(item[0].count(".") + 1 if item[0] else 0))
    undo: list[tuple[str, nn.Module]] = []
    sites: list[tuple[str, Addition, nn.Module]] = []
    root = model
    try:
        for name, block in found:
            rewritten, added = _rewrite(block, name)
            if not added:
                continue
            undo.append((name, block))
            if name:
                _set_submodule(root, name, rewritten)
            else:
                root = rewritten
            prefix = f"{name}." if name else ""
            sites += [(prefix + a, rewritten.get_submodule(a), block) for a in added]
        if not sites:
            warnings.warn(
                f"convert_merges converted nothing in {type(model).__name__}: no residual addition in a block of "
                f"the known classes (pwlu.convert2d.MERGE_BLOCK_NAMES{' or blocks=' if types_ else ''}); "
                "pass blocks=[YourBlock] for other residual blocks",
                stacklevel=2,
            )
            return model
        # 2. measure every merge's shape
        _probe(root, example_input)
        plan = []
        param = next(root.parameters(), None)
        to_kw = dict(device=param.device, dtype=param.dtype) if param is not None and param.is_floating_point() else {}
        never, guessed, numbers = [], [], []
        for name, add, block in sites:
            if not add.shapes:
                (numbers if add.numbers else never).append(name)
                continue
            shapes = set(add.shapes)
            if any(sx != sy for sx, sy in shapes):
                raise ConversionError(
                    f"convert_merges: merge {name!r} adds tensors of different shapes {sorted(shapes)} "
                    "(broadcasting); a PWLU2D needs two inputs of one shape. Exclude its block"
                )
            layer_channels = _layer_channels(block)
            layouts = _layouts(block)
            found_dims = {sx: _channel_dim(sx, layer_channels, layouts) for sx, _ in shapes}
            if channel_dim is None:
                dims = {d for d, _ in found_dims.values()}
                if any(guess for _, guess in found_dims.values()):
                    guessed.append((name, sorted(found_dims), dims))
            else:
                bad = [sx for sx, _ in shapes if not -len(sx) <= channel_dim < len(sx)]
                if bad and mode == "channel":
                    raise ConversionError(
                        f"convert_merges: channel_dim={channel_dim} is not an axis of merge {name!r}'s inputs "
                        f"of shape {bad[0]}"
                    )
                dims = {channel_dim}
            channels = {sx[d] for sx, _ in shapes for d in dims if len(sx) >= 2 and -len(sx) <= d < len(sx)}
            if mode == "channel" and (len(dims) > 1 or len(channels) != 1):
                raise ConversionError(
                    f"convert_merges: merge {name!r} sees inputs of shapes {sorted(s for s, _ in shapes)}, so no "
                    "single channel count fits it (or it has no channel axis); use mode='layer' or exclude it"
                )
            num_channels = channels.pop() if mode == "channel" else None
            new = PWLU2D(num_channels, num_intervals, channel_dim=dims.pop(), **kwargs)
            new.to(**to_kw).train(add.training)
            plan.append((name, new))
    except BaseException:
        for name, block in reversed(undo):
            if name:
                _set_submodule(model, name, block)
        for _, block in undo:  # the original blocks got an Addition attribute each
            for attr, child in list(block.named_children()):
                if isinstance(child, Addition):
                    delattr(block, attr)
        raise
    for _, block in undo:
        for attr, child in list(block.named_children()):
            if isinstance(child, Addition):
                delattr(block, attr)
    for name, new in plan:
        _set_submodule(root, name, new)
    for name in numbers:  # int arguments added (forward(x, H, W): H + W): not a merge
        _restore_addition(root, name)
    for _, add, _ in sites:
        add.shapes = []
    if guessed and mode == "channel":
        warnings.warn(
            "convert_merges: the layers of the blocks do not tell which axis holds the channels of "
            + ", ".join(f"{name!r} (inputs {shapes}, took axis {sorted(dims)})" for name, shapes, dims in guessed)
            + "; pass channel_dim= if that is wrong",
            stacklevel=2,
        )
    if never:
        warnings.warn(
            f"convert_merges: {len(never)} merge(s) were not reached by the example forward pass and stay "
            f"additions: {never}",
            stacklevel=2,
        )
    return root


def _probe(model: nn.Module, example_input: Any) -> None:
    """One forward pass, side-effect free (buffers and the RNG restored)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(model, example_input)):
            _run(model, example_input)
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(
            f"convert_merges: the forward pass with example_input failed ({type(e).__name__}: {e}); "
            "pass an example_input that the model accepts in its current train/eval mode"
        ) from e
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
