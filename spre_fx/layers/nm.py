"""Plain N:M train-time layers: the user's conv or linear with its weight seen through an N:M mask.

`NMLayer` owns a layer's masks: it computes them from the dense latent weight, keeps them in
bool buffers (so checkpoints hold them), holds them when the user or a `MaskScheduler` says so,
and applies them with SR-STE's gradient (docs/method.md §1). Each layer *adopts* the user's
module: same attributes, same parameter and buffer objects under the same names, so dense
checkpoints load and the user's forward, which calls the module by attribute, keeps running.
Everything spre_fx adds besides its buffers lives in one attribute, `layer.spre_fx`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..masks import nm_mask, nm_masks, pruned_indicator, srste_pruned
from ..module_tree import adopt

__all__ = [
    "LayerState",
    "MaskStep",
    "NMLayer",
    "NMConv1d",
    "NMConv2d",
    "NMConv3d",
    "NMLinear",
    "NM_CLASSES",
    "effective_weight",
    "masks_of",
    "freeze_masks",
    "update_layer_masks",
    "scheduled_updates",
    "write_nm_masks",
]

# The tensors and children spre_fx adds to an adopted module; `to_original` removes them again.
_ADDED_TENSORS = ("nm_mask", "spatial_mask", "weight_rep")
_ADDED_CHILDREN = ("rep",)
STATE = "spre_fx"


@dataclass
class LayerState:
    """spre_fx's state on one adopted layer, in one attribute (`layer.spre_fx`): nothing spre_fx
    keeps can clobber an attribute of the user's class, and convert removes this one only.

    frozen: masks held by the user (`freeze_masks`); scheduled: moved by a `MaskScheduler` only;
    dense_warmup: the scheduler holds the N:M mask all-ones. mask_key: what identifies the weight
    the stored masks were computed from (None: unknown). caches: float masks derived from the
    bool buffers, rebuilt on demand, and the spatial mask kernel's hint (speed only).
    """

    original: type
    n: int
    m: int
    decay: float
    frozen: bool = False
    scheduled: bool = False
    dense_warmup: bool = False
    mask_key: tuple | None = None
    caches: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    @property
    def held(self) -> bool:
        """Whether the masks are held still on purpose (frozen, or moved by a scheduler only)."""
        return self.frozen or self.scheduled


@dataclass(frozen=True)
class MaskStep:
    """What one scheduled mask update changed in a layer (`scheduled_updates`).

    Counts are 0-dim int64 tensors on the masks' device (a plain 0 where nothing moved), so
    tracking them makes the host wait for nothing; `sparsity` reads one back.
    """

    nm_flips: Tensor | int
    nm_total: int
    spatial_changes: Tensor | int
    nm_kept: Tensor
    numel: int

    @property
    def sparsity(self) -> float:
        """Share of the N:M mask that is pruned (1 − kept/numel); reads the count (a sync on GPU)."""
        return 1.0 - int(self.nm_kept) / self.numel


def weight_key(weight: Tensor) -> tuple[int, int, int]:
    """What identifies the weight a mask was computed from: object, version counter and storage.

    The version counter alone is not enough: a copy (deepcopy, pickle) restarts it at 0. The
    storage address catches `param.data = ...` (and `.to()`, which does that).
    """
    ptr = weight.data_ptr() if type(weight) in (Tensor, nn.Parameter) else 0
    return id(weight), weight._version, ptr


class NMLayer:
    """N:M view of `self.weight`: mask in a buffer, SR-STE gradient, masks that follow the weight.

    Masks follow the dense latent weight unless they are held on purpose (`spre_fx.frozen`,
    `spre_fx.scheduled`, `spre_fx.dense_warmup`, see `LayerState`). Otherwise every forward
    (training and eval) recomputes the masks when the weight changed since they were computed,
    so a plain loop gets SR-STE's one update per step, and `current_masks()` (what `convert`
    folds) computes fresh ones without writing. A copy (deepcopy, pickle) is driven by no
    scheduler: it keeps `frozen` and follows its own weights otherwise. A state dict that brings
    a weight but not its masks (a dense checkpoint) recomputes them at once, whatever holds them;
    one that brings masks keeps them bit for bit.
    """

    weight: nn.Parameter
    spre_fx: LayerState
    mask_names: tuple[str, ...] = ("nm_mask",)

    @classmethod
    def adopt(cls, module: nn.Module, n: int, m: int, decay: float) -> NMLayer:
        """The train-time form of `module` (sharing its state), N:M with SR-STE decay `decay`."""
        new = adopt(cls, module)
        new.init_masks(type(module), n, m, decay)
        return new

    def init_masks(self, original: type, n: int, m: int, decay: float) -> None:
        """Start spre_fx's state and the N:M mask of the current weight (`adopt` calls it)."""
        object.__setattr__(self, STATE, LayerState(original, n, m, decay))
        self.register_buffer("nm_mask", nm_mask(self.weight, n, m))
        self.spre_fx.mask_key = weight_key(self.weight)

    def to_original(self) -> nn.Module:
        """The user's class again, on the same state, without anything spre_fx added."""
        plain = adopt(self.spre_fx.original, self)
        plain.__dict__.pop(STATE, None)
        for name in _ADDED_TENSORS:
            plain._parameters.pop(name, None)
            plain._buffers.pop(name, None)
            plain._non_persistent_buffers_set.discard(name)
        for name in _ADDED_CHILDREN:
            plain._modules.pop(name, None)
        return plain

    def __setstate__(self, state: dict) -> None:
        # deepcopy, copy.copy and unpickling come here: the copy's parameters are new objects
        # whose version counters restart at 0, and no scheduler drives the copy.
        super().__setstate__(state)
        own = self.spre_fx
        object.__setattr__(self, STATE, LayerState(own.original, own.n, own.m, own.decay, own.frozen))

    # ------------------------------------------------------------------ masks
    def masks_from_weight(self) -> dict[str, Tensor]:
        """The masks computed from the current weight now (new tensors; nothing is written)."""
        return {"nm_mask": nm_mask(self.weight, *self.spre_fx.nm)}

    def masks_current(self) -> bool:
        """Whether the stored masks were computed from the weight as it is now."""
        return self.spre_fx.mask_key == weight_key(self.weight)

    def current_masks(self) -> dict[str, Tensor]:
        """The masks this layer computes with now: the stored ones when held or up to date, else
        the ones of the current weight, computed out of place (`convert` must not write)."""
        if self.spre_fx.held or self.masks_current():
            return {name: getattr(self, name) for name in self.mask_names}
        return self.masks_from_weight()

    def update_masks(self, which: tuple[str, ...] | None = None) -> None:
        """Recompute the masks named in `which` (default: all) from the dense latent weight, in
        place; during a dense warm-up the N:M mask stays all-ones."""
        update_layer_masks([(self, which)])

    def write_mask(self, name: str) -> None:
        """Recompute mask `name` from the current weight into its buffer (no warm-up rule)."""
        nm_mask(self.weight, *self.spre_fx.nm, out=self.nm_mask)

    @classmethod
    def write_masks(cls, layers: Sequence[NMLayer], name: str) -> None:
        """`layer.write_mask(name)` for each of `layers` (instances of `cls`), in grouped calls
        where the mask is spre_fx's own; a subclass overriding `write_mask` gets it called."""
        if name == "nm_mask" and cls.write_mask is NMLayer.write_mask:
            write_nm_masks(layers)
        else:
            for layer in layers:
                layer.write_mask(name)

    def sync_masks(self) -> None:
        """Bring the stored masks up to date with the weight, unless they are held (what every
        forward does first)."""
        if self.spre_fx.held:
            return
        if torch.compiler.is_compiling():
            # A compiled graph cannot branch on the version counter (it would be read once, at
            # trace time): recompute, which gives the same masks when the weight has not moved.
            for name in self.mask_names:
                self.write_mask(name)
        elif not self.masks_current():
            self.update_masks()

    def freeze_masks(self, frozen: bool = True) -> None:
        """Hold the masks in force now (brought up to date with the weight first, unless a
        scheduler already holds them), or release them (`frozen=False`)."""
        if frozen:
            self.sync_masks()
        self.spre_fx.frozen = bool(frozen)

    # ------------------------------------------------------------------ what a scheduler calls
    def attach_schedule(self) -> None:
        """From now on only `scheduled_update` moves the masks; those in force are kept."""
        self.sync_masks()
        self.spre_fx.scheduled = True

    @torch.no_grad()
    def set_dense_warmup(self, dense: bool) -> None:
        """Enter (all-ones N:M mask) or leave a scheduler's dense warm-up."""
        state = self.spre_fx
        if dense and not state.dense_warmup:
            self.nm_mask.fill_(True)
            state.mask_key = None
        state.dense_warmup = dense

    def scheduled_update(self, nm: bool, spatial: bool, *, track: bool = False) -> MaskStep | None:
        """One scheduled update: recompute the N:M mask (`nm`, which ends a dense warm-up) and the
        spatial one (`spatial`, SpRe layers), unless frozen. With `track`, what changed."""
        return scheduled_updates([self], nm, spatial, track=track)[0]

    def detach_schedule(self, freeze: bool) -> None:
        """The scheduler lets go: the masks in force stay frozen (`freeze`, when the schedule fixed
        them for good) or follow the weight again; a dense warm-up ends."""
        if freeze:
            self.spre_fx.frozen = True  # while still scheduled: the masks in force, as they are
        self.set_dense_warmup(False)
        self.spre_fx.scheduled = False

    # ------------------------------------------------------------------ state dicts, caches
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # torch's per-module load step (as BatchNorm overrides it): a weight arriving without its
        # masks (a dense checkpoint, strict=False) gets the masks of the loaded weight at once.
        brings_weight = prefix + "weight" in state_dict
        lacking = [name for name in self.mask_names if prefix + name not in state_dict]
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.spre_fx.mask_key = None  # loaded masks are kept as they are; free layers re-check them
        if brings_weight and lacking and len(error_msgs) == errors:
            self.update_masks(tuple(lacking))

    def cached(self, name: str, sources: tuple[Tensor, ...], make) -> Tensor:
        """`make(out)` (a float tensor derived from the bool mask buffers), cached until a source
        buffer is written, replaced or moved, or the weight's dtype changes.

        Masks move at most once per optimizer step while the weight is read at every forward;
        float masks also multiply an order of magnitude faster than bool ones on CPU. When they
        move, the new one is written into the old tensor (`out`; None: a new one) unless a live
        autograd graph still saved it: a layer-sized tensor on fresh memory costs more than its
        fill. Under torch.compile the graph computes (and fuses) the cast itself.
        """
        if torch.compiler.is_compiling():
            return make(None)
        key = (self.weight.dtype, self.weight.device, *(t._version for t in sources))
        caches = self.spre_fx.caches
        entry = caches.get(name)
        if entry is None or entry[1] != key or any(a is not b for a, b in zip(entry[0], sources)):
            old = entry[2] if entry is not None else None
            reusable = (old is not None and old.dtype == self.weight.dtype and old.device == sources[0].device
                        and old.shape == sources[0].shape and _only_cached(old))
            entry = (sources, key, make(old if reusable else None))
            caches[name] = entry
        return entry[2]

    def pruned(self) -> Tensor:
        """P = 1 − M_nm in the weight's dtype (no gradient), cached until the N:M mask moves."""
        return self.cached("pruned", (self.nm_mask,),
                           lambda out: pruned_indicator(self.nm_mask, self.weight.dtype, out=out))

    def masked_weight(self) -> Tensor:
        """The weight this layer computes with: N:M-masked, with SR-STE's gradient.

        The decay λ P ⊙ W enters in backward only while no `MaskScheduler` drives the layer: a
        scheduler adds it once per optimizer step, to the unscaled gradient (docs/method.md §1).
        """
        self.sync_masks()
        decay = 0.0 if self.spre_fx.scheduled else self.spre_fx.decay
        return srste_pruned(self.weight, self.pruned(), decay)

    def extra_repr(self) -> str:
        n, m = self.spre_fx.nm
        return f"{super().extra_repr()}, nm={n}:{m}"


def _only_cached(t: Tensor) -> bool:
    """Whether nothing but its Python object holds `t` (no autograd graph saved it for backward)."""
    use_count = getattr(t, "_use_count", None)  # torch's count of owners of the tensor
    return use_count is not None and use_count() == 1


def effective_weight(module: nn.Module, masks: dict[str, Tensor] | None = None) -> Tensor:
    """The weight the layer computes with in eval mode (its current N:M mask applied)."""
    w = module.weight.detach()
    if not isinstance(module, NMLayer):
        return w
    return w * (masks or module.current_masks())["nm_mask"]


def masks_of(module: nn.Module) -> dict[str, Tensor] | None:
    """The masks an N:M layer computes with now (`current_masks()`), None for a plain layer."""
    return module.current_masks() if isinstance(module, NMLayer) else None


def freeze_masks(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Hold (or release) the masks of every N:M layer of `model` as they are in force now.

    Frozen masks move only when a state dict brings a weight without its masks; a
    `MaskScheduler` leaves them alone. Returns `model`.
    """
    for m in model.modules():
        if isinstance(m, NMLayer):
            m.freeze_masks(frozen)
    return model


def write_nm_masks(layers: Sequence[NMLayer]) -> None:
    """Each layer's N:M mask from its current weight into its buffer (`masks.nm_masks`: layers of
    one weight shape in one set of calls on the torch path)."""
    by_nm: dict[tuple[int, int], list[NMLayer]] = {}
    for layer in layers:
        by_nm.setdefault(layer.spre_fx.nm, []).append(layer)
    for (n, m), group in by_nm.items():
        nm_masks([layer.weight for layer in group], n, m, [layer.nm_mask for layer in group])


@torch.no_grad()
def update_layer_masks(requests: Iterable[tuple[NMLayer, tuple[str, ...] | None]]) -> None:
    """`layer.update_masks(which)` for every `(layer, which)`, the masks of one kind and layer
    class computed together (`write_masks`): a few calls per weight shape, not a dozen per layer."""
    requests = list(requests)
    jobs: dict[tuple[type, str], list[NMLayer]] = {}
    for layer, which in requests:
        for name in layer.mask_names if which is None else tuple(which):
            if name not in layer.mask_names:
                raise ValueError(f"{type(layer).__name__} has no mask {name!r}; it has {layer.mask_names}")
            if name == "nm_mask" and layer.spre_fx.dense_warmup:
                layer.nm_mask.fill_(True)
            else:
                jobs.setdefault((type(layer), name), []).append(layer)
    for (cls, name), layers in jobs.items():
        cls.write_masks(layers, name)
    for layer, which in requests:
        names = layer.mask_names if which is None else tuple(which)
        complete = set(names) == set(layer.mask_names) and not layer.spre_fx.dense_warmup
        layer.spre_fx.mask_key = weight_key(layer.weight) if complete else None


@torch.no_grad()
def scheduled_updates(layers: Sequence[NMLayer], nm: bool, spatial: bool, *,
                      track: bool = False) -> list[MaskStep | None]:
    """`layer.scheduled_update(nm, spatial, track=track)` for every layer, in grouped calls
    (`update_layer_masks`). What changed (`track`) stays in tensors: nothing is read back."""
    requests = []
    for layer in layers:
        which = tuple(n for n, move in (("nm_mask", nm), ("spatial_mask", spatial))
                      if move and n in layer.mask_names)
        if layer.spre_fx.frozen:
            which = ()
        elif nm:
            layer.set_dense_warmup(False)
        requests.append((layer, which))
    old = [{k: getattr(layer, k).clone() for k in which} if track else {} for layer, which in requests]
    update_layer_masks((layer, which) for layer, which in requests if which)
    if not track:
        return [None] * len(requests)
    steps = []
    for (layer, _), before in zip(requests, old):
        changed = {k: torch.ne(v, getattr(layer, k)).sum() for k, v in before.items()}
        total = layer.nm_mask.numel() if "nm_mask" in before else 0
        steps.append(MaskStep(changed.get("nm_mask", 0), total, changed.get("spatial_mask", 0),
                              layer.nm_mask.sum(), layer.nm_mask.numel()))
    return steps


class _NMConv(NMLayer):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class NMConv1d(_NMConv, nn.Conv1d):
    """nn.Conv1d with an N:M weight (SR-STE)."""


class NMConv2d(_NMConv, nn.Conv2d):
    """nn.Conv2d with an N:M weight along [O, kh, kw, C] (SR-STE)."""


class NMConv3d(_NMConv, nn.Conv3d):
    """nn.Conv3d with an N:M weight (SR-STE)."""


class NMLinear(NMLayer, nn.Linear):
    """nn.Linear with an N:M weight along in_features (SR-STE)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


NM_CLASSES: dict[type[nn.Module], type[NMLayer]] = {
    nn.Conv1d: NMConv1d,
    nn.Conv2d: NMConv2d,
    nn.Conv3d: NMConv3d,
    nn.Linear: NMLinear,
}
