"""Channel groups: which channels of a model can be reordered together without changing it.

From the fx graphs of both modes (tracing.py), every conv/linear output starts a group; what
carries channels one for one (norms, activations, pooling, depthwise convs, per-channel scales)
moves with it, and so do its consumers' input columns. Element-wise ops join groups, concats
place them at offsets, channel splits cut layouts. An op whose channel semantics are not known,
a graph output and a parameter read directly refuse the groups that reach them, with a reason.
permutation.py collects the groups, searches and applies the orders (docs/pipeline.md).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from .module_tree import module_aliases
from .registry import is_norm, norm_spec

__all__ = ["ChannelFlow"]


@dataclass(frozen=True)
class _Flow:
    """A tensor's channel axis: segments (group id, or -1 for channels that never move; length),
    where the axis is (1: channels first, -1: last, both for [N, C]), the rank, and whether
    every other dim past the batch is 1 (after global pooling)."""

    segs: tuple[tuple[int, int | None], ...]
    axes: frozenset
    rank: int | None
    unit: bool = False

    @property
    def size(self) -> int | None:
        return None if any(s is None for _, s in self.segs) else sum(s for _, s in self.segs)


_FIXED = _Flow(((-1, None),), frozenset(), None)
_SCALAR = object()
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax)
_SPATIAL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
            nn.ReflectionPad2d, nn.ReplicationPad2d)
_UNARY_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
                    torch.sigmoid, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.mish, F.softplus, F.hardtanh,
                    F.dropout, F.dropout2d, operator.neg, torch.neg, F.softmax, torch.softmax, torch.exp}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float",
                  "half", "bfloat16", "to", "type_as", "detach", "neg", "exp", "softmax", "clamp", "clamp_",
                  "clamp_min", "clamp_min_", "hardtanh_", "div_", "mul_", "add_", "sub_"}
_BINARY = {operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.mul, torch.sub, torch.div, torch.maximum, torch.minimum, torch.where}
_BINARY_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "sub_", "div_", "maximum", "minimum"}
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.interpolate,
                   F.adaptive_avg_pool1d, F.avg_pool1d, F.max_pool1d}
# Results that carry no channel order: shapes, and fresh tensors that are constant or random
# per element (like dropout's mask: stochastic depth's `x.new_empty(size).bernoulli_(p)`).
_SHAPE_ONLY = {"size", "dim", "numel", "new_empty", "new_zeros", "new_ones", "new_full", torch.zeros_like,
               torch.ones_like, torch.rand_like}
# Wrapped functions fx keeps as one call, known by name (their package is not imported here):
# stochastic depth drops whole samples (or the batch), never single channels.
_UNARY_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth", "timm.layers.drop.drop_path"}
_STOCK_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


class _Groups:
    """Union-find over channel groups, with what each group's channels must respect."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.block: list[int] = []  # channels move only within aligned blocks of this size
        self.refused: dict[int, str] = {}

    def new(self, size: int, block: int) -> int:
        self.parent.append(len(self.parent)), self.size.append(size), self.block.append(block)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def refuse(self, g: int, why: str) -> None:
        if g >= 0:
            self.refused.setdefault(self.find(g), why)

    def join(self, a: int, b: int, why: str) -> None:
        if a < 0 or b < 0:
            self.refuse(max(a, b), why + " with channels that do not move")
            return
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] != self.size[b]:
            self.refuse(a, why + " with a group of another size")
            self.refuse(b, why + " with a group of another size")
        self.parent[b] = a
        self.block[a] = math.gcd(self.block[a], self.block[b])
        if b in self.refused:
            self.refused.setdefault(a, self.refused[b])

    def constrain(self, g: int, offset: int, length: int | None, block: int, what: str) -> None:
        if g >= 0 and (length is None or offset % block or length % block):
            self.refuse(g, f"{what} groups channels in blocks of {block} that cut it")
        elif g >= 0:
            self.block[self.find(g)] = math.gcd(self.block[self.find(g)], block)


@dataclass(frozen=True)
class _Attr:
    """A tensor the graph reads with get_attr (a per-channel scale such as ConvNeXt's gamma)."""

    name: str
    tensor: Tensor


def _segments(flow: _Flow):
    """(group, offset, length) of each segment; the offset is None past a segment of unknown size."""
    offset: int | None = 0
    for g, length in flow.segs:
        yield g, offset, length
        offset = None if offset is None or length is None else offset + length


def _qualname(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


def _channel_dim(f: _Flow) -> int | None:
    """The index of the channel axis, when the rank is known."""
    return None if f.rank is None else (1 if 1 in f.axes else f.rank - 1)


def _axes(index: int, rank: int) -> frozenset:
    return frozenset({1} if index == 1 else set()) | frozenset({-1} if index == rank - 1 else set())


def _flows_in(obj: Any) -> list:
    if isinstance(obj, (_Flow, _Attr)):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [f for v in items for f in _flows_in(v)]


class ChannelFlow:
    """Reads the data flow of fx graphs (`read`, once per graph of each mode) into:

    groups: union-find over channel groups (size, block, refused reason per root);
    members: (role, name, offset) -> the groups seen there; role "out" (a layer's weight rows
        and bias), "in" (a layer's input columns), "carry" (a module's per-channel tensors) or
        "param" (a tensor the graph reads; param_dim: along which dim); -1: channels that never move;
    blocked: module or tensor name -> why nothing of it may move.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.canonical = {n: names[0] for names in module_aliases(model).values() for n in names}
        self.tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(
            remove_duplicate=False))}
        self.first_name = {id(t): n for n, t in reversed(self.tensors.items())}  # what apply uses
        self.groups = _Groups()
        self.members: dict[tuple[str, str, int], list[int]] = {}
        self.param_dim: dict[str, int] = {}
        self.blocked: dict[str, str] = {}
        self.read_owners: set[str] = set()  # modules whose tensors the graph reads with get_attr

    def member(self, role: str, name: str, flow: _Flow, what: str) -> None:
        for g, offset, _ in _segments(flow):
            if offset is None:
                self.groups.refuse(g, f"sits after channels of unknown count in '{name}'s input")
            else:  # -1 too: channels that never move pin whatever else passes here
                self.members.setdefault((role, name, offset), []).append(g)

    def refuse(self, args: Any, why: str) -> None:
        for f in _flows_in(args):
            if isinstance(f, _Attr):
                self.blocked.setdefault(f.name, why)
            else:
                for g, _ in f.segs:
                    self.groups.refuse(g, why)

    def value(self, arg: Any, flows: dict) -> Any:
        if isinstance(arg, fx.Node):
            return flows[arg]
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.value(a, flows) for a in arg)
        if isinstance(arg, dict):
            return {k: self.value(v, flows) for k, v in arg.items()}
        return arg

    def read(self, prefix: str, graph: fx.Graph) -> None:
        flows: dict[fx.Node, Any] = {}
        for node in graph.nodes:
            args, kwargs = self.value(node.args, flows), self.value(node.kwargs, flows)
            if node.op == "placeholder":
                flows[node] = _FIXED
            elif node.op == "get_attr":
                name = f"{prefix}.{node.target}" if prefix else node.target
                t = self.tensors.get(name)
                owner = name.rpartition(".")[0]
                self.read_owners.add(self.canonical.get(owner, owner))
                flows[node] = _Attr(self.first_name[id(t)], t) if t is not None else _FIXED
            elif node.op == "output":
                self.refuse(args, "is an output of the traced graph (its order is the caller's)")
            elif node.op == "call_module":
                name = self.canonical[f"{prefix}.{node.target}" if prefix else node.target]
                flows[node] = self.module(name, self.modules[name], args, kwargs)
            else:
                what = getattr(node.target, "__name__", str(node.target))
                flows[node] = self.function(node.op, node.target, what, args, kwargs)

    def unknown(self, what: str, args: Any, kwargs: Any) -> _Flow:
        self.refuse((args, kwargs), f"reaches {what}, whose channel semantics are unknown")
        return _FIXED

    def module(self, name: str, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        f = args[0] if args else None
        what = f"'{name}' ({type(m).__name__})"
        if not isinstance(f, _Flow) or len(args) > 1 or kwargs:
            return self.unknown(what, args, kwargs)
        if isinstance(m, (_ConvNd, nn.Linear)):
            return self.layer(name, m, f, what)
        if isinstance(m, _ACTIVATIONS) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return f
        if isinstance(m, _SPATIAL):
            size = getattr(m, "output_size", None)
            unit = size is not None and all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
            return self.spatial(f, unit, what)
        if isinstance(m, nn.Flatten):
            return self.flatten(f, m.start_dim, m.end_dim, what)
        return self.carried(name, m, f, what)

    def layer(self, name: str, m: nn.Module, f: _Flow, what: str) -> _Flow:
        w = m.weight
        if type(m).forward not in _STOCK_FORWARD or isinstance(w, nn.parameter.UninitializedParameter):
            return self.unknown(f"{what} (its forward or weight is not torch's own)", (f,), {})
        out = w.shape[0]
        if isinstance(m, nn.Linear):
            if -1 not in f.axes and f is not _FIXED:
                return self.unknown(f"{what} with channels not on the last axis", (f,), {})
            self.member("in", name, f, what)
            axes = f.axes or frozenset({-1})
            rank = f.rank
        else:
            if 1 not in f.axes and f is not _FIXED:
                return self.unknown(f"{what} with channels not on axis 1", (f,), {})
            g, cin = m.groups, w.shape[1] * m.groups
            rank = w.dim()
            if g > 1 and g == cin == out:  # depthwise: channel for channel
                self.member("carry", name, f, what)
                return _Flow(f.segs, frozenset({1}), rank)
            if g > 1:
                for gid, offset, length in _segments(f):
                    self.groups.constrain(gid, offset or 0, length, cin // g, f"grouped conv {what}")
            self.member("in", name, f, what)
            axes = _axes(1, rank)
        gid = self.groups.new(out, out // getattr(m, "groups", 1))
        self.members.setdefault(("out", name, 0), []).append(gid)
        return _Flow(((gid, out),), axes, rank)

    def carried(self, name: str, m: nn.Module, f: _Flow, what: str) -> _Flow:
        c = f.size
        if c is None:
            return self.unknown(what, (f,), {})
        tensors = [t for t in (*m.parameters(), *m.buffers()) if t.numel() > 1]
        if isinstance(m, nn.LayerNorm):
            ok = -1 in f.axes and tuple(m.normalized_shape) == (c,)
        elif isinstance(m, nn.GroupNorm):
            ok = 1 in f.axes and m.num_channels == c
            for gid, offset, length in _segments(f):
                self.groups.constrain(gid, offset or 0, length, c // m.num_groups, f"GroupNorm {what}")
        elif isinstance(m, nn.PReLU) or is_norm(m):
            ok = 1 in f.axes and (isinstance(m, nn.PReLU) or norm_spec(m) is not None)
        else:
            return self.unknown(what, (f,), {})
        if not ok or any(t.dim() != 1 or t.shape[0] != c for t in tensors):
            return self.unknown(f"{what} (per-channel state that does not match {c} channels)", (f,), {})
        self.member("carry", name, f, what)
        return f

    def spatial(self, f: _Flow, unit: bool, what: str) -> _Flow:
        if f is not _FIXED and (1 not in f.axes or f.rank is None or f.rank < 3):
            return self.unknown(f"{what} on a tensor whose channels are not on axis 1", (f,), {})
        return f if f is _FIXED else _Flow(f.segs, f.axes, f.rank, unit)

    def flatten(self, f: _Flow, start: int, end: int, what: str) -> _Flow:
        if f is _FIXED:
            return f
        if f.rank is None:
            return self.unknown(f"{what} of a tensor of unknown rank", (f,), {})
        rank, c = f.rank, (1 if 1 in f.axes else f.rank - 1)
        s, e = start % rank, end % rank
        if s >= e:
            return f
        if s <= c <= e and not (s >= 1 and f.unit):
            return self.unknown(f"{what} across the channel axis", (f,), {})
        new_rank = rank - (e - s)
        index = c if c < s else (s if c <= e else c - (e - s))
        return _Flow(f.segs, _axes(index, new_rank), new_rank, f.unit)

    def elementwise(self, operands: list, what: str) -> Any:
        tensors = [f for f in operands if isinstance(f, _Flow)]
        attrs = [a for a in operands if isinstance(a, _Attr)]
        if not tensors:
            return self.unknown(what, attrs, {}) if attrs else _SCALAR
        wide = [f for f in tensors if f.size != 1] or tensors[:1]
        ref = wide[0]
        lengths = [s for _, s in ref.segs]

        def right(f: _Flow) -> set:  # the channel axis, counted from the last dim (broadcasting)
            return ({f.rank - 2} if 1 in f.axes and f.rank else set()) | ({0} if -1 in f.axes else set())

        for f in wide[1:]:
            if [s for _, s in f.segs] != lengths or (f is not _FIXED and ref is not _FIXED
                                                     and not right(f) & right(ref)):
                return self.unknown(f"{what} of tensors whose channel layouts differ", operands, {})
            for (a, _), (b, _) in zip(ref.segs, f.segs):
                self.groups.join(a, b, f"joined by {what}")
        for a in attrs:
            t = a.tensor
            if t.numel() == 1:
                continue
            d = None if ref.rank is None else (1 if 1 in ref.axes else ref.rank - 1) - (ref.rank - t.dim())
            if d is None or d < 0 or ref.size is None or any(
                    s != 1 for i, s in enumerate(t.shape) if i != d) or t.shape[d] not in (1, ref.size):
                return self.unknown(f"{what} with '{a.name}' of shape {tuple(t.shape)}", operands, {})
            if t.shape[d] > 1:
                self.param_dim[a.name] = d
                self.member("param", a.name, ref, what)
        rank = max((f.rank for f in tensors if f.rank is not None), default=None)
        return _Flow(ref.segs, ref.axes, rank, all(f.unit for f in tensors))

    def function(self, op: str, target: Any, what: str, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else None
        if target in _SHAPE_ONLY:  # reads only shape, dtype, device: constants or per-element noise
            return _SCALAR
        if target is getattr:
            return _SCALAR if isinstance(x, _Flow) else self.unknown(f"getattr {args[1]}", args, {})
        if target is operator.getitem:
            if isinstance(x, tuple) and isinstance(args[1], int):
                return x[args[1]]
            return _SCALAR if x is _SCALAR else self.unknown("indexing", args, kwargs)
        if x is _SCALAR and op == "call_method" and not _flows_in((args, kwargs)):
            return _SCALAR  # e.g. stochastic depth's noise.bernoulli_(p).div_(p)
        if not isinstance(x, _Flow) and target not in _BINARY and target not in (torch.cat, torch.concat):
            return self.unknown(f"'{what}'", args, kwargs)
        if op == "call_method" and target in ("to", "type_as"):
            return x
        if (target in _UNARY_FUNCTIONS or target in _BINARY or _qualname(target) in _UNARY_BY_NAME
                or op == "call_method" and target in _UNARY_METHODS | _BINARY_METHODS):
            return self.elementwise([*args, *kwargs.values()], f"'{what}'")
        if target in _POOL_FUNCTIONS:
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            unit = "adaptive" in what and (size == 1 or (isinstance(size, tuple) and set(size) == {1}))
            return self.spatial(x, unit, f"'{what}'")
        if target in (torch.flatten, "flatten"):
            dims = [*args[1:], *kwargs.values()]
            return self.flatten(x, *(list(dims) + [0, -1][len(dims):]), f"'{what}'")
        if target in ("view", "reshape"):
            shape = args[1:] if len(args) != 2 or not isinstance(args[1], (tuple, list)) else args[1]
            if len(shape) == 2 and shape[1] == -1 and x.rank is not None:
                return self.flatten(x, 1, -1, f"'{what}'")
            return self.unknown(f"'{what}'", args, kwargs)
        if target in (torch.permute, "permute"):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if x is _FIXED:
                return x
            if x.rank is not None and len(dims) != x.rank or not all(isinstance(d, int) for d in dims):
                return self.unknown(f"'{what}'", args, kwargs)
            c = 1 if 1 in x.axes else len(dims) - 1
            index = [d % len(dims) for d in dims].index(c)
            return _Flow(x.segs, _axes(index, len(dims)), len(dims), x.unit)
        if target in (torch.transpose, "transpose") and x is not _FIXED and x.rank is not None:
            a, b = (d % x.rank for d in args[1:3])
            c = 1 if 1 in x.axes else x.rank - 1
            index = b if c == a else (a if c == b else c)
            return _Flow(x.segs, _axes(index, x.rank), x.rank, x.unit)
        if target in (torch.mean, "mean", torch.sum, "sum", torch.amax, "amax") and x is not _FIXED:
            return self.reduce(x, args[1] if len(args) > 1 else kwargs.get("dim"),
                               (args[2] if len(args) > 2 else kwargs.get("keepdim", False)) is True, what)
        if target in (torch.cat, torch.concat):
            return self.cat(list(x) if isinstance(x, (tuple, list)) else [],
                            args[1] if len(args) > 1 else kwargs.get("dim", 0), what)
        if target in (torch.chunk, "chunk", torch.split, "split") and x is not _FIXED:
            return self.split(x, target in (torch.chunk, "chunk"), args[1],
                              args[2] if len(args) > 2 else kwargs.get("dim", 0), what)
        return self.unknown(f"'{what}'", args, kwargs)

    def reduce(self, x: _Flow, dims: Any, keepdim: bool, what: str) -> _Flow:
        dims = (dims,) if isinstance(dims, int) else dims
        if x.rank is None or not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
            return self.unknown(f"'{what}'", (x,), {})
        dims = {d % x.rank for d in dims}
        c = 1 if 1 in x.axes else x.rank - 1
        if c in dims:  # a sum, mean or max over channels does not depend on their order
            return _FIXED
        unit = x.unit or dims >= set(range(x.rank)) - {0, c}
        rank = x.rank if keepdim else x.rank - len(dims)
        index = c if keepdim else c - sum(d < c for d in dims)
        return _Flow(x.segs, _axes(index, rank), rank, unit)

    def cat(self, parts: list, dim: Any, what: str) -> _Flow:
        if not parts or not all(isinstance(p, _Flow) for p in parts) or not isinstance(dim, int):
            return self.unknown(f"'{what}'", parts, {})
        on_channels = [p is not _FIXED and p.rank is not None and dim % p.rank == _channel_dim(p)
                       for p in parts]
        if not any(on_channels):
            return self.elementwise(parts, f"'{what}'")
        if not all(on_channels) or len({p.axes for p in parts}) > 1:
            return self.unknown(f"'{what}' of tensors whose channel axes differ", parts, {})
        segs = tuple(s for p in parts for s in p.segs)
        return _Flow(segs, parts[0].axes, parts[0].rank, all(p.unit for p in parts))

    def split(self, x: _Flow, chunk: bool, how: Any, dim: Any, what: str) -> Any:
        if x.rank is None or not isinstance(dim, int) or dim % x.rank != _channel_dim(x):
            count = len(how) if isinstance(how, (list, tuple)) else how if chunk else None
            return (x,) * count if count else self.unknown(f"'{what}'", (x,), {})
        c = x.size
        if c is None:
            return self.unknown(f"'{what}' of channels of unknown count", (x,), {})
        if chunk:
            step = -(-c // how)
            sizes = [min(step, c - i) for i in range(0, c, step)]
        else:
            sizes = [how] * (-(-c // how)) if isinstance(how, int) else list(how)
            sizes[-1] = c - sum(sizes[:-1])
        pieces, segs = [], list(x.segs)
        for size in sizes:
            piece = []
            while size:
                g, length = segs.pop(0)
                if length > size:  # the cut falls inside this group
                    self.groups.refuse(g, f"'{what}' splits it")
                    segs.insert(0, (g, length - size))
                    length = size
                piece.append((g, length))
                size -= length
            pieces.append(_Flow(tuple(piece), x.axes, x.rank, x.unit))
        return tuple(pieces)
