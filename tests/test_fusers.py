"""The ecosystems' own conv+BN fusers run on a converted model and leave it equal and N:M.

`convert` leaves a `spre_fx.FoldedBatchNorm` where each folded BatchNorm was: an exact identity
(or, with `keep_norms=True`, the folded shift) that answers BatchNorm's attributes with the
identity normalisation, which any fuser folds exactly.

Cost on one core: ~45 s in all (ultralytics YOLOv8n build + prepare + convert ~15 s, the four
timm models ~20 s, the rest ~5 s).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import spre_fx
from spre_fx.masks import is_nm

from .nets import TinyNet, tiny_input, train_steps
from .test_roundtrip import _randomise_norms

ROOT = Path(__file__).resolve().parents[1]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(FLOATS), c=st.integers(1, 16), bias=st.booleans(), shift=st.booleans(),
       seed=st.integers(0, 999))
def test_torch_fuser_folds_a_folded_norm_exactly(dtype, c, bias, shift, seed):
    """torch's fuse_conv_bn_eval on (conv, FoldedBatchNorm): the same weight bit for bit, and the
    conv's bias (or the shift) as the fused bias, bit for bit, in every float dtype."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, c, 3, bias=bias).to(dtype).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g).to(dtype))
    b = torch.randn(c, generator=g).to(dtype)
    folded = spre_fx.FoldedBatchNorm(c, shift=b if shift else None, dtype=dtype).eval()
    fused = fuse_conv_bn_eval(conv, folded)
    assert torch.equal(_bits(fused.weight), _bits(conv.weight))
    expected = conv.bias if bias else torch.zeros(c, dtype=dtype)
    if shift:
        expected = expected + b  # the one addition the fused bias is made of
    assert torch.equal(_bits(fused.bias.detach()), _bits(expected.detach()))


def test_folded_norm_is_the_identity_bit_for_bit_in_both_modes():
    x = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -1e-45, 3.0]).reshape(1, 6, 1, 1)
    folded = spre_fx.FoldedBatchNorm(6)
    for mode in (True, False):
        folded.train(mode)
        assert torch.equal(_bits(folded(x)), _bits(x))
    assert not list(folded.parameters()) and not folded.state_dict()  # nothing to train or save
    shifted = spre_fx.FoldedBatchNorm(6, shift=torch.arange(6.0))
    assert list(shifted.state_dict()) == ["bias"]
    with pytest.raises(ValueError, match=r"expected shape \(6,\)"):
        spre_fx.FoldedBatchNorm(6, shift=torch.zeros(5))


@pytest.mark.parametrize("keep_norms", [False, True])
def test_convert_leaves_folded_norms_fusers_take(keep_norms):
    torch.manual_seed(0)
    model = TinyNet()
    x = tiny_input()
    prepared = spre_fx.prepare(model)
    train_steps(prepared, x)
    prepared.eval()
    deployed = spre_fx.convert(prepared, keep_norms=keep_norms)
    spre_fx.verify(prepared, deployed, x)
    assert isinstance(deployed.block.bn1, spre_fx.FoldedBatchNorm)
    assert (deployed.block.conv1.bias is None) == keep_norms  # the conv keeps its own bias layout
    assert deployed.block.bn1.has_shift == keep_norms
    # torch's eager fuser on one pair: the same weights (still N:M); with the shift in the norm,
    # the fused conv adds it inside the conv instead of after it: one rounding apart at most.
    conv, norm = deployed.block.conv1, deployed.block.bn1
    fused = fuse_conv_bn_eval(conv, norm)
    assert torch.equal(fused.weight, conv.weight) and is_nm(fused.weight, 2, 4)
    h = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        want, got = norm(conv(h)), fused(h)
        if not keep_norms:
            assert torch.equal(got, want)
        else:  # |error| <= K roundings of the same sums taken over |W|, |h| and |shift|
            scale = nn.functional.conv2d(h.abs(), conv.weight.abs(), None, conv.stride, conv.padding)
            scale = scale + norm.bias.abs().reshape(-1, 1, 1)
            k = conv.weight[0].numel() + 1
            assert ((got - want).abs() <= k * torch.finfo(h.dtype).eps * scale).all()


@pytest.mark.parametrize("arch", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9"])
def test_timm_reparameterize_model_on_a_converted_model(arch):
    """timm's fusers read the norm's shift and ignore a conv's bias: with keep_norms=True,
    reparameterize_model runs and computes what the converted model does (float64 round-off)."""
    timm = pytest.importorskip("timm", reason="timm not installed")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).eval()
    _randomise_norms(model, seed=4)
    deployed = spre_fx.convert(spre_fx.prepare(model).eval(), keep_norms=True).double()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # RepViT's fuse builds its new convs in the default dtype
    try:
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            y = deployed(x)
            y_fused = reparameterize_model(deployed)(x)
    finally:
        torch.set_default_dtype(default_dtype)
    # Summed branches (float64): a rounding of 1e-16 per term, far below 1e-10 of the output.
    assert (y_fused - y).abs().max() <= 1e-10 * y.abs().max()


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repvgg_summed_branches_break_2_4_reparameterize_first_keeps_it():
    """docs/deploy.md: reparameterizing a converted RepVGG sums its 2:4 branches into convs that
    are not 2:4; reparameterizing first, then preparing, gives single 2:4 convs (plain N:M)."""
    timm = pytest.importorskip("timm", reason="timm not installed")
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", num_classes=10).eval()
    summed = reparameterize_model(spre_fx.convert(spre_fx.prepare(model).eval(), keep_norms=True))
    bad, total = _benchmark("reparam_nm").broken_groups(summed)  # what docs/deploy.md's table counts
    assert bad > 0.01 * total  # measured: 9.3 %

    # The snippet of docs/deploy.md
    single = reparameterize_model(model)             # one conv per block, BatchNorms folded by timm
    prepared = spre_fx.prepare(single, nm=(2, 4))     # plain N:M on every conv (no BN: no SpRe)
    assert spre_fx.report(prepared).count("spre") == 0 and spre_fx.report(prepared).count("nm") > 0
    x = torch.randn(2, 3, 32, 32)
    deployed = spre_fx.convert(prepared.eval())
    result = spre_fx.verify(prepared, deployed, x)   # equal, and every N:M layer is 2:4
    assert result.nm_violations and not any(result.nm_violations.values())


@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None,
                    reason="ultralytics not installed (pip install '.[dev]')")
def test_ultralytics_fuse_runs_on_a_converted_yolov8n(monkeypatch):
    """ultralytics' fuse() (its predictor and exporter call it) expects `Conv.bn` to be a
    BatchNorm: it runs on a converted YOLOv8n, and the outputs before and after are equal."""
    monkeypatch.setenv("YOLO_OFFLINE", "true")
    monkeypatch.setenv("YOLO_AUTOINSTALL", "false")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", verbose=False)
    _randomise_norms(model, seed=5)
    prepared = spre_fx.prepare(model).eval()
    deployed = spre_fx.convert(prepared)
    x = torch.randn(1, 3, 64, 64)

    def flat(out) -> list[torch.Tensor]:  # (decoded boxes, dict of boxes / scores / feature maps)
        if isinstance(out, torch.Tensor):
            return [out]
        return [t for o in (out.values() if isinstance(out, dict) else out) for t in flat(o)]

    with torch.no_grad():
        before = flat(deployed(x))
        fused = deployed.fuse(verbose=False)
        after = flat(fused(x))
    assert fused.is_fused()
    assert not any(isinstance(m, spre_fx.FoldedBatchNorm) for m in fused.modules())
    assert len(before) == len(after) > 0 and all(torch.equal(a, b) for a, b in zip(before, after))
    plan = spre_fx.plan_of(fused, stage="converted")
    nm_layers = [lp.name for lp in plan.layers if lp.treatment != "dense"]
    assert nm_layers and all(is_nm(fused.get_submodule(n).weight, 2, 4) for n in nm_layers)


def test_folded_norms_benchmark_runs():
    pytest.importorskip("torchvision", reason="the benchmark builds a torchvision model")
    argv = ["--model", "resnet18", "--batch", "1", "--size", "32", "--rounds", "1", "--threads", "1"]
    ratios = _benchmark("folded_norms").main(argv)
    assert set(ratios) == {"default", "identity", "keep_norms", "batchnorm"} and ratios["default"] == 1.0
