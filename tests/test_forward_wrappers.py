"""A `forward` set on a module instance (accelerate's autocast wrapper, `torch.compile(m.forward)`,
a user's closure) and the copies spre_fx makes: a copy never runs the original model.

`copy.deepcopy` rebinds a bound method or a partial to the copy, but keeps a function as it is:
a closure over the original's bound forward would make `convert(p)` compute with `p`. Such a copy
is refused with a ValueError; `verify` refuses a converted model that runs the prepared one's
modules. Cost on one core: ~4 s in all, ~3 s of it importing torch._dynamo for `torch.compile`.
"""

from __future__ import annotations

import functools
import re
import types

import pytest
import torch
from torch.nn import functional as F

import spre_fx

from .nets import TinyNet, tiny_input, train_steps


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return tiny_input()


def _prepared(x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(1)
    prepared = spre_fx.prepare(TinyNet())
    train_steps(prepared, x)
    return prepared.eval()


def _assert_converted_on_its_own(prepared, converted, x) -> None:
    """`converted` verifies against `prepared`, and computes with its own weights: moving every
    weight of `prepared` afterwards changes the prepared output and not the converted one."""
    spre_fx.verify(prepared, converted, x)
    with torch.no_grad():
        before = converted(x)
        for p in prepared.parameters():
            p.add_(0.5)
        assert torch.equal(converted(x), before)
        assert not torch.equal(prepared(x), before)


def _closure(bound):
    """What accelerate does to a forward without `__func__`: a function closing over it."""
    return functools.wraps(bound)(lambda *a, **k: bound(*a, **k))


ORIGINAL = "reaches the original model (the model itself)"


def _wrapper(model: torch.nn.Module, kind: str) -> tuple:
    """An instance forward that would run `model` itself from a deep copy of it: the module to set
    it on, the wrapper, and what the error must say it reaches."""
    head = model.head
    if kind == "closure":
        return model, _closure(model.forward), ORIGINAL
    if kind == "torch.compile":  # compiled on a first call: never here
        return model, torch.compile(model.forward), ORIGINAL
    if kind == "global":
        return model, eval("lambda *a: original(*a)", {"original": model.forward}), ORIGINAL
    if kind == "closure on a layer":
        return head, _closure(head.forward), "reaches the original model (module 'head')"
    weight = head.weight
    return head, lambda t: F.linear(t, weight), "tensor 'head.weight'"


@pytest.mark.parametrize("kind", ["closure", "torch.compile", "global", "closure on a layer",
                                  "closure over a weight"])
def test_convert_refuses_a_forward_that_would_run_the_original(x, kind):
    prepared = _prepared(x)
    module, wrapper, target = _wrapper(prepared, kind)
    module.forward = wrapper
    with pytest.raises(ValueError, match="would make the copy run the original model") as error:
        spre_fx.convert(prepared)
    assert target in str(error.value)
    assert "module.__dict__.pop('forward')" in str(error.value)  # and what to do
    assert module.forward is wrapper  # the user's model untouched


def test_the_wrapper_set_aside_converts_and_the_result_follows_its_own_weights(x):
    prepared = _prepared(x)
    prepared.forward = _closure(prepared.forward)
    wrapper = prepared.__dict__.pop("forward")  # what the error says to do
    converted = spre_fx.convert(prepared)
    prepared.forward = wrapper
    _assert_converted_on_its_own(prepared, converted, x)


@pytest.mark.parametrize("kind", ["method", "wrapped method", "partial", "layer method"])
def test_a_bound_forward_is_rebound_to_the_copy(x, kind):
    """A bound method or partial over the module (accelerate's usual autocast wrapper is a
    `MethodType` over a function that closes over the class's forward only) runs the copy."""
    prepared = _prepared(x)
    cls_forward = type(prepared).forward
    calls = []

    def counted(self, *args):
        calls.append(self)
        return cls_forward(self, *args)

    if kind == "method":
        prepared.forward = types.MethodType(cls_forward, prepared)
    elif kind == "wrapped method":
        prepared.forward = types.MethodType(functools.wraps(cls_forward)(counted), prepared)
    elif kind == "partial":
        prepared.forward = functools.partial(cls_forward, prepared)
    else:
        prepared.head.forward = types.MethodType(type(prepared.head).forward, prepared.head)
    converted = spre_fx.convert(prepared)
    _assert_converted_on_its_own(prepared, converted, x)
    if kind == "wrapped method":
        assert calls[-1] is prepared and converted in calls  # each ran its own forward


def test_prepare_and_permute_channels_refuse_the_copy_and_prepare_inplace_keeps_it(x):
    model = TinyNet()
    wrapper = _closure(model.forward)
    model.forward = wrapper
    for make in (spre_fx.prepare, spre_fx.permute_channels):
        with pytest.raises(ValueError, match=re.escape(ORIGINAL)):
            make(model)
    prepared = spre_fx.prepare(model, inplace=True)  # no copy: the wrapper runs the prepared model
    assert prepared is model and prepared.forward is wrapper
    assert prepared.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("where", ["model", "layer"])
def test_verify_refuses_a_converted_model_that_runs_the_prepared_one(x, where):
    """A wrapper on the converted `head` that calls the prepared `head`: the converted head's hooks
    still fire, with the prepared head's output; before, verify passed without checking it."""
    prepared = _prepared(x)
    converted = spre_fx.convert(prepared)
    if where == "model":
        converted.forward = _closure(prepared.forward)
    else:
        converted.head.forward = _closure(prepared.head.forward)
    with pytest.raises(spre_fx.VerificationError, match="calls into the prepared model") as error:
        spre_fx.verify(prepared, converted, x)
    want = "the model: its forward reaches the prepared model (the model itself)" if where == "model" else (
        "module 'head': its forward reaches the prepared model (module 'head')")
    assert want in str(error.value)


def test_verify_refuses_a_converted_model_sharing_the_prepared_models_tensors(x):
    prepared = _prepared(x)
    converted = spre_fx.convert(prepared)
    assert torch.equal(converted.head.bias, prepared.head.bias)  # no norm folded into it
    converted.head.bias = prepared.head.bias  # the same values: before, verify passed
    with pytest.raises(spre_fx.VerificationError, match="tensor 'head.bias'"):
        spre_fx.verify(prepared, converted, x)


def test_prepare_runs_the_n_m_forward_of_a_layer_with_its_own_forward_bound(x):
    """`layer.forward = MethodType(type(layer).forward, layer)` adds nothing: prepare's N:M layer
    runs its own masked forward (before, the bound Linear.forward ran: dense, masks bypassed)."""
    model = TinyNet()
    model.head.forward = types.MethodType(type(model.head).forward, model.head)
    prepared = spre_fx.prepare(model).eval()
    features = torch.randn(4, 16)
    head = prepared.head
    with torch.no_grad():
        want = F.linear(features, head.weight * head.nm_mask, head.bias)
        torch.testing.assert_close(head(features), want, rtol=0, atol=0)
        assert not torch.equal(head(features), F.linear(features, head.weight, head.bias))


def test_a_layer_whose_forward_is_a_wrapper_is_refused_when_swapped(x):
    """In place there is no copy: the error names the layer, before any layer is swapped."""
    model = TinyNet()
    model.head.forward = _closure(model.head.forward)
    with pytest.raises(ValueError, match=r"forward would run instead of .*\n  head: forward"):
        spre_fx.prepare(model, inplace=True)
    assert type(model.head) is torch.nn.Linear and type(model.block.conv1) is torch.nn.Conv2d
    with pytest.raises(ValueError, match="never prepared|not prepared"):
        spre_fx.plan_of(model)


def test_export_onnx_measures_float16_against_a_copy_that_runs_itself(tmp_path):
    """export_onnx's float32 reference of a float16 model is a copy: with a closure forward it
    would run the float16 original, and the check would compare float16 with itself."""
    pytest.importorskip("onnx", reason="ONNX export needs onnx (dev dependency)")
    converted = spre_fx.convert(spre_fx.prepare(TinyNet()).eval()).half()
    converted.forward = _closure(converted.forward)
    with pytest.raises(ValueError, match="would make the copy run the original model"):
        spre_fx.export_onnx(converted, (tiny_input().half(),), str(tmp_path / "m.onnx"), dynamo=False)
