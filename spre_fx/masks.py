"""Pure tensor functions: N:M masks, spatial sparsity, the SpRe spatial mask, SR-STE.

Everything here takes and returns tensors; no module state (docs/method.md §1-2).
Conv weights are `[O, C, *kernel]` (C = in-channels per group), linear weights `[O, C]`;
N:M groups run along C at a fixed `(o, *kernel)` position, i.e. along the last axis of
`weight.movedim(1, -1)` = `[O, *kernel, C]`, the K order of a channels-last im2col GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _native

__all__ = [
    "check_nm_shape",
    "nm_mask",
    "nm_violations",
    "is_nm",
    "magnitude_mask",
    "spatial_sparsity",
    "spatial_mask",
    "spatial_hint",
    "srste",
    "srste_pruned",
    "pruned_indicator",
    "mask_kernels",
]

# Above this M a stable sort is cheaper than the M×M pairwise rank.
_PAIRWISE_MAX_M = 8


def check_nm_shape(weight: Tensor, n: int, m: int) -> None:
    """Raise ValueError unless `weight` can be cut into N:M groups along its channel axis."""
    if not 1 <= n < m:
        raise ValueError(f"need 1 <= N < M, found N={n}, M={m}")
    if weight.dim() < 2:
        raise ValueError(f"expected a weight of rank >= 2 ([O, C, ...]), found shape {tuple(weight.shape)}")
    c = weight.shape[1]
    if c == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} has no input channels: no N:M groups to "
                         "form (leave the layer dense, e.g. with skip=...)")
    if c % m:
        raise ValueError(f"in-channels per group ({c}) is not a multiple of M={m}")


def _groups(weight: Tensor, m: int) -> Tensor:
    """View `weight` as `[O, *kernel, C // m, m]` (a copy when the layout needs one)."""
    w = weight.movedim(1, -1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _ungroup(groups: Tensor, like: Tensor) -> Tensor:
    w = groups.reshape(*groups.shape[:-2], -1)
    return w.movedim(-1, 1).reshape(like.shape)


def nm_mask(weight: Tensor, n: int, m: int, out: Tensor | None = None) -> Tensor:
    """Boolean mask keeping the N largest |w| of every M consecutive input channels.

    Ties go to the lower channel index, so every process computes the same mask. `out`, a
    bool tensor of the weight's shape (a mask buffer), receives the mask in place.
    """
    check_nm_shape(weight, n, m)
    if out is not None and (out.shape != weight.shape or out.dtype != torch.bool):
        raise ValueError(f"out must be a bool tensor of shape {tuple(weight.shape)}, "
                         f"found {out.dtype} {tuple(out.shape)}")
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    with torch.no_grad():
        if not _native.nm_mask(weight.detach(), n, m, out):
            _nm_mask_torch(weight.detach(), n, m, out)
    return out


def _nm_mask_torch(weight: Tensor, n: int, m: int, out: Tensor) -> None:
    """`nm_mask` in torch ops (any device and dtype); the C kernel computes the same."""
    if not out.is_contiguous():  # e.g. a buffer moved to channels_last
        out.copy_(nm_mask(weight, n, m))
        return
    if weight.numel() == 0:  # no output channels or an empty kernel: nothing to rank
        return
    o, c = weight.shape[:2]
    # [M, O, C/M, taps]: member i of every group is one contiguous block, so each
    # comparison below is a single dense pass.
    view = weight.reshape(o, c // m, m, -1).permute(2, 0, 1, 3)
    a = torch.empty(view.shape, dtype=weight.dtype, device=weight.device)
    torch.abs(view, out=a)
    out_groups = out.view(o, c // m, m, -1).permute(2, 0, 1, 3)
    if m <= _PAIRWISE_MAX_M:
        # rank_i = #{j : a_j beats a_i}, a tie going to the lower index:
        # rank_j = j + sum_{k>j} [a_j < a_k] - sum_{i<j} [a_i < a_j]. Keep rank < N.
        rank = torch.empty(a.shape, dtype=torch.uint8, device=a.device)
        for j in range(m):
            rank[j].fill_(j)
        wins = torch.empty(a.shape[1:], dtype=torch.bool, device=a.device)
        wins_u8 = wins.view(torch.uint8)  # no cast per accumulation
        for i in range(m):
            for j in range(i + 1, m):
                torch.lt(a[i], a[j], out=wins)
                rank[i] += wins_u8
                rank[j] -= wins_u8
        torch.lt(rank, n, out=out_groups.view(torch.uint8))  # bool kernels are slower on CPU
    else:
        order = torch.sort(a, dim=0, descending=True, stable=True).indices
        keep = torch.zeros_like(a, dtype=torch.bool)
        keep.scatter_(0, order[:n], True)
        out_groups.copy_(keep)


def nm_violations(weight: Tensor, n: int, m: int) -> int:
    """Number of M-groups of `weight` with more than N non-zeros (0 means exactly N:M)."""
    check_nm_shape(weight, n, m)
    nonzero = _groups(weight.detach() != 0, m).sum(-1)
    return int((nonzero > n).sum())


def is_nm(weight: Tensor, n: int, m: int) -> bool:
    """True when the channel axis divides into M-groups and each holds at most N non-zeros."""
    if weight.dim() < 2 or weight.shape[1] == 0 or weight.shape[1] % m:
        return False
    return nm_violations(weight, n, m) == 0


def _kth_smallest(a: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) of a non-negative float32/float64 tensor, exactly.

    Non-negative floats sort like their bit patterns: a histogram of the top bits finds the
    bucket holding the k-th value, and only that bucket goes through `kthvalue` (several times
    faster than `kthvalue` on the whole layer).
    """
    flat = a.reshape(-1)
    wide = flat.dtype == torch.float64
    bucket = (flat.view(torch.int64) >> 48) if wide else (flat.view(torch.int32) >> 16)
    below = torch.bincount(bucket).cumsum(0)
    b = int(torch.searchsorted(below, k))
    before = int(below[b - 1]) if b else 0
    return flat[bucket == b].kthvalue(k - before).values


def _pruned_count(rate: float, numel: int) -> int:
    """How many weights layer-wise pruning at `rate` drops (validating the rate)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), found {rate}")
    return int(round(rate * numel))


def magnitude_mask(weight: Tensor, rate: float) -> Tensor:
    """Layer-wise unstructured magnitude pruning: drop the `rate` fraction of smallest |w|."""
    k = _pruned_count(rate, weight.numel())
    with torch.no_grad():
        a = weight.detach().abs()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()  # kthvalue has no half-precision CPU kernel; float32 holds them exactly
        if k == 0:
            return torch.ones_like(a, dtype=torch.bool)
        return a > _kth_smallest(a, k)


def _tap_sparsity(kept: Tensor, total: int) -> Tensor:
    """1 − kept/total per tap, from float32 counts (exact up to 2^24 weights per tap)."""
    return 1.0 - kept / total


def spatial_sparsity(mask: Tensor) -> Tensor:
    """s(h, w) = 1 - mean over (o, c) of a binary conv mask `[O, C, *kernel]` (docs/method.md §2)."""
    if mask.dim() < 3:
        raise ValueError(f"expected a conv mask [O, C, *kernel], found shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # bool -> float casts are several times slower on CPU
    return _tap_sparsity(mask.float().sum(dim=(0, 1)), mask.shape[0] * mask.shape[1])


def spatial_hint() -> Tensor:
    """Where a layer's k-th |w| was at its last `spatial_mask` (a small tensor the caller keeps,
    one per layer): while it stays near, the C kernel reads the weight once instead of twice."""
    return _native.spatial_hint()


def spatial_mask(weight: Tensor, rate: float, hint: Tensor | None = None) -> Tensor:
    """The SpRe spatial mask S: taps that unstructured pruning at `rate` keeps denser than average.

    S[h, w] = s_U(h, w) < rate, with s_U the spatial sparsity of layer-wise magnitude
    pruning of the dense latent weight (docs/method.md §3). `hint` (`spatial_hint()`, one per
    layer) only speeds up the next update of the same layer's S.
    """
    k = _pruned_count(rate, weight.numel())
    if weight.dim() < 3:
        raise ValueError(f"expected a conv weight [O, C, *kernel], found shape {tuple(weight.shape)}")
    kept = _native.spatial_kept(weight.detach(), k, hint) if k else None
    if kept is None:
        return spatial_sparsity(magnitude_mask(weight, rate)) < rate
    return _tap_sparsity(kept.float(), weight.shape[0] * weight.shape[1]) < rate


class _SRSTE(torch.autograd.Function):
    """Forward W − W ⊙ P = W ⊙ M; backward dL/dW = dL/dW̃ + λ P ⊙ W (docs/method.md §1), P = 1 − M.

    With P in {0, 1} both are exact (w − w = 0), and each is a single pass over the weight.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, pruned: Tensor, decay: float) -> Tensor:
        if decay:  # λ = 0 (a MaskScheduler adds the decay at the step) needs nothing saved
            ctx.save_for_backward(weight, pruned)
        ctx.decay = decay
        return torch.addcmul(weight, weight, pruned, value=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.decay:
            weight, pruned = ctx.saved_tensors
            grad = torch.addcmul(grad, weight, pruned, value=ctx.decay)
        return grad, None, None


def pruned_indicator(mask: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """P = 1 − M in `dtype` (no gradient), from a bool or 0/1 float mask; into `out` (a tensor of
    the mask's shape and `dtype`) when given."""
    if out is None:
        out = torch.empty(mask.shape, dtype=dtype, device=mask.device)
    elif out.shape != mask.shape or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(mask.shape)}, found {out.dtype} "
                         f"{tuple(out.shape)}")
    if mask.dtype == torch.bool:  # read as uint8: several times faster than bool ops on CPU
        return torch.eq(mask.view(torch.uint8), 0, out=out)
    return out.copy_(1 - mask.detach())


def srste(weight: Tensor, mask: Tensor, decay: float = 2e-4) -> Tensor:
    """Masked weight with the SR-STE gradient (straight-through plus decay on pruned weights)."""
    return srste_pruned(weight, pruned_indicator(mask, weight.dtype), decay)


def srste_pruned(weight: Tensor, pruned: Tensor, decay: float = 2e-4) -> Tensor:
    """`srste` given P = 1 − M in the weight's dtype (what a layer caches once per mask)."""
    return _SRSTE.apply(weight, pruned, decay)


def mask_kernels() -> str:
    """What computes `nm_mask` and `spatial_mask` for float CPU weights here: 'native' (the C
    kernels of spre_fx/_native.c) or 'torch (<why not native>)'."""
    return _native.backend()
