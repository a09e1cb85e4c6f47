"""Discovery: which layers get SpRe, N:M or nothing, and that every decision is safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import spre_fx
from spre_fx.discovery import discover
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
    assert layers["1"].treatment == "dense"
    assert layers["1"].reason.startswith("tests.test_discovery.test_conv_subclass_with_own_forward_left_dense"
                                         ".<locals>.StdConv overrides forward")
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
    assert isinstance(c[2], spre_fx.FoldedBatchNorm) and isinstance(c[2].post.act, nn.ReLU)
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
    lp = plan(m3)["1"]
    assert lp.treatment == "nm" and lp.norm == "2"
    assert lp.reason == ("3x3x3 Conv3d followed by BatchNorm '2': plain N:M, SpRe branches are Conv2d-only "
                         "(the BatchNorm is folded at convert)")  # not the 1x1 reason
    assert plan(m1)["1"].reason.startswith("3 Conv1d followed by BatchNorm '2'")
    roundtrip(m3, torch.randn(2, 3, 8, 8, 8))
    pointwise = nn.Sequential(nn.Conv3d(3, 8, 3), nn.Conv3d(8, 8, 1), nn.BatchNorm3d(8))
    assert plan(pointwise)["1"].reason == "1x1x1 conv: plain N:M (docs/method.md §3)"


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


class ConvAct(nn.Module):
    """ultralytics' `Conv`: every instance registers the one class-level activation module."""

    default_act = nn.SiLU()

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class LoopsOverLayers(nn.Module):
    """A parent fx cannot trace (ultralytics' DetectionModel loops with data-dependent routing)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.ModuleList([ConvAct(3, 8), ConvAct(8, 8), ConvAct(8, 8)])

    def forward(self, x):
        for m in self.model:
            x = m(x) if x.sum() > -1e9 else x
        return x


def test_one_module_under_several_names_in_an_untraced_parent():
    torch.manual_seed(0)
    layers = plan(LoopsOverLayers())
    assert layers["model.1.conv"].treatment == "spre" and layers["model.2.conv"].norm == "model.2.bn"
    roundtrip(LoopsOverLayers(), tiny_input())


class SharedConvLevels(nn.Module):
    """mmdet RTMDet `share_conv=True`: one conv module object per level, a BatchNorm per level."""

    def __init__(self, levels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(levels)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(8) for _ in range(levels)])
        for i in range(1, levels):
            self.convs[i] = self.convs[0]

    def forward(self, x):
        x = self.stem(x)
        feats = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
        return sum(bn(conv(f)).mean() for f, conv, bn in zip(feats, self.convs, self.bns))


def test_conv_shared_across_levels_gets_nm_without_a_pair():
    torch.manual_seed(0)
    layers = plan(SharedConvLevels())
    assert "convs.1" not in layers  # one module object, planned once
    lp = layers["convs.0"]
    assert lp.treatment == "nm" and lp.norm is None and "called from 3 places" in lp.reason
    x = tiny_input()
    p = spre_fx.prepare(SharedConvLevels())
    assert p.convs[1] is p.convs[0] and isinstance(p.convs[2], spre_fx.layers.NMConv2d)
    train_steps(p, x)
    p.eval()
    c = spre_fx.convert(p)
    assert c.convs[2] is c.convs[0]
    result = spre_fx.verify(p, c, x)
    assert len(result.call_errors["convs.0"]) == 3  # every level compared
    assert spre_fx.report(c).layers[1].nm_coverage == 1.0


def test_an_alias_called_once_pairs_but_not_one_fx_cannot_see():
    class AliasOnly(nn.Module):
        """The block is also registered as `alias` but the forward calls it once."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = conv_bn(8, 8)
            self.alias = self.block

        def forward(self, x):
            return self.block(self.stem(x))

    class CallsItsChild(nn.Module):
        """Untraceable, calls its direct child `conv`, which another traced block calls too."""

        def __init__(self, conv: nn.Module) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x) if x.sum() > -1e9 else x

    class HiddenSecondCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = conv_bn(8, 8)
            self.odd = CallsItsChild(self.block[0])

        def forward(self, x):
            return self.odd(self.block(self.stem(x))) if x.sum() > -1e9 else x

    torch.manual_seed(0)
    assert plan(AliasOnly())["block.0"].treatment == "spre"
    roundtrip(AliasOnly(), tiny_input())
    lp = plan(HiddenSecondCall())["block.0"]
    assert lp.norm is None and "also registered as 'odd.conv'" in lp.reason
    roundtrip(HiddenSecondCall(), tiny_input())


def test_tied_weights_of_two_modules_stay_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4))
    model[2].weight = model[0].weight
    layers = plan(model)
    for name in ("0", "2"):
        assert layers[name].treatment == "dense" and "tied weights" in layers[name].reason
    assert layers["3"].treatment == "nm"


def test_reading_only_a_weights_dtype_or_device_is_no_direct_read():
    """timm's XCiT builds its positional encoding with `self.token_projection.weight.dtype`."""

    class PositionalEncoding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            w = self.proj.weight
            grid = torch.arange(x.shape[-1], dtype=w.dtype, device=w.device) / w.shape[1]
            grid = grid * self.fc.weight.size(0) / self.fc.weight.dim()
            y = self.bn(self.proj(x + grid))
            return self.fc(y.mean((2, 3)))

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), PositionalEncoding())
    torch.manual_seed(0)
    layers = plan(model)
    assert layers["1.proj"].treatment == "spre" and layers["1.fc"].treatment == "nm"
    roundtrip(model, tiny_input())


def test_timm_xcit_positional_encoding_is_nm():
    timm = pytest.importorskip("timm", reason="timm not installed")
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", num_classes=10, img_size=64)
    assert plan(model)["pos_embed.token_projection"].treatment == "nm"


def test_reasons_name_classes_by_their_public_path():
    timm = pytest.importorskip("timm", reason="timm not installed")
    reason = plan(nn.Sequential(timm.layers.Linear(8, 8)))["0"].reason
    assert reason.startswith("timm.layers.Linear overrides forward")
    layers = plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3)))
    assert layers["1"].reason == "torch.nn.ConvTranspose2d: only Conv1d/2d/3d and Linear are made N:M"
    from spre_fx.module_tree import class_name

    assert class_name(nn.Conv2d) == "torch.nn.Conv2d"
    assert class_name(timm.layers.Linear) == "timm.layers.Linear"


class PartlyFrozen(nn.Module):
    """Five 3×3 conv→norm pairs: one that trains, then a conv whose weight is frozen, a BatchNorm
    with frozen affine parameters, a BatchNorm that `train()` keeps in eval (mmdet's
    norm_eval=True), and a norm given as `last_norm` (torchvision's FrozenBatchNorm2d)."""

    def __init__(self, last_norm: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(5))
        self.norms = nn.ModuleList([*(nn.BatchNorm2d(8) for _ in range(4)), last_norm or nn.BatchNorm2d(8)])
        self.convs[1].requires_grad_(False)
        self.norms[2].requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.norms[3].eval()  # what mmdet's ResNet.train() does with norm_eval=True
        return self

    def forward(self, x):
        x = self.stem(x)
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return x


def _random_frozen_bn(c: int, eps: float):
    from torchvision.ops.misc import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(c, eps=eps)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 2.0)
    return bn


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-3])
def test_spre_branch_only_where_conv_and_batchnorm_train(eps):
    """A frozen conv stays dense (prune_frozen=True: plain N:M), a norm that does not train
    (frozen affine, kept in eval, FrozenBatchNorm2d) gives its conv plain N:M; each such norm is
    folded at convert, and a reason says why; the trainable pair gets SpRe. Exact in float64, also
    for FrozenBatchNorm2d's own eps."""
    pytest.importorskip("torchvision", reason="needs torchvision (FrozenBatchNorm2d)")
    torch.manual_seed(0)
    model = PartlyFrozen(_random_frozen_bn(8, eps)).double()
    layers = plan(model)
    assert layers["convs.0"].treatment == "spre"
    frozen = layers["convs.1"]
    assert (frozen.treatment, frozen.norm) == ("dense", "norms.1"), frozen
    assert frozen.reason.startswith("weight does not train (requires_grad=False): pruning it could not "
                                    "be recovered"), frozen.reason
    pruned = plan(model, prune_frozen=True)["convs.1"]
    assert (pruned.treatment, pruned.norm) == ("nm", "norms.1"), pruned
    assert pruned.reason.startswith("no SpRe branch: weight does not train (frozen, requires_grad=False)")
    expected = {
        "convs.2": "BatchNorm 'norms.2' is frozen (its affine parameters have requires_grad=False)",
        "convs.3": "BatchNorm 'norms.3' stays in eval mode while the model trains (mmdet: norm_eval=True)",
        "convs.4": "BatchNorm 'norms.4' is frozen (FrozenBatchNorm2d): SpRe's branch needs a BatchNorm",
    }
    for name, why in expected.items():
        lp = layers[name]
        assert lp.treatment == "nm" and lp.norm == name.replace("convs", "norms"), (name, lp.reason)
        assert lp.reason.startswith("no SpRe branch: " + why), lp.reason
    x = tiny_input(dtype=torch.float64)
    p = spre_fx.prepare(model)
    assert [type(c).__name__ for c in p.convs] == ["SpReConv2d", "Conv2d"] + ["NMConv2d"] * 3
    train_steps(p, x)
    p.eval()
    c = spre_fx.convert(p)
    assert spre_fx.verify(p, c, x).output_error <= 1e-10
    assert all(isinstance(n, spre_fx.FoldedBatchNorm) for n in c.norms)  # FrozenBatchNorm2d folded too
    assert all(plan(model, spre=False)[n].reason == "spre=False: plain N:M (SR-STE)" for n in expected)


class FrozenLayers(nn.Module):
    """Layers whose weights do not train: a conv whose weights are constants (ultralytics' DFL: a
    1×1 conv over 16 bins with weights 0..15, no BatchNorm), a frozen 3×3 conv→BN (mmdet's
    frozen_stages) and a frozen linear; and one conv that trains."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.dfl.weight.copy_(torch.arange(16.0).view(1, 16, 1, 1))
        self.frozen = nn.Conv2d(16, 8, 3, padding=1, bias=False).requires_grad_(False)
        self.frozen_bn = nn.BatchNorm2d(8)
        self.trains = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4).requires_grad_(False)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        bins = self.dfl(x.softmax(1))
        y = self.bn(self.trains(torch.relu(self.frozen_bn(self.frozen(x)))))
        return self.head(y.mean((2, 3))) + bins.mean((1, 2, 3))[:, None]


@pytest.mark.parametrize("prune_frozen", [False, True])
def test_weights_that_do_not_train_stay_dense_unless_asked(prune_frozen):
    """A weight with requires_grad=False stays dense by default, with the reason; its BatchNorm is
    still folded at convert. The DFL-like conv is untouched: the same values after prepare and after
    convert. prune_frozen=True makes them N:M (no SpRe branch)."""
    torch.manual_seed(0)
    model = FrozenLayers()
    dfl = model.dfl.weight.clone()
    options = {"prune_frozen": True} if prune_frozen else {}  # the default says nothing
    layers = plan(model, **options)
    assert layers["trains"].treatment == "spre"
    assert layers["frozen"].norm == "frozen_bn"
    for name in ("dfl", "frozen", "head"):
        lp = layers[name]
        if prune_frozen:
            assert lp.treatment == "nm", (name, lp.reason)
        else:
            assert lp.treatment == "dense", (name, lp.reason)
            assert lp.reason == ("weight does not train (requires_grad=False): pruning it could not be "
                                 "recovered, left dense; SpReConfig(prune_frozen=True) prunes it anyway")
    p = spre_fx.prepare(model, **options)
    train_steps(p, torch.randn(2, 3, 8, 8))
    p.eval()
    c = spre_fx.convert(p)
    spre_fx.verify(p, c, torch.randn(2, 3, 8, 8))
    if prune_frozen:
        assert not torch.equal(c.dfl.weight, dfl)
        assert {lr.name: lr.sparsity for lr in spre_fx.report(c).layers}["dfl"] == 0.5
    else:
        assert type(p.dfl) is nn.Conv2d and type(c.dfl) is nn.Conv2d
        assert torch.equal(p.dfl.weight, dfl) and torch.equal(c.dfl.weight, dfl)
        assert isinstance(c.frozen_bn, spre_fx.FoldedBatchNorm)  # the frozen conv's BatchNorm is folded


def test_frozen_conv_computes_what_its_nm_counterpart_computes():
    """No silent extra term: with spre=True a frozen conv (and its norm) computes what it computes
    with spre=False, bit for bit, in training mode, before and after optimizer steps."""
    torch.manual_seed(0)
    model = PartlyFrozen()
    runs = {}
    for spre in (True, False):
        p = spre_fx.prepare(model, spre=spre).train()
        opt = torch.optim.SGD(p.parameters(), lr=0.1)
        runs[spre] = (p, opt, spre_fx.MaskScheduler(p, opt))
    y = torch.relu(torch.randn(2, 8, 12, 12))
    with torch.no_grad():
        pair = {spre: p.norms[1](p.convs[1](y)) for spre, (p, _, _) in runs.items()}
    assert torch.equal(pair[True], pair[False])
    for _ in range(2):
        for p, opt, _ in runs.values():
            opt.zero_grad()
            p(tiny_input()).square().mean().backward()
            opt.step()
        with torch.no_grad():  # the norm after it trains (differently in each model); the conv does not
            conv = {spre: p.convs[1](y) for spre, (p, _, _) in runs.items()}
        assert torch.equal(conv[True], conv[False])
        assert torch.equal(runs[True][0].convs[1].weight, model.convs[1].weight)


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
