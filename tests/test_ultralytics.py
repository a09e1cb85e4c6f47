"""ultralytics YOLOv8 (issue 24 item 3): its DFL layer is a 1×1 conv with requires_grad=False whose
weights are the fixed bins 0..15 that decode box distributions. Pruned 2:4, 7 of the 15 non-zero
bins become 0 and every box decodes wrong, which no loss can recover: it must stay untouched.

Cost: ~6 s on one core (yolov8n built from its yaml, no weights, 64 px input).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import spre_fx

os.environ.setdefault("YOLO_OFFLINE", "true")  # no download, no settings sync, no pip installs
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")
tasks = pytest.importorskip("ultralytics.nn.tasks", reason="needs ultralytics: pip install ultralytics")

DFL = "model.22.dfl.conv"
BINS = torch.arange(16.0)


def test_yolov8_dfl_conv_is_untouched_by_prepare_and_convert():
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    assert torch.equal(model.get_submodule(DFL).weight.flatten(), BINS)
    prepared = spre_fx.prepare(model)
    lp = spre_fx.plan_of(prepared).layer(DFL)
    assert lp.treatment == "dense" and lp.reason.startswith("weight does not train"), lp
    assert spre_fx.plan_of(prepared).count("spre") > 0  # the convs that train still get SpRe
    prepared.eval()
    converted = spre_fx.convert(prepared)
    x = torch.randn(1, 3, 64, 64)
    spre_fx.verify(prepared, converted, x)
    for m in (prepared, converted):
        dfl = m.get_submodule(DFL)
        assert type(dfl) is nn.Conv2d and not dfl.weight.requires_grad
        assert torch.equal(dfl.weight.flatten(), BINS)
