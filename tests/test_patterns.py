"""Pattern discovery: which layers get SpRe, N:M or nothing, and that every decision is safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import spre_fx
from spre_fx.patterns import discover
from spre_fx.registry import is_leaf_class, leaf_functions, norm_spec, scoped_registrations

from .nets import conv_bn, tiny_input, train_steps


def plan(model, **options):
    return {lp.name: lp for lp in discover(model, spre_fx.SpReConfig(**options)).layers}


def roundtrip(model, x, **options):
    """prepare → train → convert → verify; returns the report of the prepared model."""
    p = spre_fx.prepare(model, **options)
    train_steps(p, x)
    p.eval()
    spre_fx.verify(p, spre_fx.convert(p), x)
    return spre_fx.report(p)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BN (torch's fuse gets this wrong)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


class TwoUsers(nn.Module):
    """A conv whose output feeds its BN and a residual add; a BN called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shared_bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        y = self.conv(x)
        x = self.bn(y) + y
        return self.shared_bn(self.conv2(x)) + self.shared_bn(self.conv3(x))


def test_shared_conv_gets_nm_without_fold():
    torch.manual_seed(0)
    lp = plan(SharedConv())["conv"]
    assert lp.treatment == "nm" and lp.norm is None and "2 places" in lp.reason
    roundtrip(SharedConv(), tiny_input())


def test_extra_users_and_shared_bn_are_not_paired():
    torch.manual_seed(0)
    layers = plan(TwoUsers())
    assert layers["conv"].norm is None and "other users" in layers["conv"].reason
    for name in ("conv2", "conv3"):
        assert layers[name].norm is None and "called from 2 places" in layers[name].reason
    roundtrip(TwoUsers(), tiny_input())


class DataDependent(nn.Module):
    """A block fx cannot trace (control flow on a tensor value) inside a traceable model."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = DataDependent()
        self.tail = conv_bn(8, 8)

    def forward(self, x):
        return self.tail(self.odd(self.stem(x)))


def test_untraceable_module_is_traced_through_its_children():
    torch.manual_seed(0)
    model = Wrapper()
    p = discover(model, spre_fx.SpReConfig())
    layers = {lp.name: lp for lp in p.layers}
    assert {m for m, _ in p.untraced} == {"<model>", "odd"}
    assert layers["odd.inner.0"].treatment == "spre"  # found inside the child's own trace
    assert layers["tail.0"].treatment == "spre"
    report = roundtrip(Wrapper(), tiny_input())
    assert "could not trace" in str(report)


def test_registered_leaf_module_is_opaque():
    torch.manual_seed(0)

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Opaque())
    with scoped_registrations():
        spre_fx.register_leaf_module(Opaque)
        layers = plan(model)
        # fx does not see how the leaf uses its conv (it could read conv.weight directly): dense
        assert layers["1.conv"].treatment == "dense" and layers["1.conv"].norm is None
        assert "inside '1'" in layers["1.conv"].reason
        roundtrip(model, tiny_input())
    assert not is_leaf_class(Opaque)  # the registration did not outlive the block
    assert plan(model)["1.conv"].treatment == "spre"


def test_weights_read_directly_stay_dense():
    """A layer whose weight the forward reads itself (F.linear, nn.MultiheadAttention) is not masked."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            x = F.linear(x, self.fc.weight, self.fc.bias)
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    layers = plan(Functional())
    assert layers["fc"].treatment == "dense" and "read directly" in layers["fc"].reason
    assert layers["attn.out_proj"].treatment == "dense" and "inside 'attn'" in layers["attn.out_proj"].reason
    assert layers["out"].treatment == "nm"
    x = torch.randn(2, 5, 8)
    p = spre_fx.prepare(Functional())
    train_steps(p, x)
    p.eval()
    spre_fx.verify(p, spre_fx.convert(p), x)


def test_depthwise_stem_and_divisibility_reasons():
    torch.manual_seed(0)
    model = nn.Sequential(
        conv_bn(3, 8), conv_bn(8, 8, groups=8), conv_bn(8, 6), conv_bn(6, 8), conv_bn(8, 16, groups=2)
    )
    layers = plan(model)
    assert layers["0.0"].treatment == "dense" and "stem" in layers["0.0"].reason
    assert layers["1.0"].treatment == "dense" and "depthwise" in layers["1.0"].reason
    assert layers["2.0"].treatment == "spre"
    assert layers["3.0"].treatment == "dense" and "(6) is not a multiple of M=4" in layers["3.0"].reason
    assert layers["4.0"].treatment == "spre"  # 4 in-channels per group
    assert all(layers[n].norm for n in ("0.0", "1.0", "3.0"))  # dense pairs still fold
    assert plan(model, dense_stem=False)["0.0"].reason.endswith("not a multiple of M=4")
    roundtrip(model, tiny_input())


def test_include_skip_and_spre_off():
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8), nn.Flatten(), nn.LazyLinear(4))
    model(tiny_input())
    layers = plan(model, include=("1.*", "4"), skip=("4",))
    assert layers["1.0"].treatment == "spre"
    assert layers["2.0"].treatment == "dense" and "include" in layers["2.0"].reason
    assert layers["4"].treatment == "dense" and "skip" in layers["4"].reason
    off = plan(model, spre=False)
    assert {lp.treatment for lp in off.values()} == {"dense", "nm"}
    assert off["1.0"].norm == "1.1"  # still folded at convert


def test_conv_subclass_with_own_forward_left_dense():
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std() + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class PlainSub(nn.Conv2d):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), StdConv(8, 8, 3, padding=1), nn.BatchNorm2d(8),
        PlainSub(8, 8, 3, padding=1), nn.BatchNorm2d(8),
    )
    layers = plan(model)
    assert layers["1"].treatment == "dense" and "overrides forward" in layers["1"].reason
    assert layers["1"].norm is None  # folding into a standardised weight would be wrong
    assert layers["3"].treatment == "spre"
    roundtrip(model, tiny_input())
    c = spre_fx.convert(spre_fx.prepare(model))
    assert type(c[3]) is PlainSub  # the user's class comes back


def test_timm_batchnorm_act_sums_branches_before_activation():
    timm = pytest.importorskip("timm", reason="timm not installed")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        BatchNormAct2d(8, act_layer=nn.ReLU),
    )
    assert timm is not None
    assert plan(model)["1"].treatment == "spre"
    p = spre_fx.prepare(model).eval()
    x = tiny_input()
    bn = p[2]
    branches = p[1](p[0](x))
    manual = torch.relu(F.batch_norm(branches.main, bn.running_mean, bn.running_var, bn.weight,
                                     bn.bias, False, 0.0, bn.eps) + bn.rep(branches.rep))
    torch.testing.assert_close(p(x), manual)
    c = spre_fx.convert(p)
    assert isinstance(c[2].act, nn.ReLU)
    spre_fx.verify(p, c, x)


def test_syncbatchnorm_branch_is_sync_and_folds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.SyncBatchNorm(8))
    p = spre_fx.prepare(model).eval()
    assert isinstance(p[2].rep, nn.SyncBatchNorm)
    spre_fx.verify(p, spre_fx.convert(p), tiny_input())


def test_conv1d_and_conv3d_get_nm_and_fold():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Conv1d(3, 8, 3), nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8))
    layers = plan(m1)
    assert layers["1"].treatment == "nm" and layers["1"].norm == "2"
    roundtrip(m1, torch.randn(2, 3, 16))
    m3 = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Conv3d(8, 8, 3), nn.BatchNorm3d(8))
    roundtrip(m3, torch.randn(2, 3, 8, 8, 8))


class OptionalNorm(nn.Module):
    """A ConvModule-like block: Python control flow on plain keyword defaults."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, norm=True, activate=True):
        x = self.conv(x)
        if norm:
            x = self.bn(x)
        return torch.relu(x) if activate else x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([OptionalNorm(), OptionalNorm()])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks[: int(x.shape[0] > 0) + 1]:  # data-dependent length: fx fails
            x = block(x)
        return x


def test_children_trace_at_their_plain_defaults():
    """A child whose forward branches on `norm=True` is traced on that default path."""
    torch.manual_seed(0)
    layers = plan(Untraceable())
    assert layers["blocks.0.conv"].treatment == "spre" and layers["blocks.1.conv"].treatment == "spre"
    roundtrip(Untraceable(), tiny_input())


def test_dimension_agnostic_batchnorm_pairs():
    """A _BatchNorm subclass without a fixed rank (mmengine's _BatchNormXd) is paired."""
    from torch.nn.modules.batchnorm import _BatchNorm

    class BatchNormXd(_BatchNorm):
        def _check_input_dim(self, input):
            return

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), BatchNormXd(8),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm1d(8))
    layers = plan(model)
    assert layers["1"].treatment == "spre" and layers["1"].norm == "2"
    assert layers["3"].norm is None and "does not match" in layers["3"].reason


def clamp_if_big(x):
    """Data-dependent control flow: fx cannot trace through it."""
    return x.clamp(max=1.0) if x.abs().max() > 1.0 else x


def test_registered_leaf_function_keeps_the_whole_model_traceable():
    class UsesFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(self.conv(clamp_if_big(self.stem(x))))

    torch.manual_seed(0)
    with scoped_registrations():
        spre_fx.register_leaf_function(clamp_if_big)
        p = discover(UsesFunction(), spre_fx.SpReConfig())
        assert p.untraced == ()  # the root traced whole: the function is one call_function node
        assert {lp.name: lp for lp in p.layers}["conv"].treatment == "spre"
        roundtrip(UsesFunction(), tiny_input())
    assert clamp_if_big not in leaf_functions()


def test_mmcv_conv_module_pairs():
    cnn = pytest.importorskip("mmcv.cnn", reason="mmcv is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          cnn.ConvModule(8, 8, 3, padding=1, norm_cfg=dict(type="BN")))
    layers = plan(model)
    assert layers["1.conv"].treatment == "spre" and layers["1.conv"].norm == "1.bn"
    roundtrip(model, tiny_input())


def test_scoped_registrations_undo_every_registration_even_on_error():
    """Leaf modules, leaf functions and norms registered inside the block are gone after it."""
    class CustomBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    class Block(nn.Module):
        pass

    def helper(x):
        return x

    assert norm_spec(CustomBN(4)) is None
    with pytest.raises(RuntimeError, match="inside"), scoped_registrations():
        spre_fx.register_norm(CustomBN, post=lambda m, y: y * 2, after_fold=lambda m: nn.Identity())
        spre_fx.register_leaf_module(Block)
        spre_fx.register_leaf_function(helper)
        assert norm_spec(CustomBN(4)) is not None and is_leaf_class(Block) and helper in leaf_functions()
        raise RuntimeError("inside")
    assert norm_spec(CustomBN(4)) is None and not is_leaf_class(Block) and helper not in leaf_functions()
    assert norm_spec(nn.BatchNorm2d(4)) is not None  # what was there before stays
