"""Pure tensor functions: which order of a layer's input channels lets N:M keep the most |w|.

N:M keeps the N largest of every M consecutive input channels (masks.py); reordering the
channels changes which weights share a group, so a good order keeps more magnitude (NVIDIA
ASP's objective, Pool & Yu, NeurIPS 2021). The search here is a swap-based local search over
pairs of M-groups: every round pairs the groups (a round-robin schedule, in a seeded order) and,
for each pair, makes the one channel swap between them that gains the most, if any does. It
never returns an order that keeps less than the identity. docs/pipeline.md "Channel
permutation" says what it finds against an exhaustive search.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nm_kept", "search_permutation"]

# Candidate swaps of one chunk of group pairs: at most this many elements in flight.
_CHUNK = 1 << 23


def _sorted(values: list[Tensor]) -> list[Tensor]:
    """The m tensors sorted elementwise, largest first: a compare-exchange network (m small)."""
    s = list(values)
    for i in range(len(s) - 1):
        for j in range(len(s) - 1 - i):
            s[j], s[j + 1] = torch.maximum(s[j], s[j + 1]), torch.minimum(s[j], s[j + 1])
    return s


def nm_kept(magnitudes: Tensor, n: int, m: int, perm: Tensor | None = None) -> float:
    """Σ of what N:M keeps of `magnitudes` ([rows, C], C a multiple of M, values >= 0), the
    columns taken in the order `perm` (new position p holds column perm[p]), in float64."""
    a = magnitudes if perm is None else magnitudes[:, perm]
    rows, c = a.shape
    if c % m:
        raise ValueError(f"{c} channels are not a multiple of M={m}")
    top = _sorted(list(a.reshape(rows, c // m, m).unbind(-1)))[:n]
    return float(sum(t.sum(dtype=torch.float64) for t in top))


def _without_each(z: Tensor, n: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """For groups z [P, m, rows]: Σ_rows of the top-N sum of the group without member i [P, m],
    the N-th largest without member i [P, m, rows], and Σ_rows of the group's top-N sum [P].

    The group's values are sorted by a compare-exchange network over its m rows (no sort, no
    scatter). Member i is in the top N when z_i >= s_{N-1}; on a tie either reading gives the
    same sums."""
    s = _sorted(list(z.unbind(1)))
    kept = torch.stack(s[:n]).sum(0)
    in_top = (z >= s[n - 1].unsqueeze(1)).to(z.dtype)
    total = kept.sum(-1)
    top = total.unsqueeze(1) - (in_top * (z - s[n].unsqueeze(1))).sum(-1)
    nth = s[n - 1].unsqueeze(1) + in_top * (s[n] - s[n - 1]).unsqueeze(1)
    return top, nth, total


def search_permutation(magnitudes: Tensor, n: int, m: int, *, rounds: int = 12, seed: int = 0) -> Tensor:
    """An order of the C columns of `magnitudes` ([rows, C], every consumer's |w| stacked along
    rows) under which N:M keeps at least as much as in the identity order.

    Swapping channel i of group X with channel j of group Y changes only X's and Y's top-N sums;
    with X∖i's top-N sum T and N-th largest t, the top-N sum of X∖i ∪ {j} is T + max(0, w_j - t),
    so every swap of a pair of groups is scored at once. Stops after `rounds`, or earlier at a
    local optimum: a full round-robin of group pairs without a gain.
    """
    rows, c = magnitudes.shape
    if c % m or not 1 <= n < m:
        raise ValueError(f"need 1 <= N < M and C a multiple of M, found N={n}, M={m}, C={c}")
    groups = c // m
    perm = torch.arange(c, device=magnitudes.device).view(groups, m)
    if groups < 2 or rows == 0:
        return perm.reshape(-1)
    w = magnitudes.t().reshape(groups, m, rows).clone(memory_format=torch.contiguous_format)  # never a view
    # Round-robin (circle method) over the groups in a seeded order: every `slots - 1` rounds
    # pair each group with each other one once, so that many idle rounds in a row is a local optimum.
    labels = torch.randperm(groups, generator=torch.Generator().manual_seed(seed)).tolist()
    labels += [-1] * (groups % 2)
    slots = len(labels)
    step = max(1, _CHUNK // (m * m * rows))
    idle = 0
    for r in range(rounds):
        k = r % (slots - 1)
        ring = [labels[0], *labels[1:][k:], *labels[1:][:k]]
        pairs = [(a, b) for a, b in zip(ring[:slots // 2], reversed(ring[slots // 2:])) if a >= 0 and b >= 0]
        left = torch.tensor([a for a, _ in pairs], device=w.device)
        right = torch.tensor([b for _, b in pairs], device=w.device)
        swapped = 0
        for start in range(0, len(pairs), step):
            a, b = left[start:start + step], right[start:start + step]
            x, y = w[a], w[b]
            top_x, nth_x, kept_x = _without_each(x, n, m)
            top_y, nth_y, kept_y = _without_each(y, n, m)
            gain = top_x[:, :, None] + top_y[:, None, :] - (kept_x + kept_y)[:, None, None]
            gain += (y[:, None, :, :] - nth_x[:, :, None, :]).clamp_min_(0).sum(-1)
            gain += (x[:, :, None, :] - nth_y[:, None, :, :]).clamp_min_(0).sum(-1)
            best, arg = gain.flatten(1).max(1)
            # a gain below float rounding of the pair's own sum is no gain
            ok = best > 1e-5 * (kept_x + kept_y)
            a, b, i, j = a[ok], b[ok], arg[ok] // m, arg[ok] % m
            perm[a, i], perm[b, j] = perm[b, j].clone(), perm[a, i].clone()
            w[a, i], w[b, j] = w[b, j].clone(), w[a, i].clone()
            swapped += int(ok.sum())
        idle = 0 if swapped else idle + 1
        if idle >= slots - 1:
            break
    return perm.reshape(-1)
