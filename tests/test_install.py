"""spre_fx as a user installs it (issue 24 item 1): the wheel built from the checkout holds every
file of the package, and installed beside torch alone (no numpy, torchvision, timm or mmdet) it
imports and runs prepare → MaskScheduler → recalibrate_bn → convert → verify → report.

Cost on one loaded core: the wheel build ~7 s, the torch-only venv and install ~7 s, the smoke run
~10 s of CPU (25 s wall on a loaded machine); the in-process numpy test ~1 s.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import spre_fx

ROOT = Path(__file__).resolve().parents[1]


def _check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="the wheel is built from the checkout's files as git lists them: needs a git checkout",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return _check_wheel().build_wheel(tmp_path_factory.mktemp("wheel"))


@needs_git
@pytest.mark.xdist_group("wheel")
def test_the_wheel_holds_every_file_of_the_package(wheel):
    missing = _check_wheel().missing_from_wheel(wheel)
    assert not missing, (
        f"the wheel lacks {missing}: add each new package to [tool.setuptools] packages in "
        "pyproject.toml (and data files to package-data)"
    )


@needs_git
@pytest.mark.xdist_group("wheel")
def test_the_installed_wheel_runs_with_torch_alone(wheel, tmp_path):
    check = _check_wheel()
    python = check.torch_only_env(tmp_path / "env")
    check.install(python, wheel)
    (tmp_path / "run").mkdir()
    result = check.run_smoke(python, tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheel smoke: ok" in result.stdout


def test_the_core_never_asks_numpy(monkeypatch):
    """What the wheel smoke shows, in process: prepare (SpRe branches included), training under a
    MaskScheduler, convert, verify and report never convert a tensor to numpy."""

    def no_numpy(*args, **kwargs):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    prepared = spre_fx.prepare(model, dense_stem=False)
    assert spre_fx.plan_of(prepared).count("spre") == 2
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    spre_fx.MaskScheduler(prepared, opt)
    x = torch.randn(4, 4, 8, 8)
    prepared(x).sum().backward()
    opt.step()
    spre_fx.recalibrate_bn(prepared, [x])
    deployed = spre_fx.convert(prepared.eval())
    spre_fx.verify(prepared, deployed, x)
    assert spre_fx.report(deployed, x).count("spre") == 2
