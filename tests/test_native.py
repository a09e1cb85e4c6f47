"""The C mask kernels (spre_fx/_native.c) against the torch code they replace, and their fallback.

Expectations come from the torch implementations in masks.py (themselves checked against
plain-Python references in test_masks.py), never from the kernels.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import spre_fx
from spre_fx import _native
from spre_fx.masks import (
    magnitude_mask,
    nm_mask,
    spatial_hint,
    spatial_mask,
    spatial_sparsity,
)

needs_native = pytest.mark.skipif(_native.library() is None, reason=f"C mask kernels: {_native.backend()}")
SETTINGS = settings(max_examples=60, deadline=None)
FLOATS = [torch.float32, torch.float64]
LAYOUTS = ["contiguous", "channels_last"]
GROUP_KERNELS = [(3, 3), (1, 1), (2, 3)]
SEEDS = st.integers(0, 2**31 - 1)


def torch_nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask the torch code computes (what CUDA and half-precision weights run)."""
    with _native.using(None):
        return nm_mask(w, n, m)


def rand_weight(shape, dtype, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # many equal |w|, zeros and opposite signs included
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def relayout(w: torch.Tensor, how: str) -> torch.Tensor:
    """Same values stored contiguous, channels-last, or as a strided slice of a larger tensor."""
    if how == "channels_last":
        return w.movedim(1, -1).contiguous().movedim(-1, 1)
    if how == "slice":
        wide = torch.zeros(w.shape[0] * 2, *w.shape[1:], dtype=w.dtype)
        wide[1::2] = w
        return wide[1::2]
    return w.contiguous()


@st.composite
def kernels(draw) -> tuple[int, ...]:
    """(), small 1-3-D kernels, and large ones (> 16 taps: fewer histogram bits per tap)."""
    return draw(st.one_of(
        st.just(()),
        st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
        st.sampled_from([(3, 3), (7, 7), (13, 11), (5, 5, 5), (1, 70)]),
    ))


@needs_native
@SETTINGS
@given(
    m=st.integers(2, 8),
    n_frac=st.floats(0.0, 1.0),
    o=st.integers(1, 4),
    groups=st.integers(1, 4),
    kernel=kernels(),
    dtype=st.sampled_from(FLOATS),
    ties=st.booleans(),
    nans=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "slice"]),
    out_layout=st.sampled_from(["contiguous", "channels_last"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_kernel_equals_torch(m, n_frac, o, groups, kernel, dtype, ties, nans, layout, out_layout, seed):
    """Same mask bit for bit: ties, zeros and NaN, any weight layout and any out layout."""
    n = min(m - 1, 1 + int(n_frac * (m - 1)))
    w = rand_weight((o, m * groups, *kernel), dtype, seed, ties)
    if nans:
        w.view(-1)[:: 5] = float("nan")
    w = relayout(w, layout)
    expect = torch_nm_mask(w.contiguous(), n, m)
    out = relayout(torch.zeros(w.shape, dtype=torch.bool), out_layout)
    assert _native.nm_mask(w, n, m, out)
    assert torch.equal(out, expect)
    assert torch.equal(nm_mask(w, n, m), expect)


@needs_native
@SETTINGS
@given(
    o=st.integers(1, 5),
    c=st.integers(1, 6),
    kernel=kernels().filter(len),
    dtype=st.sampled_from(FLOATS),
    ties=st.booleans(),
    rate=st.floats(0.0, 0.999),
    layout=st.sampled_from(["contiguous", "channels_last", "slice"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_spatial_kernel_counts_what_magnitude_pruning_keeps(o, c, kernel, dtype, ties, rate, layout, seed):
    """Per tap, the kernel's kept count equals that of magnitude_mask (ties at the k-th pruned)."""
    w = relayout(rand_weight((o, c, *kernel), dtype, seed, ties), layout)
    k = int(round(rate * w.numel()))
    assume(0 < k < w.numel())  # k = 0 is left to magnitude_mask (keep all)
    kept = _native.spatial_kept(w, k)
    assert kept is not None and kept.dtype == torch.int64 and kept.shape == w.shape[2:]
    assert torch.equal(kept, magnitude_mask(w, rate).sum(dim=(0, 1)))
    assert torch.equal(spatial_mask(w, rate), spatial_sparsity(magnitude_mask(w, rate)) < rate)


@needs_native
@SETTINGS
@given(
    m=st.integers(2, 8),
    n_frac=st.floats(0.0, 1.0),
    shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3), st.sampled_from(GROUP_KERNELS)),
                    min_size=1, max_size=2),
    picks=st.lists(st.tuples(st.integers(0, 1), st.booleans(), st.sampled_from(LAYOUTS), SEEDS),
                   min_size=1, max_size=5),
    dtype=st.sampled_from(FLOATS),
    rate=st.floats(0.01, 0.99),
)
def test_grouped_torch_masks_equal_the_kernels_layer_by_layer(m, n_frac, shapes, picks, dtype, rate):
    """What CUDA runs (`nm_masks` / `spatial_masks` with the kernels off: layers of one shape
    concatenated or stacked and ranked together) equals the C kernels run on each layer alone,
    bit for bit: heavy ties, float32/64, contiguous and channels-last layers mixed in a group."""
    from spre_fx.masks import nm_masks, spatial_masks

    n = min(m - 1, 1 + int(n_frac * (m - 1)))
    weights = []
    for which, ties, layout, seed in picks:
        o, groups, kernel = shapes[which % len(shapes)]
        weights.append(relayout(rand_weight((o, groups * m, *kernel), dtype, seed, ties), layout))
    nm_out = [torch.zeros(w.shape, dtype=torch.bool) for w in weights]
    s_out = [torch.zeros(w.shape[2:], dtype=torch.bool) for w in weights]
    with _native.using(None):
        nm_masks(weights, n, m, nm_out)
        spatial_masks(weights, rate, s_out)
    for w, got_nm, got_s in zip(weights, nm_out, s_out):
        assert torch.equal(got_nm, nm_mask(w, n, m))
        assert torch.equal(got_s, spatial_mask(w, rate))


@needs_native
@SETTINGS
@given(
    o=st.integers(1, 40),
    c=st.integers(1, 24),
    kernel=st.sampled_from([(3, 3), (1, 3), (5, 5), (2, 2, 2)]),
    dtype=st.sampled_from(FLOATS),
    ties=st.booleans(),
    rate=st.floats(0.01, 0.99),
    layout=st.sampled_from(["contiguous", "channels_last", "slice"]),
    step=st.sampled_from([0.0, 1e-4, 1e-2, 1.0]),
    garbage=st.one_of(st.none(),  # the key of v_k, a half-width (up to all keys), a flag
                      st.tuples(st.integers(-3, 2**63 - 1), st.integers(-3, 2**63 - 1), st.integers(-1, 2))),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_spatial_hint_changes_no_count(o, c, kernel, dtype, ties, rate, layout, step, garbage, threads,
                                         seed):
    """The hint kept per layer (the key of the k-th |w| at its last update and a half-width) only
    decides how the counts are found: after a step of any size, or holding any value, they are
    magnitude pruning's. The same weight twice is counted by the one-pass bracket."""
    w = relayout(rand_weight((o, c, *kernel), dtype, seed, ties), layout)
    k = int(round(rate * w.numel()))
    assume(0 < k < w.numel())
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hint = spatial_hint()
        first = _native.spatial_kept(w, k, hint)
        assert torch.equal(first, magnitude_mask(w, rate).sum(dim=(0, 1)))
        assert hint[0] >= 0 and hint[1] >= 1 and hint[2] == 0  # no bracket the first time
        again = _native.spatial_kept(w, k, hint)
        assert torch.equal(again, first) and hint[2] == 1
        if garbage is not None:
            hint.copy_(torch.tensor(garbage))
        noise = rand_weight(w.shape, dtype, seed + 1, ties=False) * step
        moved = relayout((w + noise).contiguous(), layout)
        assert torch.equal(_native.spatial_kept(moved, k, hint), magnitude_mask(moved, rate).sum(dim=(0, 1)))
        expect_s = spatial_sparsity(magnitude_mask(moved, rate)) < rate
        assert torch.equal(spatial_mask(moved, rate, hint), expect_s)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_a_spatial_hint_is_checked_before_use():
    w = torch.randn(8, 8, 3, 3)
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64),
                torch.zeros(6, dtype=torch.int64)[::2]):
        with pytest.raises(ValueError, match="spatial_hint"):
            _native.spatial_kept(w, 10, bad)


@needs_native
@settings(max_examples=25, deadline=None)
@given(base=st.floats(0.1, 10.0), numel=st.integers(50, 2000), dtype=st.sampled_from(FLOATS),
       rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**31 - 1))
def test_spatial_kernel_resolves_neighbouring_floats(base, numel, dtype, rate, seed):
    """Values one ulp apart all land in one histogram bucket: the select must go to the last bit."""
    vals = torch.full((numel,), base, dtype=dtype)
    for _ in range(int(torch.randint(0, 40, (), generator=torch.Generator().manual_seed(seed)))):
        vals = torch.nextafter(vals, torch.tensor(float("inf"), dtype=dtype))
    steps = torch.randint(0, 64, (numel,), generator=torch.Generator().manual_seed(seed))
    for _ in range(6):  # a cloud of values a few ulps apart
        vals = torch.where(steps % 2 == 1, torch.nextafter(vals, torch.tensor(0.0, dtype=dtype)), vals)
        steps = steps // 2
    w = vals.reshape(numel, 1, 1, 1).expand(numel, 1, 1, 3).contiguous()
    k = max(1, int(round(rate * w.numel())))
    assert torch.equal(_native.spatial_kept(w, k), magnitude_mask(w, k / w.numel()).sum(dim=(0, 1)))


@needs_native
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 8),
    n_frac=st.floats(0.0, 1.0),
    blocks=st.integers(0, 3),
    tail=st.integers(0, 15),
    ties=st.booleans(),
    nans=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_nm_kernel_on_contiguous_3x3_blocks_and_their_tail(m, n_frac, blocks, tail, ties, nans, seed):
    """Contiguous float32 3x3 layers take a blocked body (16 groups of M x 9 at a time) and the
    groups left after the last whole block one tap at a time: both give torch's mask."""
    assume(blocks or tail)
    n = min(m - 1, 1 + int(n_frac * (m - 1)))
    w = rand_weight((blocks * 16 + tail, m, 3, 3), torch.float32, seed, ties)  # one group per row
    if nans:
        w.view(-1)[:: 7] = float("nan")
    expect = torch_nm_mask(w, n, m)
    assert torch.equal(nm_mask(w, n, m), expect)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(67, 1024, 3, 3), (301, 1024, 1, 1), (5, 64, 31, 29)])
def test_kernels_split_across_threads_like_one(threads, shape):
    """Layers big enough to be split across threads (over 1 MiB: chunks start mid-row and, in 3x3
    layers, mid-block) give the same result."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = rand_weight(shape, torch.float32, seed=sum(shape), ties=False)
        expect = torch_nm_mask(w, 2, 4)
        assert torch.equal(nm_mask(w, 2, 4), expect)
        k = w.numel() // 2
        expect_kept = magnitude_mask(w, k / w.numel()).sum(dim=(0, 1))
        assert torch.equal(_native.spatial_kept(w, k), expect_kept)
        hint = spatial_hint()  # parts collect their share of the bracket apart
        assert torch.equal(_native.spatial_kept(w, k, hint), expect_kept) and hint[2] == 0
        assert torch.equal(_native.spatial_kept(w, k, hint), expect_kept) and hint[2] == 1
        moved = w + 1e-3 * rand_weight(shape, torch.float32, seed=1, ties=False)
        assert torch.equal(_native.spatial_kept(moved, k, hint),
                           magnitude_mask(moved, k / w.numel()).sum(dim=(0, 1)))
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_spatial_kernel_leaves_non_finite_layers_to_torch(bad, dtype, layout):
    """inf/NaN: the kernel declines (None), with a hint too (the one-pass bracket checks it as
    the two passes do), and spatial_mask still equals its definition."""
    w = relayout(torch.randn(40, 8, 3, 3, dtype=dtype), layout)
    hint = spatial_hint()
    assert _native.spatial_kept(w, 100, hint) is not None and hint[0] >= 0
    w[21, 3, 1, 1] = bad
    assert _native.spatial_kept(w, 100) is None
    assert _native.spatial_kept(w, 100, hint) is None
    assert torch.equal(spatial_mask(w, 0.5), spatial_sparsity(magnitude_mask(w, 0.5)) < 0.5)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_spatial_bracket_grows_for_many_ties(threads, layout):
    """Thousands of |w| equal to the k-th one: the bracket collects them all (its buffers grow
    past their first 1024 keys, in each thread's part) and the counts stay pruning's."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = rand_weight((96, 128, 3, 3), torch.float32, seed=threads, ties=False)
        tie = w.abs().median()
        every7 = w.view(-1)[::7]
        every7.copy_(tie * torch.where(torch.arange(every7.numel()) % 2 == 0, -1.0, 1.0))
        w = relayout(w, layout)
        k = w.numel() // 2
        expect = magnitude_mask(w, k / w.numel()).sum(dim=(0, 1))
        hint = spatial_hint()
        assert torch.equal(_native.spatial_kept(w, k, hint), expect) and hint[2] == 0
        assert torch.equal(_native.spatial_kept(w, k, hint), expect) and hint[2] == 1
        assert int(hint[0]) == int(tie.view(torch.int32))  # v_k is the tie: all of them collected
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_spatial_bracket_edges_hold_weights(dtype, layout):
    """Hints whose bracket ends exactly on a weight's key (above v_k, below it, at v_k itself):
    a key on an edge is in the bracket, not above or below it, and the counts are pruning's."""
    w = relayout(rand_weight((48, 16, 3, 3), dtype, seed=5, ties=False), layout)
    k = w.numel() // 2
    expect = magnitude_mask(w, k / w.numel()).sum(dim=(0, 1))
    ints = torch.int64 if dtype == torch.float64 else torch.int32
    keys = torch.sort(w.abs().reshape(-1)).values.view(ints).to(torch.int64)
    kth = int(keys[k - 1])
    hits = 0
    for j in (k - 40, k - 3, k - 2, k, k + 1, k + 2, k + 39):
        other = int(keys[j])
        d = abs(other - kth)
        for centre in (kth, other):  # an edge on `other`, or v_k on an edge
            hint = torch.tensor([centre, d, 0], dtype=torch.int64)
            assert torch.equal(_native.spatial_kept(w, k, hint), expect), (j, centre, d)
            hits += int(hint[2])
    assert hits >= 10  # most of these brackets hold v_k: the one pass counted them


@needs_native
def test_nm_kernel_bumps_the_version_of_out():
    """Writes behind autograd's back still invalidate caches keyed on the buffer's version."""
    w = torch.randn(8, 16, 3, 3)
    out = torch.zeros(w.shape, dtype=torch.bool)
    before = out._version
    nm_mask(w, 2, 4, out=out)
    assert out._version > before
    assert torch.equal(out, nm_mask(w.clone(), 2, 4))


def test_kernels_decline_what_they_do_not_cover():
    """Half precision, M > 8 and non-collapsible kernel strides go to the torch code."""
    out = torch.zeros(4, 16, 3, 3, dtype=torch.bool)
    assert not _native.nm_mask(torch.randn(4, 16, 3, 3).half(), 2, 4, out)
    assert not _native.nm_mask(torch.randn(4, 16, 3, 3), 2, 16, out)
    assert _native.spatial_kept(torch.randn(4, 16, 3, 3).bfloat16(), 10) is None
    skew = torch.randn(4, 16, 3, 5)[..., ::2]  # kernel axes that do not collapse into one
    assert _native._layout(skew) is None
    w = torch.randn(4, 16, 3, 3, dtype=torch.float64)[..., ::2, :]
    assert torch.equal(nm_mask(w, 2, 4), nm_mask(w.contiguous(), 2, 4))
    with FakeTensorMode():  # no memory behind a fake tensor: the torch code traces it
        fake = torch.randn(4, 16, 3, 3)
        assert not _native.nm_mask(fake, 2, 4, torch.empty(fake.shape, dtype=torch.bool))
        assert nm_mask(fake, 2, 4).shape == fake.shape


def test_without_a_compiler_masks_fall_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    """A failing build warns once, says why in backend(), and the masks are unchanged."""
    w = torch.randn(8, 16, 3, 3)
    expect = torch_nm_mask(w, 2, 4)
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("SPRE_FX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.warns(UserWarning, match="C mask kernels not built"):
        assert torch.equal(nm_mask(w, 2, 4), expect)
    assert _native.backend().startswith("torch (not built")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert torch.equal(spatial_mask(w, 0.5), spatial_sparsity(magnitude_mask(w, 0.5)) < 0.5)


@needs_native
def test_another_build_of_the_source_runs_inside_its_block_only(monkeypatch, tmp_path):
    """`build` compiles another version of the C source (what benchmarks compare against) and
    `using` swaps it in for one block; `using(None)` runs the torch code."""
    monkeypatch.setenv("SPRE_FX_CACHE", str(tmp_path))
    source = tmp_path / "other.c"
    source.write_text(_native._SOURCE.read_text() + "\n/* another version */\n")
    other = _native.build(source)
    shipped = _native.library()
    assert other is not shipped and list(tmp_path.glob("native/*.so"))
    w = rand_weight((8, 16, 3, 3), torch.float32, seed=3, ties=True)
    expect = torch_nm_mask(w, 2, 4)
    with _native.using(other):
        assert _native.library() is other
        assert torch.equal(nm_mask(w, 2, 4), expect)
    assert _native.library() is shipped
    with _native.using(None):
        assert _native.backend().startswith("torch")
        assert not _native.nm_mask(w, 2, 4, torch.empty(w.shape, dtype=torch.bool))
        assert torch.equal(nm_mask(w, 2, 4), expect)
    assert _native.backend() == "native"


def test_native_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("SPRE_FX_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.library() is None
    assert _native.backend() == "torch (disabled by SPRE_FX_NATIVE=0)"


def test_report_says_what_computes_the_masks():
    """A prepared model's report names the mask backend; a converted model has no masks."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3))
    prepared = spre_fx.prepare(model, dense_stem=False)
    rep = spre_fx.report(prepared)
    assert rep.mask_kernels == _native.backend()
    assert f"CPU mask updates: {_native.backend()}" in str(rep)
    assert spre_fx.report(spre_fx.convert(prepared)).mask_kernels is None


# --------------------------------------------------------------------------- nothing kills the process
def _run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter: a crash (SIGFPE, SIGSEGV) must not take the test run with it."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=str(Path(__file__).resolve().parents[1]))


def test_zero_input_channels_raise_instead_of_crashing():
    """nm_mask on a weight with 0 input channels: a ValueError, not SIGFPE in the C kernel (the
    kernels decline such a weight); prepare leaves such a conv dense, saying why, and the report
    and convert of the model work."""
    done = _run_python("""
        import torch
        from torch import nn
        import spre_fx
        from spre_fx import _native
        from spre_fx.masks import nm_mask
        empty = torch.randn(4, 0, 3, 3)
        assert not _native.nm_mask(empty, 2, 4, torch.zeros(empty.shape, dtype=torch.bool))
        assert _native.spatial_kept(empty, 1) is None
        try:
            nm_mask(torch.randn(4, 0, 3, 3), 2, 4)
        except ValueError as e:
            assert "no input channels" in str(e), e
        else:
            raise SystemExit("no error")
        model = spre_fx.prepare(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(0, 8, 3)), dense_stem=False)
        lp = spre_fx.report(model).layers[1]
        assert lp.treatment == "dense" and lp.reason.startswith("empty weight (8, 0, 3, 3)"), lp
        assert lp.nm_coverage is None
        spre_fx.report(spre_fx.convert(model))
        print("refused")
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused" in done.stdout


def test_the_c_functions_refuse_bad_arguments_themselves():
    """Called directly (past the Python checks), the C kernels return an error code for C = 0,
    negative sizes or strides, NULL pointers and k outside [1, numel], instead of crashing."""
    if _native.library() is None:
        pytest.skip(f"C mask kernels: {_native.backend()}")
    done = _run_python("""
        import ctypes, torch
        from spre_fx import _native
        lib, I3 = _native.library(), _native._I64 * 3
        w = torch.randn(4, 8, 3, 3)
        out = torch.zeros(w.shape, dtype=torch.bool)
        ok, wp, kp, s = (w.data_ptr(), 0, out.data_ptr()), w.data_ptr(), out.data_ptr(), I3(72, 9, 1)
        calls = {
            "c = 0": lib.spre_nm_mask(*ok, 4, 0, 9, I3(72, 9, 1), I3(72, 9, 1), 2, 4, 1),
            "c < 0": lib.spre_nm_mask(*ok, 4, -8, 9, I3(72, 9, 1), I3(72, 9, 1), 2, 4, 1),
            "o < 0": lib.spre_nm_mask(*ok, -4, 8, 9, I3(72, 9, 1), I3(72, 9, 1), 2, 4, 1),
            "stride < 0": lib.spre_nm_mask(*ok, 4, 8, 9, I3(72, -9, 1), I3(72, 9, 1), 2, 4, 1),
            "null out": lib.spre_nm_mask(wp, 0, None, 4, 8, 9, s, s, 2, 4, 1),
            "null strides": lib.spre_nm_mask(*ok, 4, 8, 9, None, I3(72, 9, 1), 2, 4, 1),
            "k = 0": lib.spre_spatial_kept(wp, 0, 4, 8, 9, s, 0, 1, kp),
            "k > numel": lib.spre_spatial_kept(wp, 0, 4, 8, 9, s, 289, 1, kp),
            "spatial c = 0": lib.spre_spatial_kept(wp, 0, 4, 0, 9, s, 1, 1, kp),
            "null weight": lib.spre_spatial_kept(None, 0, 4, 8, 9, s, 1, 1, kp),
        }
        bad = {k: v for k, v in calls.items() if v != -1}
        assert not bad, bad
        print("refused", len(calls))
    """)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused 10" in done.stdout


def test_python_side_validates_before_calling_c():
    """Every argument the C code indexes is checked before the call: such calls are declined
    (the torch code then answers or raises), never passed on. (C = 0, which crashed the process
    before, is tried in a subprocess above.)"""
    w = torch.randn(4, 8, 3, 3)
    good = torch.zeros(w.shape, dtype=torch.bool)
    declined = [
        (torch.randn(4, 6, 3, 3), 2, 4, torch.zeros(4, 6, 3, 3, dtype=torch.bool)),  # C % M
        (w, 0, 4, good), (w, 4, 4, good), (w, 2, 1, good),                           # N, M
        (w, 2, 4, torch.zeros(4, 8, 3, dtype=torch.bool)),                           # out shape
        (w, 2, 4, torch.zeros(w.shape, dtype=torch.uint8)),                          # out dtype
        (w, 2, 4, torch.zeros(1, 8, 3, 3, dtype=torch.bool).expand(4, 8, 3, 3)),     # out overlaps itself
        (torch.randn(8), 2, 4, torch.zeros(8, dtype=torch.bool)),                    # rank 1
    ]
    for args in declined:
        assert not _native.nm_mask(*args), [getattr(a, "shape", a) for a in args]
    storage = torch.zeros(2 * w.numel() * 4, dtype=torch.uint8)
    w_in = storage[: w.numel() * 4].view(torch.float32).view(w.shape)
    w_in.copy_(w)
    overlapping = storage[w.numel() * 2: w.numel() * 3].view(torch.bool).view(w.shape)
    assert not _native.nm_mask(w_in, 2, 4, overlapping)  # out writes into the weight being read
    for k in (0, -1, w.numel() + 1):
        assert _native.spatial_kept(w, k) is None
    assert _native.spatial_kept(torch.randn(4, 8), 3) is None  # no taps


def test_a_cached_library_that_does_not_load_is_rebuilt(monkeypatch, tmp_path):
    """A truncated or foreign file in the cache is replaced by a fresh build (with a warning)."""
    if not shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]):
        pytest.skip("no C compiler (CC or cc) on this machine")
    monkeypatch.setenv("SPRE_FX_CACHE", str(tmp_path))
    # Built by another process: this one must not have the file mapped (dlopen would reuse it).
    done = _run_python("from spre_fx import _native; assert _native.backend() == 'native'")
    assert done.returncode == 0, done.stderr[-2000:]
    (lib,) = (tmp_path / "native").glob("*.so")
    lib.write_bytes(b"not a shared library")
    monkeypatch.setattr(_native, "_state", {})
    with pytest.warns(UserWarning, match="did not load"):
        assert _native.backend() == "native"
    assert lib.read_bytes()[:4] == b"\x7fELF"
    w = torch.randn(8, 16, 3, 3)
    expect = torch_nm_mask(w, 2, 4)
    assert torch.equal(nm_mask(w, 2, 4), expect)


def test_the_cache_key_covers_the_compiler(monkeypatch, tmp_path):
    """Another compiler behind the same name (`cc` upgraded: another `cc --version`) builds
    another library file instead of loading the old one."""
    real = shutil.which("cc")
    if not real:
        pytest.skip("no C compiler `cc` on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "cc"
    version = '[ "$1" = --version ] && echo "other cc 1.0" && exit 0'
    wrapper.write_text(f'#!/bin/sh\n{version}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("SPRE_FX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    built = []
    for path in (os.environ["PATH"], f"{bin_dir}{os.pathsep}{os.environ['PATH']}"):
        monkeypatch.setattr(_native, "_state", {})
        monkeypatch.setenv("PATH", path)
        assert _native.backend() == "native"
        built.append({p.name for p in (tmp_path / "cache" / "native").glob("*.so")})
    assert len(built[0]) == 1 and len(built[1]) == 2


def test_a_machine_with_a_compiler_runs_the_c_kernels():
    """Where a C compiler exists the kernels must build and load: a silent fall back to torch
    would let every kernel test above skip unnoticed (CI sets CI=true; this holds everywhere)."""
    if os.environ.get("SPRE_FX_NATIVE", "1") == "0":
        pytest.skip("C mask kernels switched off with SPRE_FX_NATIVE=0")
    cc = shlex.split(os.environ.get("CC", "cc"))[0]
    if not shutil.which(cc):
        assert os.environ.get("CI", "").lower() != "true", f"CI machine without a C compiler ({cc})"
        pytest.skip(f"no C compiler ({cc}) on this machine")
    assert _native.backend() == "native"
