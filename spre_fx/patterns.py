"""Pattern discovery: which layers get SpRe, plain N:M or nothing, and why.

The model is traced with torch.fx (in training and in eval mode, so that branches on
`self.training` are both seen) by a tracer that keeps every conv, linear and BatchNorm, and
whatever the registry names, whole. A module that does not trace is replaced by its children,
recursively, and the report says so. Conv→BN pairs are read from data flow, with the
preconditions that make the rewrite safe (the checks `torch.fx.experimental.optimization.fuse`
lacks: a conv or BN module called from more than one place is never paired).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .compare import modes_restored
from .config import SpReConfig
from .registry import is_leaf_class, is_norm, leaf_functions, norm_spec

__all__ = ["LayerPlan", "Plan", "SpReTracer", "discover"]

SPRE, NM, DENSE = "spre", "nm", "dense"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_STOCK_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


@dataclass(frozen=True)
class LayerPlan:
    """What `prepare` does to one conv or linear layer, and why."""

    name: str
    kind: str  # "conv" or "linear"
    treatment: str  # "spre", "nm" or "dense"
    reason: str
    norm: str | None  # the BatchNorm that `convert` folds into this layer
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    config: SpReConfig
    layers: tuple[LayerPlan, ...]
    untraced: tuple[tuple[str, str], ...] = ()  # (module, error) replaced by its children
    stage: str = "prepared"  # "prepared", then "converted"

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)


class SpReTracer(fx.Tracer):
    """fx tracer that keeps convs, linears, norms (BatchNorm subclasses, registered norms such as
    FrozenBatchNorm2d) and registered leaves whole."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=leaf_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear)) or is_norm(m) or is_leaf_class(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


# --------------------------------------------------------------------------- tracing
@dataclass
class _Flow:
    """What the graphs of one mode say about each module."""

    calls: Counter = field(default_factory=Counter)
    attr_reads: Counter = field(default_factory=Counter)
    # module -> the opaque leaf (nn.MultiheadAttention, a registered leaf) it lives inside
    inside: dict[str, str] = field(default_factory=dict)
    first_conv: str | None = None
    # conv name -> (BN name, None) for a candidate pair, or (None, reason) when there is none
    follows: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # module -> another name of it, outside every traced graph: calls through it are not counted
    unseen_alias: dict[str, str] = field(default_factory=dict)
    # norms in eval mode right after `model.train(True)` (mmdet's norm_eval=True, frozen stages)
    idle_norms: set[str] = field(default_factory=set)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def class_name(cls: type) -> str:
    """The shortest public path of a class: `timm.layers.Linear`, `torch.nn.Conv2d`."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        if getattr(sys.modules.get(".".join(parts[:i])), cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (_ConvNd, nn.Linear))


_PLAIN = (type(None), bool, int, float, str)


def _plain_defaults(module: nn.Module) -> dict[str, Any]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and isinstance(p.default, _PLAIN)
    }


def _trace_graphs(
    root: nn.Module, prefix: str, concrete_args: dict[str, Any] | None, failures: list
) -> Iterator[tuple[str, fx.Graph]]:
    """Graphs covering `root`: its own, or, where it does not trace, its children's.

    Optional forward arguments with plain defaults (`activate=True`, `mode='tensor'`) are
    traced at their defaults, the way the parent most likely calls them.
    """
    try:
        args = {**_plain_defaults(root), **(concrete_args or {})}
        yield prefix, SpReTracer().trace(root, concrete_args=args or None)
        return
    except Exception as err:  # fx raises many types; every one means "trace the children"
        failures.append((prefix or "<model>", f"{type(err).__name__}: {err}".splitlines()[0][:200]))
    for name, child in root.named_children():
        if isinstance(child, (_ConvNd, nn.Linear)) or is_norm(child) or is_leaf_class(type(child)):
            continue  # nothing to pair inside a leaf; it is counted as called elsewhere
        yield from _trace_graphs(child, _join(prefix, name), None, failures)


def _describe(node: fx.Node, prefix: str) -> str:
    if node.op == "call_module":
        return f"'{_join(prefix, node.target)}'"
    if node.op in ("call_function", "call_method"):
        return f"'{getattr(node.target, '__name__', node.target)}'"
    return f"'{node.op}'"


# Tensor metadata: reading it (`self.proj.weight.dtype`, timm's XCiT) does not use the values.
_METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda", "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "numel"})


def _reads_values(node: fx.Node) -> bool:
    """Whether a get_attr node's tensor is used for more than its dtype, device or shape."""
    for user in node.users:
        if user.op == "call_function" and user.target is getattr and user.args[1] in _METADATA_ATTRS:
            continue
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        return True
    return False


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name a module is registered under -> its first name (the one `named_modules` keeps)."""
    first: dict[int, str] = {}
    names = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names[name] = first.setdefault(id(mod), name)
    return names


def _read_flow(model: nn.Module, graphs: list[tuple[str, fx.Graph]], canonical: dict[str, str]) -> _Flow:
    """Calls, reads and conv→BN candidates, per module object (every alias counts as its first name)."""
    flow = _Flow()
    modules = dict(model.named_modules())
    for prefix, graph in graphs:
        for node in graph.nodes:
            if node.op == "get_attr" and _reads_values(node):
                owner = _join(prefix, node.target).rpartition(".")[0]
                flow.attr_reads[canonical.get(owner, owner)] += 1
            if node.op != "call_module":
                continue
            name = canonical[_join(prefix, node.target)]
            flow.calls[name] += 1
            mod = modules[name]
            if not _is_layer(mod) and not is_norm(mod):
                # fx does not see how it uses them
                for sub, _ in mod.named_modules(prefix=name, remove_duplicate=False):
                    if sub != name:
                        flow.inside.setdefault(canonical[sub], name)
            if not isinstance(mod, _ConvNd):
                continue
            if not prefix:  # only a trace of the whole model knows which conv runs first
                flow.first_conv = flow.first_conv or name
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                bn_name = canonical[_join(prefix, users[0].target)]
                if is_norm(modules.get(bn_name)):
                    if users[0].args == (node,) and not users[0].kwargs:
                        flow.follows[name] = (bn_name, None)
                    else:
                        flow.follows[name] = (None, f"BatchNorm '{bn_name}' takes more than its output")
                    continue
            if not users:
                why = "its output is unused in the traced forward"
            elif len(users) == 1:
                why = f"no BatchNorm follows (its output goes to {_describe(users[0], prefix)})"
            else:
                why = "its output has other users than a BatchNorm (" + ", ".join(
                    _describe(u, prefix) for u in users) + ")"
            flow.follows[name] = (None, why)
    return flow


_CONTAINERS = (list, dict, set)


@contextmanager
def _attributes_restored(model: nn.Module) -> Iterator[None]:
    """Undo every attribute write of a block on `model`'s modules (and in-place changes to the
    lists, dicts and sets they hold): fx runs forwards with Proxies, and a module that caches on
    its first call (torchvision's MultiScaleRoIAlign: `scales`, `map_levels`) would keep them.
    Shallow: no tensor is copied."""
    saved = []
    for mod in model.modules():
        attrs = vars(mod)
        contents = [(v, copy.copy(v)) for v in attrs.values() if type(v) in _CONTAINERS]
        saved.append((attrs, dict(attrs), contents))
    try:
        yield
    finally:
        for attrs, before, contents in saved:
            for key in [k for k in attrs if k not in before]:
                del attrs[key]
            attrs.update(before)
            for container, items in contents:
                if isinstance(container, list):
                    container[:] = items
                else:
                    container.clear()
                    container.update(items)


def _proxy_in(obj: Any, seen: set[int]) -> bool:
    if isinstance(obj, fx.Proxy):
        return True
    if id(obj) in seen or not isinstance(obj, (list, tuple, dict, set, frozenset)):
        return False
    seen.add(id(obj))
    return any(_proxy_in(v, seen) for v in (obj.values() if isinstance(obj, dict) else obj))


def _check_no_proxies(model: nn.Module) -> None:
    """Raise if tracing left an fx Proxy anywhere a forward would find it."""
    seen: set[int] = set()
    for name, mod in model.named_modules():
        for key, value in vars(mod).items():
            if key not in ("_parameters", "_buffers", "_modules") and _proxy_in(value, seen):
                raise RuntimeError(
                    f"tracing left an fx Proxy in '{_join(name, key)}' ({class_name(type(mod))}), "
                    "which its next forward would use: register the module with "
                    "spre_fx.register_leaf_module so fx does not run its forward"
                )


def _unseen_aliases(canonical: dict[str, str], prefixes: list[str]) -> dict[str, str]:
    """Modules known by several names, one of which no traced graph covers."""
    counts = Counter(canonical.values())
    traced = tuple(prefixes)
    return {
        first: alias
        for alias, first in canonical.items()
        if counts[first] > 1
        and not any(not p or alias == p or alias.startswith(p + ".") for p in traced)
    }


def _flows(model: nn.Module, concrete_args, failures) -> list[_Flow]:
    """One `_Flow` per mode (training, eval); the model's modes and attributes are restored."""
    flows = []
    canonical = _canonical_names(model)
    with _attributes_restored(model), modes_restored(model):
        for training in (True, False):
            model.train(training)
            graphs = list(_trace_graphs(model, "", concrete_args, failures if training else []))
            flow = _read_flow(model, graphs, canonical)
            flow.unseen_alias = _unseen_aliases(canonical, [p for p, _ in graphs])
            if training:
                flow.idle_norms = {n for n, m in model.named_modules() if is_norm(m) and not m.training}
            flows.append(flow)
    _check_no_proxies(model)
    return flows


# --------------------------------------------------------------------------- decisions
def _pair(conv: str, flows: list[_Flow], modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """The BatchNorm `conv` may be paired with in every mode, else None and the reason."""
    bn = None
    for flow in flows:
        if flow.calls[conv] == 0:
            continue  # not called in this mode (e.g. an auxiliary head in eval)
        if flow.calls[conv] > 1:
            return None, f"called from {flow.calls[conv]} places in the forward"
        cand, why = flow.follows.get(conv, (None, "never called in the traced forward"))
        if cand is None:
            return None, why
        if flow.calls[cand] > 1:
            return None, f"its BatchNorm '{cand}' is called from {flow.calls[cand]} places"
        for mod in (conv, cand):
            if mod in flow.unseen_alias:
                return None, (f"'{mod}' is also registered as '{flow.unseen_alias[mod]}', "
                              "where fx does not see how it is called")
            if mod in flow.inside:
                return None, f"'{mod}' is also used inside '{flow.inside[mod]}', which fx does not enter"
        if flow.attr_reads[conv] or flow.attr_reads[cand]:
            return None, "its parameters are read directly elsewhere in the forward"
        if bn is not None and cand != bn:
            return None, f"feeds '{bn}' in training but '{cand}' in eval mode"
        bn = cand
    if bn is None:
        if any(f.calls[conv] for f in flows):
            return None, "never called in the traced forward"
        return None, "not seen by fx (inside a module that does not trace or a registered leaf)"
    norm, layer = modules[bn], modules[conv]
    if norm_spec(norm) is None:
        return None, (
            f"{class_name(type(norm))} '{bn}' overrides forward; declare how it splits with "
            "spre_fx.register_norm"
        )
    if not isinstance(layer, _CONVS):
        return None, f"{class_name(type(layer))} is not folded"
    base = next(c for c in _CONVS if isinstance(layer, c))
    other_dims = [n for c, n in _NORM_FOR_CONV.items() if c is not base]
    if isinstance(norm, tuple(other_dims)):  # dimension-agnostic norms (SyncBN, _BatchNormXd) pass
        return None, f"'{bn}' ({class_name(type(norm))}) does not match a {base.__name__}"
    if getattr(norm, "running_mean", None) is None:
        return None, f"'{bn}' keeps no running statistics, so it cannot be folded"
    if norm.running_mean.numel() != layer.out_channels:
        return None, f"'{bn}' has {norm.running_mean.numel()} features, the conv {layer.out_channels} outputs"
    return bn, ""


def _frozen(conv: nn.Module, bn: str, norm: nn.Module, flows: list[_Flow]) -> str:
    """Why a conv→BN pair gets no SpRe branch because something in it does not train ('' if all does).

    The branch adds a trainable weight and its own BatchNorm: on a conv whose weight is frozen it
    would add a fixed random term to the frozen features, and it needs a BatchNorm that trains.
    """
    tail = "SpRe's branch needs a BatchNorm that trains; plain N:M, folded at convert"
    if not conv.weight.requires_grad:
        return f"weight does not train (frozen, requires_grad=False): plain N:M, '{bn}' folded at convert"
    if norm_spec(norm).frozen:
        return f"BatchNorm '{bn}' is frozen ({type(norm).__qualname__}): {tail}"
    if any(bn in f.idle_norms for f in flows):
        return (f"BatchNorm '{bn}' stays in eval mode while the model trains (mmdet: norm_eval=True): "
                f"{tail} (norm_eval=False gets one)")
    if any(not p.requires_grad for p in (norm.weight, norm.bias) if p is not None):
        return f"BatchNorm '{bn}' is frozen (its affine parameters have requires_grad=False): {tail}"
    return ""


def _nm_blocker(name: str, m: nn.Module, config: SpReConfig, stem: str | None, shared: set[str]) -> str:
    """Why `m` cannot be N:M ('' when it can)."""
    if not isinstance(m, (*_CONVS, nn.Linear)):
        return f"{class_name(type(m))}: only Conv1d/2d/3d and Linear are made N:M"
    if type(m).forward not in _STOCK_FORWARD:
        return (
            f"{class_name(type(m))} overrides forward, so its effective weight may differ from "
            "`weight` (weight standardisation, dynamic padding): left dense"
        )
    if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
        return "matches a skip pattern"
    if config.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return "matches no include pattern"
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return "lazy module not yet initialised: run one forward before prepare"
    if not m.weight.is_floating_point():
        return f"weight dtype {m.weight.dtype} is not floating point"
    if name in shared:
        return "its weight is shared with another module (tied weights)"
    if name == stem and config.dense_stem:
        return "first conv of the network (stem) kept dense (docs/method.md §5); dense_stem=False changes it"
    c = m.weight.shape[1]
    if c == 0 or m.weight.shape[0] == 0:
        return f"empty weight {tuple(m.weight.shape)}: nothing to make N:M"
    if isinstance(m, _ConvNd) and c == 1 and m.groups > 1:
        return (
            "depthwise conv: one input channel per group, no channel run to group "
            "(grouping across taps is not hardware N:M, docs/method.md §1)"
        )
    if c % config.m:
        per = "in-channels per group" if isinstance(m, _ConvNd) else "in_features"
        return f"{per} ({c}) is not a multiple of M={config.m}"
    return ""


def _hidden_use(name: str, flows: list[_Flow]) -> str:
    """Why masking `name`'s forward would not reach every use of its weight ('' when it would)."""
    for flow in flows:
        if flow.attr_reads[name]:
            return (
                "its weight is read directly in the forward (e.g. F.linear(x, self.fc.weight)), "
                "where an N:M mask on the layer's own forward would not reach it: left dense"
            )
        if name in flow.inside and not flow.calls[name]:
            return (
                f"inside '{flow.inside[name]}', which fx does not enter (e.g. nn.MultiheadAttention "
                "reads its out_proj.weight directly): its use of this layer is unknown, left dense"
            )
    return ""


def _tied_weights(model: nn.Module) -> set[str]:
    """Names of the modules holding a parameter that another module object holds too.

    One module object under several names (mmdet's `share_conv`) is not tied: its own forward,
    where the mask lives, computes every use of its weight.
    """
    owners: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)][id(mod)].append(mod_name)
    return {n for by_module in owners.values() if len(by_module) > 1 for names in by_module.values()
            for n in names}


def discover(model: nn.Module, config: SpReConfig, concrete_args: dict[str, Any] | None = None) -> Plan:
    """Decide, for every conv and linear of `model`, its treatment and the reason for it."""
    failures: list[tuple[str, str]] = []
    flows = _flows(model, concrete_args, failures)
    modules = dict(model.named_modules())
    stem = flows[0].first_conv or next((n for n, m in modules.items() if isinstance(m, _ConvNd)), None)
    shared = _tied_weights(model)
    layers = []
    for name, m in modules.items():
        if not _is_layer(m):
            continue
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        shape = tuple(m.weight.shape) if not isinstance(m.weight, nn.parameter.UninitializedParameter) else ()
        blocker = _nm_blocker(name, m, config, stem, shared) or _hidden_use(name, flows)
        bn, no_pair = (None, "") if kind == "linear" or name in shared else _pair(name, flows, modules)
        if kind == "conv" and name in shared:
            no_pair = "its weight is shared with another module"
        if blocker and isinstance(m, _CONVS) and type(m).forward not in _STOCK_FORWARD:
            bn = None  # an unknown forward: folding a BN into its `weight` would be wrong too
        spatial = kind == "conv" and max(m.kernel_size) > 1
        k_by_k = spatial and isinstance(m, nn.Conv2d)
        if blocker:
            treatment, reason = DENSE, blocker
        elif kind == "linear":
            treatment, reason = NM, "linear layer: plain N:M"
        elif bn is not None and k_by_k and config.spre:
            frozen = _frozen(m, bn, modules[bn], flows)
            treatment = NM if frozen else SPRE
            reason = f"no SpRe branch: {frozen}" if frozen else f"k×k conv followed by BatchNorm '{bn}'"
        elif bn is not None and k_by_k:
            treatment, reason = NM, "spre=False: plain N:M (SR-STE)"
        elif bn is not None and spatial:
            conv = next(c for c in _CONVS if isinstance(m, c)).__name__
            treatment, reason = NM, (
                f"{'x'.join(map(str, m.kernel_size))} {conv} followed by BatchNorm '{bn}': plain N:M, "
                "SpRe branches are Conv2d-only (the BatchNorm is folded at convert)"
            )
        elif bn is not None:
            treatment, reason = NM, f"{'x'.join(map(str, m.kernel_size))} conv: plain N:M (docs/method.md §3)"
        elif k_by_k and config.spre:
            treatment, reason = NM, f"no SpRe branch: {no_pair}"
        else:
            treatment, reason = NM, "plain N:M" + (f" ({no_pair})" if no_pair else "")
        layers.append(LayerPlan(name, kind, treatment, reason, bn, shape))
    return Plan(config, tuple(layers), tuple(failures))
