"""The package reads as the pipeline: stages import only earlier stages, no private name crosses a
module boundary, no public function hides a module, spre_fx's state on a user's module stays in
one place, and the mmdet plugin uses only public API (issue: layout)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import spre_fx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spre_fx"

# The order data flows in (docs/pipeline.md): a module may import only modules ranked lower.
STAGES = {
    "spre_fx._native": 0, "spre_fx.config": 0, "spre_fx.registry": 0, "spre_fx.compare": 0,
    "spre_fx.module_tree": 0, "spre_fx.fusion": 0,
    "spre_fx.masks": 1, "spre_fx.plan": 1, "spre_fx.inputs": 1,
    "spre_fx.tracing": 2,
    "spre_fx.discovery": 3, "spre_fx.channel_search": 1.5,
    "spre_fx.channel_groups": 3.1, "spre_fx.permutation": 3.2,
    "spre_fx.layers.tapconv": 3.5,
    "spre_fx.layers.nm": 4.0, "spre_fx.layers.spre": 4.1, "spre_fx.layers": 4.2,
    "spre_fx.rewrite": 5,
    "spre_fx.scheduling": 6, "spre_fx.calibration": 6,
    "spre_fx.collapse": 7,
    "spre_fx.deploy.kernels": 8.0, "spre_fx.deploy.im2col": 8.1, "spre_fx.deploy.advisor": 8.2,
    "spre_fx.deploy.backend": 8.3, "spre_fx.deploy.onnx": 8.4, "spre_fx.deploy": 8.5,
    "spre_fx.conversion": 9,
    "spre_fx.reporting": 10, "spre_fx.verification": 10,
    "spre_fx": 11,
    "spre_fx.cli": 12, "spre_fx.__main__": 13,  # the command line: public API only
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported spre_fx module, names taken from it) for every import in `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("spre_fx"):
                continue
            names = [a.name for a in node.names]
            # `from . import x` imports the module `x`
            submodules = [n for n in names if f"{target}.{n}" in STAGES]
            found += [(f"{target}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((target, rest))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("spre_fx")]
    return found


def test_every_module_has_a_stage():
    assert set(_sources()) == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_module_imports_only_earlier_stages_and_no_private_names(name):
    path = _sources()[name]
    for target, names in _imports(name, path):
        if target == "spre_fx._native" and name == "spre_fx.masks":
            continue  # the C kernels' one user
        assert STAGES[target] < STAGES[name], f"{name} imports {target}, a later (or the same) stage"
        private = [n for n in names if n.startswith("_")] + ([target] if "._" in target else [])
        assert not private, f"{name} imports private {private} from {target}"


def test_no_file_is_over_450_lines():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_public_name_hides_a_module():
    """`import spre_fx.X` gives a module and `spre_fx.X` is that module, for every submodule."""
    submodules = {m.name for m in pkgutil.iter_modules(spre_fx.__path__)}
    assert not submodules & set(spre_fx.__all__), submodules & set(spre_fx.__all__)
    for name in submodules - {"integrations"}:
        assert getattr(spre_fx, name, None) is None or getattr(spre_fx, name) is importlib.import_module(
            f"spre_fx.{name}")


def test_public_api_is_importable_and_lean():
    for name in spre_fx.__all__:
        assert getattr(spre_fx, name) is not None, name
    assert "SemiStructuredConv2d" not in spre_fx.__all__  # an implementation class
    for name in ("plan_of", "to_semi_structured", "advise", "Treatment", "LayerReport", "KernelAdvice"):
        assert name in spre_fx.__all__, name


def test_the_integrations_use_only_public_names():
    public_modules = {"spre_fx", "spre_fx.layers", "spre_fx.integrations"}
    for path in (ROOT / "integrations").rglob("*.py"):  # mmdet, lightning, transformers, session
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            module = getattr(node, "module", None) or ""
            if isinstance(node, ast.ImportFrom) and not node.level and module.startswith("spre_fx"):
                assert node.module in public_modules, f"{path.name}: from {node.module} import ..."
                assert not [a.name for a in node.names if a.name.startswith("_")], path.name
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "spre_fx":
                assert node.attr in {*spre_fx.__all__, "__version__"}, f"{path.name}: spre_fx.{node.attr}"


class _UserConv(nn.Conv2d):
    """A user's conv subclass (stock forward) with attributes of its own under common names."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nm = "user nm"
        self.decay = "user decay"
        self.frozen = "user frozen"
        self.scheduled = "user scheduled"


@pytest.mark.parametrize("spre", [True, False])
def test_spre_fx_state_does_not_clobber_or_delete_user_attributes(spre):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _UserConv(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    p = spre_fx.prepare(model, spre=spre)
    mine = {k: f"user {k}" for k in ("nm", "decay", "frozen", "scheduled")}
    assert {k: vars(p[1])[k] for k in mine} == mine  # kept while prepared
    sched = spre_fx.MaskScheduler(p, torch.optim.SGD(p.parameters(), lr=0.1), decay=1e-3)
    p.train()
    p(torch.randn(2, 3, 8, 8)).sum().backward()
    sched.optimizer.step()
    sched.remove()
    c = spre_fx.convert(p)
    assert type(c[1]) is _UserConv
    assert {k: vars(c[1])[k] for k in mine} == mine  # and given back at convert
    assert "spre_fx" not in vars(c[1])
