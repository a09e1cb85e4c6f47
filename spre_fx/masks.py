"""Pure tensor functions: N:M masks, spatial sparsity, the SpRe spatial mask, SR-STE.

Everything here takes and returns tensors; no module state (docs/method.md §1-2).
Conv weights are `[O, C, *kernel]` (C = in-channels per group), linear weights `[O, C]`;
N:M groups run along C at a fixed `(o, *kernel)` position, i.e. along the last axis of
`weight.movedim(1, -1)` = `[O, *kernel, C]`, the K order of a channels-last im2col GEMM.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native

__all__ = [
    "check_nm_shape",
    "nm_mask",
    "nm_masks",
    "nm_violations",
    "is_nm",
    "magnitude_mask",
    "spatial_sparsity",
    "spatial_mask",
    "spatial_masks",
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


def _check_out(weight: Tensor, out: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if out.shape != shape or out.dtype != dtype or out.device != weight.device:
        kind = str(dtype).removeprefix("torch.")
        raise ValueError(f"out must be a {kind} tensor of shape {tuple(shape)} on {weight.device}, found "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")


def _group_by(weights: Sequence[Tensor], key) -> dict[tuple, list[int]]:
    """Indices of `weights` grouped by `key(weight)`: each group is computed in one set of calls."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault(key(w), []).append(i)
    return groups


def _write_split(result: Tensor, outs: list[Tensor], sizes: list[int] | None) -> None:
    """Copy the rows of `result` (the layers of one group, stacked or concatenated along dim 0)
    into `outs` in one grouped call: `split`/`unbind` are views, `_foreach_copy_` one launch."""
    if len(outs) == 1:
        outs[0].copy_(result if sizes is not None else result[0])
        return
    pieces = result.split(sizes) if sizes is not None else result.unbind(0)
    torch._foreach_copy_(outs, pieces)


def nm_mask(weight: Tensor, n: int, m: int, out: Tensor | None = None) -> Tensor:
    """Boolean mask keeping the N largest |w| of every M consecutive input channels.

    Ties go to the lower channel index, so every process computes the same mask. `out`, a
    bool tensor of the weight's shape (a mask buffer), receives the mask in place.
    """
    if out is None:
        check_nm_shape(weight, n, m)
        out = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    nm_masks([weight], n, m, [out])
    return out


def nm_masks(weights: Sequence[Tensor], n: int, m: int, out: Sequence[Tensor]) -> None:
    """`nm_mask(w, n, m, out=o)` for every pair of `weights` and `out`, in grouped calls.

    Float32/float64 CPU weights go to the C kernels one by one. The others (CUDA, half
    precision, `SPRE_FX_NATIVE=0`) are concatenated per trailing shape, dtype and device and
    ranked together: a fixed number of ops per group, whatever the number of layers, and no op
    that waits for the device (no `item()`, no data-dependent shape).
    """
    if len(weights) != len(out):
        raise ValueError(f"need one out per weight, found {len(weights)} weights and {len(out)} outs")
    rest = []
    for i, (w, o) in enumerate(zip(weights, out)):
        check_nm_shape(w, n, m)
        _check_out(w, o, torch.bool, w.shape)
        if not _native.nm_mask(w, n, m, o):
            rest.append(i)
    groups = _group_by([weights[i] for i in rest], lambda w: (tuple(w.shape[1:]), w.dtype, w.device))
    with torch.no_grad():
        for members in groups.values():
            ws = [weights[rest[j]] for j in members]
            stacked = ws[0] if len(ws) == 1 else torch.cat(ws)
            if stacked.numel() == 0:  # no output channels or an empty kernel: nothing to rank
                continue
            _write_split(_nm_keep(stacked, n, m), [out[rest[j]] for j in members], [w.shape[0] for w in ws])


def _nm_keep(weight: Tensor, n: int, m: int) -> Tensor:
    """The N:M mask of `weight` ([B, C, *kernel], any strides) in a fixed number of torch ops;
    the C kernel computes the same (ties and NaN included)."""
    view = weight.unflatten(1, (weight.shape[1] // m, m)).movedim(2, 0)  # [M, B, C/M, *kernel]
    a = torch.empty(view.shape, dtype=weight.dtype, device=weight.device)
    torch.abs(view, out=a)  # member i of every group is one contiguous plane: dense passes below
    if m <= _PAIRWISE_MAX_M:
        # rank_i = i + #{j > i : a_i < a_j} - #{j < i : a_j < a_i} (a tie goes to the lower index;
        # a NaN ties with everything). Keep rank < N. All M×M comparisons in one op, summed in
        # int8 (|rank| < 8): beats[i, j] = [j > i] [a_i < a_j].
        upper, limit = _rank_constants(n, m, a)
        beats = torch.lt(a.unsqueeze(1), a.unsqueeze(0)).view(torch.uint8).mul_(upper)
        keep = torch.lt(beats.sum(1, dtype=torch.int8) - beats.sum(0, dtype=torch.int8), limit)
    else:
        order = torch.sort(a, dim=0, descending=True, stable=True).indices
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(0, order[:n], True)
    return keep.movedim(0, 2).flatten(1, 2)


def _rank_constants(n: int, m: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """[j > i] as uint8 [M, M, 1, ...] and N − i as int8 [M, 1, ...] for `_nm_keep` on `like`'s
    device; kept per device for plain tensors (built at each update they are a few more
    launches per group), built afresh for fake, traced or compiled ones."""
    if type(like) is Tensor and not torch.compiler.is_compiling():
        return _cached_rank_constants(n, m, like.dim(), like.device)
    return _build_rank_constants(n, m, like.dim(), like.device)


def _build_rank_constants(n: int, m: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    upper = torch.ones(m, m, dtype=torch.uint8, device=device).triu_(1)
    limit = torch.arange(n, n - m, -1, dtype=torch.int8, device=device)
    return upper.view((m, m) + (1,) * (dim - 1)), limit.view((m,) + (1,) * (dim - 1))


_cached_rank_constants = functools.lru_cache(maxsize=64)(_build_rank_constants)


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


def _pruned_count(rate: float, numel: int) -> int:
    """How many weights layer-wise pruning at `rate` drops (validating the rate)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), found {rate}")
    return int(round(rate * numel))


def magnitude_mask(weight: Tensor, rate: float) -> Tensor:
    """Layer-wise unstructured magnitude pruning: drop the `rate` fraction of smallest |w|."""
    k = _pruned_count(rate, weight.numel())
    with torch.no_grad():
        if k == 0:
            return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        return _magnitude_keep(weight.detach().unsqueeze(0), k)[0]


def _magnitude_keep(stacked: Tensor, k: int) -> Tensor:
    """Per layer of `stacked` ([L, *shape]), |w| > the layer's k-th smallest |w| (1 <= k <= numel).

    An exact k-th value per layer (`kthvalue` along each row: NaN counts as the largest), so no
    count or index ever comes back to the host.
    """
    a = stacked.abs()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()  # kthvalue has no half-precision CPU kernel; float32 holds them exactly
    kth = a.reshape(a.shape[0], -1).kthvalue(k, dim=1).values
    return a > kth.view(-1, *[1] * (a.dim() - 1))


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
    _pruned_count(rate, weight.numel())
    if weight.dim() < 3:
        raise ValueError(f"expected a conv weight [O, C, *kernel], found shape {tuple(weight.shape)}")
    out = torch.empty(weight.shape[2:], dtype=torch.bool, device=weight.device)
    spatial_masks([weight], rate, [out], None if hint is None else [hint])
    return out


def spatial_masks(weights: Sequence[Tensor], rate: float, out: Sequence[Tensor],
                  hints: Sequence[Tensor] | None = None) -> None:
    """`out[i].copy_(spatial_mask(weights[i], rate, hints[i]))` for every layer, in grouped calls.

    Float32/float64 CPU weights go to the C kernel one by one. The others are stacked per shape,
    dtype and device: one `kthvalue` per group finds every layer's exact threshold, and nothing
    comes back to the host.
    """
    if len(weights) != len(out) or (hints is not None and len(hints) != len(weights)):
        raise ValueError(f"need one out (and hint) per weight, found {len(weights)} weights, {len(out)} outs"
                         + ("" if hints is None else f", {len(hints)} hints"))
    rest = []
    for i, (w, o) in enumerate(zip(weights, out)):
        k = _pruned_count(rate, w.numel())
        if w.dim() < 3:
            raise ValueError(f"expected a conv weight [O, C, *kernel], found shape {tuple(w.shape)}")
        _check_out(w, o, torch.bool, w.shape[2:])
        kept = _native.spatial_kept(w, k, None if hints is None else hints[i]) if k else None
        if kept is not None:
            o.copy_(_tap_sparsity(kept.float(), w.shape[0] * w.shape[1]) < rate)
        elif k == 0:  # nothing pruned: every tap as dense as the average
            o.copy_(spatial_sparsity(magnitude_mask(w, rate)) < rate)
        else:
            rest.append(i)
    groups = _group_by([weights[i] for i in rest], lambda w: (tuple(w.shape), w.dtype, w.device))
    with torch.no_grad():
        for members in groups.values():
            ws = [weights[rest[j]] for j in members]
            o, c = ws[0].shape[:2]
            stacked = ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)
            kept = _magnitude_keep(stacked, _pruned_count(rate, ws[0].numel())).sum(dim=(1, 2))
            _write_split(_tap_sparsity(kept.float(), o * c) < rate, [out[rest[j]] for j in members], None)


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
