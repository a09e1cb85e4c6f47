"""What a user relies on after `spre_fx.prepare` (issue: core §3)."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

import spre_fx
from spre_fx.layers import SpReBatchNorm2d, SpReConv2d

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


def test_branch_starts_silent_by_default_and_the_paper_init_is_one_option_away(net):
    """The default follows both studies of docs/results.md (silent); silent_branch=False is the
    paper's start: the branch BatchNorm at torch's γ = 1, so step 0 is not the N:M projection."""
    assert spre_fx.SpReConfig().silent_branch is True
    x = tiny_input()
    net.eval()
    default = spre_fx.prepare(net, nm=(2, 4)).eval()
    explicit = spre_fx.prepare(net, nm=(2, 4), silent_branch=True).eval()
    paper = spre_fx.prepare(net, nm=(2, 4), silent_branch=False).eval()
    branches = lambda m: [b.rep for b in m.modules() if isinstance(b, SpReBatchNorm2d)]
    assert branches(default)
    assert all(torch.equal(r.weight, torch.zeros_like(r.weight)) for r in branches(default))
    assert all(torch.equal(r.weight, torch.ones_like(r.weight)) for r in branches(paper))
    assert torch.equal(default(x), explicit(x))
    assert not torch.allclose(default(x), paper(x), rtol=1e-3, atol=1e-3)


def test_prepare_permute_is_permute_channels_then_prepare(net):
    """prepare(permute=True) permutes its own copy for the layers the config chooses, exactly as
    permute_channels(...) then prepare(...) would; the input model is left untouched."""
    nm, x = (1, 4), tiny_input()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = spre_fx.prepare(net, nm=nm, permute=True)
    q = spre_fx.prepare(spre_fx.permute_channels(net, nm=nm), nm=nm)
    unpermuted = spre_fx.prepare(net, nm=nm)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert spre_fx.permutation_of(net) is None
    record = spre_fx.report(p).permutation
    assert record is not None and any(g.applied for g in record.groups), record
    assert record == dataclasses.replace(spre_fx.report(q).permutation, seconds=record.seconds)
    ps, qs, us = p.state_dict(), q.state_dict(), unpermuted.state_dict()
    assert ps.keys() == qs.keys() == us.keys()
    assert all(torch.equal(ps[k], qs[k]) for k in ps)
    assert any(not torch.equal(ps[k], us[k]) for k in ps), "permute=True moved no channel"
    p.eval(), q.eval()
    assert torch.equal(p(x), q(x))


def test_prepare_permute_inplace_permutes_the_users_model(net):
    p = spre_fx.prepare(net, nm=(1, 4), permute=True, inplace=True)
    assert p is net and spre_fx.permutation_of(net) is not None


def test_prepare_permute_refuses_the_meta_device():
    """A meta model prepares without values, but a permutation needs them: an error, not a guess."""
    with torch.device("meta"):
        model = TinyNet()
    spre_fx.prepare(model, nm=(1, 4))
    with pytest.raises(ValueError, match="meta device: load the weights"):
        spre_fx.prepare(model, nm=(1, 4), permute=True)


class CachesOnFirstCall(nn.Module):
    """Caches what it saw on its first call (torchvision's MultiScaleRoIAlign keeps `scales`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.size = None
        self.seen: list = []
        self.by_key: dict = {}

    def forward(self, x):
        if self.size is None:
            self.size = x.shape[-1]
            self.seen.append(x.shape[-2])
            self.by_key["first"] = x.mean()
        return self.bn(self.conv(x)) * (self.size / x.shape[-1])


def _proxies(model: nn.Module) -> list[str]:
    """Every attribute (or list/dict entry of one) of any module that holds an fx Proxy."""
    found = []
    for name, mod in model.named_modules():
        for key, value in vars(mod).items():
            values = value.values() if isinstance(value, dict) else value
            values = values if isinstance(value, (dict, list)) else (value,)
            if any(isinstance(v, torch.fx.Proxy) for v in values):
                found.append(f"{name}.{key}")
    return found


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_leaves_no_mark_on_the_model(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CachesOnFirstCall())
    before = {id(m): {k: v for k, v in vars(m).items() if k != "_modules"} for m in model.modules()}
    p = spre_fx.prepare(model, inplace=inplace)
    assert _proxies(p) == []
    if inplace:  # every module that was not swapped holds exactly what it held before
        kept = [m for m in p.modules() if id(m) in before]
        assert len(kept) == 3  # the Sequential, the stem conv (dense) and the cache module
        for m in kept:
            after = {k: v for k, v in vars(m).items() if k not in ("_modules", "_spre_fx_plan")}
            assert after.keys() == before[id(m)].keys()
            assert all(after[k] is v or after[k] == v for k, v in before[id(m)].items())
    cache = p[1]
    assert cache.size is None and cache.seen == [] and cache.by_key == {}
    assert spre_fx.report(p).layers[1].treatment == "spre"  # the trace saw the pair all the same
    x = tiny_input()
    p(x)  # its first real call caches real values
    assert cache.size == 12 and cache.seen == [12]


def test_torchvision_rcnn_runs_after_prepare():
    """MultiScaleRoIAlign kept fx Proxies from the trace: the first forward raised a TraceError."""
    tv = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    model = tv.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128,
        rpn_post_nms_top_n_train=64, rpn_post_nms_top_n_test=64, box_batch_size_per_image=32)
    p = spre_fx.prepare(model)
    assert _proxies(p) == []
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}] * 2
    losses = p.train()(images, targets)
    sum(losses.values()).backward()
    with torch.no_grad():
        detections = p.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


def test_a_proxy_left_out_of_reach_of_the_restore_is_an_error():
    """A cache nested two containers deep is not restored; prepare says so instead of returning a
    model that fails at its first forward."""

    class NestedCache(CachesOnFirstCall):
        def __init__(self) -> None:
            super().__init__()
            self.nested = {"levels": {}}

        def forward(self, x):
            self.nested["levels"].setdefault("scale", x.shape[-1])
            return super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), NestedCache())
    with pytest.raises(RuntimeError, match=r"tracing left an fx Proxy in '1.nested'.*register_leaf_module"):
        spre_fx.prepare(model)
