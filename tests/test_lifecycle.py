"""Masks through a model's life: train, eval, copy, checkpoint, dense load, schedule, freeze, convert.

The invariant (docs/method.md §1, issue 13): a mask that is not held on purpose is the mask of its
layer's current weight, at every forward (train and eval) and in `convert`; a held one (a
`MaskScheduler`'s schedule, a user freeze) is exactly what was held. Expected masks come from
`nm_mask` / `spatial_mask` (checked against plain-Python references in test_masks.py) applied
by this file's own bookkeeping of what holds what, never from the layers' state.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import spre_fx
from spre_fx.masks import is_nm, nm_mask, spatial_mask
from spre_fx.plan import plan_of

DT = torch.float64
RATE = 0.5  # 1 - N/M for 2:4


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the model
class Net(nn.Module):
    """A dense stem, a SpRe pair (3×3 conv → BN), an N:M 1×1 conv → BN and an N:M linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_point = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_point(self.point(x)))
        return self.head(x.mean((2, 3)))


LAYERS = ("conv", "point", "head")


def dense_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().to(DT)


def prepared(seed: int) -> nn.Module:
    p = spre_fx.prepare(dense_net(seed))
    treatments = {lp.name: lp.treatment for lp in plan_of(p).layers}
    assert treatments == {"stem": "dense", "conv": "spre", "point": "nm", "head": "nm"}
    return p


def batch(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=DT)


def masks_of_weight(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of the layer's current dense weight, computed here."""
    out = {"nm_mask": nm_mask(layer.weight, 2, 4)}
    if hasattr(layer, "spatial_mask"):
        out["spatial_mask"] = spatial_mask(layer.weight, RATE)
    return out


def stored(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(layer, k).clone() for k in ("nm_mask", "spatial_mask") if hasattr(layer, k)}


def equal_masks(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def promote_dropped(w: torch.Tensor) -> torch.Tensor:
    """`w` with its first N:M-dropped weight made the largest of its group: its N:M mask must change."""
    new = w.detach().clone()
    view = new.movedim(1, -1)  # [O, *kernel, C]: groups of 4 along the last axis
    idx = tuple((~nm_mask(w, 2, 4).movedim(1, -1)).nonzero()[0].tolist())
    start = idx[-1] - idx[-1] % 4
    view[idx] = 1.5 * view[idx[:-1]][start:start + 4].abs().max() + 0.1
    return new


def move_every_mask(model: nn.Module) -> None:
    """An in-place weight change per layer after which every layer's N:M mask is different."""
    with torch.no_grad():
        for name in LAYERS:
            w = model.get_submodule(name).weight
            w.copy_(promote_dropped(w))


def reference(model: nn.Module, expected: dict[str, dict]) -> nn.Module:
    """A copy of `model` computing with exactly the `expected` masks (held, written by hand)."""
    ref = copy.deepcopy(model)
    for name in LAYERS:
        layer = ref.get_submodule(name)
        layer.freeze_masks(True)
        for k, v in expected[name].items():
            getattr(layer, k).copy_(v)
    return ref.eval()


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


def assert_converts_exactly(model: nn.Module, expected: dict[str, dict], x: torch.Tensor) -> None:
    """convert(model) computes with the expected masks, equals the prepared model in eval mode,
    is N:M, and writes nothing into `model`."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = spre_fx.convert(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "convert wrote into the prepared model"
    for name in LAYERS:
        w = deployed.get_submodule(name).weight
        assert not w[~expected[name]["nm_mask"]].any(), f"{name}: weights outside the expected N:M mask"
        assert is_nm(w, 2, 4) or bool(expected[name]["nm_mask"].all()), name  # all-ones: dense warm-up
    head = deployed.get_submodule("head").weight  # no BN: exactly W ⊙ M
    assert torch.equal(head, model.head.weight.detach() * expected["head"]["nm_mask"]), "stale head mask"
    want = eval_out(reference(model, expected), x)
    torch.testing.assert_close(eval_out(deployed, x), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- §1, deterministic
def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bounded-gradient loss: weights stay finite however large the hand-made changes get."""
    return -torch.log_softmax(model(x), 1)[:, 0].mean()


def sgd_steps(model: nn.Module, steps: int, seed: int = 0) -> torch.optim.Optimizer:
    """A plain loop (no MaskScheduler): forward, backward, step; masks move in the next forward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, batch(seed + i)).backward()
        opt.step()
    return opt


def test_eval_and_convert_after_a_plain_loop_use_the_current_weights():
    """After the last optimizer step of a plain loop, eval and convert use the masks of the weights
    as they are now, not those of the weights before the step (convert without writing)."""
    p = prepared(0).train()
    sgd_steps(p, 2)
    move_every_mask(p)  # the last step, moving every mask for sure
    expected = {n: masks_of_weight(p.get_submodule(n)) for n in LAYERS}
    assert not any(equal_masks(stored(p.get_submodule(n)), expected[n]) for n in LAYERS)
    x = batch(99)
    assert_converts_exactly(p, expected, x)
    p.eval()
    with torch.no_grad():
        y = p(x)
    for n in LAYERS:
        assert equal_masks(stored(p.get_submodule(n)), expected[n]), f"eval forward used stale masks: {n}"
    torch.testing.assert_close(y, eval_out(reference(p, expected), x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copy_follows_its_own_weights(how):
    """A copy's parameter version counters restart at 0: its masks must still follow its weights
    after each change (train and eval)."""
    p = prepared(0).train()
    sgd_steps(p, 1)
    p(batch(5))
    if how == "deepcopy":
        q = copy.deepcopy(p)
    elif how == "pickle":
        q = pickle.loads(pickle.dumps(p))
    else:
        buf = io.BytesIO()
        torch.save(p, buf)
        buf.seek(0)
        q = torch.load(buf, weights_only=False)
    for i in range(4):
        move_every_mask(q)
        q.train(i % 2 == 0)
        with torch.no_grad():
            q(batch(i))
        for n in LAYERS:
            layer = q.get_submodule(n)
            assert equal_masks(stored(layer), masks_of_weight(layer)), f"change {i}: {n} kept stale masks"


def test_a_copy_of_a_scheduled_model_is_not_scheduled():
    """The scheduler drives the model it was given; a copy (e.g. an EMA model) follows its weights."""
    p = prepared(0)
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    spre_fx.MaskScheduler(p, opt, nm_freeze_after=0, spatial_freeze_after=0)
    q = copy.deepcopy(p)
    move_every_mask(q)
    q.train()
    q(batch(0))
    assert all(equal_masks(stored(q.get_submodule(n)), masks_of_weight(q.get_submodule(n))) for n in LAYERS)


@pytest.mark.parametrize("scheduler", [None, "freeze", "warmup"])
def test_a_dense_checkpoint_brings_its_masks_at_once(scheduler):
    """load_state_dict(dense, strict=False): the masks are those of the loaded weights immediately,
    also under MaskScheduler(nm_freeze_after=0); a dense warm-up keeps its all-ones N:M masks."""
    p = prepared(0)
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    if scheduler == "freeze":
        spre_fx.MaskScheduler(p, opt, nm_freeze_after=0, spatial_freeze_after=0)
    elif scheduler == "warmup":
        spre_fx.MaskScheduler(p, opt, warmup_steps=5)
    dense = dense_net(1).state_dict()
    result = p.load_state_dict(dense, strict=False)
    assert not result.unexpected_keys and "conv.nm_mask" in result.missing_keys
    for n in LAYERS:
        expect = masks_of_weight(p.get_submodule(n))
        assert torch.equal(p.get_submodule(n).weight, dense[f"{n}.weight"])
        if scheduler == "warmup":
            expect["nm_mask"] = torch.ones_like(expect["nm_mask"])
        assert equal_masks(stored(p.get_submodule(n)), expect), f"{n}: masks of the random init survived"
    if scheduler == "freeze":  # and they stay those, step after step
        for i in range(2):
            opt.zero_grad()
            loss_of(p, batch(i)).backward()
            opt.step()
        w = dense["conv.weight"]
        expect = {"nm_mask": nm_mask(w, 2, 4), "spatial_mask": spatial_mask(w, RATE)}
        assert equal_masks(stored(p.conv), expect)


def test_a_prepared_checkpoint_keeps_its_masks_bit_for_bit():
    """A state dict that brings masks (a prepared checkpoint) loads them as they are, even when
    they are not the masks of its weights (held by a schedule), and a scheduled run resumes on them."""
    p = prepared(0)
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    spre_fx.MaskScheduler(p, opt, nm_interval=100, spatial_interval=100)
    for i in range(2):
        opt.zero_grad()
        loss_of(p, batch(i)).backward()
        opt.step()
    move_every_mask(p)
    state = p.state_dict()
    assert not equal_masks(stored(p.head), masks_of_weight(p.head))  # held, not those of the weights
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    q = prepared(1)
    spre_fx.MaskScheduler(q, torch.optim.SGD(q.parameters(), lr=0.5), nm_interval=100, spatial_interval=100)
    q.load_state_dict(torch.load(buf, weights_only=True))
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k
    q.eval()
    with torch.no_grad():
        q(batch(0))
    assert equal_masks(stored(q.head), {"nm_mask": state["head.nm_mask"]})


def test_frozen_masks_stay_through_steps_eval_convert_and_scheduler():
    """spre_fx.freeze_masks holds the masks in force (brought up to date first); a scheduler leaves
    them alone, convert folds them, unfreezing lets them follow the weight again."""
    p = prepared(0).train()
    sgd_steps(p, 1)
    move_every_mask(p)  # stale buffers: freezing holds the masks of the current weights
    held = {n: masks_of_weight(p.get_submodule(n)) for n in LAYERS}
    spre_fx.freeze_masks(p)
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt)
    for i in range(2):
        opt.zero_grad()
        loss_of(p, batch(i)).backward()
        opt.step()
    move_every_mask(p)
    p(batch(3))
    eval_out(p, batch(4))
    assert all(equal_masks(stored(p.get_submodule(n)), held[n]) for n in LAYERS)
    assert_converts_exactly(p, held, batch(5))
    sched.remove()
    assert all(p.get_submodule(n).spre_fx.frozen for n in LAYERS)  # remove() keeps a user freeze
    spre_fx.freeze_masks(p, False)
    eval_out(p, batch(6))
    assert all(equal_masks(stored(p.get_submodule(n)), masks_of_weight(p.get_submodule(n))) for n in LAYERS)


def test_removing_a_scheduler_in_warmup_lets_masks_follow_weights():
    """The all-ones warm-up masks belong to the schedule: once it is removed, they follow the weight."""
    p = prepared(0)
    sched = spre_fx.MaskScheduler(p, torch.optim.SGD(p.parameters(), lr=0.1), warmup_steps=3)
    assert bool(p.head.nm_mask.all())
    sched.remove()
    eval_out(p, batch(0))
    assert equal_masks(stored(p.head), masks_of_weight(p.head))


# --------------------------------------------------------------------------- §3, the state machine
SCHEDULES = [
    {},
    {"nm_interval": 2, "spatial_interval": 3},
    {"nm_freeze_after": 0, "spatial_freeze_after": 1},
    {"warmup_steps": 2, "nm_interval": 2},
]


def moves(step: int, warmup: int, interval: int, freeze: int | None) -> bool:
    """Whether a schedule moves masks after optimizer step `step` (1-based), written out here."""
    if step < warmup or (freeze is not None and step > freeze):
        return False
    return (step - warmup) % interval == 0


class Lifecycle(RuleBasedStateMachine):
    """Rules are what users do to a prepared model; `held` is this test's record of what holds
    each layer's masks and which masks it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.model = prepared(0).train()
        self.new_optimizer()
        self.sched = None
        self.schedule: dict = {}
        self.frozen: dict[str, dict] = {}     # user freezes: layer -> masks held
        self.scheduled: dict[str, dict] = {}  # scheduler: layer -> masks held between its steps

    # ---------------------------------------------------------------- bookkeeping
    def new_optimizer(self) -> None:
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.3, momentum=0.5)

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def expected(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.frozen:
            return self.frozen[name]
        if self.sched is not None:
            return self.scheduled[name]
        return masks_of_weight(self.layer(name))

    def warming_up(self) -> bool:
        return self.sched is not None and self.sched.step < self.schedule.get("warmup_steps", 0)

    def after_real_step(self) -> None:
        if self.sched is None:
            return
        s, step = self.schedule, self.sched.step
        warmup = s.get("warmup_steps", 0)
        for name in LAYERS:
            if name in self.frozen:
                continue
            fresh = masks_of_weight(self.layer(name))
            if step < warmup:
                continue
            if moves(step, warmup, s.get("nm_interval", 1), s.get("nm_freeze_after")):
                self.scheduled[name]["nm_mask"] = fresh["nm_mask"]
            if "spatial_mask" in fresh and moves(step, warmup, s.get("spatial_interval", 1),
                                                 s.get("spatial_freeze_after")):
                self.scheduled[name]["spatial_mask"] = fresh["spatial_mask"]

    def check_stored(self, what: str) -> None:
        for name in LAYERS:
            assert equal_masks(stored(self.layer(name)), self.expected(name)), f"{what}: {name}"

    # ---------------------------------------------------------------- rules
    @rule(seed=st.integers(0, 3), accumulate=st.booleans(), skip=st.booleans())
    def train_step(self, seed, accumulate, skip):
        """Forward (train), backward (twice when accumulating), an optimizer step or a step that
        GradScaler skips for an inf gradient."""
        self.model.train()
        self.opt.zero_grad()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if skip else None
        for i in range(2 if accumulate else 1):
            loss = loss_of(self.model, batch(seed + i))
            self.check_stored("training forward")
            (scaler.scale(loss) if skip else loss).backward()
        if skip:
            before = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.head.weight.grad[0, 0] = float("inf")
            scaler.step(self.opt)
            after = self.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step moved something"
        else:
            self.opt.step()
            self.after_real_step()

    @rule(seed=st.integers(0, 3))
    def eval_forward(self, seed):
        x = batch(seed)
        want = eval_out(reference(self.model, {n: self.expected(n) for n in LAYERS}), x)
        y = eval_out(self.model, x)
        self.check_stored("eval forward")
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-14)

    @rule()
    def hand_weight_change(self):
        """An in-place change of every N:M layer's weight (re-initialising, an EMA update)."""
        move_every_mask(self.model)

    @rule()
    def deepcopy(self):
        """Continue with a deep copy (what EMA wrappers make): driven by no scheduler, frozen
        layers stay frozen."""
        self.model = copy.deepcopy(self.model)
        self.new_optimizer()
        self.sched = None
        self.scheduled = {}
        q = copy.deepcopy(self.model)  # a further copy must follow a weight change at once
        move_every_mask(q)
        q.train()
        with torch.no_grad():
            q(batch(0))
        for name in LAYERS:
            if name not in self.frozen:
                layer = q.get_submodule(name)
                assert equal_masks(stored(layer), masks_of_weight(layer)), f"copy skipped its update: {name}"

    @rule(with_scheduler=st.booleans())
    def save_and_load(self, with_scheduler):
        """torch.save the state dicts, torch.load(weights_only=True) them into a fresh prepared model."""
        buf = io.BytesIO()
        resume = with_scheduler and self.sched is not None
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict() if resume else None}, buf)
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        expected = {n: self.expected(n) for n in LAYERS}
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        fresh = prepared(1).train()
        self.model = fresh
        self.new_optimizer()
        self.frozen = {}  # a freeze is not part of a state dict
        if resume:
            self.sched = spre_fx.MaskScheduler(fresh, self.opt, **self.schedule)
            self.sched.load_state_dict(ckpt["sched"])
        else:
            self.sched, self.scheduled = None, {}
        fresh.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, saved[k]), f"not loaded bit for bit: {k}"
        if resume:
            self.scheduled = expected

    @rule(seed=st.integers(1, 3))
    def load_dense(self, seed):
        """A dense checkpoint (the user's own model) loaded with strict=False."""
        dense = dense_net(seed).state_dict()
        self.model.load_state_dict(dense, strict=False)
        for name in LAYERS:
            fresh = masks_of_weight(self.layer(name))
            if self.warming_up() and name not in self.frozen:
                fresh["nm_mask"] = torch.ones_like(fresh["nm_mask"])
            assert equal_masks(stored(self.layer(name)), fresh), f"dense load kept old masks: {name}"
            if name in self.frozen:
                self.frozen[name] = fresh
            elif self.sched is not None:
                self.scheduled[name] = fresh

    @precondition(lambda self: self.sched is None)
    @rule(which=st.integers(0, len(SCHEDULES) - 1))
    def attach_scheduler(self, which):
        self.schedule = SCHEDULES[which]
        self.scheduled = {n: {k: v.clone() for k, v in self.expected(n).items()} for n in LAYERS}
        self.sched = spre_fx.MaskScheduler(self.model, self.opt, **self.schedule)
        if self.schedule.get("warmup_steps"):
            for name in LAYERS:
                if name not in self.frozen:
                    self.scheduled[name]["nm_mask"] = torch.ones_like(self.scheduled[name]["nm_mask"])

    @precondition(lambda self: self.sched is not None)
    @rule()
    def remove_scheduler(self):
        """Layers whose every mask kind the schedule has fixed for good (step >= its
        `*_freeze_after`, including 0 at step 0) stay frozen with the masks in force."""
        s, step = self.schedule, self.sched.step
        settled = {kind: s.get(f"{kind}_freeze_after") is not None and step >= s[f"{kind}_freeze_after"]
                   for kind in ("nm", "spatial")}
        for name in LAYERS:
            kinds = ("nm", "spatial") if "spatial_mask" in self.scheduled[name] else ("nm",)
            if name not in self.frozen and all(settled[k] for k in kinds):
                self.frozen[name] = self.scheduled[name]
        self.sched.remove()
        self.sched, self.scheduled = None, {}

    @precondition(lambda self: not self.warming_up())
    @rule(name=st.sampled_from(LAYERS), on=st.booleans())
    def freeze(self, name, on):
        """A user freeze of one layer (`layer.freeze_masks(...)`), outside a dense warm-up."""
        if on and name not in self.frozen:
            held = {k: v.clone() for k, v in self.expected(name).items()}
            self.layer(name).freeze_masks(True)
            self.frozen[name] = held
        elif not on and name in self.frozen:
            held = self.frozen.pop(name)
            self.layer(name).freeze_masks(False)
            if self.sched is not None:
                self.scheduled[name] = held

    @rule(seed=st.integers(0, 3))
    def convert(self, seed):
        assert_converts_exactly(self.model, {n: self.expected(n) for n in LAYERS}, batch(seed))

    # ---------------------------------------------------------------- invariant
    @invariant()
    def masks_in_force_are_the_expected_ones(self):
        """What the model computes with now (its deployed form) uses the expected masks."""
        assert_converts_exactly(self.model, {n: self.expected(n) for n in LAYERS}, batch(7))


Lifecycle.TestCase.settings = settings(
    max_examples=50, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLifecycle = Lifecycle.TestCase


def test_report_describes_the_masks_in_force():
    """report(prepared) after a plain-loop step shows the masks of the current weights (and
    writes nothing into the model)."""
    p = prepared(0).train()
    sgd_steps(p, 1)
    off = tuple((~p.conv.spatial_mask).nonzero()[0].tolist())  # a tap outside S ...
    with torch.no_grad():
        p.conv.weight[:, :, off[0], off[1]] *= 100  # ... made the densest: S moves
    assert spatial_mask(p.conv.weight, RATE)[off]
    before = {k: v.clone() for k, v in p.state_dict().items()}
    layers = {lr.name: lr for lr in spre_fx.report(p).layers}
    assert layers["conv"].spatial_mask == spatial_mask(p.conv.weight, RATE).tolist()
    assert all(torch.equal(before[k], v) for k, v in p.state_dict().items())


@pytest.mark.parametrize("weights_move", [False, True])
def test_removing_a_schedule_that_fixed_the_masks_at_its_start_keeps_them(weights_move):
    """Two sequences hypothesis found (the lifecycle model had missed that a schedule with
    nm_freeze_after=0 fixes the N:M masks for good at step 0): attach it, (change the weights,)
    remove it; the plain N:M layers keep the masks of the attach, through eval, copies and convert."""
    state = Lifecycle()
    state.attach_scheduler(which=2)
    if weights_move:
        state.hand_weight_change()
    state.masks_in_force_are_the_expected_ones()
    state.remove_scheduler()
    assert set(state.frozen) == {"point", "head"}  # 'conv' (SpRe): its spatial mask is not settled
    state.masks_in_force_are_the_expected_ones()
    state.deepcopy()
    state.masks_in_force_are_the_expected_ones()
