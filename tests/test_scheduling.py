"""MaskScheduler: masks move on real optimizer steps only, on schedule, and resume exactly."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import spre_fx
from spre_fx.masks import nm_mask, spatial_mask

from .nets import Block, tiny_input


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def loss_of(model, x):
    return model(x).square().mean()


def step(model, opt, x):
    opt.zero_grad()
    loss_of(model, x).backward()
    opt.step()


def masks(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}


def follows_weights(model) -> bool:
    for m in model.modules():
        if hasattr(m, "nm_mask") and not torch.equal(m.nm_mask, nm_mask(m.weight, *m.spre_fx.nm)):
            return False
        if hasattr(m, "spatial_mask") and not torch.equal(m.spatial_mask, spatial_mask(m.weight, 0.5)):
            return False
    return True


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=0.05),
])
def test_masks_move_once_per_step_not_per_forward(make_opt):
    p = spre_fx.prepare(small_net())
    opt = make_opt(p.parameters())
    sched = spre_fx.MaskScheduler(p, opt)
    x = tiny_input()
    p.train()
    before = masks(p)
    with torch.no_grad():
        p[1].conv1.weight.mul_(-1).add_(torch.randn_like(p[1].conv1.weight))
    p(x)  # a forward alone never moves scheduled masks
    assert all(torch.equal(v, masks(p)[k]) for k, v in before.items())
    for _ in range(3):
        step(p, opt, x)
        assert follows_weights(p)
    assert sched.step == 3


def test_lr_scheduler_and_clipping_work_alongside():
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    sched = spre_fx.MaskScheduler(p, opt)
    x = tiny_input()
    for _ in range(4):
        opt.zero_grad()
        loss_of(p, x).backward()
        torch.nn.utils.clip_grad_norm_(p.parameters(), 0.1)
        opt.step()
        lr_sched.step()
    assert sched.step == 4 and follows_weights(p)


def test_skipped_amp_step_changes_no_mask():
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = tiny_input()
    before = masks(p)
    opt.zero_grad()
    scaler.scale(loss_of(p, x)).backward()
    p[1].conv1.weight.grad[0, 0, 0, 0] = float("inf")  # an overflow: GradScaler skips the step
    scaler.step(opt)
    scaler.update()
    assert sched.step == 0
    assert all(torch.equal(v, masks(p)[k]) for k, v in before.items())
    opt.zero_grad()
    scaler.scale(loss_of(p, x)).backward()
    scaler.step(opt)
    assert sched.step == 1 and follows_weights(p)


def promote_dropped(w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`w` with the first weight `mask` (default: w's N:M mask) drops made the largest: the N:M
    mask of the result differs from `mask`."""
    new = w.detach().clone()
    mask = nm_mask(w, 2, 4) if mask is None else mask
    idx = tuple((~mask.movedim(1, -1)).nonzero()[0].tolist())
    new.movedim(1, -1)[idx] = 10 * (w.detach().abs().max() + 1)
    return new


def test_gradient_accumulation_moves_masks_on_real_steps_only():
    """Three backward passes per step: masks hold through the accumulating passes (even when the
    weight changes in between) and move on each real step, to the masks of the weights after it."""
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=1.0)
    sched = spre_fx.MaskScheduler(p, opt)
    conv = p[1].conv1
    x = tiny_input(batch=4)
    for i in range(6):
        before = masks(p)
        if i % 3 != 2:  # a weight change mid-accumulation: a forward that followed it would move masks
            with torch.no_grad():
                conv.weight.copy_(promote_dropped(conv.weight))
        loss_of(p, x[i % 2 * 2:(i % 2 + 1) * 2]).backward()
        if i % 3 == 2:
            target = promote_dropped(conv.weight, conv.nm_mask)
            conv.weight.grad = conv.weight.detach() - target  # lr 1: the step lands there
            opt.step()
            opt.zero_grad()
            assert not torch.equal(conv.nm_mask, before["1.conv1.nm_mask"]), f"pass {i}: no move"
            assert follows_weights(p), f"pass {i}: masks are not those of the new weights"
        else:
            assert all(torch.equal(v, masks(p)[k]) for k, v in before.items()), f"pass {i} moved masks"
    assert sched.step == 2


def test_warmup_interval_and_freeze():
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt, warmup_steps=2, nm_interval=2, nm_freeze_after=6,
                                  spatial_freeze_after=2, track_stats=True)
    conv = p[1].conv1
    x = tiny_input()
    assert bool(conv.nm_mask.all())  # dense warm-up
    history = []
    for _ in range(9):
        step(p, opt, x)
        dense = bool(conv.nm_mask.all())
        history.append((sched.step, dense, conv.nm_mask.clone(), conv.spatial_mask.clone()))
        if sched.step in (2, 4, 6):  # first pruning at step 2, then every 2 steps until the freeze
            assert torch.equal(conv.nm_mask, nm_mask(conv.weight, 2, 4)), sched.step
            assert sched.stats["step"] == sched.step
    assert history[0][1] and not history[1][1]  # dense through step 1, pruned after step 2
    nm_at = {s: m for s, _, m, _ in history}
    assert torch.equal(nm_at[3], nm_at[2])  # interval 2: no move at step 3
    assert torch.equal(nm_at[7], nm_at[6]) and torch.equal(nm_at[9], nm_at[6])  # frozen after 6
    spatial_at = {s: m for s, _, _, m in history}
    assert torch.equal(spatial_at[9], spatial_at[2])  # spatial mask frozen after step 2
    assert not follows_weights(p)


def test_stats_and_decay_schedule():
    """stats count what changed in the step (recounted here from the masks before and after) and
    the decay follows its schedule."""
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt, decay=lambda s: 1e-3 / (1 + s), track_stats=True)
    assert p[1].conv1.spre_fx.decay == pytest.approx(1e-3)
    before = masks(p)
    step(p, opt, tiny_input())
    after = masks(p)
    assert p[1].conv1.spre_fx.decay == pytest.approx(5e-4)
    nm_keys = [k for k in before if k.endswith("nm_mask")]
    flips = sum(int((before[k] != after[k]).sum()) for k in nm_keys)
    stats = sched.stats
    assert flips > 0 and follows_weights(p)
    assert stats["step"] == 1
    assert stats["nm_flip_rate"] == pytest.approx(flips / sum(before[k].numel() for k in nm_keys))
    assert stats["spatial_mask_changes"] == sum(
        int((before[k] != after[k]).sum()) for k in before if k.endswith("spatial_mask"))
    assert stats["sparsity"] == {k[: -len(".nm_mask")]: pytest.approx(1 - after[k].double().mean().item())
                                 for k in nm_keys}


def test_optimizer_wrappers_and_bad_inputs():
    class Wrapper:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(torch.nn.parallel.DataParallel(p), Wrapper(opt))
    step(p, opt, tiny_input())
    assert sched.step == 1
    sched.remove()
    step(p, opt, tiny_input())
    assert sched.step == 1  # detached
    with pytest.raises(TypeError, match="Optimizer"):
        spre_fx.MaskScheduler(p, object())
    with pytest.raises(ValueError, match="prepare"):
        spre_fx.MaskScheduler(small_net(), opt)
    with pytest.raises(ValueError, match="nm_interval"):
        spre_fx.MaskScheduler(p, opt, nm_interval=0)


def _run(p, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 3, 12, 12, generator=g)
        step(p, opt, x)


def test_resume_is_bit_exact():
    """Save model + optimizer + scheduler, reload with weights_only=True: same run as without a stop."""
    def fresh():
        torch.manual_seed(1)
        p = spre_fx.prepare(small_net())
        opt = torch.optim.SGD(p.parameters(), lr=0.2, momentum=0.9)
        return p, opt, spre_fx.MaskScheduler(p, opt, warmup_steps=1, nm_interval=2)

    p, opt, sched = fresh()
    _run(p, opt, sched, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": p.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    _run(p, opt, sched, 4, seed=1)

    q, opt2, sched2 = fresh()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    q.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _run(q, opt2, sched2, 4, seed=1)
    assert sched2.step == sched.step == 7
    for (k, a), b in zip(p.state_dict().items(), q.state_dict().values()):
        assert torch.equal(a, b), k


def test_refresh_masks_after_reinitialising_weights():
    p = spre_fx.prepare(small_net())
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt)
    with torch.no_grad():
        for m in p.modules():
            if hasattr(m, "nm_mask"):
                m.weight.copy_(torch.randn_like(m.weight))
    assert not follows_weights(p)
    sched.refresh_masks()
    assert follows_weights(p) and sched.step == 0


def test_remove_after_the_schedule_froze_every_mask_keeps_them_for_eval_copy_and_convert():
    """Fine-tuning under `nm_freeze_after` / `spatial_freeze_after`, then `remove()`: the masks
    stay those the schedule froze (the weights trained under them), not those of the final weights."""
    import copy

    from spre_fx.masks import nm_mask as nm_of

    torch.manual_seed(0)
    model = spre_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, bias=False),
                                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = spre_fx.MaskScheduler(model, opt, nm_freeze_after=1, spatial_freeze_after=0)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(4):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    conv = model[1]
    frozen = conv.nm_mask.clone(), conv.spatial_mask.clone()
    assert not torch.equal(nm_of(conv.weight, 2, 4), frozen[0])  # the weights moved on
    sched.remove()
    model.eval()(x)
    for m in (model, copy.deepcopy(model)):
        assert torch.equal(m[1].nm_mask, frozen[0]) and torch.equal(m[1].spatial_mask, frozen[1])
    support = spre_fx.convert(model)[1].weight != 0
    assert not (support & ~frozen[0]).any()  # the deployed weight lives on the frozen N:M mask


def test_remove_with_only_some_masks_frozen_warns_and_releases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8))
    model = spre_fx.prepare(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(model, opt, spatial_freeze_after=0)
    with pytest.warns(UserWarning, match="fixed only some masks"):
        sched.remove()
    assert not model[1].spre_fx.frozen


def test_decay_is_added_after_clipping_and_in_backward_again_after_remove():
    """With a scheduler the decay enters inside step(), after the user clipped the gradient: a clip
    to norm 0 leaves exactly −lr·λ·(1 − M)⊙W. Once removed, the layers' backward adds it again."""
    import copy

    lam, lr = 0.05, 0.1
    p = spre_fx.prepare(small_net(), decay=lam)
    opt = torch.optim.SGD(p.parameters(), lr=lr)
    sched = spre_fx.MaskScheduler(p, opt)
    conv, x = p[1].conv1, tiny_input()
    w, pruned = conv.weight.detach().clone(), ~conv.nm_mask
    opt.zero_grad()
    loss_of(p, x).backward()
    torch.nn.utils.clip_grad_norm_(p.parameters(), 0.0)  # the loss's gradient, all of it, gone
    assert not conv.weight.grad.any()
    opt.step()
    step = conv.weight.detach() - w
    assert torch.allclose(step, -lr * lam * pruned * w, rtol=0, atol=4e-7 * float(w.abs().max()))
    assert (step[pruned] != 0).all() and not step[~pruned].any()

    sched.remove()
    twin = copy.deepcopy(p)
    for m in twin.modules():
        if hasattr(m, "nm_mask"):
            m.spre_fx.decay = 0.0
    for net in (p, twin):
        net.zero_grad()
        loss_of(net, x).backward()
    w, pruned = conv.weight.detach(), (~conv.nm_mask).float()
    assert torch.equal(conv.nm_mask, twin[1].conv1.nm_mask)
    g0 = twin[1].conv1.weight.grad
    expected = g0 + lam * pruned * w
    tol = 4e-7 * float((g0.abs() + lam * w.abs()).max())
    assert torch.allclose(conv.weight.grad, expected, rtol=0, atol=tol)


def test_attaches_to_the_optimizer_inside_accelerates_wrapper():
    """accelerate's AcceleratedOptimizer (what the Hugging Face Trainer holds) subclasses Optimizer
    without its __init__: the scheduler hooks the optimizer it wraps, which its step() steps."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is in the transformers extra")
    torch.manual_seed(0)
    model = spre_fx.prepare(nn.Sequential(nn.Linear(8, 8)), dense_stem=False)
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapped = accelerate.Accelerator(cpu=True).prepare(inner)
    assert wrapped is not inner and isinstance(wrapped, torch.optim.Optimizer)
    sched = spre_fx.MaskScheduler(model, wrapped)
    assert sched.optimizer is inner
    model(torch.randn(4, 8)).square().sum().backward()
    wrapped.step()
    assert sched.step == 1
    assert torch.equal(model[0].nm_mask, nm_mask(model[0].weight, 2, 4))
