"""Pure tensor functions: N:M masks, spatial sparsity, the SpRe spatial mask, SR-STE.

Everything here takes and returns tensors; no module state (SPRE.md §1-2).
Conv weights are `[O, C, *kernel]` (C = in-channels per group), linear weights `[O, C]`;
N:M groups run along C at a fixed `(o, *kernel)` position, i.e. along the last axis of
`weight.movedim(1, -1)` = `[O, *kernel, C]`, the K order of a channels-last im2col GEMM.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "check_nm_shape",
    "nm_mask",
    "nm_violations",
    "is_nm",
    "magnitude_mask",
    "spatial_sparsity",
    "spatial_mask",
    "srste",
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
    if c % m:
        raise ValueError(f"in-channels per group ({c}) is not a multiple of M={m}")


def _groups(weight: Tensor, m: int) -> Tensor:
    """View `weight` as `[O, *kernel, C // m, m]` (a copy when the layout needs one)."""
    w = weight.movedim(1, -1)
    return w.reshape(*w.shape[:-1], w.shape[-1] // m, m)


def _ungroup(groups: Tensor, like: Tensor) -> Tensor:
    w = groups.reshape(*groups.shape[:-2], -1)
    return w.movedim(-1, 1).reshape(like.shape)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the N largest |w| of every M consecutive input channels.

    Ties go to the lower channel index, so every process computes the same mask.
    """
    check_nm_shape(weight, n, m)
    with torch.no_grad():
        o, c = weight.shape[:2]
        # [M, O, C/M, taps]: member i of every group is one contiguous block, so each
        # comparison below is a single dense pass.
        view = weight.detach().reshape(o, c // m, m, -1).permute(2, 0, 1, 3)
        a = torch.empty(view.shape, dtype=weight.dtype, device=weight.device)
        torch.abs(view, out=a)
        if m <= _PAIRWISE_MAX_M:
            # rank_i = #{j : a_j beats a_i}; a tie goes to the lower index. Keep rank < N.
            rank = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
            for i in range(m):
                for j in range(i + 1, m):
                    j_wins = a[i] < a[j]
                    rank[i] += j_wins
                    rank[j] += ~j_wins
            keep = rank < n
        else:
            order = torch.sort(a, dim=0, descending=True, stable=True).indices
            keep = torch.zeros_like(a, dtype=torch.bool)
            keep.scatter_(0, order[:n], True)
        return keep.permute(1, 2, 0, 3).reshape(weight.shape)


def nm_violations(weight: Tensor, n: int, m: int) -> int:
    """Number of M-groups of `weight` with more than N non-zeros (0 means exactly N:M)."""
    check_nm_shape(weight, n, m)
    nonzero = _groups(weight.detach() != 0, m).sum(-1)
    return int((nonzero > n).sum())


def is_nm(weight: Tensor, n: int, m: int) -> bool:
    """True when the channel axis divides into M-groups and each holds at most N non-zeros."""
    if weight.dim() < 2 or weight.shape[1] % m:
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


def magnitude_mask(weight: Tensor, rate: float) -> Tensor:
    """Layer-wise unstructured magnitude pruning: drop the `rate` fraction of smallest |w|."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), found {rate}")
    with torch.no_grad():
        a = weight.detach().abs()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()  # kthvalue has no half-precision CPU kernel; float32 holds them exactly
        k = int(round(rate * a.numel()))
        if k == 0:
            return torch.ones_like(a, dtype=torch.bool)
        return a > _kth_smallest(a, k)


def spatial_sparsity(mask: Tensor) -> Tensor:
    """s(h, w) = 1 - mean over (o, c) of a binary conv mask `[O, C, *kernel]` (SPRE.md §2)."""
    if mask.dim() < 3:
        raise ValueError(f"expected a conv mask [O, C, *kernel], found shape {tuple(mask.shape)}")
    return 1.0 - mask.float().mean(dim=(0, 1))


def spatial_mask(weight: Tensor, rate: float) -> Tensor:
    """The SpRe spatial mask S: taps that unstructured pruning at `rate` keeps denser than average.

    S[h, w] = s_U(h, w) < rate, with s_U the spatial sparsity of layer-wise magnitude
    pruning of the dense latent weight (SPRE.md §3).
    """
    return spatial_sparsity(magnitude_mask(weight, rate)) < rate


class _SRSTE(torch.autograd.Function):
    """Forward W ⊙ M; backward dL/dW = dL/dW̃ + λ (1 − M) ⊙ W (SPRE.md §1)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        if ctx.decay:
            if mask.dtype == torch.bool:  # two passes: one add, one select
                grad = torch.where(mask, grad, torch.add(grad, weight, alpha=ctx.decay))
            else:
                grad = torch.addcmul(grad, weight, 1 - mask, value=ctx.decay)
        return grad, None, None


def srste(weight: Tensor, mask: Tensor, decay: float = 2e-4) -> Tensor:
    """Masked weight with the SR-STE gradient (straight-through plus decay on pruned weights)."""
    return _SRSTE.apply(weight, mask, decay)
