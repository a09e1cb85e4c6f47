"""Train-time modules and their collapse, side by side (SPRE.md §3 and §4).

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
    def of(cls, bn: _BatchNorm) -> BNStats:
        if bn.running_mean is None or bn.running_var is None:
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
    """Collapse the two SpRe branches and their BatchNorms into one N:M conv (SPRE.md §4).

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
_ADDED = ("nm", "decay", "frozen", "_mask_version", "_spre_orig_cls", "_spre_norm_spec", "_pruned_cache",
          "_rep_mask_cache")
_ADDED_TENSORS = ("nm_mask", "spatial_mask", "weight_rep")
_ADDED_CHILDREN = ("rep",)


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


# --------------------------------------------------------------------------- N:M layers (§1)
class _NMMixin:
    """N:M view of `self.weight`: mask in a buffer, SR-STE gradient, masks that follow the weight.

    In training mode the masks are recomputed when the weight has changed since they were last
    computed (an optimizer step bumps the parameter's version counter), so a plain training loop
    gets SR-STE's dynamic masks with one mask update per step. A `MaskScheduler` sets
    `frozen = True` and updates masks itself.
    """

    weight: nn.Parameter

    def _init_nm(self, n: int, m: int, decay: float) -> None:
        self.nm = (n, m)
        self.decay = decay
        self.frozen = False
        self.register_buffer("nm_mask", nm_mask(self.weight, n, m))
        self._mask_version = self.weight._version

    def update_masks(self) -> None:
        """Recompute the masks from the dense latent weight."""
        self._compute_masks()
        self._mask_version = self.weight._version

    @torch.no_grad()
    def _compute_masks(self) -> None:
        nm_mask(self.weight, *self.nm, out=self.nm_mask)

    def _follow_weight(self) -> None:
        if not self.training or self.frozen:
            return
        if torch.compiler.is_compiling():
            # A compiled graph cannot branch on the version counter (it would be read once, at
            # trace time): recompute, which gives the same masks when the weight has not moved.
            self._compute_masks()
        elif self.weight._version != self._mask_version:
            self.update_masks()

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
        self._follow_weight()
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

    @torch.no_grad()
    def _compute_masks(self) -> None:
        super()._compute_masks()
        self.spatial_mask.copy_(self.spatial_from_weight())

    def spatial_from_weight(self) -> Tensor:
        """S from the dense latent weight: unstructured pruning at the N:M rate 1 − N/M (SPRE.md §3)."""
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
        new.rep.train(bn.training)
        if bn.weight is not None:  # a frozen BN (e.g. mmdet frozen_stages) freezes its branch too
            new.rep.requires_grad_(bn.weight.requires_grad)
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


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer computes with in eval mode (N:M mask applied)."""
    w = module.weight.detach()
    return w * module.nm_mask if hasattr(module, "nm_mask") else w


def deploy_layer(module: nn.Module, norm: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    """One plain layer (the user's class) computing `norm(module(x))` in eval mode.

    Returns the layer and what replaces `norm` (None when there was no norm).
    """
    if isinstance(module, SpReConv2d):
        if not isinstance(norm, _SpReNormMixin):
            raise ValueError("a SpReConv2d collapses only together with its SpReBatchNorm2d")
        w, b = merge_spre(
            module.weight, module.bias, module.weight_rep, module.nm_mask, module.spatial_mask,
            BNStats.of(norm), BNStats.of(norm.rep),
        )
        return _with_weights(module, w, b), norm._spre_norm_spec.after_fold(norm)
    weight = effective_weight(module)
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
