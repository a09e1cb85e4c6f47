"""Tracing: what the fx graphs of a model, in training and in eval mode, say about its modules.

`SpReTracer` keeps every conv, linear and norm, and whatever the registry names, whole. A module
that does not trace is replaced by its children, recursively. Tracing leaves no mark on the
model: attributes a forward writes while running on Proxies are put back (docs/pipeline.md).
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from .module_tree import class_name, modes_restored
from .registry import is_leaf_class, is_norm, leaf_functions

__all__ = ["SpReTracer", "ModeFlow", "is_layer", "trace_flows", "trace_graphs"]


class SpReTracer(fx.Tracer):
    """fx tracer that keeps convs, linears, norms (BatchNorm subclasses, registered norms such as
    FrozenBatchNorm2d) and registered leaves whole."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=leaf_functions())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (_ConvNd, nn.Linear)) or is_norm(m) or is_leaf_class(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def is_layer(m: nn.Module) -> bool:
    """A conv or linear: what spre_fx plans."""
    return isinstance(m, (_ConvNd, nn.Linear))


@dataclass
class ModeFlow:
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


def _read_flow(model: nn.Module, graphs: list[tuple[str, fx.Graph]], canonical: dict[str, str]) -> ModeFlow:
    """Calls, reads and conv→BN candidates, per module object (every alias counts as its first name)."""
    flow = ModeFlow()
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
            if not is_layer(mod) and not is_norm(mod):
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


def trace_flows(model: nn.Module, concrete_args: dict[str, Any] | None, failures: list) -> list[ModeFlow]:
    """One `ModeFlow` per mode (training, eval); the model's modes and attributes are restored.

    `failures` receives (module, fx error) for every module traced through its children.
    """
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


def trace_graphs(
    model: nn.Module, concrete_args: dict[str, Any] | None, failures: list
) -> list[list[tuple[str, fx.Graph]]]:
    """The graphs covering `model` in training, then in eval mode: (module prefix, graph) each.

    For passes that read data flow themselves (channel permutation); as with `trace_flows`, the
    model's modes and attributes are restored and `failures` receives the modules traced
    through their children.
    """
    modes = []
    with _attributes_restored(model), modes_restored(model):
        for training in (True, False):
            model.train(training)
            modes.append(list(_trace_graphs(model, "", concrete_args, failures if training else [])))
    _check_no_proxies(model)
    return modes
