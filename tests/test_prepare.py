"""What a user relies on after `spre_fx.prepare` (issue: core §3)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import spre_fx
from spre_fx.modules import SpReBatchNorm2d, SpReConv2d

from .nets import TinyNet, tiny_input, train_steps


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet()


def test_keeps_class_names_and_other_methods(net):
    """Same class, original names, forward_features runs the SpRe branches too."""
    p = spre_fx.prepare(net)
    assert type(p) is TinyNet
    original = set(net.state_dict())
    assert original <= set(p.state_dict())
    assert {n for n, _ in net.named_parameters()} <= {n for n, _ in p.named_parameters()}
    assert isinstance(p.block.conv1, SpReConv2d) and isinstance(p.block.bn1, SpReBatchNorm2d)
    calls = []
    p.block.conv1.register_forward_hook(lambda *a: calls.append(1))
    p.forward_features(tiny_input())
    assert calls, "forward_features did not run the SpRe conv"


def test_new_parameters_get_new_names(net):
    p = spre_fx.prepare(net)
    new = set(p.state_dict()) - set(net.state_dict())
    assert "block.conv1.weight_rep" in new and "block.bn1.rep.weight" in new
    assert "block.conv1.nm_mask" in new and "block.conv1.spatial_mask" in new
    assert all(k.rpartition(".")[2] in {"weight_rep", "nm_mask", "spatial_mask"} or ".rep." in k for k in new)


def test_dense_checkpoint_loads_without_unexpected_keys(net):
    p = spre_fx.prepare(TinyNet())
    result = p.load_state_dict(net.state_dict(), strict=False)
    assert result.unexpected_keys == []
    new = set(p.state_dict()) - set(net.state_dict())
    # BatchNorm tolerates a missing num_batches_tracked; every other new key is reported missing.
    assert set(result.missing_keys) == {k for k in new if not k.endswith("num_batches_tracked")}
    assert torch.equal(p.block.conv1.weight, net.block.conv1.weight)


def test_prepared_checkpoint_round_trip(net):
    """A prepared checkpoint loads strictly into another prepared model: same outputs, same masks."""
    x = tiny_input()
    p = spre_fx.prepare(net)
    train_steps(p, x, steps=3)
    p.eval()
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    q = spre_fx.prepare(TinyNet())
    q.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    q.eval()
    assert torch.equal(q.block.conv1.nm_mask, p.block.conv1.nm_mask)
    assert torch.equal(q.block.conv1.spatial_mask, p.block.conv1.spatial_mask)
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=0)


def test_training_flag_still_controls_forward(net):
    """Python branches on self.training (aux output, dropout) follow .train()/.eval()."""
    p = spre_fx.prepare(net)
    x = tiny_input()
    p.train()
    assert isinstance(p(x), tuple)
    p.eval()
    out = p(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, p(x))  # dropout off in eval: deterministic
    p.train()
    a, b = p(x)[0], p(x)[0]
    assert not torch.equal(a, b)  # dropout live again in training


def test_input_not_mutated_unless_inplace(net):
    before = copy.deepcopy(net.state_dict())
    types = [type(m) for m in net.modules()]
    p = spre_fx.prepare(net)
    train_steps(p, tiny_input())
    assert [type(m) for m in net.modules()] == types
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    q = spre_fx.prepare(net, inplace=True)
    assert q is net and isinstance(net.block.conv1, SpReConv2d)


def test_dtype_and_device_kept():
    torch.manual_seed(0)
    net = TinyNet().double()
    p = spre_fx.prepare(net)
    assert p.block.conv1.weight_rep.dtype == torch.float64
    assert p.block.bn1.rep.running_var.dtype == torch.float64
    assert p.block.conv1.nm_mask.dtype == torch.bool
    assert all(t.device == torch.device("cpu") for t in p.state_dict().values())
    p.eval()
    assert p(tiny_input(dtype=torch.float64)).dtype == torch.float64


def test_deepcopy_and_whole_object_save(net, tmp_path):
    x = tiny_input()
    p = spre_fx.prepare(net)
    train_steps(p, x)
    p.eval()
    ema = copy.deepcopy(p)
    torch.testing.assert_close(ema(x), p(x), rtol=0, atol=0)
    torch.save(p, tmp_path / "whole.pt")
    q = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=0)
    assert spre_fx.report(q).count("spre") == spre_fx.report(p).count("spre")
    spre_fx.verify(q, spre_fx.convert(q), x)


def test_masks_follow_weights_in_training_and_eval(net):
    """Without a scheduler, the N:M mask follows the dense weight at the next forward, train or eval."""
    p = spre_fx.prepare(net)
    conv = p.block.conv1
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    p.train()
    p(tiny_input())
    assert torch.equal(conv.nm_mask, spre_fx.masks.nm_mask(conv.weight, 2, 4))
    p.eval()
    stale = conv.nm_mask.clone()
    with torch.no_grad():
        conv.weight.mul_(-torch.rand_like(conv.weight))
    assert not torch.equal(spre_fx.masks.nm_mask(conv.weight, 2, 4), stale)
    p(tiny_input())
    assert torch.equal(conv.nm_mask, spre_fx.masks.nm_mask(conv.weight, 2, 4))  # eval follows too


@pytest.mark.parametrize("nm", [(4, 4), (0, 4), (3, 2), (2.0, 4), "2:4", (1, 2, 3)])
def test_invalid_nm(net, nm):
    with pytest.raises(ValueError, match="nm"):
        spre_fx.prepare(net, nm=nm)


def test_bad_inputs(net):
    with pytest.raises(TypeError, match="nn.Module"):
        spre_fx.prepare("resnet18")
    with pytest.raises(ValueError, match="not prepared"):
        spre_fx.convert(net)
    with pytest.raises(ValueError, match="not prepared"):
        spre_fx.report(net)
    p = spre_fx.prepare(net)
    with pytest.raises(ValueError, match="already prepared"):
        spre_fx.prepare(p)
    with pytest.raises(ValueError, match="either config"):
        spre_fx.prepare(net, config=spre_fx.SpReConfig(), skip=("head",))


def test_non_finite_weights_rejected_before_any_change(net):
    with torch.no_grad():
        net.block.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="block.conv2.weight"):
        spre_fx.prepare(net, inplace=True)
    assert type(net.block.conv1) is nn.Conv2d


def test_config_object_and_options(net):
    cfg = spre_fx.SpReConfig(nm=(1, 4), skip=("head",), spre=False)
    p = spre_fx.prepare(net, config=cfg)
    rep = spre_fx.report(p)
    assert rep.nm == (1, 4)
    assert rep.count("spre") == 0
    head = next(lr for lr in rep.layers if lr.name == "head")
    assert head.treatment == "dense" and "skip" in head.reason
    with pytest.raises(TypeError):
        spre_fx.SpReConfig(spre="yes")
    with pytest.raises(ValueError, match="decay"):
        spre_fx.SpReConfig(decay=-1.0)


def test_silent_branch_starts_at_nm_projection(net):
    """silent_branch: step 0 equals the N:M projection of the dense model (SpRe BN γ = 0)."""
    x = tiny_input()
    net.eval()
    silent = spre_fx.prepare(net, silent_branch=True).eval()
    plain = spre_fx.prepare(net, spre=False).eval()
    torch.testing.assert_close(silent(x), plain(x), rtol=1e-5, atol=1e-6)
