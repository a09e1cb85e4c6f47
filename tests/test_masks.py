"""Property tests for spre_fx/masks.py: N:M masks, magnitude pruning, spatial masks, SR-STE.

Every expectation is computed by an independent (slow, obvious) reference written here in
plain Python, never by calling the function under test a second time.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spre_fx.masks import (
    check_nm_shape,
    is_nm,
    magnitude_mask,
    nm_mask,
    nm_violations,
    pruned_indicator,
    spatial_mask,
    spatial_sparsity,
    srste,
)

SETTINGS = settings(max_examples=40, deadline=None)
FAST = settings(max_examples=25, deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


# --------------------------------------------------------------------------- strategies
@st.composite
def nm_pairs(draw, max_m: int = 16) -> tuple[int, int]:
    """(N, M) with 1 <= N < M, M in 2..max_m (M > 8 takes the sort path of nm_mask)."""
    m = draw(st.integers(2, max_m))
    n = draw(st.integers(1, m - 1))
    return n, m


@st.composite
def kernels(draw, rank: int | None = None) -> tuple[int, ...]:
    """() for a linear weight, else a (possibly non-square) conv kernel of rank 1..3."""
    if rank is None:
        rank = draw(st.integers(0, 3))
    hi = 5 if rank < 3 else 3
    return tuple(draw(st.integers(1, hi)) for _ in range(rank))


def rand_weight(shape, dtype, seed: int, ties: bool) -> torch.Tensor:
    """Random weight; with `ties`, small integers (many equal |w|, zeros included)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 3, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def channel_rows(t: torch.Tensor) -> list[list[float]]:
    """`t` as rows of its channel axis: [O, *kernel, C] flattened to [-1, C], as Python lists."""
    c = t.shape[1]
    return t.movedim(1, -1).reshape(-1, c).double().tolist()


def ref_nm_rows(weight: torch.Tensor, n: int, m: int) -> list[list[bool]]:
    """Reference N:M mask, row by row: in each M-group keep sorted by (-|w|, channel index)[:N]."""
    out = []
    for row in channel_rows(weight):
        keep = [False] * len(row)
        for start in range(0, len(row), m):
            idx = sorted(range(start, start + m), key=lambda j: (-abs(row[j]), j))
            for j in idx[:n]:
                keep[j] = True
        out.append(keep)
    return out


def other_layout(w: torch.Tensor) -> torch.Tensor:
    """Same values, channel axis stored innermost (channels_last for 4-D and 5-D weights)."""
    if w.dim() == 4:
        return w.contiguous(memory_format=torch.channels_last)
    if w.dim() == 5:
        return w.contiguous(memory_format=torch.channels_last_3d)
    return w.movedim(1, -1).contiguous().movedim(-1, 1)


# --------------------------------------------------------------------------- nm_mask
@SETTINGS
@given(
    nm=nm_pairs(),
    o=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=kernels(),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_mask_matches_reference(nm, o, groups, kernel, dtype, ties, seed):
    """nm_mask equals the sorted (-|w|, index) reference: top-N per group, ties to lower channel."""
    n, m = nm
    w = rand_weight((o, m * groups, *kernel), dtype, seed, ties)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert channel_rows(mask) == [[float(k) for k in row] for row in ref_nm_rows(w, n, m)]


@SETTINGS
@given(
    nm=nm_pairs(),
    o=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=kernels(),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_mask_keeps_exactly_n_largest_per_group(nm, o, groups, kernel, dtype, ties, seed):
    """Exactly N kept per M-group, every kept |w| >= every dropped |w|; the result is N:M."""
    n, m = nm
    w = rand_weight((o, m * groups, *kernel), dtype, seed, ties)
    mask = nm_mask(w, n, m)
    g_mask = mask.movedim(1, -1).reshape(-1, m)
    g_abs = w.abs().double().movedim(1, -1).reshape(-1, m)
    assert (g_mask.sum(-1) == n).all()
    min_kept = torch.where(g_mask, g_abs, math.inf).amin(-1)
    max_dropped = torch.where(g_mask, -math.inf, g_abs).amax(-1)
    assert (min_kept >= max_dropped).all()
    assert nm_violations(w * mask, n, m) == 0
    assert is_nm(w * mask, n, m)


@SETTINGS
@given(
    nm=nm_pairs(),
    o=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=kernels(),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_mask_independent_of_memory_layout(nm, o, groups, kernel, dtype, ties, seed):
    """A channels-last (or otherwise permuted) copy of the weight gets the same mask."""
    n, m = nm
    w = rand_weight((o, m * groups, *kernel), dtype, seed, ties)
    w2 = other_layout(w)
    assert torch.equal(w, w2)
    if w.shape[1] > 1 and math.prod(w.shape[2:]) > 1:
        assert not w2.is_contiguous()
    assert torch.equal(nm_mask(w2, n, m), nm_mask(w, n, m))
    # Writing into a mask buffer in either layout gives the same mask as a fresh result.
    for out in (torch.zeros(w.shape, dtype=torch.bool), other_layout(torch.zeros(w.shape, dtype=torch.bool))):
        assert nm_mask(w2, n, m, out=out) is out
        assert torch.equal(out, nm_mask(w, n, m))


def test_nm_mask_out_must_match_the_weight():
    """`out` of another shape or dtype is refused with the expected one named."""
    w = torch.randn(4, 8, 3, 3)
    for bad in (torch.zeros(4, 8, 3, dtype=torch.bool), torch.zeros(4, 8, 3, 3)):
        with pytest.raises(ValueError, match=r"out must be a bool tensor of shape \(4, 8, 3, 3\)"):
            nm_mask(w, 2, 4, out=bad)


def test_nm_mask_tie_break_both_paths():
    """All-equal groups keep the first N channels, on the pairwise (M <= 8) and sort (M > 8) paths."""
    for m in (4, 8, 9, 16):
        for n in (1, m // 2, m - 1):
            mask = nm_mask(torch.ones(2, 2 * m, 3), n, m)
            expect = (torch.arange(2 * m) % m < n).view(1, -1, 1).expand(2, -1, 3)
            assert torch.equal(mask, expect), (n, m)


@FAST
@given(
    nm=nm_pairs(),
    o=st.integers(1, 3),
    kernel=kernels(),
    groups=st.integers(1, 3),
    rest=st.data(),
)
def test_check_nm_shape_rejects_bad_channels(nm, o, kernel, groups, rest):
    """C % M != 0 raises ValueError (for check_nm_shape, nm_mask and nm_violations); is_nm is False."""
    n, m = nm
    c = m * groups + rest.draw(st.integers(1, m - 1))
    w = torch.randn(o, c, *kernel)
    for fn in (check_nm_shape, nm_mask, nm_violations):
        with pytest.raises(ValueError):
            fn(w, n, m)
    assert not is_nm(w, n, m)


@FAST
@given(m=st.integers(2, 16), kernel=kernels(), rest=st.data())
def test_check_nm_shape_rejects_bad_nm(m, kernel, rest):
    """N >= M (and N < 1) raises ValueError even when C is a multiple of M."""
    n = rest.draw(st.sampled_from([0, -1, m, m + 1, 2 * m]))
    w = torch.randn(2, 2 * m, *kernel)
    for fn in (check_nm_shape, nm_mask, nm_violations):
        with pytest.raises(ValueError):
            fn(w, n, m)
    check_nm_shape(w, m - 1, m)  # the valid neighbour passes


# --------------------------------------------------------------------------- nm_violations
@SETTINGS
@given(
    nm=nm_pairs(),
    o=st.integers(1, 3),
    groups=st.integers(1, 3),
    kernel=kernels(),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_violations_counts_overfull_groups(nm, o, groups, kernel, density, dtype, seed):
    """nm_violations = number of M-groups with more than N non-zeros (counted by hand)."""
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    shape = (o, m * groups, *kernel)
    w = (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < density)).to(dtype)
    expect = 0
    for row in channel_rows(w):
        for start in range(0, len(row), m):
            expect += sum(v != 0 for v in row[start : start + m]) > n
    assert nm_violations(w, n, m) == expect
    assert is_nm(w, n, m) == (expect == 0)


# --------------------------------------------------------------------------- magnitude_mask
@st.composite
def distinct_weights(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    """Weights with pairwise distinct |w| (a signed permutation of 1..numel), shape [O, C, *k]."""
    kernel = draw(kernels())
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)), *kernel)
    numel = math.prod(shape)
    dtype = draw(st.sampled_from([d for d in dtypes if d != torch.bfloat16 or numel <= 256]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mags = (torch.randperm(numel, generator=g) + 1).double()
    signs = torch.randint(0, 2, (numel,), generator=g).double() * 2 - 1
    return (mags * signs).reshape(shape).to(dtype)


@SETTINGS
@given(w=distinct_weights(), rate=st.floats(0.0, 0.99))
def test_magnitude_mask_prunes_round_rate_smallest(w, rate):
    """Without ties, round(rate·numel) weights are pruned and every kept |w| > every pruned |w|."""
    mask = magnitude_mask(w, rate)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert int((~mask).sum()) == round(rate * w.numel())
    a = w.abs().double()
    if mask.any() and (~mask).any():
        assert a[mask].min() > a[~mask].max()


@FAST
@given(kernel=kernels(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_magnitude_mask_rate_zero_keeps_all(kernel, dtype, seed):
    """rate = 0 keeps every weight, zeros and ties included."""
    w = rand_weight((2, 3, *kernel), dtype, seed, ties=True)
    assert magnitude_mask(w, 0.0).all()


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_magnitude_mask_rejects_bad_rate(rate):
    """A rate outside [0, 1) raises ValueError."""
    with pytest.raises(ValueError):
        magnitude_mask(torch.randn(4, 4, 3, 3), rate)


@FAST
@given(
    base=st.floats(0.5, 100.0),
    step=st.floats(1e-13, 1e-9),
    numel=st.integers(4, 32),
    rate=st.floats(0.1, 0.9),
)
def test_magnitude_mask_float64_resolution(base, step, numel, rate):
    """float64 weights that differ below float32 resolution are still distinct: same count pruned."""
    w = (base + step * torch.arange(numel, dtype=torch.float64)).reshape(1, numel)
    assert len(set(w.flatten().tolist())) == numel
    mask = magnitude_mask(w, rate)
    k = round(rate * numel)
    assert int((~mask).sum()) == k
    assert not mask.flatten()[:k].any() and mask.flatten()[k:].all()


# --------------------------------------------------------------------------- spatial sparsity / mask
@SETTINGS
@given(
    o=st.integers(1, 4),
    c=st.integers(1, 5),
    kernel=kernels(rank=None).filter(len),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_spatial_sparsity_is_one_minus_mean_over_oc(o, c, kernel, density, seed):
    """s(tap) = 1 - (#kept at that tap) / (O·C), counted tap by tap."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(o, c, *kernel, generator=g) < density
    s = spatial_sparsity(mask)
    assert s.shape == kernel
    flat = mask.reshape(o * c, -1).tolist()
    expect = [1.0 - sum(row[t] for row in flat) / (o * c) for t in range(len(flat[0]))]
    assert torch.allclose(s.double().flatten(), torch.tensor(expect, dtype=torch.float64), atol=1e-6)


def test_spatial_sparsity_rejects_linear_mask():
    """A [O, C] mask has no taps."""
    with pytest.raises(ValueError):
        spatial_sparsity(torch.ones(4, 4, dtype=torch.bool))


def ref_magnitude_keep(w: torch.Tensor, rate: float) -> list[bool]:
    """Reference for distinct |w|: prune the round(rate·numel) smallest, by sorting in Python."""
    flat = w.double().flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: abs(flat[i]))
    keep = [True] * len(flat)
    for i in order[: round(rate * len(flat))]:
        keep[i] = False
    return keep


@SETTINGS
@given(w=distinct_weights(dtypes=(torch.float32, torch.float64)).filter(lambda t: t.dim() > 2),
       rate=st.floats(0.0, 0.99))
def test_spatial_mask_marks_denser_than_average_taps(w, rate):
    """S = s_U < rate, with s_U from an independent magnitude pruning (boundary taps excepted)."""
    s_mask = spatial_mask(w, rate)
    assert s_mask.dtype == torch.bool and s_mask.shape == w.shape[2:]
    keep = torch.tensor(ref_magnitude_keep(w, rate)).reshape(w.shape)
    s_ref = 1.0 - keep.double().mean(dim=(0, 1))
    clear = (s_ref - rate).abs() > 1e-6
    assert torch.equal(s_mask[clear], (s_ref < rate)[clear])


def ref_spatial_mask(w: torch.Tensor, rate: Fraction) -> list[bool]:
    """Reference S by sorting in Python, in exact arithmetic: prune the k = round(rate·numel)
    smallest |w| (every weight tied with the k-th goes too), s(tap) = 1 − kept(tap)/(O·C),
    S = s < rate."""
    o, c = w.shape[:2]
    rows = w.double().reshape(o * c, -1).abs().tolist()  # exact for every float dtype
    k = round(rate * len(rows) * len(rows[0]))
    ordered = sorted(v for row in rows for v in row)
    kept = [sum(row[t] > ordered[k - 1] for row in rows) if k else len(rows) for t in range(len(rows[0]))]
    return [1 - Fraction(n, o * c) < rate for n in kept]


@SETTINGS
@given(
    o=st.integers(1, 5),
    c=st.integers(1, 5),
    kernel=st.one_of(kernels(rank=None).filter(len), st.just((3, 7, 7)), st.just((1, 13, 11))),
    dtype=st.sampled_from(DTYPES + [torch.float16]),
    ties=st.booleans(),
    rate_64ths=st.integers(0, 63),
    seed=st.integers(0, 2**31 - 1),
)
def test_spatial_mask_matches_sorting_reference(o, c, kernel, dtype, ties, rate_64ths, seed):
    """S equals an independent sort-based reference exactly: ties, zeros, half precision and
    kernels of > 128 taps (a coarser histogram) included. Rates are multiples of 1/64, exact in
    float32 as in the reference's fractions, so no tap sits on a rounding boundary."""
    w = rand_weight((o, c, *kernel), dtype, seed, ties)
    rate = Fraction(rate_64ths, 64)
    expect = ref_spatial_mask(w, rate)
    assert spatial_mask(w, float(rate)).flatten().tolist() == expect


@SETTINGS
@given(
    o=st.integers(1, 4),
    c=st.integers(1, 4),
    kernel=st.one_of(
        st.tuples(st.sampled_from([3, 5]), st.sampled_from([3, 5])),
        st.tuples(st.just(3), st.just(3), st.sampled_from([1, 3])),
    ),
    rate=st.floats(0.3, 0.6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_spatial_mask_centre_heavy_weight(o, c, kernel, rate, dtype, seed):
    """A centre tap of much larger |w| is in S; a tap of tiny |w| is not."""
    g = torch.Generator().manual_seed(seed)
    shape = (o, c, *kernel)
    signs = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    w = (1 + torch.rand(shape, generator=g, dtype=torch.float64)) * signs
    centre = (slice(None), slice(None), *(k // 2 for k in kernel))
    corner = (slice(None), slice(None), *(0 for _ in kernel))
    w[centre] *= 100
    w[corner] *= 1e-3
    s_mask = spatial_mask(w.to(dtype), rate)
    assert s_mask[centre[2:]]
    assert not s_mask[corner[2:]]


# --------------------------------------------------------------------------- SR-STE
@SETTINGS
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    decay=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_srste_forward_and_gradient(shape, decay, seed):
    """Forward W ⊙ M; dL/dW = upstream + decay·(1 − M)·W; decay = 0 is plain straight-through."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(shape, generator=g) < 0.5
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    out = srste(w, mask, decay)
    assert torch.equal(out, w.detach() * mask)
    (grad,) = torch.autograd.grad(out, w, upstream)
    expect = upstream + decay * (1 - mask.double()) * w.detach()
    torch.testing.assert_close(grad, expect, rtol=1e-12, atol=1e-15)
    if decay == 0.0:
        assert torch.equal(grad, upstream)


def test_srste_default_decay_is_2e_4():
    """The default λ is docs/method.md's 2e-4."""
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 8) < 0.5
    srste(w, mask).sum().backward()
    torch.testing.assert_close(w.grad, 1 + 2e-4 * (~mask).double() * w.detach(), rtol=1e-12, atol=1e-15)


@FAST
@given(decay=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), seed=st.integers(0, 2**31 - 1))
def test_srste_float_mask_gets_no_gradient(decay, seed):
    """A 0/1 float mask (requiring grad) gets no gradient, and W's gradient is the SR-STE one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 8, generator=g) < 0.5).double().requires_grad_()
    upstream = torch.randn(3, 8, generator=g, dtype=torch.float64)
    out = srste(w, mask, decay)
    gw, gm = torch.autograd.grad(out, (w, mask), upstream, allow_unused=True)
    assert gm is None
    expect = upstream + decay * (1 - mask.detach()) * w.detach()
    torch.testing.assert_close(gw, expect, rtol=1e-12, atol=1e-15)


def test_srste_bool_mask_stays_out_of_graph():
    """With a bool mask (what nm_mask returns) only W receives a gradient."""
    w = torch.randn(2, 4, 3, requires_grad=True)
    mask = nm_mask(w, 2, 4)
    srste(w, mask, 0.1).square().sum().backward()
    assert w.grad is not None and not mask.requires_grad and mask.grad is None


# --------------------------------------------------------------------------- grouped (torch) path
def ref_nm_pairwise(weight: torch.Tensor, n: int, m: int) -> list[list[bool]]:
    """Reference N:M mask by pairwise comparison in Python, as the C kernel defines it also for
    NaN: member i is outranked by every lower j unless |w_j| < |w_i|, and by every higher j with
    |w_i| < |w_j| (a NaN compares false both ways, so it ties with everything)."""
    out = []
    for row in channel_rows(weight):
        a = [abs(v) for v in row]
        keep = []
        for start in range(0, len(a), m):
            g = a[start:start + m]
            for i in range(m):
                rank = sum(not g[j] < g[i] for j in range(i)) + sum(g[i] < g[j] for j in range(i + 1, m))
                keep.append(rank < n)
        out.append(keep)
    return out


@st.composite
def layer_sets(draw, conv_only: bool = False):
    """2-5 weights drawn from two shapes (so that some share one: a group), with ties, NaN
    (optional) and a channels-last layout mixed in: what a grouped call receives."""
    n, m = draw(nm_pairs(max_m=8))
    shapes = []
    for _ in range(2):
        kernel = draw(kernels(rank=2 if conv_only else None))
        shapes.append((draw(st.integers(1, 3)), m * draw(st.integers(1, 3)), *kernel))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    weights = []
    for _ in range(draw(st.integers(2, 5))):
        seed, ties = draw(st.integers(0, 2**31 - 1)), draw(st.booleans())
        w = rand_weight(draw(st.sampled_from(shapes)), dtype, seed, ties)
        weights.append(other_layout(w) if draw(st.booleans()) else w)
    return n, m, weights


@SETTINGS
@given(layers=layer_sets(), nan_at=st.lists(st.integers(0, 10**6), max_size=3))
def test_grouped_nm_masks_equal_the_pairwise_reference(layers, nan_at):
    """`nm_masks` on the torch path (CUDA's), several layers per group, ties and NaN included,
    equals the pairwise reference layer by layer (the C kernel is held to it in test_native)."""
    from spre_fx import _native
    from spre_fx.masks import nm_masks

    n, m, weights = layers
    for w, at in zip(weights, nan_at):
        w[tuple(torch.unravel_index(torch.tensor(at % w.numel()), w.shape))] = float("nan")
    outs = [torch.zeros(w.shape, dtype=torch.bool) for w in weights]
    outs[0] = other_layout(outs[0])
    with _native.using(None):
        nm_masks(weights, n, m, outs)
    for w, out in zip(weights, outs):
        assert channel_rows(out) == [[float(v) for v in row] for row in ref_nm_pairwise(w, n, m)]


@SETTINGS
@given(layers=layer_sets(conv_only=True), dtype=st.sampled_from(DTYPES + [torch.float16]),
       rate_64ths=st.integers(0, 63))
def test_grouped_spatial_masks_equal_the_sorting_reference(layers, dtype, rate_64ths):
    """`spatial_masks` on the torch path (one `kthvalue` per group of equal shapes) equals the
    sort-based reference layer by layer: ties, zeros, half precision, channels-last."""
    from spre_fx import _native
    from spre_fx.masks import spatial_masks

    _, _, weights = layers
    weights = [w.to(dtype) for w in weights]
    rate = Fraction(rate_64ths, 64)
    outs = [torch.zeros(w.shape[2:], dtype=torch.bool) for w in weights]
    with _native.using(None):
        spatial_masks(weights, float(rate), outs)
    for w, out in zip(weights, outs):
        assert out.flatten().tolist() == ref_spatial_mask(w, rate)


def test_grouped_masks_check_their_arguments():
    """One out per weight, each of the right shape, dtype and device; a bad one is named."""
    from spre_fx.masks import nm_masks, spatial_masks

    w = torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="one out per weight"):
        nm_masks([w, w], 2, 4, [torch.empty(w.shape, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"out must be a bool tensor of shape \(4, 8, 3, 3\)"):
        nm_masks([w], 2, 4, [torch.empty(4, 8, 3, 3)])
    with pytest.raises(ValueError, match=r"out must be a bool tensor of shape \(3, 3\)"):
        spatial_masks([w], 0.5, [torch.empty(4, 8, dtype=torch.bool)])
    with pytest.raises(ValueError, match="one out \\(and hint\\) per weight"):
        spatial_masks([w], 0.5, [torch.empty(3, 3, dtype=torch.bool)], hints=[])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruned_indicator_writes_into_out(dtype):
    """P = 1 − M into a given tensor (what a layer's cache reuses), from bool and float masks;
    an `out` of another shape or dtype is refused."""
    mask = torch.rand(6, 8, 3, 3) > 0.5
    out = torch.full(mask.shape, 7.0, dtype=dtype)
    assert pruned_indicator(mask, dtype, out=out) is out
    assert torch.equal(out, (~mask).to(dtype))
    assert torch.equal(pruned_indicator(mask.double(), dtype, out=out), (~mask).to(dtype))
    for bad in (torch.empty(6, 8, 3, dtype=dtype), torch.empty(mask.shape, dtype=torch.float16)):
        with pytest.raises(ValueError, match="out must be"):
            pruned_indicator(mask, dtype, out=bad)
