"""The SpRe dual branch at training time (docs/method.md §3).

`SpReConv2d` computes the main N:M branch `conv(x, W ⊙ M_nm)` and the extra branch
`conv(x, W_r ⊙ M_nm ⊙ S)` and hands both, as a `SpReBranches` pair, to the `SpReNorm` that took
the place of the user's BatchNorm: it normalises each branch with its own statistics and sums
them before whatever the user's BN class runs after normalising (timm's BatchNormAct2d: dropout,
activation). `convert` collapses the pair into one N:M conv (docs/method.md §4).
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..masks import spatial_hint, spatial_mask, spatial_masks
from ..module_tree import adopt
from ..registry import NormSpec
from .nm import STATE, NMLayer, write_nm_masks
from .tapconv import tap_conv2d

__all__ = [
    "SpReBranches",
    "SpReConv2d",
    "NormState",
    "SpReNorm",
    "SpReBatchNorm2d",
    "SpReSyncBatchNorm",
    "convert_sync_batchnorm",
]


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


def _tensor_bytes(t: Tensor) -> bytes:
    """The bytes of `t`'s values (numpy's `tobytes`, without numpy: the core needs torch only)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return ctypes.string_at(flat.data_ptr(), flat.numel())


def _branch_generator(weight: Tensor) -> torch.Generator | None:
    """A generator for the extra branch's init, seeded from the global RNG state and `weight`.

    It reads the global RNG without drawing from it, so `prepare(spre=True)` leaves it where
    `spre=False` does (paired SR-STE/SpRe runs see the same data order and dropout); `weight`'s
    bytes make every layer's stream its own (a `fork_rng` per layer would repeat one stream).
    None for a weight on the meta device: it has no values to read, and the branch's neither.
    """
    if weight.is_meta:
        return None
    digest = hashlib.blake2b(_tensor_bytes(torch.random.get_rng_state()), digest_size=8)
    digest.update(_tensor_bytes(weight))
    return torch.Generator(device=weight.device).manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


class SpReConv2d(NMLayer, nn.Conv2d):
    """Main N:M branch `conv(x, W ⊙ M_nm)` plus the extra branch `conv(x, W_r ⊙ M_nm ⊙ S)`.

    `weight` (and `bias`) are the user's; `weight_rep` is new. `spatial_mask` is S over the
    kernel taps, recomputed with the N:M mask from the dense latent `weight`.
    """

    mask_names = ("nm_mask", "spatial_mask")

    @classmethod
    def adopt(cls, module: nn.Module, n: int, m: int, decay: float) -> SpReConv2d:
        new = adopt(cls, module)
        w = module.weight
        rep = torch.empty_like(w, requires_grad=False)
        nn.init.kaiming_normal_(rep, mode="fan_in", generator=_branch_generator(w))
        new.weight_rep = nn.Parameter(rep, requires_grad=w.requires_grad)
        hint = spatial_hint()
        # A weight on the meta device has no values to rank: a placeholder of S's shape, replaced
        # by the loaded one (or recomputed from the loaded weight) after `to_empty`.
        s = torch.ones(w.shape[2:], dtype=torch.bool, device=w.device) if w.is_meta else None
        new.register_buffer("spatial_mask", spatial_mask(w, 1.0 - n / m, hint) if s is None else s)
        new.init_masks(type(module), n, m, decay)
        new.spre_fx.caches["spatial_hint"] = hint
        return new

    def masks_from_weight(self) -> dict[str, Tensor]:
        return {**super().masks_from_weight(), "spatial_mask": self.spatial_from_weight()}

    def write_mask(self, name: str) -> None:
        if name == "spatial_mask":
            self.spatial_mask.copy_(self.spatial_from_weight())
        else:
            super().write_mask(name)

    @classmethod
    def write_masks(cls, layers: Sequence[SpReConv2d], name: str) -> None:
        """Both masks of many layers in grouped calls (`masks.nm_masks`, `masks.spatial_masks`),
        unless a subclass computes them its own way (`write_mask`, `spatial_from_weight`)."""
        if cls.write_mask is not SpReConv2d.write_mask:
            super().write_masks(layers, name)
        elif name == "nm_mask":
            write_nm_masks(layers)
        elif cls.spatial_from_weight is not SpReConv2d.spatial_from_weight:
            for layer in layers:
                layer.write_mask(name)
        else:
            by_rate: dict[float, list[SpReConv2d]] = {}
            for layer in layers:
                by_rate.setdefault(_spatial_rate(layer), []).append(layer)
            for rate, group in by_rate.items():
                weights = [layer.weight for layer in group]
                outs = [layer.spatial_mask for layer in group]
                spatial_masks(weights, rate, outs, hints=[_spatial_hint(layer) for layer in group])

    def spatial_from_weight(self) -> Tensor:
        """S from the dense latent weight: unstructured pruning at the N:M rate 1 − N/M (method.md §3)."""
        return spatial_mask(self.weight, _spatial_rate(self), _spatial_hint(self))

    def _rep_mask(self, out: Tensor | None = None) -> Tensor:
        """M_nm ⊙ S in the branch weight's dtype (into `out`, the old one, when given): the bool M
        read as uint8 times S as a float (0.7 of the time of a uint8 × uint8 product cast to
        float on CPU, 64-512-channel 3×3 layers)."""
        if out is None or out.dtype != self.weight_rep.dtype:
            out = torch.empty(self.nm_mask.shape, dtype=self.weight_rep.dtype, device=self.nm_mask.device)
        return torch.mul(self.nm_mask.view(torch.uint8), self.spatial_mask.to(out.dtype), out=out)

    def forward(self, input: Tensor) -> SpReBranches:
        main = self._conv_forward(input, self.masked_weight(), self.bias)
        # Masks carry no gradient: the extra branch lives inside supp(M_nm) ⊙ S (S over kh×kw).
        rep_mask = self.cached("rep_mask", (self.nm_mask, self.spatial_mask), self._rep_mask)
        # Zero wherever S is: computed over the taps S keeps only (spre_fx/layers/tapconv.py).
        rep = tap_conv2d(input, self.weight_rep * rep_mask, self.spatial_mask, self.stride, self.padding,
                         self.dilation, self.groups, self.padding_mode)
        return SpReBranches(main, rep)


def _spatial_rate(layer: SpReConv2d) -> float:
    """The unstructured pruning rate S is computed at: the N:M rate 1 − N/M (method.md §3)."""
    return 1.0 - layer.spre_fx.n / layer.spre_fx.m


def _spatial_hint(layer: SpReConv2d) -> Tensor:
    """The layer's hint for the spatial mask kernel (speed only: any value gives the same S)."""
    caches = layer.spre_fx.caches
    if "spatial_hint" not in caches:  # a copy starts without one
        caches["spatial_hint"] = spatial_hint()
    return caches["spatial_hint"]


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


@dataclass
class NormState:
    """spre_fx's state on an adopted BatchNorm (`bn.spre_fx`): the user's class and its split."""

    original: type
    spec: NormSpec


class SpReNorm:
    """The user's BatchNorm (same parameters and buffers) plus the extra branch's own BN `rep`.

    y = post(BN_main(main) + BN_rep(rep)), `post` being what the user's BN class runs after
    normalising (identity for torch's BatchNorms).
    """

    @classmethod
    def adopt(cls, bn: _BatchNorm, spec: NormSpec, silent: bool = False) -> nn.Module:
        if cls is SpReBatchNorm2d and isinstance(bn, nn.SyncBatchNorm):
            cls = SpReSyncBatchNorm
        new = adopt(cls, bn)
        object.__setattr__(new, STATE, NormState(type(bn), spec))
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
        return self.spre_fx.spec.post(self, y)


class SpReBatchNorm2d(SpReNorm, nn.BatchNorm2d):
    __doc__ = SpReNorm.__doc__


class SpReSyncBatchNorm(SpReNorm, nn.SyncBatchNorm):
    __doc__ = SpReNorm.__doc__


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` that keeps SpRe pairs: both branches' BNs sync.

    Works on prepared and unprepared models (in place on children; returns the model).
    """
    if isinstance(model, SpReNorm) and not isinstance(model, nn.SyncBatchNorm):
        sync = adopt(SpReSyncBatchNorm, model)
        sync.process_group = process_group
        sync.rep = nn.SyncBatchNorm.convert_sync_batchnorm(model.rep, process_group)
        return sync
    if isinstance(model, _BatchNorm) and not isinstance(model, SpReNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for name, child in model.named_children():
        model._modules[name] = convert_sync_batchnorm(child, process_group)
    return model
