"""Mistakes stopped where they happen (issue 24 item 2): each raises (or warns) with a message that
names the mistake and the fix, before anything changes. Cost: ~3 s on one core."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
from torch import nn

import spre_fx

pytestmark = pytest.mark.usefixtures("one_thread")


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def x_small(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 4)


# ----------------------------------------------------------------------------- MaskScheduler
def test_optimizer_built_before_prepare_holds_none_of_the_prepared_parameters():
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the user's model, not the prepared copy
    prepared = spre_fx.prepare(model)
    with pytest.raises(ValueError, match=r"holds none of the prepared model's parameters.*built before "
                                         r"spre_fx.prepare.*copy"):
        spre_fx.MaskScheduler(prepared, opt)
    assert not any(m.spre_fx.scheduled for m in prepared.modules() if hasattr(m, "nm_mask"))


def test_optimizer_built_before_an_inplace_prepare_lacks_the_branches():
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spre_fx.prepare(model, inplace=True)
    with pytest.raises(ValueError, match=r"lacks 3 SpRe branch parameter\(s\) \(e.g. '3.weight_rep'\)"):
        spre_fx.MaskScheduler(model, opt)
    spre_fx.MaskScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1))  # built after: fine


def test_an_optimizer_over_part_of_the_model_is_accepted():
    """Only the mistakes above raise: an optimizer for the head alone trains what it holds."""
    prepared = spre_fx.prepare(small())
    spre_fx.MaskScheduler(prepared, torch.optim.SGD(prepared[7].parameters(), lr=0.1))


def test_a_second_scheduler_on_the_same_model_or_optimizer():
    prepared, other = spre_fx.prepare(small()), spre_fx.prepare(small())
    both = torch.optim.SGD([*prepared.parameters(), *other.parameters()], lr=0.1)
    first = spre_fx.MaskScheduler(prepared, both, nm_interval=4)
    with pytest.raises(ValueError, match=r"already moved by a MaskScheduler \(layer '3'\).*\.remove\(\)"):
        spre_fx.MaskScheduler(prepared, torch.optim.SGD(prepared.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"this optimizer already drives a MaskScheduler"):
        spre_fx.MaskScheduler(other, both)
    first.remove()
    second = spre_fx.MaskScheduler(other, both)  # after remove(): one scheduler again
    assert second.schedule.nm_interval == 1


# ----------------------------------------------------------------------------- prepare
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_module_is_refused():
    scripted = torch.jit.script(small())
    with pytest.raises(TypeError, match=r"TorchScript module.*Prepare the Python nn.Module"):
        spre_fx.prepare(scripted)


def test_lazy_module_not_initialised_asks_for_one_forward():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"'2' \(LazyLinear\) is a lazy module.*run one forward"):
        spre_fx.prepare(model, inplace=True)
    assert type(model[2]) is nn.LazyLinear  # nothing changed
    model(torch.randn(1, 3, 6, 6))
    assert spre_fx.plan_of(spre_fx.prepare(model)).layer("2").treatment == "nm"


def test_include_that_matches_no_layer_raises_and_unmatched_patterns_warn():
    model = small()
    with pytest.raises(ValueError, match=r"include=\('layer1',\) matches no conv or linear layer.*"
                                         r"named like \['0', '3', '7'\]"):
        spre_fx.prepare(model, include="layer1")
    with pytest.warns(UserWarning, match=r"skip pattern 'fc' matches no conv or linear layer"):
        spre_fx.prepare(model, skip=("fc", "7"))
    with pytest.warns(UserWarning, match=r"include pattern 'head.\*' matches no"):
        prepared = spre_fx.prepare(model, include=("3", "head.*"))
    assert spre_fx.plan_of(prepared).layer("3").treatment == "spre"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spre_fx.prepare(model, include=("3", "7"), skip=("7",))  # every pattern matches: silent
        assert spre_fx.plan_of(spre_fx.prepare(model, include=())).count("dense") == 3  # asked for


# ----------------------------------------------------------------------------- meta device
def test_meta_model_prepares_then_converts_after_to_empty_and_load():
    """A model built on the meta device (no values) prepares without reading data; after
    `to_empty` and loading a trained prepared model's state dict it converts to exactly what
    that model converts to."""
    torch.manual_seed(0)
    trained = spre_fx.prepare(small())
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    spre_fx.MaskScheduler(trained, opt)
    trained(x_small()).square().mean().backward()
    opt.step()
    with torch.device("meta"):
        model = small()
    prepared = spre_fx.prepare(model)
    assert prepared[3].weight_rep.is_meta and prepared[3].spatial_mask.is_meta
    assert [lp.treatment for lp in spre_fx.plan_of(prepared).layers] == \
           [lp.treatment for lp in spre_fx.plan_of(trained).layers]
    prepared.to_empty(device="cpu")
    prepared.load_state_dict(trained.state_dict())
    deployed, reference = spre_fx.convert(prepared.eval()), spre_fx.convert(trained.eval())
    for (k, a), b in zip(deployed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    spre_fx.verify(prepared, deployed, x_small())


# ----------------------------------------------------------------------------- verify / report inputs
@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    prepared = spre_fx.prepare(small()).eval()
    return prepared, spre_fx.convert(prepared)


@pytest.mark.parametrize("x, match", [
    (torch.randn(2, 4, 4, 4), r"verify: layer '0' \(Conv2d\) expects 3 input channels, found 4"),
    (torch.randn(2, 3, 5, 5), r"layer '7' \(NMLinear\) expects 128 input features \(last dimension\), "
                              r"found 200 .*example inputs given: \(2, 3, 5, 5\)"),
    (torch.randn(2, 3, 4, 4, dtype=torch.float64), r"layer '0' \(Conv2d\) expects torch.float32 input "
                                                   r"\(its weight's dtype\), found torch.float64"),
])
def test_verify_says_what_the_model_expected_and_what_was_given(pair, x, match):
    with pytest.raises(ValueError, match=match):
        spre_fx.verify(*pair, x)


def test_verify_accepts_a_forward_that_casts_its_inputs():
    """Judged by what reaches each layer: a model that casts its float64 input itself verifies."""
    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small()

        def forward(self, x):
            return self.body(x.float())

    prepared = spre_fx.prepare(Casts()).eval()
    spre_fx.verify(prepared, spre_fx.convert(prepared), x_small().double())


def test_verify_refuses_a_list_or_dict_of_inputs(pair):
    with pytest.raises(TypeError, match=r"found list: pass tuple\(...\)"):
        spre_fx.verify(*pair, [x_small()])
    with pytest.raises(TypeError, match=r"pass keyword arguments as example_kwargs"):
        spre_fx.verify(*pair, {"input": x_small()})


def test_report_input_size_needs_its_batch_dimension(pair):
    _, converted = pair
    with pytest.raises(ValueError, match=r"report: layer '0' \(Conv2d\) expects a batch dimension first "
                                         r"\(4-d input\), found 3-d.*input_size=\(3, 4, 4\)"):
        spre_fx.report(converted, input_size=(3, 4, 4))
    with pytest.raises(ValueError, match=r"input_size is a whole input's shape, batch first"):
        spre_fx.report(converted, input_size=3)
    assert spre_fx.report(converted, input_size=(1, 3, 4, 4)).flops is not None


# ----------------------------------------------------------------------------- optional dependencies
def test_mmdet_integration_without_its_dependencies_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name.startswith("spre_fx.integrations.mmdet"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mmengine", None)  # `import mmengine` now fails
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "spre_fx\[mmdet\]"'):
        importlib.import_module("spre_fx.integrations.mmdet")


def test_export_onnx_without_onnx_names_the_extra(monkeypatch, tmp_path, pair):
    _, converted = pair
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r'pip install "spre_fx\[onnx\]"'):
        spre_fx.export_onnx(converted, x_small(), tmp_path / "m.onnx")
