"""spre_fx.layers.tapconv: every plan equals the full masked conv, forward and both gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from spre_fx.layers import tapconv
from spre_fx.layers.tapconv import PLANS, tap_conv2d
from tests.tolerance import assert_within, conv_terms


@pytest.fixture(autouse=True)
def tuning_on():
    """These tests exercise the autotuner, which is off by default (opt-in, like cudnn.benchmark)."""
    before = tapconv.enabled()
    tapconv.set_enabled(True)
    yield
    tapconv.set_enabled(before)

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ((1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (1, 5), (7, 7), (2, 4))


@st.composite
def conv_cases(draw):
    """A conv layer (any kernel, stride, padding incl. 'same'/'valid', dilation, groups), an input
    it accepts, and a tap mask (empty and full included)."""
    kh, kw = draw(st.sampled_from(KERNELS))
    groups = draw(st.sampled_from((1, 2, 3)))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(("int", "pair", "same", "valid")))
    stride = (1, 1) if kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = {"int": draw(st.integers(0, 3)), "pair": (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
               "same": "same", "valid": "valid"}[kind]
    pads = (0, 0) if kind in ("same", "valid") else ((padding,) * 2 if kind == "int" else padding)
    # An input large enough for at least one output in each dimension.
    lo_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * pads[0])
    lo_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * pads[1])
    h, w = draw(st.integers(lo_h, lo_h + 6)), draw(st.integers(lo_w, lo_w + 6))
    fill = draw(st.sampled_from(("random", "empty", "full", "one")))
    bits = draw(st.lists(st.booleans(), min_size=kh * kw, max_size=kh * kw))
    taps = torch.tensor(bits).reshape(kh, kw)
    if fill == "empty":
        taps[:] = False
    elif fill == "full":
        taps[:] = True
    elif fill == "one":
        taps[:] = False
        taps[draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))] = True
    batch = draw(st.sampled_from((0, 1, 2)))  # 0: an unbatched [C, H, W] input
    seed = draw(st.integers(0, 2**16))
    return dict(shape=(batch, cin, h, w), cout=cout, kernel=(kh, kw), stride=stride, padding=padding,
                dilation=dilation, groups=groups, taps=taps, seed=seed)


def _check(case: dict, plan: str | None, dtype: torch.dtype, mode: str = "zeros") -> None:
    """The plan's output and both gradients against the full masked conv, each element within the
    rounding bound of what it sums (tests/tolerance.py): the same conv on |x| and |w ⊙ mask|."""
    g = torch.Generator().manual_seed(case["seed"])
    batch, cin, h, w = case["shape"]
    x = torch.randn((batch, cin, h, w) if batch else (cin, h, w), generator=g, dtype=dtype).requires_grad_()
    base = torch.randn(case["cout"], cin // case["groups"], *case["kernel"], generator=g, dtype=dtype)
    base.requires_grad_()
    # The caller's mask: another (N:M-like) mask inside the taps, as SpRe's M_nm ⊙ S.
    mask = (torch.rand(base.shape, generator=g) < 0.7) & case["taps"]
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    if mode == "zeros":
        def conv(inp, weight):
            return F.conv2d(inp, weight, None, *args)
    else:
        module = torch.nn.Conv2d(cin, case["cout"], case["kernel"], *args, bias=False, padding_mode=mode)

        def conv(inp, weight):
            return module._conv_forward(inp, weight, None)
    ref = conv(x, base * mask)
    out = tap_conv2d(x, base * mask, case["taps"], *args, padding_mode=mode, plan=plan)
    assert out.shape == ref.shape
    grad = torch.randn(ref.shape, generator=g, dtype=dtype)
    # magnitudes: the conv and its two gradients on |x|, |w ⊙ mask| and |upstream gradient|
    x_abs, w_abs = x.detach().abs().requires_grad_(), (base * mask).detach().abs().requires_grad_()
    magnitude = conv(x_abs, w_abs)
    grad_magnitudes = torch.autograd.grad(magnitude, (x_abs, w_abs), grad.abs())
    assert_within(out, ref, magnitude, dtype, conv_terms(base), what="output")
    expected = torch.autograd.grad(ref, (x, base), grad)
    got = torch.autograd.grad(out, (x, base), grad, allow_unused=False)
    # how many products each gradient element sums: the same gradients with every value 1 (an
    # input element read twice by a reflect/replicate/circular pad counts twice)
    x_one, w_one = torch.ones_like(x_abs).requires_grad_(), torch.ones_like(w_abs).requires_grad_()
    counts = torch.autograd.grad(conv(x_one, w_one), (x_one, w_one), torch.ones_like(ref))
    names = ("input gradient", "weight gradient")
    for e, a, mag, n, what in zip(expected, got, grad_magnitudes, counts, names):
        assert_within(a, e, mag, dtype, max(1, int(n.max())), what=what)


@pytest.mark.parametrize("plan", PLANS)
@settings(max_examples=40, deadline=None)
@given(case=conv_cases())
def test_every_plan_is_the_full_masked_conv_float64(plan, case):
    _check(case, plan, torch.float64)


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), plan=st.sampled_from(PLANS))
def test_every_plan_is_the_full_masked_conv_float32(case, plan):
    _check(case, plan, torch.float32)


@settings(max_examples=25, deadline=None)
@given(case=conv_cases(), mode=st.sampled_from(("reflect", "replicate", "circular")))
def test_padding_modes_pad_then_convolve_the_taps(case, mode):
    kh, kw = case["kernel"]
    case["shape"] = (*case["shape"][:2], max(case["shape"][2], 2 * kh * 2), max(case["shape"][3], 2 * kw * 2))
    _check(case, "taps", torch.float64, mode=mode)


@settings(max_examples=15, deadline=None)
@given(case=conv_cases())
def test_autotuned_choice_is_exact_and_cached(case):
    tapconv.clear_cache()
    # A layout with something to choose (not empty, not full, not 1x1) is decided within a few
    # calls (a few pieces measured per call), each exact; then it is cached.
    trivial = case["kernel"] == (1, 1) or not case["taps"].any() or case["taps"].all()
    for _ in range(12):
        _check(case, None, torch.float64)
        if tapconv.tuned_plans():
            break
    choices = tapconv.tuned_plans()
    assert len(choices) == (0 if trivial else 1)
    assert set(choices.values()) <= set(PLANS)
    costs = tapconv.measured_costs()
    _check(case, None, torch.float64)
    assert tapconv.tuned_plans() == choices and tapconv.measured_costs() == costs  # read from the cache


def test_empty_taps_give_zero_and_zero_gradients():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.zeros(3, 4, 3, 3, requires_grad=True)
    out = tap_conv2d(x, w, torch.zeros(3, 3, dtype=torch.bool), 1, 1)
    assert out.shape == (2, 3, 6, 6) and not out.any()
    out.sum().backward()
    # Zeros, not None: an optimizer then treats the weight as the full conv would (decay, momentum).
    assert w.grad is not None and not w.grad.any()
    assert x.grad is not None and not x.grad.any()


def test_pieces_are_measured_once_only_while_they_can_win_and_within_budget(monkeypatch):
    tapconv.clear_cache()
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(2, 2, 3, 3)
    calls = []

    def fake_measure(items, *args):  # the top tap's conv is cheap, sums free, the rest as dear as full
        calls.append(items)
        return {p: {("rect", (0, 1, 1, 2)): 0.1, ("add",): 0.0}.get(p, 1.0) for p in items}

    monkeypatch.setattr(tapconv, "_measure", fake_measure)
    column = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    top = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    tap_conv2d(x, w * column, column, 1, 1)
    assert ("full",) in calls[0] and ("rect", (0, 2, 1, 2)) in calls[0] and ("add",) in calls[0]
    assert list(tapconv.tuned_plans().values()) == ["full"]  # 1x2 tap column: 1.1, full: 1
    tap_conv2d(x, w * top, top, 1, 1)  # its rectangle is known: only the stacked conv is new
    assert calls[1] == [("stack", 1)]
    assert list(tapconv.tuned_plans().values()) == ["full", "bbox"]
    # A layout whose plans could win but whose pieces are over the budget: the full conv, decided.
    layer = next(iter(tapconv.measured_costs()))
    monkeypatch.setattr(tapconv, "_MAX_PIECES", len(tapconv.measured_costs()[layer]))
    corners = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    tap_conv2d(x, w * corners, corners, 1, 1)
    assert len(calls) == 2 and list(tapconv.tuned_plans().values())[-1] == "full"


def test_a_layout_is_decided_over_several_calls_a_few_pieces_each(monkeypatch):
    tapconv.clear_cache()
    monkeypatch.setattr(tapconv, "_PIECES_PER_CALL", 2)
    calls = []

    def fake_measure(items, *args):
        calls.append(items)
        return {p: {"rect": 0.5, "stack": 0.9}.get(p[0], 1.0) for p in items}

    monkeypatch.setattr(tapconv, "_measure", fake_measure)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)  # a backward follows: tuned
    cross = torch.tensor([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    w = torch.randn(2, 2, 3, 3) * cross
    for _ in range(10):
        torch.testing.assert_close(tap_conv2d(x, w, cross, 1, 1), F.conv2d(x, w, None, 1, 1))
        if tapconv.tuned_plans():
            break
    assert len(calls) > 1 and all(len(c) <= 2 for c in calls)
    assert list(tapconv.tuned_plans().values()) == ["stack"]  # 0.9; full 1, rectangles' sums >= 2


def test_switched_off_is_the_full_conv_without_tuning():
    tapconv.clear_cache()
    x = torch.randn(1, 2, 5, 5)
    taps = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    w = torch.randn(2, 2, 3, 3) * taps
    tapconv.set_enabled(False)
    try:
        assert not tapconv.enabled()
        torch.testing.assert_close(tap_conv2d(x, w, taps, 1, 1), F.conv2d(x, w, None, 1, 1), rtol=0, atol=0)
        assert tapconv.tuned_plans() == {}
    finally:
        tapconv.set_enabled(True)  # the fixture restores the default


def test_forwards_without_a_backward_run_the_full_conv_without_tuning():
    """verify, report and validation forwards of a prepared model pay no timing."""
    tapconv.clear_cache()
    x = torch.randn(1, 2, 5, 5)
    taps = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(tap_conv2d(x, w * taps, taps, 1, 1), F.conv2d(x, w * taps, None, 1, 1),
                                   rtol=0, atol=0)
    assert tapconv.tuned_plans() == {} and tapconv.measured_costs() == {}


def test_deterministic_algorithms_get_the_full_conv_without_tuning():
    """A plan chosen by timing may differ between runs (and so may the rounding): not when the
    user asks torch for deterministic algorithms."""
    tapconv.clear_cache()
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    taps = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    w = torch.randn(2, 2, 3, 3) * taps
    torch.use_deterministic_algorithms(True)
    try:
        torch.testing.assert_close(tap_conv2d(x, w, taps, 1, 1), F.conv2d(x, w, None, 1, 1), rtol=0, atol=0)
        assert tapconv.tuned_plans() == {} and tapconv.measured_costs() == {}
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("value,expected", [(None, False), ("0", False), ("1", True)])
def test_environment_switch(value, expected):
    """Off unless asked for (None: the variable unset)."""
    code = "from spre_fx.layers import tapconv; print(tapconv.enabled())"
    env = {k: v for k, v in os.environ.items() if k != "SPRE_FX_TAPCONV"}
    if value is not None:
        env["SPRE_FX_TAPCONV"] = value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_bad_arguments_say_what_was_expected():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match="kernel's shape"):
        tap_conv2d(x, w, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="plan must be one of"):
        tap_conv2d(x, w, torch.ones(3, 3, dtype=torch.bool), plan="fast")


def test_compiled_runs_the_full_conv_in_one_graph():
    taps = torch.tensor([[0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3) * taps
    fn = torch.compile(lambda a, b: tap_conv2d(a, b, taps, 1, 1), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w), F.conv2d(x, w, None, 1, 1))


def test_micro_benchmark_runs():
    """benchmarks/tapconv.py, tiny (no timing asserted): keeps the documented command alive."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "tapconv.py"), "--batch", "1", "--rounds", "1",
           "--shapes", "512", "--taps", "3", "--layouts", "cross", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout
    assert "512x7x7" in out and "tuned" in out


def test_a_prepared_model_trains_over_its_taps_as_over_the_full_branch_and_converts_exactly():
    """The wiring: with tuning on, SpReConv2d's branch runs tap_conv2d; two training steps match
    the full-conv branch's (float64), and the converted model equals the prepared one."""
    from torch import nn

    import spre_fx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU()).double()
    x = torch.randn(4, 4, 12, 12, dtype=torch.float64)
    runs = {}
    for on in (True, False):
        tapconv.set_enabled(on)
        tapconv.clear_cache()
        p = spre_fx.prepare(net, dense_stem=False).train()
        opt = torch.optim.SGD(p.parameters(), lr=0.1)
        spre_fx.MaskScheduler(p, opt)
        for _ in range(2):
            opt.zero_grad()
            p(x).square().mean().backward()
            opt.step()
        runs[on] = p
        if on:
            assert tapconv.tuned_plans() or tapconv.measured_costs()  # the branch went through the tuner
    assert spre_fx.plan_of(runs[True]).count("spre") == 3
    for (k, a), b in zip(runs[True].state_dict().items(), runs[False].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)
    tapconv.set_enabled(True)
    spre_fx.verify(runs[True], spre_fx.convert(runs[True]), x)
