"""Deployed models round-trip: `spre_fx.deployed_like(fresh_model, converted.state_dict())`
rebuilds the converted model from the user's own, never prepared, model, and computes what the
converted model computes, bit for bit; the state dict travels through `torch.save` and
`torch.load(..., weights_only=True)`.

Cost on one core: ~25 s in all (the generated networks ~8 s, torchvision ~3 s, timm ~4 s, the
mmdet RetinaNet ~8 s).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import spre_fx
from spre_fx.masks import is_nm

from .nets import TinyNet, tiny_input, train_steps
from .test_convert import networks

ROOT = Path(__file__).resolve().parents[1]


def _through_file(state_dict: dict) -> dict:
    """What a deployment reads back: torch.save, then torch.load with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({"model": state_dict}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["model"]


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine terms away from their initial 0 / 1, so that a fold that
    forgot one of them could not go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def _assert_same_deployed(rebuilt: nn.Module, deployed: nn.Module) -> None:
    """The same module classes at the same names, and the same state."""
    got, want = dict(rebuilt.named_modules()), dict(deployed.named_modules())
    assert got.keys() == want.keys()
    for name, module in want.items():
        assert type(got[name]) is type(module), name
    assert rebuilt.state_dict().keys() == deployed.state_dict().keys()
    for key, value in deployed.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


@settings(max_examples=20, deadline=None)
@given(net=networks(frozen=True), nm=st.sampled_from([(2, 4), (1, 4), (2, 8)]), spre=st.booleans(),
       keep_norms=st.booleans(), seed=st.integers(0, 99))
def test_generated_networks_rebuild_exactly(net, nm, spre, keep_norms, seed):
    fresh = copy.deepcopy(net)  # the user's model as their code builds it
    torch.manual_seed(seed)
    x = tiny_input(batch=2, size=10)
    prepared = spre_fx.prepare(net, nm=nm, spre=spre)
    train_steps(prepared, x, steps=2)
    deployed = spre_fx.convert(prepared.eval(), keep_norms=keep_norms)

    rebuilt = spre_fx.deployed_like(fresh, _through_file(deployed.state_dict()), nm=nm).eval()
    _assert_same_deployed(rebuilt, deployed)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), deployed(x))
    assert not spre_fx.plan.is_prepared(fresh)  # copied, not changed
    # The attached plan marks as N:M exactly the layers whose weight is N:M.
    for lp in spre_fx.plan_of(rebuilt, stage="converted").layers:
        weight = rebuilt.get_submodule(lp.name).weight
        assert (lp.treatment == "nm") == is_nm(weight, *nm), lp.name


def test_the_fresh_model_is_left_alone_unless_inplace():
    torch.manual_seed(0)
    model = TinyNet()
    fresh = copy.deepcopy(model)
    deployed = spre_fx.convert(spre_fx.prepare(model).eval())
    before = copy.deepcopy(fresh.state_dict())
    rebuilt = spre_fx.deployed_like(fresh, deployed.state_dict())
    assert rebuilt is not fresh and not spre_fx.plan.is_prepared(fresh)
    assert isinstance(fresh.stem[1], nn.BatchNorm2d) and fresh.stem[0].bias is None
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    same = spre_fx.deployed_like(fresh, deployed.state_dict(), inplace=True)
    assert same is fresh and isinstance(fresh.stem[1], spre_fx.FoldedBatchNorm)
    assert fresh.training  # the mode is the caller's


def test_what_does_not_fit_is_refused_with_the_keys():
    torch.manual_seed(0)
    deployed = spre_fx.convert(spre_fx.prepare(TinyNet()).eval())
    with pytest.raises(ValueError, match="never prepared"):
        spre_fx.deployed_like(spre_fx.prepare(TinyNet()), deployed.state_dict())
    with pytest.raises(ValueError, match="does not fit the deployed form of this TinyNet") as info:
        spre_fx.deployed_like(TinyNet(width=16), deployed.state_dict())
    assert "size mismatch" in str(info.value)
    partial = {k: v for k, v in deployed.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="Missing key"):
        spre_fx.deployed_like(TinyNet(), partial)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        spre_fx.deployed_like(deployed.state_dict(), deployed.state_dict())


def test_torchvision_resnet_round_trips():
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    build = lambda: torchvision.models.resnet18(num_classes=10)
    model = build()
    _randomise_norms(model, seed=1)
    prepared = spre_fx.prepare(model).eval()
    deployed = spre_fx.convert(prepared)
    rebuilt = spre_fx.deployed_like(build(), _through_file(deployed.state_dict())).eval()
    _assert_same_deployed(rebuilt, deployed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), deployed(x))
    spre_fx.verify(prepared, rebuilt, x)  # N:M and equal to the trained model, by spre_fx's own check
    assert spre_fx.report(rebuilt).count("nm") == spre_fx.report(deployed).count("nm") + \
        spre_fx.report(deployed).count("spre")


def test_timm_norm_act_model_round_trips():
    """timm's BatchNormAct2d folds into a FoldedBatchNorm that still runs its activation."""
    timm = pytest.importorskip("timm", reason="timm not installed")
    torch.manual_seed(0)
    build = lambda: timm.create_model("mobilenetv3_small_050", num_classes=10)
    model = build()
    _randomise_norms(model, seed=2)
    deployed = spre_fx.convert(spre_fx.prepare(model).eval())
    folded = [m for m in deployed.modules() if isinstance(m, spre_fx.FoldedBatchNorm)]
    assert folded and any(m.post is not None for m in folded)  # the activation is kept
    rebuilt = spre_fx.deployed_like(build(), _through_file(deployed.state_dict())).eval()
    _assert_same_deployed(rebuilt, deployed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), deployed(x))


@pytest.mark.mmdet
def test_mmdet_detector_round_trips():
    pytest.importorskip("mmdet", reason="mmdetection not installed: pip install -e .[mmdet]")
    pytest.importorskip("mmcv.ops", reason="mmcv with its ops is needed by mmdet")
    import spre_fx.integrations.mmdet  # noqa: F401  (SpReDetector, as the config imports it)
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    config = ROOT / "integrations" / "mmdet" / "configs" / "spre-2-4_retinanet_r50_fpn_1x_coco.py"
    det = Config.fromfile(str(config)).model.detector
    det.backbone.update(depth=18, base_channels=16, init_cfg=None, frozen_stages=-1, norm_eval=False)
    det.neck.update(in_channels=[16, 32, 64, 128], out_channels=32)
    det.bbox_head.update(in_channels=32, feat_channels=32, num_classes=2)

    def build() -> nn.Module:
        with DefaultScope.overwrite_default_scope("mmdet"):
            return MODELS.build(copy.deepcopy(det))

    torch.manual_seed(0)
    model = build()
    _randomise_norms(model, seed=3)
    deployed = spre_fx.convert(spre_fx.prepare(model).eval())
    rebuilt = spre_fx.deployed_like(build(), _through_file(deployed.state_dict())).eval()
    _assert_same_deployed(rebuilt, deployed)
    assert type(rebuilt) is type(model)  # a RetinaNet stays a RetinaNet
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = rebuilt(x, mode="tensor"), deployed(x, mode="tensor")
    flat = lambda out: [t for level in out for t in level]
    assert len(flat(got)) == len(flat(want)) > 0
    assert all(torch.equal(a, b) for a, b in zip(flat(got), flat(want)))
