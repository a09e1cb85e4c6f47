"""Train-time modules and their collapse, side by side (docs/method.md §3 and §4).

- `NMConv1d/2d/3d`, `NMLinear`: the user's layer with its weight seen through an N:M mask
  (SR-STE gradient).
- `SpReConv2d` + `SpReBatchNorm2d`: the dual branch. The conv computes both branches and hands
  them, as a `SpReBranches` pair, to the BatchNorm in the place of the user's BN, which
  normalises each with its own statistics and sums them before whatever the BN module ran after
  normalising (timm's BatchNormAct2d: dropout, activation).
- `fold_bn` / `merge_spre`: the pure tensor math of the collapse; `deploy_*` build modules.

Each train-time module *adopts* the user's module: same attributes, same parameter and
buffer objects under the same names, so dense checkpoints load and the user's forward code,
which calls the module by attribute, keeps running.
"""

from __future__ import annotations

import copy
import hashlib
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .masks import nm_mask, pruned_indicator, spatial_mask, srste_pruned
from .registry import NormSpec, norm_spec

__all__ = [
    "BNStats",
    "fold_bn",
    "merge_spre",
    "SpReBranches",
    "NMConv1d",
    "NMConv2d",
    "NMConv3d",
    "NMLinear",
    "SpReConv2d",
    "SpReBatchNorm2d",
    "SpReSyncBatchNorm",
    "freeze_masks",
]


# --------------------------------------------------------------------------- math (§4)
class BNStats(NamedTuple):
    """What a BatchNorm contributes to a fold; `weight`/`bias` are None when not affine."""

    mean: Tensor
    var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def of(cls, bn: nn.Module) -> BNStats:
        """Read from a `_BatchNorm`, or any norm holding the same state under the same names
        (torchvision's FrozenBatchNorm2d: buffers `weight`, `bias`, `running_*`, and `eps`)."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError("a BatchNorm without running statistics cannot be folded")
        return cls(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(t, β − μ·t) in float64, with t = γ / sqrt(σ² + ε)."""
        var = self.var.detach().double()
        t = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            t = t * self.weight.detach().double()
        shift = -self.mean.detach().double() * t
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return t, shift


def _per_out(t: Tensor, weight: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (weight.dim() - 1)))


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is folded in float32 (one rounding per product)."""
    return torch.promote_types(weight.dtype, torch.float32)


def fold_bn(weight: Tensor, bias: Tensor | None, bn: BNStats) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it: `BN(conv(x, W) + b) = conv(x, W') + b'`."""
    dtype = _compute_dtype(weight)
    t, shift = bn.scale_shift()
    w = weight.detach().to(dtype) * _per_out(t.to(dtype), weight)
    b = shift if bias is None else shift + t * bias.detach().double()
    return w.to(weight.dtype), b.to(weight.dtype)


def merge_spre(
    weight: Tensor,
    bias: Tensor | None,
    weight_rep: Tensor,
    nm: Tensor,
    spatial: Tensor,
    bn: BNStats,
    bn_rep: BNStats,
) -> tuple[Tensor, Tensor]:
    """Collapse the two SpRe branches and their BatchNorms into one N:M conv (docs/method.md §4).

    W' = (t_main·W + t_rep·(W_r ⊙ S)) ⊙ M_nm,  b' = shift_main + shift_rep (+ t_main·bias).
    supp(W') ⊆ supp(M_nm): the result is N:M without any projection.
    """
    dtype = _compute_dtype(weight)
    t, shift = bn.scale_shift()
    t_rep, shift_rep = bn_rep.scale_shift()
    w = _per_out(t.to(dtype), weight) * weight.detach().to(dtype)
    w += _per_out(t_rep.to(dtype), weight) * (weight_rep.detach().to(dtype) * spatial)
    w *= nm
    b = shift + shift_rep
    if bias is not None:
        b = b + t * bias.detach().double()
    return w.to(weight.dtype), b.to(weight.dtype)


# --------------------------------------------------------------------------- adoption
# Attributes spre_fx adds to an adopted module; `_restore` removes them again.
_ADDED = ("nm", "decay", "_frozen", "scheduled", "dense_warmup", "_mask_key", "_spre_orig_cls",
          "_spre_norm_spec", "_pruned_cache", "_rep_mask_cache")
_ADDED_TENSORS = ("nm_mask", "spatial_mask", "weight_rep")
_ADDED_CHILDREN = ("rep",)
# Derived from the mask buffers; rebuilt on demand (a copy need not carry them).
_CACHES = ("_pruned_cache", "_rep_mask_cache")


def _adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A `cls` instance sharing `module`'s attributes, parameters, buffers and children."""
    new = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    new.__dict__.update(state)
    return new


def _restore(module: nn.Module) -> nn.Module:
    """The user's class again, without anything spre_fx added."""
    plain = _adopt(module._spre_orig_cls, module)
    for name in _ADDED:
        plain.__dict__.pop(name, None)
    for name in _ADDED_TENSORS:
        plain._parameters.pop(name, None)
        plain._buffers.pop(name, None)
        plain._non_persistent_buffers_set.discard(name)
    for name in _ADDED_CHILDREN:
        plain._modules.pop(name, None)
    return plain


def _weight_key(weight: Tensor) -> tuple[int, int, int]:
    """What identifies the weight a mask was computed from: object, version counter and storage.

    The version counter alone is not enough: a copy (deepcopy, pickle) restarts it at 0. The
    storage address catches `param.data = ...` (and `.to()`, which does that).
    """
    ptr = weight.data_ptr() if type(weight) in (Tensor, nn.Parameter) else 0
    return id(weight), weight._version, ptr


# --------------------------------------------------------------------------- N:M layers (§1)
class _NMMixin:
    """N:M view of `self.weight`: mask in a buffer, SR-STE gradient, masks that follow the weight.

    Masks follow the dense latent weight unless they are held on purpose:
    - `frozen`: the user holds them (`spre_fx.freeze_masks`);
    - `scheduled`: a `MaskScheduler` moves them, on its optimizer steps only;
    - `dense_warmup`: the scheduler holds the N:M mask all-ones (dense warm-up; implies scheduled).
    Otherwise every forward (training and eval) recomputes the masks when the weight changed since
    they were computed (`_mask_key`: the weight's identity, version and storage, None when
    unknown), so a plain loop gets SR-STE's one update per step, and `current_masks()` (what
    `convert` folds) computes fresh ones without writing. A copy (deepcopy, pickle) is driven by
    no scheduler: it keeps `frozen` and follows its own weights otherwise. A state dict that
    brings a weight but not its masks (a dense checkpoint) recomputes them at once, whatever
    holds them; one that brings masks keeps them bit for bit.
    """

    weight: nn.Parameter

    def _init_nm(self, n: int, m: int, decay: float) -> None:
        self.nm = (n, m)
        self.decay = decay
        self._frozen = False
        self.scheduled = False
        self.dense_warmup = False
        self.register_buffer("nm_mask", nm_mask(self.weight, n, m))
        self._mask_key = _weight_key(self.weight)

    def __setstate__(self, state: dict) -> None:
        # deepcopy, copy.copy and unpickling come here: the copy's parameters are new objects
        # whose version counters restart at 0, and no scheduler drives the copy.
        state = dict(state)
        if "frozen" in state:  # pickled by spre_fx <= 0.1.0, where `frozen` also meant scheduled
            state["_frozen"] = state.pop("frozen")
        state.pop("_mask_version", None)
        super().__setstate__(state)
        self._mask_key = None
        self.scheduled = False
        self.dense_warmup = False
        for name in _CACHES:
            self.__dict__.pop(name, None)

    @property
    def frozen(self) -> bool:
        """Masks held still by the user; setting it holds the masks in force now (brought up to
        date with the weight first, unless a scheduler already holds them)."""
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if value:
            self.sync_masks()
        self._frozen = bool(value)

    @property
    def masks_held(self) -> bool:
        """Whether the masks are held still on purpose (frozen, or moved by a scheduler only)."""
        return self._frozen or self.scheduled

    def _mask_names(self) -> tuple[str, ...]:
        return ("nm_mask",)

    def masks_from_weight(self) -> dict[str, Tensor]:
        """The masks computed from the current weight now (new tensors; nothing is written)."""
        return {"nm_mask": nm_mask(self.weight, *self.nm)}

    def masks_current(self) -> bool:
        """Whether the stored masks were computed from the weight as it is now."""
        return self._mask_key == _weight_key(self.weight)

    def current_masks(self) -> dict[str, Tensor]:
        """The masks this layer computes with now: the stored ones when held or up to date, else
        the ones of the current weight, computed out of place (`convert` must not write)."""
        if self.masks_held or self.masks_current():
            return {name: getattr(self, name) for name in self._mask_names()}
        return self.masks_from_weight()

    @torch.no_grad()
    def update_masks(self, which: tuple[str, ...] | None = None) -> None:
        """Recompute the masks named in `which` (default: all) from the dense latent weight, in
        place; during a dense warm-up the N:M mask stays all-ones."""
        names = self._mask_names() if which is None else tuple(which)
        for name in names:
            if name not in self._mask_names():
                raise ValueError(f"{type(self).__name__} has no mask {name!r}; it has {self._mask_names()}")
            if name == "nm_mask" and self.dense_warmup:
                self.nm_mask.fill_(True)
            else:
                self._compute_mask(name)
        complete = set(names) == set(self._mask_names()) and not self.dense_warmup
        self._mask_key = _weight_key(self.weight) if complete else None

    @torch.no_grad()
    def set_dense_warmup(self, dense: bool) -> None:
        """Enter (all-ones N:M mask) or leave a scheduler's dense warm-up."""
        if dense and not self.dense_warmup:
            self.nm_mask.fill_(True)
            self._mask_key = None
        self.dense_warmup = dense

    def _compute_mask(self, name: str) -> None:
        nm_mask(self.weight, *self.nm, out=self.nm_mask)

    def sync_masks(self) -> None:
        """Bring the stored masks up to date with the weight, unless they are held (what every
        forward does first)."""
        if self.masks_held:
            return
        if torch.compiler.is_compiling():
            # A compiled graph cannot branch on the version counter (it would be read once, at
            # trace time): recompute, which gives the same masks when the weight has not moved.
            for name in self._mask_names():
                self._compute_mask(name)
        elif not self.masks_current():
            self.update_masks()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # torch's per-module load step (as BatchNorm overrides it): a weight arriving without its
        # masks (a dense checkpoint, strict=False) gets the masks of the loaded weight at once.
        brings_weight = prefix + "weight" in state_dict
        lacking = [name for name in self._mask_names() if prefix + name not in state_dict]
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._mask_key = None  # loaded masks are kept as they are; free layers re-check them
        if brings_weight and lacking and len(error_msgs) == errors:
            self.update_masks(tuple(lacking))

    def _cached(self, name: str, sources: tuple[Tensor, ...], make) -> Tensor:
        """`make()` (a float tensor derived from the bool mask buffers), cached until a source
        buffer is written, replaced or moved, or the weight's dtype changes.

        Masks move at most once per optimizer step while the weight is read at every forward;
        float masks also multiply an order of magnitude faster than bool ones on CPU. Under
        torch.compile the graph computes (and fuses) the cast itself.
        """
        if torch.compiler.is_compiling():
            return make()
        key = (self.weight.dtype, self.weight.device, *(t._version for t in sources))
        entry = self.__dict__.get(name)
        if entry is None or entry[1] != key or any(a is not b for a, b in zip(entry[0], sources)):
            entry = (sources, key, make())
            self.__dict__[name] = entry
        return entry[2]

    def masked_weight(self) -> Tensor:
        self.sync_masks()
        pruned = self._cached("_pruned_cache", (self.nm_mask,),
                              lambda: pruned_indicator(self.nm_mask, self.weight.dtype))
        return srste_pruned(self.weight, pruned, self.decay)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nm={self.nm[0]}:{self.nm[1]}"

    @classmethod
    def adopt(cls, module: nn.Module, n: int, m: int, decay: float) -> nn.Module:
        new = _adopt(cls, module)
        new._spre_orig_cls = type(module)
        new._init_nm(n, m, decay)
        return new


def freeze_masks(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Hold (or release) the masks of every N:M layer of `model` as they are now.

    Frozen masks move only when a state dict brings a weight without its masks; a
    `MaskScheduler` leaves them alone. Returns `model`.
    """
    for m in model.modules():
        if isinstance(m, _NMMixin):
            m.frozen = frozen
    return model


class _NMConvMixin(_NMMixin):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class NMConv1d(_NMConvMixin, nn.Conv1d):
    """nn.Conv1d with an N:M weight (SR-STE)."""


class NMConv2d(_NMConvMixin, nn.Conv2d):
    """nn.Conv2d with an N:M weight along [O, kh, kw, C] (SR-STE)."""


class NMConv3d(_NMConvMixin, nn.Conv3d):
    """nn.Conv3d with an N:M weight (SR-STE)."""


class NMLinear(_NMMixin, nn.Linear):
    """nn.Linear with an N:M weight along in_features (SR-STE)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


NM_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: NMConv1d,
    nn.Conv2d: NMConv2d,
    nn.Conv3d: NMConv3d,
    nn.Linear: NMLinear,
}


# --------------------------------------------------------------------------- SpRe (§3)
class SpReBranches(NamedTuple):
    """The two pre-BN outputs of a SpRe conv; only its `SpReBatchNorm2d` consumes them."""

    main: Tensor
    rep: Tensor

    def __getattr__(self, name: str):
        # Reached when a module other than its SpRe BatchNorm treats the pair as a tensor.
        if name.startswith("_"):
            raise AttributeError(name)  # protocol probes (copy, pickle, torch.compile)
        raise TypeError(
            f"SpReBranches.{name}: the output of a SpReConv2d reached a module other than its "
            "SpReBatchNorm2d. If nn.SyncBatchNorm.convert_sync_batchnorm ran after prepare, use "
            "spre_fx.convert_sync_batchnorm instead (it keeps the SpRe branches)."
        )


def _branch_generator(weight: Tensor) -> torch.Generator:
    """A generator for the extra branch's init, seeded from the global RNG state and `weight`.

    It reads the global RNG without drawing from it, so `prepare(spre=True)` leaves it where
    `spre=False` does (paired SR-STE/SpRe runs see the same data order and dropout); `weight`'s
    bytes make every layer's stream its own (a `fork_rng` per layer would repeat one stream).
    """
    digest = hashlib.blake2b(torch.random.get_rng_state().numpy().tobytes(), digest_size=8)
    digest.update(weight.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.Generator(device=weight.device).manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


class SpReConv2d(_NMMixin, nn.Conv2d):
    """Main N:M branch `conv(x, W ⊙ M_nm)` plus the extra branch `conv(x, W_r ⊙ M_nm ⊙ S)`.

    `weight` (and `bias`) are the user's; `weight_rep` is new. `spatial_mask` is S over the
    kernel taps, recomputed with the N:M mask from the dense latent `weight`.
    """

    @classmethod
    def adopt(cls, module: nn.Module, n: int, m: int, decay: float) -> SpReConv2d:
        new = _adopt(cls, module)
        new._spre_orig_cls = type(module)
        w = module.weight
        rep = torch.empty_like(w, requires_grad=False)
        nn.init.kaiming_normal_(rep, mode="fan_in", generator=_branch_generator(w))
        new.weight_rep = nn.Parameter(rep, requires_grad=w.requires_grad)
        new.register_buffer("spatial_mask", spatial_mask(w, 1.0 - n / m))
        new._init_nm(n, m, decay)
        return new

    def _mask_names(self) -> tuple[str, ...]:
        return ("nm_mask", "spatial_mask")

    def masks_from_weight(self) -> dict[str, Tensor]:
        return {**super().masks_from_weight(), "spatial_mask": self.spatial_from_weight()}

    def _compute_mask(self, name: str) -> None:
        if name == "spatial_mask":
            self.spatial_mask.copy_(self.spatial_from_weight())
        else:
            super()._compute_mask(name)

    def spatial_from_weight(self) -> Tensor:
        """S from the dense latent weight: unstructured pruning at the N:M rate 1 − N/M (method.md §3)."""
        return spatial_mask(self.weight, 1.0 - self.nm[0] / self.nm[1])

    def _rep_mask(self) -> Tensor:
        """M_nm ⊙ S in the branch weight's dtype (bools read as uint8: faster on CPU)."""
        out = torch.empty(self.nm_mask.shape, dtype=self.weight_rep.dtype, device=self.nm_mask.device)
        return torch.mul(self.nm_mask.view(torch.uint8), self.spatial_mask.view(torch.uint8), out=out)

    def forward(self, input: Tensor) -> SpReBranches:
        main = self._conv_forward(input, self.masked_weight(), self.bias)
        # Masks carry no gradient: the extra branch lives inside supp(M_nm) ⊙ S (S over kh×kw).
        rep_mask = self._cached("_rep_mask_cache", (self.nm_mask, self.spatial_mask), self._rep_mask)
        rep = self._conv_forward(input, self.weight_rep * rep_mask, None)
        return SpReBranches(main, rep)


def _norm_ref(bn: _BatchNorm) -> Tensor | None:
    return bn.weight if bn.weight is not None else bn.running_mean


def _fresh_norm(bn: _BatchNorm) -> _BatchNorm:
    """A new plain BatchNorm2d (SyncBatchNorm for a sync one) with `bn`'s hyper-parameters."""
    ref = _norm_ref(bn)
    kwargs = dict(
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    if isinstance(bn, nn.SyncBatchNorm):
        return nn.SyncBatchNorm(bn.num_features, process_group=bn.process_group, **kwargs)
    return nn.BatchNorm2d(bn.num_features, **kwargs)


class _SpReNormMixin:
    """The user's BatchNorm (same parameters and buffers) plus the extra branch's own BN `rep`.

    y = post(BN_main(main) + BN_rep(rep)), `post` being what the user's BN class runs after
    normalising (identity for torch's BatchNorms).
    """

    @classmethod
    def adopt(cls, bn: _BatchNorm, spec: NormSpec, silent: bool = False) -> nn.Module:
        if cls is SpReBatchNorm2d and isinstance(bn, nn.SyncBatchNorm):
            cls = SpReSyncBatchNorm
        new = _adopt(cls, bn)
        new._spre_orig_cls = type(bn)
        new._spre_norm_spec = spec
        new.rep = _fresh_norm(bn)
        new.rep.train(bn.training)  # discovery gives no branch to a BatchNorm that does not train
        if silent and new.rep.weight is not None:
            with torch.no_grad():
                new.rep.weight.zero_()
        return new

    def forward(self, input: SpReBranches) -> Tensor:
        if not isinstance(input, SpReBranches):
            raise TypeError(
                f"{type(self).__name__} expects the SpReBranches of its SpReConv2d, found "
                f"{type(input).__name__}: the conv feeding this BatchNorm was changed after prepare"
            )
        y = super().forward(input.main) + self.rep(input.rep)
        return self._spre_norm_spec.post(self, y)


class SpReBatchNorm2d(_SpReNormMixin, nn.BatchNorm2d):
    __doc__ = _SpReNormMixin.__doc__


class SpReSyncBatchNorm(_SpReNormMixin, nn.SyncBatchNorm):
    __doc__ = _SpReNormMixin.__doc__


# --------------------------------------------------------------------------- collapse (§4)
def _with_weights(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    plain = _restore(module) if hasattr(module, "_spre_orig_cls") else _adopt(type(module), module)
    plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    return plain


def effective_weight(module: nn.Module, masks: dict[str, Tensor] | None = None) -> Tensor:
    """The weight the layer computes with in eval mode (its current N:M mask applied)."""
    w = module.weight.detach()
    if not isinstance(module, _NMMixin):
        return w
    return w * (masks or module.current_masks())["nm_mask"]


def masks_of(module: nn.Module) -> dict[str, Tensor] | None:
    """The masks an N:M layer computes with now (`current_masks()`), None for a plain layer."""
    return module.current_masks() if isinstance(module, _NMMixin) else None


def deploy_layer(module: nn.Module, norm: nn.Module | None,
                 masks: dict[str, Tensor] | None = None) -> tuple[nn.Module, nn.Module | None]:
    """One plain layer (the user's class) computing `norm(module(x))` in eval mode.

    `masks` are the layer's (`current_masks()`, taken from the module itself when None).
    Returns the layer and what replaces `norm` (None when there was no norm).
    """
    if isinstance(module, _NMMixin) and masks is None:
        masks = module.current_masks()
    if isinstance(module, SpReConv2d):
        if not isinstance(norm, _SpReNormMixin):
            raise ValueError("a SpReConv2d collapses only together with its SpReBatchNorm2d")
        w, b = merge_spre(
            module.weight, module.bias, module.weight_rep, masks["nm_mask"], masks["spatial_mask"],
            BNStats.of(norm), BNStats.of(norm.rep),
        )
        return _with_weights(module, w, b), norm._spre_norm_spec.after_fold(norm)
    weight = effective_weight(module, masks)
    if norm is None:
        bias = None if module.bias is None else module.bias.detach().clone()
        return _with_weights(module, weight.clone(), bias), None
    w, b = fold_bn(weight, module.bias, BNStats.of(norm))
    return _with_weights(module, w, b), norm_spec(norm).after_fold(norm)


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that keeps SpRe pairs: both branches' BNs sync.

    Works on prepared and unprepared models (in place on children; returns the model).
    """
    if isinstance(model, _SpReNormMixin) and not isinstance(model, nn.SyncBatchNorm):
        sync = _adopt(SpReSyncBatchNorm, model)
        sync.process_group = process_group
        sync.rep = nn.SyncBatchNorm.convert_sync_batchnorm(model.rep, process_group)
        return sync
    if isinstance(model, _BatchNorm) and not isinstance(model, _SpReNormMixin):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for name, child in model.named_children():
        model._modules[name] = convert_sync_batchnorm(child, process_group)
    return model
