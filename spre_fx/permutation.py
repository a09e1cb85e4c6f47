"""Channel permutation: reorder channels of a dense model, exactly, so that N:M keeps more |w|.

`permute_channels(model, nm)` runs before `prepare`: channel_groups.py finds the channels that
can move together, channel_search.py the order of each group that keeps the most magnitude in
its N:M consumers, and the tensors are permuted in place on the copy, so every parameter keeps
its name and object. The record (`Permutation`) stays on the model; `report` shows it.
docs/pipeline.md "Channel permutation".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .channel_groups import ChannelFlow
from .channel_search import nm_kept, search_permutation
from .config import SpReConfig
from .discovery import discover
from .module_tree import model_copy
from .plan import Treatment, is_prepared
from .tracing import trace_graphs

__all__ = ["ChannelGroup", "PermutedGroup", "Permutation", "find_channel_groups", "apply_permutation",
           "permute_channels", "permute_for", "permutation_of"]

_ATTRIBUTE = "_spre_fx_permutation"


@dataclass(frozen=True)
class PermutedGroup:
    """Channels that move together. kept_before / kept_after / total: Σ|w| that N:M keeps in the
    group's columns of its N:M consumers, before and after, and Σ|w| of those columns."""

    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    applied: bool
    reason: str
    kept_before: float = 0.0
    kept_after: float = 0.0
    total: float = 0.0
    nm_columns: int = 0  # channels × N:M consumers searched


@dataclass(frozen=True)
class Permutation:
    """What `permute_channels` did: every group, the search time, and the N:M it searched for."""

    nm: tuple[int, int]
    groups: tuple[PermutedGroup, ...]
    seconds: float
    nm_channels: int = 0  # Σ input channels of the N:M layers

    @property
    def coverage(self) -> float:
        """Share of the N:M layers' input channels whose order was searched and changed."""
        moved = sum(g.nm_columns for g in self.groups if g.applied)
        return moved / self.nm_channels if self.nm_channels else 0.0

    def share_kept(self, after: bool = True) -> float:
        """Share of the searched columns' Σ|w| that N:M keeps, before or after (a group left as it
        was keeps what it kept before, whatever its search found)."""
        total = sum(g.total for g in self.groups)
        kept = sum(g.kept_after if after and g.applied else g.kept_before for g in self.groups)
        return kept / total if total else 0.0

    def __str__(self) -> str:
        n, m = self.nm
        applied = [g for g in self.groups if g.applied]
        lines = [f"channel permutation for {n}:{m}: {len(applied)} of {len(self.groups)} groups permuted "
                 f"in {self.seconds:.1f} s; N:M keeps {self.share_kept(False):.2%} -> "
                 f"{self.share_kept(True):.2%} of the searched columns' |w|"]
        for g in self.groups:
            what = (f"kept {g.kept_before / g.total:.2%} -> {g.kept_after / g.total:.2%}" if g.total
                    else "no N:M consumer")
            lines.append(f"  {', '.join(g.producers)} ({g.channels} ch): "
                         + (f"{what}; {g.reason}" if g.applied else f"left as is: {g.reason}"))
        return "\n".join(lines)


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that move together: members are (role, name, offset) with role "out" (a layer's
    weight rows and bias), "in" (a layer's input columns), "carry" (a module's per-channel
    tensors) or "param" (a tensor read by the graph; param_dims says along which dim)."""

    size: int
    block: int  # channels move only within aligned blocks of this size
    members: tuple[tuple[str, str, int], ...]
    param_dims: dict
    refused: str  # why the group cannot move ('' when it can)


def find_channel_groups(model: nn.Module, concrete_args: dict[str, Any] | None = None) -> list[ChannelGroup]:
    """The channel groups of `model`, read from its fx graphs in training and in eval mode."""
    found = ChannelFlow(model)
    for graphs in trace_graphs(model, concrete_args, []):
        for prefix, graph in graphs:
            found.read(prefix, graph)
    groups = found.groups
    # One tensor seen at several call sites (or in both modes) moves once: whatever passes it joins.
    for (_, name, _), gids in found.members.items():
        for g in gids[1:]:
            groups.join(gids[0], g, f"'{name}' called with other channels, so it is")
    owners: dict[int, set[str]] = {}
    for name, m in found.modules.items():
        for t in m.parameters(recurse=False):
            owners.setdefault(id(t), set()).add(found.canonical[name])
    tied = {n for names in owners.values() if len(names) > 1 for n in names}
    by_root: dict[int, list[tuple[str, str, int]]] = {}
    for (role, name, offset), gids in found.members.items():
        if max(gids) < 0:
            continue
        gids = sorted(gids, reverse=True)
        why = next((w for b, w in found.blocked.items() if name == b or b.startswith(name + ".")), "")
        if name in tied:
            why = f"'{name}' shares a parameter with another module"
        if role != "param" and name in found.read_owners:
            why = f"'{name}'s tensors are also read directly in the forward"
        if why:
            groups.refuse(gids[0], why)
        by_root.setdefault(groups.find(gids[0]), []).append((role, name, offset))
    return [ChannelGroup(groups.size[r], groups.block[r], tuple(ms), dict(found.param_dim),
                         groups.refused.get(r, "")) for r, ms in sorted(by_root.items())]


def permutation_of(model: nn.Module) -> Permutation | None:
    """The `Permutation` that `permute_channels` left on `model` (prepare and convert keep it)."""
    record = getattr(model, _ATTRIBUTE, None)
    return record if isinstance(record, Permutation) else None


def _columns(layer: nn.Module, offset: int, size: int) -> Tensor:
    """|w| of `layer`'s input channels offset..offset+size, one row per (output, tap) [rows, size];
    a grouped conv's rows see only their own group's channels (zeros elsewhere)."""
    w = layer.weight.detach().abs().float()
    groups = getattr(layer, "groups", 1)
    per, out = w.shape[1], w.shape[0] // groups
    cols = []
    for k in range(offset // per, -(-(offset + size) // per)):
        rows = w[k * out:(k + 1) * out].movedim(1, -1).reshape(-1, per)
        full = rows.new_zeros(rows.shape[0], size)
        lo, hi = max(offset, k * per), min(offset + size, (k + 1) * per)
        full[:, lo - offset:hi - offset] = rows[:, lo - k * per:hi - k * per]
        cols.append(full)
    return torch.cat(cols)


def _search(group: ChannelGroup, layers: dict[str, nn.Module], nm_layers: set[str], n: int, m: int,
            rounds: int, seed: int) -> tuple[Tensor | None, PermutedGroup]:
    """The order of one group's channels (None: leave it), and its record."""
    producers = tuple(sorted({name for role, name, _ in group.members if role == "out"}))
    consumers = sorted({(name, off) for role, name, off in group.members if role == "in"})
    record = dict(channels=group.size, producers=producers, consumers=tuple(c for c, _ in consumers))
    searched = [(name, off) for name, off in consumers if name in nm_layers]
    why = group.refused
    if not why and not searched:
        why = "no N:M layer reads these channels"
    elif not why and (group.size % m or any(off % m for _, off in searched)):
        why = f"its channels do not fill whole groups of M={m} in an N:M layer's input"
    elif not why and group.block % m:
        why = f"its channels may move only within blocks of {group.block}, not a multiple of M={m}"
    if why:
        return None, PermutedGroup(**record, applied=False, reason=why)
    a = torch.cat([_columns(layers[name], off, group.size) for name, off in searched])
    perm = torch.arange(group.size, device=a.device)
    before = after = 0.0
    for start in range(0, group.size, group.block):
        sub = a[:, start:start + group.block]
        sub = sub[sub.any(1)]
        p = search_permutation(sub, n, m, rounds=rounds, seed=seed)
        before, after = before + nm_kept(sub, n, m), after + nm_kept(sub, n, m, p)
        perm[start:start + group.block] = p + start
    total = float(a.sum(dtype=torch.float64))
    stats = dict(kept_before=before, kept_after=after, total=total, nm_columns=group.size * len(searched))
    if after <= before:
        return None, PermutedGroup(**record, applied=False, reason="no order keeps more", **stats)
    return perm, PermutedGroup(**record, applied=True, reason=f"{len(searched)} N:M consumer(s)", **stats)


def _index(t: Tensor, dim: int, offset: int, perm: Tensor) -> Tensor:
    full = torch.arange(t.shape[dim], device=t.device)
    full[offset:offset + perm.numel()] = perm.to(t.device) + offset
    return t.index_select(dim, full)


@torch.no_grad()
def apply_permutation(model: nn.Module, orders: list[tuple[ChannelGroup, Tensor]]) -> None:
    """Permute every tensor of each (group, perm) in place (each keeps its object and name): new
    channel p is old channel perm[p]; `perm` must keep every aligned block of `group.block`."""
    modules = dict(model.named_modules())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for group, perm in orders:
        for role, name, offset in group.members:
            m = modules.get(name)
            if role == "param":
                t = tensors[name]
                t.copy_(_index(t, group.param_dims[name], offset, perm))
            elif role == "carry":  # norms, depthwise convs: every per-channel tensor, along dim 0
                for t in (*m.parameters(), *m.buffers()):
                    if t.numel() > 1:
                        t.copy_(_index(t, 0, offset, perm))
            elif role == "out":
                m.weight.copy_(_index(m.weight, 0, offset, perm))
                if m.bias is not None:
                    m.bias.copy_(_index(m.bias, 0, offset, perm))
            else:  # "in": input columns, group by group for a grouped conv
                w, groups = m.weight, getattr(m, "groups", 1)
                per, out = w.shape[1], w.shape[0] // groups
                full = _index(torch.arange(per * groups, device=w.device), 0, offset, perm)
                for k in range(groups):
                    cols = full[k * per:(k + 1) * per] - k * per
                    w[k * out:(k + 1) * out] = w[k * out:(k + 1) * out].index_select(1, cols)


def permute_channels(
    model: nn.Module,
    nm: tuple[int, int] = (2, 4),
    *,
    inplace: bool = False,
    concrete_args: dict[str, Any] | None = None,
    rounds: int = 12,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """Return `model` with its channels reordered so that N:M keeps more weight magnitude, the
    same function in every mode (a copy unless `inplace=True`). Call it before `prepare`.

    options are the `SpReConfig` fields that choose the N:M layers (include, skip, dense_stem):
    pass `prepare` the same ones. Groups of channels that cannot move are left as they are, with
    a reason; `permutation_of(model)` (and `report` after prepare) says what moved and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"permute_channels expects a torch.nn.Module, found {type(model).__name__}")
    if is_prepared(model):
        raise ValueError("model is already prepared: permute channels before spre_fx.prepare, not after")
    config = SpReConfig(nm=tuple(nm), **options)
    if not inplace:
        model = model_copy(model)
    permute_for(model, config, concrete_args, rounds=rounds, seed=seed)
    return model


def permute_for(
    model: nn.Module,
    config: SpReConfig,
    concrete_args: dict[str, Any] | None = None,
    *,
    rounds: int = 12,
    seed: int = 0,
) -> Permutation:
    """Permute `model`'s channels in place for the N:M layers `config` chooses, and record it.

    The body of `permute_channels`, and what `prepare(..., permute=True)` runs on its copy before
    discovery: the same config then picks the layers that are pruned.
    """
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"channel permutation searches the weights' magnitudes, and {meta[0]} is on the "
                         "meta device: load the weights (to_empty + load_state_dict) first")
    start = time.perf_counter()
    plan = discover(model, config, concrete_args)
    nm_layers = {lp.name for lp in plan.layers if lp.treatment != Treatment.DENSE}
    layers = dict(model.named_modules())
    records, orders = [], []
    for group in find_channel_groups(model, concrete_args):
        perm, record = _search(group, layers, nm_layers, config.n, config.m, rounds, seed)
        if perm is not None:
            orders.append((group, perm))
        records.append(record)
    apply_permutation(model, orders)
    nm_channels = sum(layers[name].weight.shape[1] * getattr(layers[name], "groups", 1) for name in nm_layers)
    record = Permutation(config.nm, tuple(records), time.perf_counter() - start, nm_channels)
    object.__setattr__(model, _ATTRIBUTE, record)
    return record
