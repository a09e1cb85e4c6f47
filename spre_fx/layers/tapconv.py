"""A 2-D convolution that pays only for the kernel taps a tap mask keeps (SpRe's extra branch).

The SpRe branch computes `conv(x, W_r ⊙ M_nm ⊙ S)` with S a bool [kh, kw] mask keeping 3 to 5
of 9 taps: the weight is zero at every other tap, so a conv over the kept taps only gives the
same output for |S|/(kh·kw) of the work. `tap_conv2d` computes exactly
`F.conv2d(input, weight, None, stride, padding, dilation, groups)` for such a weight, by one of
several plans (the full conv among them), chosen per shape and tap layout by measuring them once
(forward and backward, like `torch.backends.cudnn.benchmark`) and caching the winner.

Plans (each exact; rectangles may include off taps, whose weight is zero):
- `full`: the k×k conv itself (always a candidate, and the fallback);
- `bbox`: one smaller conv over the bounding box of S, with the padding shifted to match;
- `rows` / `cols`: one conv per run of kernel rows (columns) with the same span of kept taps;
- `cover`: few rectangles of kept taps only, overlapping where that saves a conv (a cross of 5
  taps: a 3×1 and a 1×3, the shared centre zeroed in the second);
- `taps`: one 1×1 conv per kept tap, over a shifted (strided) view of the input;
- `stack`: the kept taps' shifted inputs stacked along channels, one 1×1 conv (im2col over |S|).

Gradients flow through torch ops: the input gradient is exact, the weight gradient is exact on
the kept taps and zero off them (where the caller's mask multiplies it by zero anyway).
Off by default, like `torch.backends.cudnn.benchmark`: a plan chosen by timing can differ between
two runs, and with it the float rounding, so a resumed run would no longer repeat a straight one
bit for bit. Switch on with `SPRE_FX_TAPCONV=1` or `set_enabled(True)`; under
`torch.compile` the full conv runs (a data-dependent plan cannot be traced).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["PLANS", "tap_conv2d", "set_enabled", "enabled", "clear_cache", "tuned_plans",
           "measured_costs", "tap_fraction"]

PLANS = ("full", "bbox", "rows", "cols", "cover", "taps", "stack")
Rect = tuple[int, int, int, int]  # kernel rows [i0, i1), columns [j0, j1)

_ENABLED = os.environ.get("SPRE_FX_TAPCONV", "0").strip().lower() in ("1", "true", "on", "yes")
# Tuning budget: timed repetitions per piece, pieces measured per layer and per call; a plan with
# a piece beyond the budget is not a candidate (bounded work inside training; the full conv
# always is).
_REPS = 3
_MAX_PIECES = 64
_PIECES_PER_CALL = 6  # a layout needing more is decided over several calls
_winners: dict[tuple, str] = {}  # (layer, tap layout) -> plan
_costs: dict[tuple, dict[tuple, float]] = {}  # layer -> piece -> time over the full conv's


def set_enabled(flag: bool) -> None:
    """Turn the tap-restricted plans on or off (off: `tap_conv2d` is the full conv)."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    """Whether `tap_conv2d` may choose a plan other than the full conv."""
    return _ENABLED


def clear_cache() -> None:
    """Forget every tuned choice (the next calls measure again)."""
    _winners.clear()
    _costs.clear()


def tuned_plans() -> dict[tuple, str]:
    """The tuned choices so far: (layer key, tap layout) -> plan name (a copy)."""
    return dict(_winners)


def measured_costs() -> dict[tuple, dict[tuple, float]]:
    """The measured pieces so far: layer key -> {piece: time over the full conv's} (a copy)."""
    return {k: dict(v) for k, v in _costs.items()}


def tap_fraction(taps: Tensor) -> float:
    """|S| / (kh·kw): the share of a full conv's work a tap-restricted conv does."""
    return float(taps.sum()) / taps.numel()


# --------------------------------------------------------------------------- geometry
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pads(padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(left, right) zero padding per spatial dim, as F.conv2d applies it ('same' may be asymmetric)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in _pair(padding))


def _runs(taps: list[list[bool]]) -> list[Rect]:
    """Rectangles covering the kept taps row by row, consecutive rows with one span merged."""
    rects: list[Rect] = []
    for i, row in enumerate(taps):
        on = [j for j, t in enumerate(row) if t]
        if not on:
            continue
        span = (on[0], on[-1] + 1)
        if rects and rects[-1][1] == i and rects[-1][2:] == span:
            rects[-1] = (rects[-1][0], i + 1, *span)
        else:
            rects.append((i, i + 1, *span))
    return rects


def _cover(taps: list[list[bool]]) -> list[Rect]:
    """Few rectangles of kept taps only, covering them all, greedily (the most new taps first,
    then the least overlap): a cross of 5 taps is a 3×1 and a 1×3. Overlaps are counted once
    (`_sum_rects` zeroes a tap in every rectangle after the first that holds it)."""
    kh, kw = len(taps), len(taps[0])
    spans = [(a, b) for a in range(kh) for b in range(a + 1, kh + 1)], [(a, b) for a in range(kw)
                                                                        for b in range(a + 1, kw + 1)]
    pure = {(i0, i1, j0, j1): {(i, j) for i in range(i0, i1) for j in range(j0, j1)}
            for i0, i1 in spans[0] for j0, j1 in spans[1]}
    pure = {r: cells for r, cells in pure.items() if all(taps[i][j] for i, j in cells)}
    left = {(i, j) for i in range(kh) for j in range(kw) if taps[i][j]}
    rects: list[Rect] = []
    while left:
        best = max(pure, key=lambda r, left=left: (len(pure[r] & left), -len(pure[r] - left)))
        rects.append(best)
        left = left - pure[best]
    return rects


@functools.lru_cache(maxsize=4096)
def _plans(taps: tuple[tuple[bool, ...], ...]) -> dict[str, list[Rect]]:
    """Each rectangle plan for a tap layout (`full` and `stack` are not made of rectangles);
    cached, since the layout changes rarely and the same ones recur (do not mutate the result)."""
    kept = [(i, j) for i, row in enumerate(taps) for j, t in enumerate(row) if t]
    rows_i = [i for i, _ in kept]
    cols_j = [j for _, j in kept]
    transposed = [list(col) for col in zip(*taps)]
    return {
        "bbox": [(min(rows_i), max(rows_i) + 1, min(cols_j), max(cols_j) + 1)],
        "rows": _runs(taps),
        "cols": [(i0, i1, j0, j1) for j0, j1, i0, i1 in _runs(transposed)],
        "taps": [(i, i + 1, j, j + 1) for i, j in kept],
        "cover": _cover(taps),
    }


# --------------------------------------------------------------------------- plans
def _rect_conv(x: Tensor, weight: Tensor, rect: Rect, stride, pads, dilation, groups, out_hw,
               kernel: tuple[int, int]) -> Tensor:
    """The full conv's output restricted to the taps in `rect` (`weight` is its [.., i1-i0, j1-j0]
    slice): a smaller conv whose padding is shifted by the rectangle's offset (symmetric, rounded
    up to keep the stride phase) and whose surplus outputs are cut off."""
    i0, i1, j0, j1 = rect
    conv_pad, start = [], []
    for (left, right), a, b, k, s, d in zip(pads, (i0, j0), (i1, j1), kernel, stride, dilation):
        lo, hi = left - a * d, right - (k - b) * d  # padding this rectangle needs before / after
        p = max(lo, hi, 0)
        p += (lo - p) % s  # the first wanted output lands on the conv's grid
        conv_pad.append(p)
        start.append((p - lo) // s)
    y = F.conv2d(x, weight, None, stride, tuple(conv_pad), dilation, groups)
    if tuple(y.shape[-2:]) != out_hw:
        y = y[..., start[0]:start[0] + out_hw[0], start[1]:start[1] + out_hw[1]]
    return y


def _sum_rects(x, weight, rects, stride, pads, dilation, groups, out_hw) -> Tensor:
    kernel = tuple(weight.shape[-2:])
    ys, covered = [], set()
    for i0, i1, j0, j1 in rects:
        w = weight[:, :, i0:i1, j0:j1]
        cells = {(i, j) for i in range(i0, i1) for j in range(j0, j1)}
        if cells & covered:  # taps an earlier rectangle computed: zero here
            keep = [[float((i, j) not in covered) for j in range(j0, j1)] for i in range(i0, i1)]
            w = w * torch.tensor(keep, dtype=weight.dtype, device=weight.device)
        covered |= cells
        ys.append(_rect_conv(x, w, (i0, i1, j0, j1), stride, pads, dilation, groups, out_hw, kernel))
    if len(ys) == 1:
        return ys[0]
    out = ys[0] + ys[1]  # a new tensor, saved by no backward: the rest accumulate in place
    for y in ys[2:]:
        out.add_(y)
    return out


def _stack(x, weight, taps, stride, pads, dilation, groups, out_hw) -> Tensor:
    """im2col over the kept taps only: shifted strided views stacked along channels, one 1×1 conv."""
    kept = [(i, j) for i, row in enumerate(taps) for j, t in enumerate(row) if t]
    (lh, rh), (lw, rw) = pads
    xp = F.pad(x, (lw, rw, lh, rh)) if any((lh, rh, lw, rw)) else x
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    views = [xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
             for i, j in kept]
    n, c = x.shape[:2]
    t, cg = len(kept), c // groups
    cols = torch.stack(views, 1).reshape(n, t, groups, cg, ho, wo).transpose(1, 2).reshape(n, groups * t * cg,
                                                                                           ho, wo)
    idx_i = torch.tensor([i for i, _ in kept], device=weight.device)
    idx_j = torch.tensor([j for _, j in kept], device=weight.device)
    w = weight[:, :, idx_i, idx_j]  # [O, Cg, T]
    o = weight.shape[0]
    w = w.reshape(groups, o // groups, cg, t).transpose(2, 3).reshape(o, t * cg, 1, 1)
    return F.conv2d(cols, w, None, 1, 0, 1, groups)


def _run_plan(name: str, x, weight, taps, stride, padding, pads, dilation, groups, out_hw) -> Tensor:
    if name == "full":
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if name == "stack":
        return _stack(x, weight, taps, stride, pads, dilation, groups, out_hw)
    return _sum_rects(x, weight, _plans(taps)[name], stride, pads, dilation, groups, out_hw)


# --------------------------------------------------------------------------- tuning
# A plan's cost is predicted from measured pieces, each timed once per layer against the full
# conv: the stacked conv per tap count, each rectangle's conv (at its place: padding and cropping
# differ), and the sum of two outputs (plus two input gradients). A new tap layout then costs no
# measurement once its pieces are known, so S may move every step.
def _time(fns: dict, cuda: bool) -> dict:
    """Times of each callable in each round, interleaved, after one warm-up round."""
    times: dict = {k: [] for k in fns}
    for rep in range(_REPS + 1):
        for k, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if rep:
                times[k].append(time.perf_counter() - t)
    return times


def _measure(items: list[tuple], x: Tensor, weight: Tensor, run_item: Callable, backward: bool,
             out_shape: tuple[int, ...]) -> dict[tuple, float]:
    """Each piece's time (forward, plus backward when training, on detached copies) over the full
    conv's in the same round, median over rounds: pieces measured at different times (another
    load on the machine) stay comparable."""
    items = [("full",), *(i for i in items if i != ("full",))]
    xs = x.detach().requires_grad_(x.requires_grad and backward)
    ws = weight.detach().requires_grad_(weight.requires_grad and backward)
    grads: dict = {}

    def piece(item):
        def fn():
            if item == ("add",):  # one more output to sum, and one more input gradient to accumulate
                with torch.no_grad():
                    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
                    out + out
                    if backward and x.requires_grad:
                        xs + xs
                return
            with torch.enable_grad() if backward else torch.no_grad():
                y = run_item(item, xs, ws)
                if backward:
                    g = grads.get(y.shape)
                    if g is None:
                        g = grads[y.shape] = torch.ones_like(y)
                    y.backward(g)
            xs.grad = ws.grad = None
        return fn

    times = _time({item: piece(item) for item in items}, x.device.type == "cuda")
    return {i: statistics.median(t / f for t, f in zip(times[i], times[("full",)])) for i in items}


def _autocast_key(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return None


def _pieces(name: str, rects: list[Rect], count: int) -> list[tuple]:
    if name == "full":
        return [("full",)]
    if name == "stack":
        return [("stack", count)]
    return [("rect", r) for r in rects] + [("add",)] * (len(rects) > 1)


def _choose(x, weight, taps, stride, padding, dilation, groups, run_item, out_shape) -> str:
    backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    layer = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last),
             tuple(weight.shape), weight.dtype, stride, padding, dilation, groups, backward,
             x.requires_grad, weight.requires_grad, torch.get_num_threads(), _autocast_key(x.device.type))
    key = (layer, taps)
    winner = _winners.get(key)
    if winner is not None:
        return winner
    kh, kw = len(taps), len(taps[0])
    count = sum(map(sum, taps))
    plans = {"full": [], "stack": [], **{n: rs for n, rs in _plans(taps).items() if rs != [(0, kh, 0, kw)]}}
    costs = _costs.setdefault(layer, {})

    def bound(piece: tuple) -> float:
        """A piece's measured cost, or a lower bound: no cheaper than the cheapest measured piece of
        its kind that is no larger (rectangle area, stacked tap count)."""
        if piece in costs:
            return costs[piece]
        size = _size(piece)
        return min((c for p, c in costs.items() if p[0] == piece[0] and _size(p) <= size), default=0.0)

    def estimate() -> dict[str, tuple[float, bool]]:
        """Each plan's cost (a lower bound until all its pieces are measured) and whether it is exact."""
        out = {}
        for n, rs in plans.items():
            pieces = _pieces(n, rs, count)
            total = sum(bound(p) for p in pieces if p != ("add",)) + bound(("add",)) * max(0, len(rs) - 1)
            out[n] = total, all(p in costs for p in pieces)
        return out

    est = estimate()
    best = min((c for c, exact in est.values() if exact), default=float("inf"))
    # Only plans that could still beat the best measured one need measuring, the cheapest first.
    hopeful = sorted((c, n) for n, (c, exact) in est.items() if not exact and c < best)
    needed = [p for _, n in hopeful for p in _pieces(n, plans[n], count) if p not in costs]
    needed = list(dict.fromkeys(needed))
    room = max(0, min(_PIECES_PER_CALL, _MAX_PIECES - len(costs)))
    if needed[:room]:  # the full conv is timed beside them (costs are relative to it)
        costs.update(_measure(needed[:room], x, weight, run_item, backward, out_shape))
        est = estimate()
    exact = {n: c for n, (c, e) in est.items() if e}
    winner = min(exact, key=exact.__getitem__) if exact else "full"
    open_plans = any(not e and c < exact.get(winner, float("inf")) for c, e in est.values())
    if not open_plans or len(costs) >= _MAX_PIECES:  # decided: no unmeasured plan can still win
        _winners[key] = winner
    return winner


def _size(piece: tuple) -> int:
    if piece[0] == "rect":
        i0, i1, j0, j1 = piece[1]
        return (i1 - i0) * (j1 - j0)
    return piece[1] if piece[0] == "stack" else 0


# --------------------------------------------------------------------------- entry point
def tap_conv2d(input: Tensor, weight: Tensor, taps: Tensor, stride=1, padding=0, dilation=1,
               groups: int = 1, padding_mode: str = "zeros", plan: str | None = None) -> Tensor:
    """`F.conv2d(input, weight, None, stride, padding, dilation, groups)` for a weight that is zero
    wherever the bool [kh, kw] mask `taps` is False, computed over the kept taps only.

    `padding_mode` other than 'zeros' pads the input as nn.Conv2d does, then convolves unpadded.
    `plan` forces one of `PLANS`; None chooses by measurement (cached) when a backward follows. The
    full conv runs without one (no_grad, eval forwards), when switched off, under torch.compile,
    and with `torch.use_deterministic_algorithms(True)` (a timed choice may differ between runs).
    No kept tap: a zero output (still in the autograd graph).
    """
    kernel = tuple(weight.shape[-2:])
    stride, dilation = _pair(stride), _pair(dilation)
    if tuple(taps.shape) != kernel:
        raise ValueError(f"taps must have the kernel's shape {kernel}, found {tuple(taps.shape)}")
    if plan is not None and plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS} or None, found {plan!r}")
    pads = _pads(padding, kernel, dilation)
    if padding_mode != "zeros":
        (lh, rh), (lw, rw) = pads
        input = F.pad(input, (lw, rw, lh, rh), mode=padding_mode)
        padding, pads = 0, ((0, 0), (0, 0))
    if isinstance(padding, int):
        padding = (padding, padding)
    elif not isinstance(padding, str):
        padding = tuple(padding)
    # A plan chosen by timing may differ between runs, and with it the float rounding: under
    # torch.use_deterministic_algorithms(True) the full conv runs, as cudnn.benchmark yields there.
    automatic_off = (not _ENABLED or torch.compiler.is_compiling()
                     or torch.are_deterministic_algorithms_enabled())
    full = plan == "full" or (plan is None and automatic_off)
    if full or kernel == (1, 1) or (isinstance(padding, str) and padding == "same" and stride != (1, 1)):
        return F.conv2d(input, weight, None, stride, padding, dilation, groups)
    mask = tuple(map(tuple, taps.tolist()))
    count = sum(map(sum, mask))
    if count == taps.numel():
        return F.conv2d(input, weight, None, stride, padding, dilation, groups)
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    out_hw = tuple((size + lo + hi - d * (k - 1) - 1) // s + 1
                   for size, (lo, hi), k, s, d in zip(x.shape[-2:], pads, kernel, stride, dilation))
    if min(out_hw) <= 0 or x.shape[1] != weight.shape[1] * groups:
        return F.conv2d(input, weight, None, stride, padding, dilation, groups)  # torch's own error
    if count == 0:
        # Zero, connected to both inputs so their gradients are zeros (as the full conv's are).
        zero = x.new_zeros((x.shape[0], weight.shape[0], *out_hw))
        y = zero + (x.flatten()[:0].sum() + weight.flatten()[:0].sum())
        return y if batched else y.squeeze(0)

    def run_item(item: tuple, xi: Tensor, wi: Tensor) -> Tensor:
        if item[0] == "rect":
            i0, i1, j0, j1 = item[1]
            return _rect_conv(xi, wi[:, :, i0:i1, j0:j1], item[1], stride, pads, dilation, groups, out_hw,
                              kernel)
        return _run_plan(item[0], xi, wi, mask, stride, padding, pads, dilation, groups, out_hw)

    if plan is None and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # No backward follows (eval, verify, report): a prepared model is trained, not served, so
        # one-off forwards run the full conv instead of paying for timing (convert for inference).
        plan = "full"
    if plan is None:
        out_shape = (x.shape[0], weight.shape[0], *out_hw)
        plan = _choose(x, weight, mask, stride, padding, dilation, groups, run_item, out_shape)
    y = _run_plan(plan, x, weight, mask, stride, padding, pads, dilation, groups, out_hw)
    return y if batched else y.squeeze(0)
