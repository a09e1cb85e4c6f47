"""The inverse pass: convert(prepare(m)) equals the prepared model in eval mode and is N:M."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import spre_fx
from spre_fx.layers import SpReConv2d
from spre_fx.masks import is_nm

from .nets import TinyNet, tiny_input, train_steps


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


try:
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # the frozen-norm property test below skips, naming torchvision
    FrozenBatchNorm2d = None


def _norm(draw, c: int, frozen: bool) -> nn.Module:
    """A BatchNorm2d; with `frozen`, possibly one that does not train: torchvision's
    FrozenBatchNorm2d (random statistics, eps 0 / its default 1e-5 / 1e-3) or a BatchNorm2d whose
    affine parameters have requires_grad=False."""
    kind = draw(st.sampled_from(["bn", "frozen_bn", "bn_frozen_affine"] if frozen else ["bn"]))
    if kind == "frozen_bn":
        norm = FrozenBatchNorm2d(c, eps=draw(st.sampled_from([0.0, 1e-5, 1e-3])))
        g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
        norm.running_mean.copy_(torch.randn(c, generator=g))
        norm.running_var.copy_(torch.rand(c, generator=g) + 0.1)
        return norm
    bn = nn.BatchNorm2d(c, affine=draw(st.booleans()))
    if kind == "bn_frozen_affine":
        bn.requires_grad_(False)
    return bn


@st.composite
def networks(draw, frozen: bool = False):
    """Random small CNNs: conv(+BN)(+ReLU) layers with random geometry, some residual; with
    `frozen`, some convs' weights and some norms do not train."""
    widths = st.sampled_from([4, 6, 8, 12, 16])
    c = draw(widths)
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1)]
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from([1, 2, 3, 5]))
        dilation = draw(st.sampled_from([1, 2])) if k > 1 else 1
        groups = draw(st.sampled_from([g for g in (1, 2, 4, c) if c % g == 0]))
        residual = draw(st.booleans())
        out = c if residual else draw(widths)
        if out % groups:
            groups = 1
        stride = 1 if residual else draw(st.sampled_from([1, 2]))
        pad = dilation * (k - 1) // 2
        conv = nn.Conv2d(c, out, k, stride, pad, dilation, groups, bias=draw(st.booleans()))
        if frozen and draw(st.booleans()):
            conv.requires_grad_(False)  # mmdet's frozen_stages, torchvision's trainable_layers
        body = [conv]
        if draw(st.booleans()) or residual:
            body.append(_norm(draw, out, frozen))
        body.append(nn.ReLU())
        block = nn.Sequential(*body)
        if residual and k % 2 == 1:
            block = Residual(block)
        layers.append(block)
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, draw(st.sampled_from([4, 5, 8])))]
    return nn.Sequential(*layers)


@settings(max_examples=25, deadline=None)
@given(net=networks(), nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 8), (4, 8)]),
       spre=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99),
       silent=st.booleans())
def test_convert_is_exact_on_generated_networks(net, nm, spre, dtype, seed, silent):
    """Both branch starts: silent (the default; γ has moved after the two steps) and the paper's,
    whose branch is heard at full strength from step 0."""
    torch.manual_seed(seed)
    net = net.to(dtype)
    x = tiny_input(batch=3, size=10, dtype=dtype)
    p = spre_fx.prepare(net, nm=nm, spre=spre, silent_branch=silent)
    train_steps(p, x, steps=2)
    p.eval()
    c = spre_fx.convert(p)
    result = spre_fx.verify(p, c, x)
    assert result.output_error <= (1e-10 if dtype == torch.float64 else 1e-5)
    rep = spre_fx.report(c)
    modules = dict(c.named_modules())
    for lr in rep.layers:
        layer = modules[lr.name]
        assert not type(layer).__module__.startswith("spre_fx")
        if lr.treatment != "dense":
            assert is_nm(layer.weight, *nm), lr.name
        if lr.norm is not None:
            assert not isinstance(modules[lr.norm], nn.modules.batchnorm._BatchNorm)
    if not spre:
        assert rep.count("spre") == 0


@pytest.mark.skipif(FrozenBatchNorm2d is None, reason="needs torchvision (FrozenBatchNorm2d)")
@settings(max_examples=25, deadline=None)
@given(net=networks(frozen=True), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 99))
def test_frozen_norms_and_weights_fold_exactly_without_branch(net, dtype, seed):
    """Convs before FrozenBatchNorm2d or a frozen BatchNorm, and convs whose weight does not train,
    are paired and folded at convert (exactly), and never get a SpRe branch."""
    torch.manual_seed(seed)
    net = net.to(dtype)
    x = tiny_input(batch=3, size=10, dtype=dtype)
    modules = dict(net.named_modules())
    p = spre_fx.prepare(net)
    train_steps(p, x, steps=2)
    p.eval()
    c = spre_fx.convert(p)
    assert spre_fx.verify(p, c, x).output_error <= (1e-10 if dtype == torch.float64 else 1e-5)
    prepared, converted = dict(p.named_modules()), dict(c.named_modules())
    plan = {lp.name: lp for lp in spre_fx.report(p).layers}
    for name, m in modules.items():
        if not isinstance(m, nn.Conv2d) or not name.endswith(".0"):
            continue  # the stem, which has no norm
        norm_name = name[:-1] + "1"  # what follows the conv in its block, when it is a norm
        norm, lp = modules.get(norm_name), plan[name]
        if isinstance(norm, FrozenBatchNorm2d):
            assert lp.norm == norm_name, (name, lp.reason)  # dense convs (depthwise) are folded too
            assert isinstance(converted[norm_name], spre_fx.FoldedBatchNorm), "FrozenBatchNorm2d not folded"
        frozen_norm = isinstance(norm, FrozenBatchNorm2d) or (
            isinstance(norm, nn.BatchNorm2d) and norm.affine and not norm.weight.requires_grad)
        if not m.weight.requires_grad or frozen_norm:
            assert not isinstance(prepared[name], SpReConv2d), (name, lp.reason)
            if lp.treatment == "nm" and lp.norm is not None and max(m.kernel_size) > 1:
                want = "weight does not train" if not m.weight.requires_grad else "is frozen"
                assert lp.reason.startswith("no SpRe branch: ") and want in lp.reason, lp.reason


def test_converted_resnet_matches_and_keeps_class():
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    p = spre_fx.prepare(model)
    train_steps(p, x, steps=2)
    p.eval()
    c = spre_fx.convert(p)
    assert type(c) is type(model)
    assert {type(m) for m in c.modules()}.isdisjoint(
        {spre_fx.layers.SpReConv2d, spre_fx.layers.NMConv2d, nn.BatchNorm2d})
    spre_fx.verify(p, c, x)
    # Same parameter count as the dense model with BN folded: zero inference overhead.
    dense_folded = sum(m.weight.numel() + m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    conv_params = sum(p.numel() for m in c.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    assert conv_params == dense_folded


def test_convert_leaves_prepared_model_untouched_and_rejects_converted():
    torch.manual_seed(0)
    p = spre_fx.prepare(TinyNet())
    x = tiny_input()
    train_steps(p, x)
    p.eval()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    c = spre_fx.convert(p)
    assert all(torch.equal(v, p.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="converted"):
        spre_fx.convert(c)
    with pytest.raises(ValueError):
        spre_fx.verify(c, c, x)


def test_verify_detects_a_wrong_model():
    torch.manual_seed(0)
    p = spre_fx.prepare(TinyNet())
    x = tiny_input()
    train_steps(p, x)
    p.eval()
    c = spre_fx.convert(p)
    with torch.no_grad():
        c.block.conv1.weight[0] += 1.0  # breaks both equality and 2:4
    with pytest.raises(spre_fx.VerificationError, match="block.conv1"):
        spre_fx.verify(p, c, x)
    result = spre_fx.verify(p, spre_fx.convert(p), x)
    assert set(result.layer_errors) >= {"block.bn1", "block.bn2", "head"}
    assert all(v == 0 for v in result.nm_violations.values())


def test_verify_does_not_swallow_nan():
    torch.manual_seed(0)
    p = spre_fx.prepare(TinyNet())
    x = tiny_input()
    p.eval()
    c = spre_fx.convert(p)
    c.block.conv2.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(spre_fx.VerificationError, match="output: NaN or inf values"):
        spre_fx.verify(p, c, x)


class KeepsLastForward(nn.Module):
    """Holds tensors of its last forward, with their autograd history (RAFT's correlation pyramid)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pyramid: list = []
        self.last: dict = {}

    def forward(self, x):
        y = self.bn(self.conv(self.stem(x)))
        self.pyramid = [y, F.avg_pool2d(y, 2)]
        self.last = {"mean": y.mean()}
        return y


def test_convert_and_prepare_copy_models_holding_tensors_with_history():
    torch.manual_seed(0)
    x = tiny_input()
    model = KeepsLastForward()
    model(x)  # a training forward before prepare leaves a graph behind too
    p = spre_fx.prepare(model)
    assert p.pyramid[0].grad_fn is None and model.pyramid[0].grad_fn is not None
    train_steps(p, x)
    assert p.pyramid[0].grad_fn is not None
    p.eval()
    c = spre_fx.convert(p)
    assert c.pyramid[0].grad_fn is None and c.pyramid[0] is not p.pyramid[0]
    torch.testing.assert_close(c.pyramid[1], p.pyramid[1].detach(), rtol=0, atol=0)
    spre_fx.verify(p, c, x)


def test_torchvision_raft_converts_after_a_training_forward():
    tv = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    p = spre_fx.prepare(tv.models.optical_flow.raft_small(weights=None))
    a, b = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    flows = p.train()(a, b, num_flow_updates=2)
    flows[-1].abs().mean().backward()
    p.eval()
    c = spre_fx.convert(p)
    result = spre_fx.verify(p, c, (a, b), example_kwargs={"num_flow_updates": 2})
    assert result.output_error <= 1e-5
    assert result.nm_violations and not any(result.nm_violations.values())  # N:M layers, all exact
