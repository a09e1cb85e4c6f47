"""Pattern discovery: which layers get SpRe, plain N:M or nothing, and why.

The model is traced with torch.fx (in training and in eval mode, so that branches on
`self.training` are both seen) by a tracer that keeps every conv, linear and BatchNorm, and
whatever the registry names, whole. A module that does not trace is replaced by its children,
recursively, and the report says so. Conv→BN pairs are read from data flow, with the
preconditions that make the rewrite safe (the checks `torch.fx.experimental.optimization.fuse`
lacks: a conv or BN module called from more than one place is never paired).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections import Counter, defaultdict
from collections.abc import Iterator
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
    # norms in eval mode right after `model.train(True)` (mmdet's norm_eval=True, frozen stages)
    idle_norms: set[str] = field(default_factory=set)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


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


def _read_flow(model: nn.Module, graphs: list[tuple[str, fx.Graph]]) -> _Flow:
    flow = _Flow()
    modules = dict(model.named_modules())
    for prefix, graph in graphs:
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = _join(prefix, node.target).rpartition(".")[0]
                flow.attr_reads[owner] += 1
            if node.op != "call_module":
                continue
            name = _join(prefix, node.target)
            flow.calls[name] += 1
            mod = modules.get(name)
            if not _is_layer(mod) and not is_norm(mod):
                for sub, _ in mod.named_modules(prefix=name):  # fx does not see how it uses them
                    if sub != name:
                        flow.inside.setdefault(sub, name)
            if not isinstance(mod, _ConvNd):
                continue
            if not prefix:  # only a trace of the whole model knows which conv runs first
                flow.first_conv = flow.first_conv or name
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                bn_name = _join(prefix, users[0].target)
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


def _flows(model: nn.Module, concrete_args, failures) -> list[_Flow]:
    """One `_Flow` per mode (training, eval); the model's modes are restored afterwards."""
    flows = []
    with modes_restored(model):
        for training in (True, False):
            model.train(training)
            graphs = list(_trace_graphs(model, "", concrete_args, failures if training else []))
            flows.append(_read_flow(model, graphs))
            if training:
                flows[-1].idle_norms = {n for n, m in model.named_modules() if is_norm(m) and not m.training}
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
            f"{type(norm).__qualname__} '{bn}' overrides forward; declare how it splits with "
            "spre_fx.register_norm"
        )
    if not isinstance(layer, _CONVS):
        return None, f"{type(layer).__name__} is not folded"
    base = next(c for c in _CONVS if isinstance(layer, c))
    other_dims = [n for c, n in _NORM_FOR_CONV.items() if c is not base]
    if isinstance(norm, tuple(other_dims)):  # dimension-agnostic norms (SyncBN, _BatchNormXd) pass
        return None, f"'{bn}' ({type(norm).__name__}) does not match a {base.__name__}"
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
        return f"{type(m).__name__}: only Conv1d/2d/3d and Linear are made N:M"
    if type(m).forward not in _STOCK_FORWARD:
        return (
            f"{type(m).__qualname__} overrides forward, so its effective weight may differ from "
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
        return "first conv of the network (stem) kept dense (SPRE.md §5); dense_stem=False changes it"
    c = m.weight.shape[1]
    if isinstance(m, _ConvNd) and c == 1 and m.groups > 1:
        return (
            "depthwise conv: one input channel per group, no channel run to group "
            "(grouping across taps is not hardware N:M, SPRE.md §1)"
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


def _shared_weights(model: nn.Module) -> set[str]:
    owners: dict[int, set[str]] = defaultdict(set)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)].add(mod_name)
    shared = set()
    for names in owners.values():
        if len(names) > 1:
            shared |= names
    return shared


def _aliased_modules(model: nn.Module) -> set[str]:
    """Names of modules registered under more than one name (treated as shared)."""
    seen: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        seen[id(mod)].append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def discover(model: nn.Module, config: SpReConfig, concrete_args: dict[str, Any] | None = None) -> Plan:
    """Decide, for every conv and linear of `model`, its treatment and the reason for it."""
    failures: list[tuple[str, str]] = []
    flows = _flows(model, concrete_args, failures)
    modules = dict(model.named_modules())
    stem = flows[0].first_conv or next((n for n, m in modules.items() if isinstance(m, _ConvNd)), None)
    shared = _shared_weights(model) | _aliased_modules(model)
    layers = []
    for name, m in modules.items():
        if not _is_layer(m):
            continue
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        shape = tuple(m.weight.shape) if not isinstance(m.weight, nn.parameter.UninitializedParameter) else ()
        blocker = _nm_blocker(name, m, config, stem, shared) or _hidden_use(name, flows)
        bn, no_pair = (None, "") if kind == "linear" or name in shared else _pair(name, flows, modules)
        if kind == "conv" and name in shared:
            no_pair = "module or weight shared under several names"
        if blocker and isinstance(m, _CONVS) and type(m).forward not in _STOCK_FORWARD:
            bn = None  # an unknown forward: folding a BN into its `weight` would be wrong too
        k_by_k = isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1
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
        elif bn is not None:
            treatment, reason = NM, f"{'x'.join(map(str, m.kernel_size))} conv: plain N:M (SPRE.md §3)"
        elif k_by_k and config.spre:
            treatment, reason = NM, f"no SpRe branch: {no_pair}"
        else:
            treatment, reason = NM, "plain N:M" + (f" ({no_pair})" if no_pair else "")
        layers.append(LayerPlan(name, kind, treatment, reason, bn, shape))
    return Plan(config, tuple(layers), tuple(failures))
