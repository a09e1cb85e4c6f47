"""The deploy stage (spre_fx/deploy/): im2col conv, 2:4 packing, semi-structured backend, advisor, ONNX.

CPU tests cover everything that does not need sparse tensor cores (the backend pipeline runs
with torch's packing call replaced by an identity). `gpu` tests run the real kernels and skip
without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import spre_fx
from spre_fx.deploy import SemiStructuredConv2d, backend, gemm_weight, pack_weight
from spre_fx.masks import is_nm, nm_mask, nm_violations
from spre_fx.plan import plan_of

from .nets import conv_bn, train_steps
from .tolerance import assert_within, conv_terms

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: semi-structured kernels are CUDA-only"
)


class DeployNet(nn.Module):
    """One layer per advisor verdict (2:4, fp16/bf16, tiny input)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 32)  # dense stem
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)  # GEMM 64x288: ok
        self.down_bn = nn.BatchNorm2d(64)
        self.dil = nn.Conv2d(64, 64, 3, padding=2, dilation=2, bias=False)  # 64x576: ok
        self.dil_bn = nn.BatchNorm2d(64)
        self.point = nn.Conv2d(64, 64, 1)  # 64x64: too small
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=2)  # groups
        self.odd = nn.Conv2d(64, 24, 3, padding=1)  # O = 24: no backend shape
        self.fc = nn.Linear(24, 256)  # K = 24: no backend shape
        self.fc2 = nn.Linear(256, 64)  # 64x256: ok

    def forward(self, x):
        x = F.relu(self.down_bn(self.down(self.stem(x))))
        x = F.relu(self.dil_bn(self.dil(x)))
        x = F.relu(self.grouped(F.relu(self.point(x))))
        x = F.relu(self.odd(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc(x)))


EXPECTED = {"stem.0": "dense", "down": "ok", "dil": "ok", "point": "small", "grouped": "groups",
            "odd": "shape", "fc": "shape", "fc2": "ok"}


def _converted(net: nn.Module, x: torch.Tensor, nm=(2, 4), **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    p = spre_fx.prepare(net, nm=nm, **kw)
    train_steps(p, x, steps=1)
    p.eval()
    return p, spre_fx.convert(p)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- im2col conv
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=60, deadline=None)
@given(
    c_in=st.integers(1, 6), c_out=st.integers(1, 5), kh=st.integers(1, 4), kw=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.sampled_from(["same", "valid"])),
    h=st.integers(1, 11), w=st.integers(1, 11), batch=st.integers(1, 3), bias=st.booleans(),
    channels_last=st.booleans(), seed=st.integers(0, 2**16),
)
def test_im2col_conv_with_dense_weight_equals_conv2d(
    c_in, c_out, kh, kw, stride, dilation, padding, h, w, batch, bias, channels_last, seed
):
    if padding == "same":
        stride = (1, 1)
    pads = (0, 0) if padding in ("same", "valid") else padding
    if padding != "same":
        assume(h + 2 * pads[0] >= dilation[0] * (kh - 1) + 1)
        assume(w + 2 * pads[1] >= dilation[1] * (kw - 1) + 1)
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, (kh, kw), stride, padding, dilation, bias=bias).double()
    x = torch.randn(batch, c_in, h, w, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    im2col = SemiStructuredConv2d.from_conv(conv)
    want = conv(x)
    got = im2col(x)
    assert got.shape == want.shape
    with torch.no_grad():  # each element within the rounding of what it sums (tests/tolerance.py)
        magnitude = F.conv2d(x.abs(), conv.weight.abs(), None if conv.bias is None else conv.bias.abs(),
                             stride, padding, dilation)
    assert_within(got, want, magnitude, torch.float64, conv_terms(conv.weight))
    torch.testing.assert_close(im2col.dense_weight(), conv.weight.detach())


def test_gemm_weight_is_the_nm_group_order():
    """[O, kh·kw·C] = weight.permute(0, 2, 3, 1): the N:M groups are the GEMM's K groups."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight, 2, 4))
    w2d = gemm_weight(conv)
    assert torch.equal(w2d, conv.weight.detach().permute(0, 2, 3, 1).reshape(16, -1))
    assert nm_violations(w2d, 2, 4) == 0 and is_nm(conv.weight, 2, 4)
    # any other K order (e.g. the [C, kh, kw] of F.unfold) breaks the groups
    assert nm_violations(conv.weight.detach().reshape(16, -1), 2, 4) > 0
    linear = nn.Linear(8, 4)
    assert gemm_weight(linear).data_ptr() == linear.weight.data_ptr() or torch.equal(
        gemm_weight(linear), linear.weight)


def test_im2col_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="groups=1"):
        SemiStructuredConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1"):
        SemiStructuredConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="smaller than"):
        SemiStructuredConv2d.from_conv(nn.Conv2d(4, 4, 5))(torch.randn(1, 4, 3, 3))


def test_im2col_gathers_only_when_it_must():
    """A stride-1 1×1 conv reads a channels_last input in place; any other conv gathers a copy,
    each row one window in (kh, kw, C) order with zero padding (what gpu_check times alone)."""
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    point = SemiStructuredConv2d.from_conv(nn.Conv2d(8, 16, 1))
    assert point.im2col(x).data_ptr() == x.data_ptr()
    assert point.output_size(x) == (5, 5)
    col = SemiStructuredConv2d.from_conv(nn.Conv2d(8, 16, 3, stride=2, padding=1))
    patches = col.im2col(x)
    assert col.output_size(x) == (3, 3)
    assert patches.shape == (2 * 3 * 3, 3 * 3 * 8) and patches.data_ptr() != x.data_ptr()
    window = F.pad(x, (1, 1, 1, 1))[1, :, 2:5, 4:7]  # sample 1, output (1, 2): rows 2-4, cols 4-6
    assert torch.equal(patches[9 + 1 * 3 + 2], window.permute(1, 2, 0).reshape(-1))


# --------------------------------------------------------------------------- packing (CPU helpers)
def _conversions():
    module = "torch.sparse._semi_structured_conversions"
    return pytest.importorskip(module, reason="no semi-structured packer in this torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("n", [2, 1])
def test_cutlass_pack_unpack_is_lossless_on_cpu(dtype, n):
    """torch's pure-Python CUTLASS packer runs on CPU: 2:4 (and sparser) weights round-trip exactly."""
    conv = _conversions()
    torch.manual_seed(0)
    w = torch.randint(1, 100, (64, 128)) * (torch.randint(0, 2, (64, 128)) * 2 - 1)  # exact in every dtype
    w = (w * nm_mask(w.float() + torch.rand(64, 128), n, 4)).to(dtype)
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(w)
    assert packed.shape == (64, 64) and packed.dtype == dtype
    back = conv.sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert back.dtype == dtype and torch.equal(back, w)
    if n == 2:  # exactly 2 non-zeros a group: the packed values are the non-zeros in order
        assert torch.equal(packed.flatten(), w[w != 0])


def test_cutlass_float32_packs_pairs_so_needs_1_2():
    """float32 packs 1 of every 2 (TF32 sparsity): a 1:2 weight keeps all its values, a 2:4 one does not.

    (Its Python unpacker goes through a float16 view, whose NaN bit patterns CPU scatter may
    canonicalise; the packed values are compared instead.)
    """
    conv = _conversions()
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    one_two = w * nm_mask(w, 1, 2)
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(one_two)
    assert torch.equal(packed.flatten(), one_two[one_two != 0])
    back = conv.sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert torch.equal(back != 0, one_two != 0)
    two_four = w * nm_mask(w, 2, 4)
    assert not is_nm(two_four, 1, 2)
    packed, _ = conv.sparse_semi_structured_from_dense_cutlass(two_four)
    assert packed.numel() == two_four.numel() // 2 and (packed != 0).sum() < (two_four != 0).sum()


def test_pack_weight_checks_the_pattern_before_packing(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(32, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not 2:4"):
        pack_weight(w, name="layer")  # dense: every group breaks 2:4
    good = w * nm_mask(w.float(), 2, 4)
    with pytest.raises(ValueError, match="not 1:2"):
        pack_weight(good.float(), "cutlass")  # a float32 2:4 weight would lose values
    with pytest.raises(ValueError, match="kernel"):
        pack_weight(good, "triton")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # torch's own refusal, after our check passed
            pack_weight(good, "cusparselt")
    seen = []
    monkeypatch.setattr(backend, "_sparse_from_dense", lambda cls, t: seen.append(cls.BACKEND) or t)
    assert torch.equal(pack_weight(good, "cutlass"), good) and seen == ["cutlass"]


# --------------------------------------------------------------------------- backend
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize("inplace", [False, True])
def test_semi_structured_backend_without_cuda_raises_before_any_change(inplace):
    x = torch.randn(2, 3, 12, 12)
    p, _ = _converted(DeployNet(), x)
    before = {k: v.clone() for k, v in p.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"CUDA GPU.*compute capability >= 8\.0"):
        spre_fx.convert(p, backend="semi_structured", inplace=inplace)
    assert plan_of(p).stage == "prepared"
    assert all(torch.equal(v, p.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, SemiStructuredConv2d) for m in p.modules())
    with pytest.raises(ValueError, match="backend must be one of"):
        spre_fx.convert(p, backend="tensorrt")


@pytest.fixture
def fake_kernels(monkeypatch):
    """Run the backend on CPU: no CUDA check, and torch's packing replaced by an identity.

    Records every N:M check and every pack, in order.
    """
    events: list[tuple[str, torch.Tensor]] = []
    real = backend.nm_violations

    def checked(weight, n, m):
        events.append(("check", weight.detach().clone()))
        return real(weight, n, m)

    def packed(cls, weight):
        events.append(("pack", weight))
        return weight

    monkeypatch.setattr(backend, "_require_cuda", lambda model: None)
    monkeypatch.setattr(backend, "capability", lambda model: None)
    monkeypatch.setattr(backend, "nm_violations", checked)
    monkeypatch.setattr(backend, "_sparse_from_dense", packed)
    return events


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_pipeline_with_identity_packing(fake_kernels, dtype):
    x = torch.randn(2, 3, 12, 12)
    p, dense = _converted(DeployNet(), x)
    dense = dense.to(dtype)
    sparse = spre_fx.to_semi_structured(dense)
    modules = dict(sparse.named_modules())
    assert isinstance(modules["down"], SemiStructuredConv2d)
    assert isinstance(modules["dil"], SemiStructuredConv2d)
    for name in ("point", "grouped", "odd", "stem.0"):
        assert type(modules[name]) is nn.Conv2d, name
    assert not isinstance(dict(dense.named_modules())["down"], SemiStructuredConv2d)  # copy, not in place
    packs = [i for i, (kind, _) in enumerate(fake_kernels) if kind == "pack"]
    assert len(packs) == 3  # down, dil, fc2
    for i in packs:  # each packed weight went through nm_violations just before
        w = fake_kernels[i][1]
        assert any(k == "check" and torch.equal(t, w) for k, t in fake_kernels[:i]), w.shape
    xd = x.to(dtype)
    assert _rel(dense(xd), sparse(xd)) < 2e-2
    rep = spre_fx.report(sparse)
    assert {lr.name: lr.kernel.code for lr in rep.layers} == EXPECTED
    assert rep.layers[1].shape == (64, 32, 3, 3)  # the im2col layer reports its conv weight


def test_backend_refuses_a_weight_that_lost_its_pattern(fake_kernels):
    x = torch.randn(2, 3, 12, 12)
    _, dense = _converted(DeployNet(), x)
    dense = dense.bfloat16()
    with torch.no_grad():
        dense.dil.weight[0, :4, 0, 0] = 1.0  # one group of 4 with 4 non-zeros
    with pytest.raises(ValueError, match="'dil'.*break 2:4"):
        spre_fx.to_semi_structured(dense, inplace=True)
    assert not any(kind == "pack" for kind, _ in fake_kernels)  # checked all before packing any
    assert not isinstance(dense.down, SemiStructuredConv2d)


def test_backend_float32_and_non_2_4_patterns_stay_dense(fake_kernels):
    x = torch.randn(2, 3, 12, 12)
    _, dense = _converted(DeployNet(), x)
    fp32 = spre_fx.to_semi_structured(dense)  # float32 2:4: no kernel
    assert not any(isinstance(m, SemiStructuredConv2d) for m in fp32.modules())
    assert {lr.kernel.code for lr in spre_fx.report(fp32).layers} == {"dense", "dtype", "groups"}
    _, dense48 = _converted(DeployNet(), x, nm=(4, 8))
    rep = spre_fx.report(dense48.half())
    assert rep.layers[1].kernel.code == "pattern" and "4:8 is not 2:4" in rep.layers[1].kernel.reason
    _, dense12 = _converted(DeployNet(), x, nm=(1, 2))  # 1:2 is also 2:4 (and float32's 1:2)
    adv = spre_fx.advise(dense12)  # float32 1:2: CUTLASS only (compute capability 8.x)
    assert adv.layers["down"].code == "ok" and adv.layers["down"].backends == ("cutlass",)
    assert spre_fx.report(dense12.half()).layers[1].kernel.code == "ok"


# --------------------------------------------------------------------------- advisor
def test_report_without_arguments_still_works_and_says_how_to_get_flops():
    x = torch.randn(2, 3, 12, 12)
    p, c = _converted(DeployNet(), x)
    for model in (p, c):
        rep = spre_fx.report(model)
        assert rep.flops is None and all(lr.kernel is not None for lr in rep.layers)
        text = str(rep)
        assert "2:4 kernel" in text and "pass example_inputs or input_size" in text
        assert rep.to_dict()["layers"][0]["kernel"]["code"] == "dense"


def test_advisor_reasons_and_flop_share():
    x = torch.randn(2, 3, 12, 12)
    p, c = _converted(DeployNet(), x)
    rep = spre_fx.report(c, dtype=torch.float16)
    assert {lr.name: lr.kernel.code for lr in rep.layers} == EXPECTED
    why = {lr.name: lr.kernel.reason for lr in rep.layers}
    assert "groups=2" in why["grouped"] and "64x64" in why["point"]
    assert "24x576" in why["odd"] and "multiples of (16, 16)" in why["odd"]
    assert spre_fx.report(p, dtype=torch.float16).layers[1].kernel.code == "ok"  # prepared: same verdict

    # With an input, the MAC rule applies: nothing gains at batch 2 of 12x12 ...
    small = spre_fx.report(c, x, dtype=torch.float16)
    assert small.flops is not None and small.flops.sparse_macs == 0
    assert {lr.kernel.code for lr in small.layers} == {"dense", "small", "groups", "shape"}
    # ... and the share counts exactly the MACs of the layers that pass, at a lower threshold.
    adv = spre_fx.advise(c, input_size=(4, 3, 32, 32), dtype=torch.float16, min_gemm_macs=0)
    out = {"stem.0": 32 * 32 * 32, "down": 64 * 16 * 16, "dil": 64 * 16 * 16, "point": 64 * 16 * 16,
           "grouped": 64 * 16 * 16, "odd": 24 * 16 * 16, "fc": 256, "fc2": 64}
    k = {"stem.0": 27, "down": 288, "dil": 576, "point": 64, "grouped": 288, "odd": 576, "fc": 24, "fc2": 256}
    macs = {name: 4 * out[name] * k[name] for name in out}
    assert {n: a.macs for n, a in adv.layers.items()} == macs
    sparse = sum(macs[n] for n in ("down", "dil", "fc2"))
    assert adv.flops.total_macs == sum(macs.values()) and adv.flops.sparse_macs == sparse
    assert math.isclose(adv.flops.share, sparse / sum(macs.values()))
    assert math.isclose(adv.flops.ideal_speedup, sum(macs.values()) / (sum(macs.values()) - sparse / 2))
    assert adv.flops.input_shapes == ((4, 3, 32, 32),)
    assert "of conv/linear MACs" in str(spre_fx.report(c, input_size=(4, 3, 32, 32)))
    with pytest.raises(ValueError, match="not both"):
        spre_fx.report(c, x, input_size=(1, 3, 8, 8))


# --------------------------------------------------------------------------- ONNX
class TokenNet(nn.Module):
    """Conv stem, SpRe 3x3, 1x1 conv, a Linear on tokens (MatMul) and one on vectors (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.point = nn.Conv2d(32, 32, 1)
        self.tokens = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        x = self.point(F.relu(self.bn(self.conv(self.stem(x)))))
        t = F.relu(self.tokens(x.flatten(2).transpose(1, 2)))  # [N, HW, 16]: MatMul in ONNX
        return self.head(t.mean(1))


def _onnx_gemm_initializers(path: str, nm=(2, 4)) -> list[tuple[str, tuple[int, ...], bool]]:
    """(op, shape as [O, K...], is N:M) of every Conv/Gemm/MatMul initializer, via onnx.numpy_helper."""
    onnx = pytest.importorskip("onnx", reason="ONNX tests need onnx (dev dependency)")
    from onnx import helper, numpy_helper

    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits:
            w = torch.from_numpy(inits[node.input[1]].copy())
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0)):
                w = w.T
            found.append((node.op_type, tuple(w.shape), is_nm(w, *nm)))
    return found


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_keeps_nm_zeros_and_matches_onnxruntime(tmp_path, dynamo):
    pytest.importorskip("onnx", reason="ONNX tests need onnx (dev dependency)")
    pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (dev dependency)")
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    x = torch.randn(2, 3, 8, 8)
    _, c = _converted(TokenNet(), x)
    path = str(tmp_path / "model.onnx")
    result = spre_fx.export_onnx(c, (x,), path, dynamo=dynamo, verbose=False)
    assert result.output_error is not None and result.output_error <= 1e-4
    assert [w.layer for w in result.weights] == ["conv", "point", "tokens", "head"]
    assert all(w.nm for w in result.weights)
    ops = {w.layer: w.op for w in result.weights}
    assert ops["conv"] == "Conv" and ops["point"] == "Conv" and ops["head"] == "Gemm"
    assert ops["tokens"] in ("MatMul", "Gemm")
    assert result.trtexec == f"trtexec --onnx={path} --sparsity=enable --fp16"
    # Independently: every GEMM initializer but the dense stem's is exactly 2:4.
    found = _onnx_gemm_initializers(path)
    assert len(found) == 5
    assert [(op, shape) for op, shape, ok in found if not ok] == [("Conv", (16, 3, 3, 3))]


def test_plain_torch_onnx_export_of_a_converted_model(tmp_path):
    """No helper needed for the export itself: torch.onnx.export + onnxruntime agree (rtol 1e-4)."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX tests need onnxruntime (dev dependency)")
    x = torch.randn(2, 3, 8, 8)
    _, c = _converted(TokenNet(), x)
    path = str(tmp_path / "plain.onnx")
    torch.onnx.export(c, (x,), path, dynamo=False, input_names=["x"])
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), c(x).detach(), rtol=1e-4, atol=1e-5)
    assert sum(ok for _, _, ok in _onnx_gemm_initializers(path)) == 4


def test_export_onnx_refuses_broken_weights_and_sparse_kernels(tmp_path, fake_kernels):
    pytest.importorskip("onnx", reason="ONNX tests need onnx (dev dependency)")
    x = torch.randn(2, 3, 8, 8)
    _, c = _converted(TokenNet(), x)
    broken = spre_fx.convert(spre_fx.prepare(TokenNet()).eval())
    with torch.no_grad():
        broken.point.weight.fill_(1.0)
    with pytest.raises(ValueError, match=r"\['point'\] are no longer 2:4"):
        spre_fx.export_onnx(broken, (x,), str(tmp_path / "b.onnx"), dynamo=False)
    im2col = spre_fx.to_semi_structured(c.half(), min_weight_elems=0)
    assert any(isinstance(m, SemiStructuredConv2d) for m in im2col.modules())
    with pytest.raises(ValueError, match="semi-structured kernels"):
        spre_fx.export_onnx(im2col, (x.half(),), str(tmp_path / "s.onnx"), dynamo=False)


# --------------------------------------------------------------------------- GPU (real kernels)
class GpuNet(nn.Module):
    """Sizes every backend takes (multiples of 64), every conv geometry the im2col path handles."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 64)
        self.a = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(128)
        self.b = nn.Conv2d(128, 128, 3, padding=2, dilation=2, bias=False)
        self.b_bn = nn.BatchNorm2d(128)
        self.c = nn.Conv2d(128, 128, (1, 3), padding="same")
        self.d = nn.Conv2d(128, 256, 1)
        self.fc = nn.Linear(256, 128)

    def forward(self, x):
        x = F.relu(self.a_bn(self.a(self.stem(x))))
        x = F.relu(self.b_bn(self.b(x)))
        x = F.relu(self.d(F.relu(self.c(x))))
        return self.fc(x.mean((2, 3)))


def _gpu_models(dtype, kernel="auto"):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    p = spre_fx.prepare(GpuNet().cuda())
    train_steps(p, x, steps=2)
    p.eval()
    dense = spre_fx.convert(p).to(dtype)
    if kernel == "auto":
        sparse = spre_fx.convert(p.to(dtype), backend="semi_structured")
    else:
        sparse = spre_fx.to_semi_structured(dense, kernel=kernel)
    return x.to(dtype), dense, sparse


def _kernel_list():
    kernels = ["auto", "cusparselt"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 8:
        kernels.append("cutlass")
    return kernels


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", _kernel_list())
def test_gpu_semi_structured_matches_dense(dtype, kernel):
    if kernel == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("torch built without cuSPARSELt")
    x, dense, sparse = _gpu_models(dtype, kernel)
    mods = dict(sparse.named_modules())
    for name in ("a", "b", "c", "d"):
        assert isinstance(mods[name], SemiStructuredConv2d), name
        assert isinstance(mods[name].weight, torch.sparse.SparseSemiStructuredTensor)
    assert isinstance(mods["fc"].weight, torch.sparse.SparseSemiStructuredTensor)
    assert type(mods["stem.0"]) is nn.Conv2d
    with torch.no_grad():
        assert _rel(dense(x), sparse(x)) < 2e-2
        for name in ("a", "b", "c", "d"):  # layer by layer, on the dense model's own inputs
            seen: dict = {}
            h = dict(dense.named_modules())[name].register_forward_hook(
                lambda m, i, o, seen=seen: seen.update(i=i[0], o=o))
            dense(x)
            h.remove()
            assert _rel(seen["o"], mods[name](seen["i"])) < 1e-2, name
    rep = spre_fx.report(sparse)
    codes = {lr.name: lr.kernel.code for lr in rep.layers}
    assert codes == {"stem.0": "dense", "a": "packed", "b": "packed", "c": "packed", "d": "packed",
                     "fc": "packed"}
    assert all(is_nm(dict(sparse.named_modules())[n].dense_weight(), 2, 4) for n in "abcd")


@pytest.mark.gpu
@needs_gpu
def test_gpu_pack_roundtrip_and_refusal():
    torch.manual_seed(0)
    w = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    w = w * nm_mask(w, 2, 4)
    if not torch.backends.cusparselt.is_available():
        pytest.skip("torch built without cuSPARSELt")
    sparse = pack_weight(w, "cusparselt")
    assert torch.equal(sparse.to_dense(), w)
    w[0, :4] = 1.0
    with pytest.raises(ValueError, match="not 2:4"):
        pack_weight(w, "cusparselt")


@pytest.mark.gpu
@needs_gpu
def test_gpu_float32_model_stays_dense_with_reasons():
    torch.manual_seed(0)
    p = spre_fx.prepare(GpuNet().cuda()).eval()
    sparse = spre_fx.convert(p, backend="semi_structured")
    assert not any(isinstance(m, SemiStructuredConv2d) for m in sparse.modules())
    assert {lr.kernel.code for lr in spre_fx.report(sparse).layers} == {"dense", "dtype"}
    with pytest.raises(ValueError, match="parameters on cpu"):
        spre_fx.convert(spre_fx.prepare(GpuNet()).eval(), backend="semi_structured")
