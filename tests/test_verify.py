"""verify: every call of every converted layer, the model's true output, and what differs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spre_fx

from .nets import Block, conv_bn, tiny_input, train_steps


class ConvTwice(nn.Module):
    """One conv applied to its own output (`self.conv(self.conv(x))`), as shared heads do."""

    def __init__(self, repeat: int = 2) -> None:
        super().__init__()
        self.repeat = repeat  # a plain attribute, so a test can make one model call conv more often
        self.stem = conv_bn(3, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = conv_bn(8, 8)
        self.last_output = None

    def forward(self, x):
        x = self.stem(x)
        for _ in range(self.repeat):
            x = self.conv(x)
        out = self.head(x).mean((2, 3))
        self.last_output = out.detach()  # what this forward really returned
        return out


def _prepared_and_converted(model, x):
    torch.manual_seed(0)
    p = spre_fx.prepare(model)
    train_steps(p, x)
    p.eval()
    return p, spre_fx.convert(p)


def _corrupt_second_call(module: nn.Module, delta: float = 1e-3) -> None:
    """Make `module` wrong on the second of its two calls per forward, only there."""
    count = [0]

    def hook(_m, _i, out):
        count[0] += 1
        return out + delta if count[0] % 2 == 0 else None

    module.register_forward_hook(hook)


def test_verify_fails_on_a_layer_wrong_only_in_its_second_call():
    x = tiny_input()
    p, c = _prepared_and_converted(ConvTwice(), x)
    _corrupt_second_call(c.conv)
    with pytest.raises(spre_fx.VerificationError, match=r"layer 'conv' call 2 of 2: relative error") as err:
        spre_fx.verify(p, c, x)
    assert "call 1 of 2" not in str(err.value)  # the first call is right
    assert "output: relative error" in str(err.value)
    result = spre_fx.verify(p, spre_fx.convert(p), x)
    assert len(result.call_errors["conv"]) == 2 and max(result.call_errors["conv"]) <= 1e-5


def test_verify_compares_the_models_true_output():
    """A hook that returned the first call's output made `conv(conv(x))` compute `conv(x)`."""
    x = tiny_input()
    p, c = _prepared_and_converted(ConvTwice(), x)
    with torch.no_grad():
        expected = p(x)
    spre_fx.verify(p, c, x)
    torch.testing.assert_close(p.last_output, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(c.last_output, c(x), rtol=0, atol=0)


def test_verify_says_when_the_number_of_calls_differs():
    x = tiny_input()
    p, c = _prepared_and_converted(ConvTwice(), x)
    c.repeat = 3
    with pytest.raises(spre_fx.VerificationError,
                       match="layer 'conv': called 2 times in the prepared model, 3 in the converted one"):
        spre_fx.verify(p, c, x)


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8))
        self.keep = 2

    def forward(self, x):
        y = self.body(x).flatten(1)
        if self.training:
            return y
        return {"scores": y[: self.keep], "labels": y.argmax(1)[: self.keep]}


def test_verify_names_a_difference_in_shape_instead_of_inf():
    x = tiny_input(batch=3)
    p, c = _prepared_and_converted(TwoOutputs(), x)
    spre_fx.verify(p, c, x)
    c.keep = 1  # e.g. NMS keeping another number of boxes
    with pytest.raises(spre_fx.VerificationError) as err:
        spre_fx.verify(p, c, x)
    msg = str(err.value)
    assert "output ['scores']: shape (2, 1152) vs (1, 1152)" in msg
    assert "inf" not in msg


def test_mismatch_walks_structure():
    from spre_fx.compare import mismatch

    a = {"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 3])}
    assert mismatch(a, {"boxes": torch.ones(3, 4), "labels": torch.tensor([1, 2, 3])}) == ""
    fewer = {"boxes": torch.zeros(2, 4), "labels": a["labels"]}
    assert mismatch(a, fewer) == "['boxes']: shape (3, 4) vs (2, 4)"
    assert mismatch(a, {**a, "labels": torch.tensor([1, 2, 4])}) == "['labels']: torch.int64 values differ"
    assert mismatch([a], [a, a]) == "value: list of 1 vs list of 2"
    assert mismatch((torch.zeros(1),), (torch.zeros(1, dtype=torch.float64),)) == (
        "[0]: dtype torch.float32 vs torch.float64")
    assert mismatch({"a": 1}, {"b": 1}) == "value: keys ['a'] vs ['b']"


def test_torchvision_fcos_shared_head_verifies_every_level():
    """A head applied to 5 FPN levels: verify compares each call (it crashed in split_with_sizes)."""
    tv = pytest.importorskip("torchvision", reason="torchvision not installed")
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256),
                                   norm_layer=nn.BatchNorm2d)
    model = tv.models.detection.FCOS(backbone, num_classes=3, min_size=96, max_size=96)
    p = spre_fx.prepare(model).eval()
    assert spre_fx.report(p).count("spre") > 0
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    result = spre_fx.verify(p, spre_fx.convert(p), (images,))
    assert result.output_error <= 1e-5
    assert len(result.call_errors["head.classification_head.cls_logits"]) == 5
    assert len(result.call_errors["head.regression_head.conv.0"]) == 5


def test_verify_a_model_whose_train_returns_none():
    """mmdet's ResNet overrides train() without returning self: verify must not chain on it."""

    class NoneTrain(nn.Sequential):
        def train(self, mode: bool = True):
            super().train(mode)

    torch.manual_seed(0)
    model = spre_fx.prepare(NoneTrain(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)))
    model.eval()
    result = spre_fx.verify(model, spre_fx.convert(model), torch.randn(2, 3, 8, 8))
    assert set(result.layer_errors) == {"0", "2"}


# --------------------------------------------------------------------------- reduced precision
def _deep_net(width: int = 16, blocks: int = 6) -> nn.Module:
    """Residual blocks enough for bfloat16 rounding to add up past 1e-2 at the output."""
    return nn.Sequential(conv_bn(3, width), *[Block(width) for _ in range(blocks)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 10))


@pytest.fixture(scope="module")
def deep_prepared():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    p, _ = _prepared_and_converted(_deep_net(), x)
    return p, x


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "autocast-bfloat16"])
def test_reduced_precision_conversion_passes_and_a_corrupted_one_fails(deep_prepared, precision):
    """A correct conversion in bfloat16/float16 passes (measured against the float32 run of the
    prepared model), and one layer whose folded weight is off by 25% fails, named."""
    import copy

    p, x = deep_prepared
    autocast = precision.startswith("autocast")
    dtype = getattr(torch, precision.removeprefix("autocast-"))
    prepared = p if autocast else copy.deepcopy(p).to(dtype)
    converted = spre_fx.convert(prepared)
    x = x if autocast else x.to(dtype)

    def check(model):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return spre_fx.verify(prepared, model, x)

    result = check(converted)
    assert result.precision == precision.removeprefix("autocast-")
    assert result.tolerance == torch.finfo(dtype).eps
    assert result.prepared_output_error > 0  # the prepared model itself rounds: what the bound scales by
    assert set(result.prepared_errors) == set(result.layer_errors)
    wrong = copy.deepcopy(converted)
    with torch.no_grad():
        wrong[3].conv1.weight.mul_(1.25)  # a fold that got one layer's scale wrong
    with pytest.raises(spre_fx.VerificationError, match=r"layer '3.bn1': relative error .* the float32"):
        check(wrong)


def test_verify_checks_n_m_of_packed_semi_structured_weights(monkeypatch):
    """A `backend="semi_structured"` model: N:M is read from the packed weights (`to_dense()`), no
    `ne.Scalar` crash. On the CPU the packing is torch's own CUTLASS format (its Python packer);
    only the sparse matmul is replaced, by one on the unpacked weight (the CUTLASS kernel is
    CUDA-only: what it computes is for benchmarks/gpu_check.py on a GPU to prove)."""
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    from torch.nn import functional as F
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    from spre_fx.deploy import backend

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 32)
            self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)  # GEMM 64 x 288
            self.bn = nn.BatchNorm2d(64)
            self.fc = nn.Linear(64, 256)  # GEMM 256 x 64

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.down(self.stem(x)))).mean((2, 3)))

    def pack(cls, weight):
        packed, meta = conversions.sparse_semi_structured_from_dense_cutlass(weight)
        return Cutlass(weight.shape, packed, meta, None, None, None)

    monkeypatch.setattr(backend, "_require_cuda", lambda model: None)
    monkeypatch.setattr(backend, "capability", lambda model: None)
    monkeypatch.setattr(backend, "_sparse_from_dense", pack)
    x = torch.randn(2, 3, 12, 12)
    torch.manual_seed(0)
    p = spre_fx.prepare(Net(), nm=(1, 4))  # 1:4 runs on the 2:4 kernels, which can pack a 2:4 group too
    train_steps(p, x)
    p = p.eval().half()
    dense = spre_fx.convert(p)
    with pytest.warns(UserWarning, match="prototype"):
        sparse = spre_fx.to_semi_structured(dense)
    assert type(sparse.fc.weight) is Cutlass and type(sparse.down.weight) is Cutlass
    with pytest.raises(NotImplementedError):
        sparse.fc.weight != 0  # what the N:M check crashed on  # noqa: B015
    monkeypatch.setitem(Cutlass.SPARSE_DISPATCH, torch.ops.aten.t,
                        lambda func, types, args, kwargs: args[0].to_dense().t())
    result = spre_fx.verify(p, sparse, x.half())
    assert result.nm_violations == {"down": 0, "fc": 0}
    with torch.no_grad():  # one group of 4 with 2 non-zeros: packable as 2:4, and not 1:4
        bad = dense.fc.weight.clone()
        bad[0, :2] = 1.0
        sparse.fc.weight = nn.Parameter(pack(None, bad), requires_grad=False)
    with pytest.raises(spre_fx.VerificationError, match="layer 'fc': 1 groups break 1:4"):
        spre_fx.verify(p, sparse, x.half())
