"""spre_fx/cli.py (`spre-fx plan`, `python -m spre_fx`): the plan of a named model, its summary
against counts made here from the unprepared model, JSON, and the errors and exit statuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from torch import nn

from spre_fx import cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> nn.Module:
    """A `package.module:factory` model: tests.test_cli:tiny_net."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def broken_net() -> nn.Module:
    raise RuntimeError("out of coffee")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_torchvision_text_and_summary(capsys):
    tv = pytest.importorskip("torchvision")
    reference = tv.models.resnet18()  # counted here, not by spre_fx
    convs = [m for m in reference.modules() if isinstance(m, nn.Conv2d)]
    kxk = [m for m in convs if m.kernel_size != (1, 1)]
    weights = sum(m.weight.numel() for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    stem = reference.conv1.weight.numel()

    code, out, err = _run(capsys, "plan", "torchvision:resnet18", "--input-size", "3", "32", "32")
    assert code == 0, err
    assert out.startswith("torchvision:resnet18: 2:4\n")
    assert "layer1.0.conv1" in out and "first conv of the network (stem) kept dense" in out  # the table
    assert f"SpRe coverage: {len(kxk) - 1} of {len(kxk)} k×k convs" in out  # all but the stem
    assert f"N:M weights: {(weights - stem) / weights:.1%} of conv/linear weights" in out
    assert "N:M MACs: " in out and "at input 1x3x32x32" in out and "2:4 kernels (float16, CUDA): " in out


def test_plan_json_of_a_factory(capsys):
    code, out, _ = _run(capsys, "plan", "tests.test_cli:tiny_net", "--nm", "1:4", "--json", "--input-size",
                        "3", "10", "10", "--batch-size", "2")
    assert code == 0
    data = json.loads(out)
    assert data["input_size"] == [2, 3, 10, 10] and data["report"]["nm"] == [1, 4]
    treatments = {layer["name"]: layer["treatment"] for layer in data["report"]["layers"]}
    assert treatments == {"0": "dense", "3": "spre", "6": "nm", "9": "nm"}
    s = data["summary"]
    assert (s["spre_kxk_convs"], s["kxk_convs"]) == (1, 2)
    sizes = [8 * 3 * 9, 16 * 8 * 9, 16 * 16, 4 * 16]  # weights of the four layers
    assert (s["nm_weights"], s["weights"]) == (sum(sizes[1:]), sum(sizes))
    # MACs at 10x10: conv 8x8 out, conv 6x6 out, 1x1 at 6x6, linear; two images.
    macs = [8 * 27 * 64, 16 * 72 * 36, 16 * 16 * 36, 4 * 16]
    assert (s["nm_macs"], s["macs"]) == (2 * sum(macs[1:]), 2 * sum(macs))


def test_unknown_names_and_bad_arguments_exit_2(capsys):
    pytest.importorskip("torchvision")
    code, _, err = _run(capsys, "plan", "torchvision:resnet5O")
    assert code == 2 and "unknown torchvision model 'resnet5O'; did you mean resnet50" in err
    assert err.startswith("usage: spre-fx plan")
    code, _, err = _run(capsys, "plan", "resnet50")
    assert code == 2 and "is not SOURCE:NAME" in err
    code, _, err = _run(capsys, "plan", "no_such_package_xyz:net")
    assert code == 2 and "cannot import 'no_such_package_xyz'" in err
    code, _, err = _run(capsys, "plan", "tests.test_cli:tiny_nett")
    assert code == 2 and "did you mean tiny_net" in err
    code, _, err = _run(capsys, "plan", "tests.test_cli:tiny_net", "--nm", "2-4")
    assert code == 2 and "expected N:M such as 2:4, found '2-4'" in err
    code, _, err = _run(capsys, "plan", "tests.test_cli:tiny_net", "--nm", "4:2")
    assert code == 2 and "spre-fx plan: error: nm=(4, 2) is invalid" in err
    code, _, err = _run(capsys)
    assert code == 2 and "the following arguments are required: COMMAND" in err


def test_a_model_that_fails_to_build_exits_1(capsys):
    code, out, err = _run(capsys, "plan", "tests.test_cli:broken_net")
    assert code == 1 and out == ""
    assert err == "spre-fx: error: could not build 'tests.test_cli:broken_net': RuntimeError: out of coffee\n"
    code, _, err = _run(capsys, "plan", "tests.test_cli:tiny_net", "--input-size", "5", "10", "10")
    assert code == 1 and "could not prepare 'tests.test_cli:tiny_net' at input (1, 5, 10, 10)" in err


def test_timm_default_input_size(capsys):
    timm = pytest.importorskip("timm")
    name = "resnet10t"
    expected = timm.create_model(name).pretrained_cfg["input_size"]
    code, out, _ = _run(capsys, "plan", f"timm:{name}", "--json")
    assert code == 0 and json.loads(out)["input_size"] == [1, *expected]


def test_import_spre_fx_imports_no_integration_and_no_cli():
    code = ("import sys, spre_fx; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'transformers', 'accelerate', 'timm', 'torchvision') "
            "or m.startswith(('spre_fx.integrations', 'spre_fx.cli'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_dash_m_and_the_console_script():
    """`python -m spre_fx` runs the same main (a subprocess: exit status and streams as a user
    sees them); pyproject names it as the `spre-fx` script."""
    proc = subprocess.run([sys.executable, "-m", "spre_fx", "plan", "tests.test_cli:tiny_net", "--input-size",
                           "3", "8", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SpRe coverage: 1 of 2 k×k convs" in proc.stdout
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"spre-fx": "spre_fx.cli:main"}
