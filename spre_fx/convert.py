"""The inverse pass: collapse SpRe branches and BatchNorms into single plain N:M layers."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .modules import deploy_layer
from .patterns import DENSE
from .prepare import attach_plan, plan_of, set_module

__all__ = ["convert"]


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return the deployable form of a prepared model.

    Every SpRe pair becomes one conv with bias (SPRE.md §4), every conv→BN pair found by
    `prepare` (dense ones too) is folded, and masks are baked into the weights: the result holds
    the user's own conv / linear classes only, each N:M layer exactly N:M along [O, kh, kw, C],
    and equals the prepared model in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, found {type(model).__name__}")
    plan = plan_of(model, stage="prepared")
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for lp in plan.layers:
        if lp.treatment == DENSE and lp.norm is None:
            continue
        norm = modules[lp.norm] if lp.norm else None
        layer, replacement = deploy_layer(modules[lp.name], norm)
        set_module(model, lp.name, layer)
        if replacement is not None:
            set_module(model, lp.norm, replacement)
    attach_plan(model, dataclasses.replace(plan, stage="converted"))
    return model
