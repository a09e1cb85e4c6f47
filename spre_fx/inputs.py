"""Example inputs, checked against the model: what `verify` and `report` run it on.

A wrong example input used to fail many frames deep inside torch ("mat1 and mat2 shapes cannot
be multiplied"). The checks here say what the model expected and what was given: the container
before the model runs, and each conv's and linear's input as the forward reaches it (device,
dtype, channels or features; with `batched`, the first one's batch dimension). They raise only
where torch would fail too, except the batch check, which only `report(input_size=...)` asks for:
its `input_size` is a whole input's shape, batch included. A forward that moves or casts its
inputs itself (mmdet's data preprocessor, Hugging Face models) is judged by what reaches each
layer, never by the example inputs as given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["example_args", "example_call", "describe", "check_input_size", "inputs_fit"]


def describe(args: tuple, kwargs: dict[str, Any]) -> str:
    """The shapes of example inputs, for messages: "(2, 3, 8, 8), mask=(2, 8)"."""
    def shape(v: Any) -> str:
        return str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__

    return ", ".join([*map(shape, args), *(f"{k}={shape(v)}" for k, v in kwargs.items())]) or "none"


def example_args(example_inputs: Any, who: str) -> tuple:
    """The forward's positional arguments: a tensor is one, a tuple is all of them."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, dict):
        raise TypeError(f"{who}: example_inputs holds the forward's positional arguments (a tensor or a "
                        "tuple); pass keyword arguments as example_kwargs={...}")
    raise TypeError(f"{who}: example_inputs must be a tensor or a tuple of the forward's positional "
                    f"arguments, found {type(example_inputs).__name__}"
                    + (": pass tuple(...)" if isinstance(example_inputs, list) else ""))


def example_call(example_inputs: Any, example_kwargs: Any, who: str) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) of the forward from `example_inputs` and `example_kwargs`, refused when
    either is the wrong container."""
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"{who}: example_kwargs must be a dict, found {type(example_kwargs).__name__}")
    return example_args(example_inputs, who), example_kwargs or {}


def _expected(module: nn.Module, x: Tensor, first: bool, batched: bool) -> str:
    """What is wrong with `x` as `module`'s input ('' when nothing is): only what torch refuses
    too, and with `batched` a first layer's input without a batch dimension."""
    w = module.weight
    if x.device != w.device:
        return f"its input on {w.device} (where its weight is), found {x.device}: move the input or the model"
    if (x.is_floating_point() and w.is_floating_point() and x.dtype != w.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        return f"{w.dtype} input (its weight's dtype), found {x.dtype}: cast the input or the model"
    if isinstance(module, _ConvNd):
        full = module.weight.dim()
        if x.dim() not in (full, full - 1):
            return f"a {full}-d (batched) or {full - 1}-d input, found {x.dim()}-d"
        if batched and first and x.dim() == full - 1:
            return f"a batch dimension first ({full}-d input), found {x.dim()}-d: add one, e.g. (1, *shape)"
        channels = x.shape[1] if x.dim() == full else x.shape[0]
        if channels != module.in_channels:
            return f"{module.in_channels} input channels, found {channels}"
    elif isinstance(module, nn.Linear) and x.dim() and x.shape[-1] != module.in_features:
        return f"{module.in_features} input features (last dimension), found {x.shape[-1]}"
    return ""


def check_input_size(input_size: Any, who: str) -> None:
    if not isinstance(input_size, (tuple, list)) or not input_size or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size):
        raise ValueError(f"{who}: input_size is a whole input's shape, batch first (e.g. (1, 3, 224, 224)), "
                         f"found {input_size!r}")


# Forwards whose first argument is the input the layer's weight is applied to.
_KNOWN_FORWARD = ("torch.nn.", "spre_fx.")


@contextmanager
def inputs_fit(model: nn.Module, given: str, who: str, *, batched: bool = False) -> Iterator[None]:
    """Within the block, every conv and linear of `model` (with torch's or spre_fx's forward)
    checks its input as the forward reaches it, and raises a ValueError naming the layer, what it
    expects, what it got and the example inputs `given`; with `batched`, the first one called must
    also get a batch dimension."""
    seen = [False]

    def check(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            first, seen[0] = not seen[0], True
            x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            problem = "" if x is None else _expected(module, x, first, batched)
            if problem:
                raise ValueError(f"{who}: layer '{name}' ({type(module).__name__}) expects {problem} "
                                 f"(its input: {tuple(x.shape)}; example inputs given: {given})")
        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (_ConvNd, nn.Linear))]
    handles = [m.register_forward_pre_hook(check(n)) for n, m in layers
               if type(m).forward.__module__.startswith(_KNOWN_FORWARD)
               and not isinstance(m.weight, nn.parameter.UninitializedParameter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
