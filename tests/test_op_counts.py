"""What one training step launches on the torch (CUDA) mask path, counted on the CPU.

A `TorchDispatchMode` (benchmarks/op_counts.py, run with the C kernels off as CUDA weights are)
counts the aten ops of a torchvision ResNet-50 SpRe 2:4 step with every mask moving after every
optimizer step, and the ops that would make the host wait for a GPU. Counts are deterministic:
nothing here times anything. ~30 s on one loaded core (the ResNet-50 build and four steps under
the counting mode, three of them with the masks' update).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="counts a torchvision ResNet-50 (pip install '.[vision]')")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "op_counts.py"


@pytest.fixture(scope="module")
def op_counts():
    spec = importlib.util.spec_from_file_location("op_counts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["op_counts"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("op_counts", None)


@pytest.fixture(scope="module")
def counts(op_counts):
    """(masks, track_stats) -> StepCounts of one step of one ResNet-50, counted three ways."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = op_counts.build("resnet50")
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return {(moving, track): op_counts.count_step(model, x, track_stats=track, moving=moving)
                for moving, track in ((False, False), (True, False), (True, True))}
    finally:
        torch.set_num_threads(threads)


def test_the_counter_sees_what_syncs(op_counts):
    """Item reads, bool-mask indexing, nonzero, bincount and host copies count as syncs;
    elementwise ops, reductions and kthvalue do not."""
    t = torch.arange(6.0)
    syncing = [lambda: int(t.sum()), lambda: t[t > 2], lambda: t.nonzero(), lambda: torch.bincount(t.long()),
               lambda: t.tolist(), lambda: bool(t.any())]
    for fn in syncing:
        with op_counts.OpCounter() as c:
            fn()
        assert c.sync_total == 1 and c.total >= c.sync_total - 1
    with op_counts.OpCounter() as c:
        (t * 2).sum().add_(1)
        t.kthvalue(3)
        t[torch.tensor([1, 2])]
    assert c.sync_total == 0 and c.total == 6


def test_a_training_step_with_moving_masks_never_waits_for_the_device(counts):
    """Forward, backward and the optimizer step with every mask moving: no host-device sync."""
    c = counts[True, False]
    assert c.forward_backward_syncs == 0 and c.step_syncs == 0, dict(c.syncs)


def test_tracked_statistics_cost_one_copy_when_read(counts):
    """With track_stats the statistics stay tensors through the step; reading them is one copy."""
    c = counts[True, True]
    assert c.forward_backward_syncs == 0
    assert c.step_syncs <= 1, dict(c.syncs)


def test_the_mask_update_costs_under_half_a_forward_backward(counts):
    """The optimizer step with the masks' update dispatches at most half the ops of forward+
    backward (issue 23: 4.0× before, with foreach SGD); and so does everything that moving masks
    add to a step, the float masks the next forward rebuilds included, against the forward+
    backward of a step whose masks stay put."""
    moving, held = counts[True, False], counts[False, False]
    assert moving.step <= 0.5 * moving.forward_backward, moving.step_ops.most_common(10)
    added = moving.step + moving.forward_backward - held.forward_backward - held.step
    assert added <= 0.5 * held.forward_backward, (added, held.forward_backward)


def test_grouped_scheduled_updates_write_what_each_layer_computes():
    """A scheduled run on the torch path (layers of equal shapes grouped) leaves in every layer the
    masks the C kernels compute from its weight alone, leaves a frozen layer's masks alone, and
    its statistics equal a recount from the masks before and after."""
    from torch import nn

    import spre_fx
    from spre_fx import _native
    from spre_fx.masks import nm_mask, spatial_mask
    from tests.nets import Block, conv_bn

    torch.manual_seed(0)
    p = spre_fx.prepare(nn.Sequential(conv_bn(4, 8), Block(8), Block(8), conv_bn(8, 16, stride=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8)))
    layers = {n: m for n, m in p.named_modules() if hasattr(m, "nm_mask")}
    frozen = p[2].conv1
    frozen.freeze_masks()
    opt = torch.optim.SGD(p.parameters(), lr=0.5)
    sched = spre_fx.MaskScheduler(p, opt, track_stats=True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    held = {k: v.clone() for k, v in frozen.state_dict().items() if k.endswith("_mask")}
    for _ in range(3):
        before = {n: m.nm_mask.clone() for n, m in layers.items()}
        with _native.using(None):
            opt.zero_grad()
            p(x).square().mean().backward()
            opt.step()
        for name, m in layers.items():
            if m is frozen:
                continue
            assert torch.equal(m.nm_mask, nm_mask(m.weight, 2, 4)), name
            if hasattr(m, "spatial_mask"):
                assert torch.equal(m.spatial_mask, spatial_mask(m.weight, 0.5)), name
        flips = sum(int((before[n] != m.nm_mask).sum()) for n, m in layers.items())
        total = sum(m.nm_mask.numel() for m in layers.values() if m is not frozen)
        assert flips > 0 and sched.stats["nm_flip_rate"] == flips / total
        expected = {n: 1 - int(m.nm_mask.sum()) / m.nm_mask.numel() for n, m in layers.items()}
        assert sched.stats["sparsity"] == expected
    assert all(torch.equal(v, getattr(frozen, k)) for k, v in held.items())
