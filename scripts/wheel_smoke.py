"""Smoke test of an installed spre_fx wheel with torch alone (run by scripts/check_wheel.py).

Run it with the interpreter of an environment holding torch (and its own dependencies) and the
wheel, from a directory outside the checkout. It checks that the environment is what it claims
(numpy, torchvision, timm and the mmdet stack are not importable; spre_fx comes from
site-packages), then runs the core on a small conv net: prepare → MaskScheduler and a few SGD
steps → recalibrate_bn → convert → verify → report, and that every optional dependency's
ImportError names the extra to install. Exit status 0 and a last line "wheel smoke: ok".
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import pkgutil
import re
import sys
import tempfile
from pathlib import Path

ABSENT = ("numpy", "torchvision", "timm", "mmdet", "mmcv", "mmengine", "onnx", "onnxruntime")


def check_environment(checkout: Path | None) -> None:
    for name in ABSENT:
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(f"the smoke environment must not hold {name}, found it importable")
        try:
            importlib.import_module(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"`import {name}` succeeded in the smoke environment")
    import spre_fx

    where = Path(spre_fx.__file__).resolve()
    if "site-packages" not in where.parts:
        raise SystemExit(f"spre_fx was imported from {where}, not from an installed wheel")
    if checkout is not None and checkout.resolve() in where.parents:
        raise SystemExit(f"spre_fx was imported from the checkout ({where}), not from the wheel")


def check_requirements() -> None:
    """Every requirement the wheel declares (extras aside) is installed: pip installed it with
    --no-deps."""
    for req in metadata.requires("spre_fx") or []:
        if "extra ==" in req:
            continue
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"the wheel requires {req!r}, which is not installed") from None


def import_every_module() -> list[str]:
    """Import every spre_fx module but the integrations (they need their frameworks)."""
    import spre_fx

    imported = []
    for info in pkgutil.walk_packages(spre_fx.__path__, "spre_fx."):
        if info.name.startswith("spre_fx.integrations."):
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
    for required in ("spre_fx.layers", "spre_fx.deploy", "spre_fx.layers.spre", "spre_fx.deploy.onnx"):
        if required not in imported:
            raise SystemExit(f"{required} is missing from the installed wheel")
    return imported


def check_integrations_name_their_extra() -> None:
    """An integration that does not import without its framework says which extra to install."""
    import spre_fx.integrations

    for info in pkgutil.iter_modules(spre_fx.integrations.__path__, "spre_fx.integrations."):
        extra = info.name.rpartition(".")[2]
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            if 'pip install "spre_fx[' not in str(err):
                raise SystemExit(f"`import {info.name}` without its dependencies says {err!r}, "
                                 f'not which extra to install (e.g. pip install "spre_fx[{extra}]")') from err


def run_core() -> None:
    import torch
    from torch import nn

    import spre_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    )
    prepared = spre_fx.prepare(model, nm=(2, 4))
    plan = spre_fx.plan_of(prepared)
    if plan.count("spre") != 1 or plan.count("nm") != 2:
        raise SystemExit(f"unexpected plan: {[(lp.name, lp.treatment, lp.reason) for lp in plan.layers]}")
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    sched = spre_fx.MaskScheduler(prepared, opt)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 8, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(prepared(x), y).backward()
        opt.step()
    if sched.step != 3:
        raise SystemExit(f"MaskScheduler counted {sched.step} steps, expected 3")
    spre_fx.recalibrate_bn(prepared, [x])
    prepared.eval()
    deployed = spre_fx.convert(prepared)
    result = spre_fx.verify(prepared, deployed, x[:2])
    report = spre_fx.report(deployed, input_size=(1, 3, 8, 8))
    if (report.stage, report.count("spre"), report.count("nm")) != ("converted", 1, 2):
        raise SystemExit(f"report of the converted model: {report}")
    print(f"verify: output error {result.output_error:.2e}; masks of the prepared model: "
          f"{spre_fx.report(prepared).mask_kernels}")


def check_onnx_names_its_extra() -> None:
    import torch
    from torch import nn

    import spre_fx

    deployed = spre_fx.convert(spre_fx.prepare(nn.Sequential(nn.Linear(8, 8))).eval())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spre_fx.export_onnx(deployed, torch.randn(1, 8), Path(tmp) / "m.onnx")
        except ImportError as err:
            if 'pip install "spre_fx[onnx]"' not in str(err):
                raise SystemExit(f"export_onnx without onnx says {err!r}, not which extra to install") \
                    from err
        else:
            raise SystemExit("export_onnx ran without onnx installed")


def main() -> None:
    checkout = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    check_environment(checkout)
    check_requirements()
    modules = import_every_module()
    check_integrations_name_their_extra()
    run_core()
    check_onnx_names_its_extra()
    print(f"wheel smoke: ok ({len(modules)} modules imported, numpy not importable)")


if __name__ == "__main__":
    main()
