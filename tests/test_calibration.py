"""spre_fx/calibration.py: recalibrate_bn against statistics written out by hand.

The reference recomputes every pre-BN activation with torch.nn.functional convolutions of the
masked weights (docs/method.md §3) and averages per-batch means and unbiased variances, as a
cumulative (momentum=None) BatchNorm does; it never calls the code under test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import spre_fx
from tests.nets import TinyNet, tiny_input, train_steps


class TwoSpRe(nn.Module):
    """conv → BN → ReLU → conv → BN → pool → linear; both convs get SpRe (dense_stem=False)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


def _branches(conv, x):
    """The two pre-BN outputs of a SpRe conv, from its weights and masks."""
    main = F.conv2d(x, conv.weight * conv.nm_mask, None, 1, 1)
    rep = F.conv2d(x, conv.weight_rep * conv.nm_mask * conv.spatial_mask, None, 1, 1)
    return main, rep


def _batch_norm(y, bn):
    """Training-mode BatchNorm of one batch (biased variance), by hand."""
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]


def _reference_stats(model, batches):
    """{bn name: (mean, var)}: per-batch mean and unbiased variance, averaged over batches."""
    acc: dict[str, list] = {}
    for x in batches:
        m1, r1 = _branches(model.conv1, x)
        h = F.relu(_batch_norm(m1, model.bn1) + _batch_norm(r1, model.bn1.rep))
        m2, r2 = _branches(model.conv2, h)
        for name, y in (("bn1", m1), ("bn1.rep", r1), ("bn2", m2), ("bn2.rep", r2)):
            acc.setdefault(name, []).append((y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=True)))
    return {k: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
            for k, v in acc.items()}


def _trained(seed: int, scheduler: bool):
    torch.manual_seed(seed)
    model = spre_fx.prepare(TwoSpRe().double(), nm=(2, 4), dense_stem=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = spre_fx.MaskScheduler(model, opt) if scheduler else None
    model.train()
    for _ in range(3):  # masks and running statistics move away from their initial values
        loss = model(torch.randn(4, 8, 6, 6, dtype=torch.float64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, sched


def _state(model):
    """The state dict, with every mask as the layer computes with it now: without a scheduler the
    stored masks catch up with the last optimizer step at the next forward (docs/training.md)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if hasattr(m, "current_masks"):
            state.update({f"{name}.{k}": v.clone() for k, v in m.current_masks().items()})
    return state


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_batches=st.integers(1, 4), scheduler=st.booleans())
def test_statistics_equal_hand_computed_ones_and_nothing_else_changes(seed, n_batches, scheduler):
    model, _ = _trained(seed, scheduler)
    model.bn2.momentum = 0.3
    model.bn1.rep.momentum = None
    before = _state(model)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(5, 8, 6, 6, generator=g, dtype=torch.float64) for _ in range(n_batches)]

    names = spre_fx.recalibrate_bn(model, batches)

    assert sorted(names) == ["bn1", "bn1.rep", "bn2", "bn2.rep"]
    modules = dict(model.named_modules())
    for name, (mean, var) in _reference_stats(model, batches).items():
        torch.testing.assert_close(modules[name].running_mean, mean, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(modules[name].running_var, var, rtol=1e-10, atol=1e-12, msg=name)
        assert int(modules[name].num_batches_tracked) == n_batches
    after = model.state_dict()
    for key, value in before.items():  # weights, masks, S: bit-identical
        if not any(key.endswith(s) for s in ("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(after[key], value), key
    assert model.bn2.momentum == 0.3 and model.bn1.rep.momentum is None and model.bn1.momentum == 0.1
    assert all(m.training for m in model.modules())  # it was in training mode before


@pytest.mark.parametrize("frozen", [False, True])
def test_statistics_are_those_of_the_masks_in_force(frozen):
    """After a hand-written weight change (e.g. a loaded checkpoint) the masks in force are those
    of the new weight, what eval and convert use (docs/training.md); masks frozen on purpose stay
    the frozen ones. Recalibration normalises under exactly those and leaves them in force."""
    model, _ = _trained(0, scheduler=False)
    if frozen:
        spre_fx.freeze_masks(model)
    held = {k: v.clone() for k, v in model.conv1.current_masks().items()}
    with torch.no_grad():
        model.conv1.weight.copy_(torch.randn_like(model.conv1.weight))
    expected = {k: v.clone() for k, v in model.conv1.current_masks().items()}
    assert all(torch.equal(expected[k], held[k]) for k in held) == frozen
    batches = [torch.randn(4, 8, 6, 6, dtype=torch.float64)]
    spre_fx.recalibrate_bn(model, batches)
    for name, mask in expected.items():
        assert torch.equal(getattr(model.conv1, name), mask), name
    modules = dict(model.named_modules())
    for name, (mean, var) in _reference_stats(model, batches).items():
        torch.testing.assert_close(modules[name].running_mean, mean, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(modules[name].running_var, var, rtol=1e-10, atol=1e-12, msg=name)


def test_modes_restored_eval_branches_taken_and_loader_batches():
    """TinyNet returns a pair in training and has dropout: both stay in their eval behaviour."""
    torch.manual_seed(0)
    model = spre_fx.prepare(TinyNet(), nm=(2, 4))
    train_steps(model, tiny_input(4))
    model.train()
    model.head.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((m.training, m.drop.training, out)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tiny_input(8), torch.zeros(8)),
                                         batch_size=4)
    names = spre_fx.recalibrate_bn(model, loader)
    assert len(seen) == 2 and all(not t and not d and isinstance(out, torch.Tensor) for t, d, out in seen)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert "stem.1" in names and "block.bn1.rep" in names
    assert int(model.block.bn1.num_batches_tracked) == 2


class NormEvalNet(TinyNet):
    """mmdet-style norm_eval: train() keeps the stem's BatchNorm in eval."""

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.stem[1].eval()
        return self


def test_bns_kept_in_eval_by_train_are_left_alone_unless_asked():
    torch.manual_seed(0)
    model = spre_fx.prepare(NormEvalNet(), nm=(2, 4))
    model.eval()
    stem = model.stem[1]
    stats = stem.running_mean.clone(), stem.running_var.clone()
    x = [tiny_input(4)]
    names = spre_fx.recalibrate_bn(model, x)
    assert "stem.1" not in names and "block.bn1" in names
    assert torch.equal(stem.running_mean, stats[0]) and torch.equal(stem.running_var, stats[1])
    assert not any(m.training for m in model.modules())  # eval before, eval after
    assert "stem.1" in spre_fx.recalibrate_bn(model, x, include_frozen=True)
    assert not torch.equal(stem.running_mean, stats[0])


def test_mapping_batches_custom_forward_and_num_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyNet()

        def forward(self, *, image, scale):
            return self.net(image * scale)

    torch.manual_seed(0)
    model = spre_fx.prepare(Keyword(), nm=(2, 4))
    batches = [{"image": tiny_input(4), "scale": 2.0} for _ in range(5)]
    spre_fx.recalibrate_bn(model, batches, num_batches=3)
    assert int(model.net.block.bn1.num_batches_tracked) == 3
    calls = []
    spre_fx.recalibrate_bn(model, [(1, tiny_input(4))], forward=lambda m, b: calls.append(b[0]) or
                           m(image=b[1], scale=1.0))
    assert calls == [1] and int(model.net.block.bn1.num_batches_tracked) == 1


def test_no_batches_raises_before_any_statistic_changes():
    torch.manual_seed(0)
    model = spre_fx.prepare(TinyNet(), nm=(2, 4))
    train_steps(model, tiny_input(4))
    before = _state(model)
    with pytest.raises(ValueError, match="no batches"):
        spre_fx.recalibrate_bn(model, [])
    for key, value in _state(model).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.mmdet
def test_mmdet_detector_norm_eval_and_frozen_stages():
    """A shipped SpRe RetinaNet (shrunk): keyword batches with mode='tensor' need no targets;
    BNs the backbone keeps in eval (frozen_stages, norm_eval) are left alone by default."""
    pytest.importorskip("mmdet", reason="mmdetection not installed: pip install -e .[mmdet]")
    pytest.importorskip("mmcv.ops", reason="mmcv with its ops is needed by mmdet")
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from tests.test_mmdet import CONFIGS, SHIPPED, _shrink

    register_all_modules()
    cfg = Config.fromfile(str(CONFIGS / SHIPPED["retinanet"]))
    _shrink(cfg.model.detector, "retinanet", width=16)
    cfg.model.backbone.update(frozen_stages=1, norm_eval=False, norm_cfg=dict(type="BN", requires_grad=True))
    model = MODELS.build(cfg.model)
    model.eval()
    frozen, free = model.backbone.layer1[0].bn1, model.backbone.layer2[0].bn1
    assert not hasattr(frozen, "rep")  # a frozen stage gets no SpRe branch (docs/support.md)
    stats = {bn: bn.running_mean.clone() for bn in (frozen, free, free.rep)}
    masks = model.backbone.layer2[0].conv1.nm_mask.clone()
    batches = [{"inputs": torch.randn(2, 3, 64, 64), "mode": "tensor"}]

    names = spre_fx.recalibrate_bn(model, batches)
    assert "backbone.layer2.0.bn1.rep" in names and "backbone.layer1.0.bn1" not in names
    assert torch.equal(frozen.running_mean, stats[frozen])
    for bn in (free, free.rep):
        assert not torch.equal(bn.running_mean, stats[bn])
    assert torch.equal(model.backbone.layer2[0].conv1.nm_mask, masks)
    assert not any(m.training for m in model.modules())

    model.backbone.norm_eval = True
    assert spre_fx.recalibrate_bn(model, batches) == []  # norm_eval: every backbone BN kept in eval
    assert "backbone.layer1.0.bn1" in spre_fx.recalibrate_bn(model, batches, include_frozen=True)
