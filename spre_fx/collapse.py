"""The inverse pass: collapse SpRe branches and BatchNorms into single plain N:M layers.

Every SpRe pair becomes one conv with bias (`merge_spre`, docs/method.md §4), every conv→BN pair
of the plan is folded (`fold_bn`), masks are baked into the weights, and the user's own conv and
linear classes come back. `spre_fx.convert` runs this, then the deploy backend.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from .fusion import BNStats, fold_bn, merge_spre
from .layers import NMLayer, SpReConv2d, SpReNorm, effective_weight, masks_of
from .module_tree import adopt, model_copy, module_aliases, set_module
from .plan import Treatment, attach_plan, plan_of
from .registry import norm_spec

__all__ = ["collapse_layer", "collapsed"]


def _with_weights(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    plain = module.to_original() if isinstance(module, NMLayer) else adopt(type(module), module)
    plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        plain.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    return plain


def collapse_layer(module: nn.Module, norm: nn.Module | None,
                   masks: dict[str, Tensor] | None = None) -> tuple[nn.Module, nn.Module | None]:
    """One plain layer (the user's class) computing `norm(module(x))` in eval mode.

    `masks` are the layer's (`current_masks()`, taken from the module itself when None).
    Returns the layer and what replaces `norm` (None when there was no norm).
    """
    if isinstance(module, NMLayer) and masks is None:
        masks = module.current_masks()
    if isinstance(module, SpReConv2d):
        if not isinstance(norm, SpReNorm):
            raise ValueError("a SpReConv2d collapses only together with its SpReBatchNorm2d")
        w, b = merge_spre(
            module.weight, module.bias, module.weight_rep, masks["nm_mask"], masks["spatial_mask"],
            BNStats.of(norm), BNStats.of(norm.rep),
        )
        return _with_weights(module, w, b), norm.spre_fx.spec.after_fold(norm)
    weight = effective_weight(module, masks)
    if norm is None:
        bias = None if module.bias is None else module.bias.detach().clone()
        return _with_weights(module, weight.clone(), bias), None
    w, b = fold_bn(weight, module.bias, BNStats.of(norm))
    return _with_weights(module, w, b), norm_spec(norm).after_fold(norm)


def _copy_except(model: nn.Module, replaced: list[str]) -> nn.Module:
    """A deep copy of `model` that shares, instead of copying, the tensors of `replaced` modules
    (and holds detached copies of tensors a training forward left in attributes).

    The collapse builds new parameters for every one of those modules, so the copy never holds
    the shared tensors once it is returned, and the input model is never written to.
    """
    memo: dict[int, object] = {}
    modules = dict(model.named_modules())
    for name in replaced:
        for t in (*modules[name].parameters(recurse=False), *modules[name].buffers(recurse=False)):
            memo[id(t)] = t
    return model_copy(model, memo)


def collapsed(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The prepared `model` with every planned layer collapsed (a copy unless `inplace`)."""
    plan = plan_of(model, stage="prepared")
    folded = [lp for lp in plan.layers if lp.treatment != Treatment.DENSE or lp.norm is not None]
    # Taken from the input model (a copy is driven by no scheduler): stale masks of layers that
    # follow their weights are computed afresh, out of place; held ones are used as they are.
    masks = {lp.name: masks_of(model.get_submodule(lp.name)) for lp in folded}
    if not inplace:
        model = _copy_except(model, [n for lp in folded for n in (lp.name, lp.norm) if n])
    aliases = module_aliases(model)
    for lp in folded:
        # Looked up one at a time: a replaced layer's tensors are freed as soon as it is swapped.
        norm = model.get_submodule(lp.norm) if lp.norm else None
        layer, replacement = collapse_layer(model.get_submodule(lp.name), norm, masks.pop(lp.name))
        set_module(model, lp.name, layer, aliases)
        if replacement is not None:
            set_module(model, lp.norm, replacement, aliases)
    attach_plan(model, dataclasses.replace(plan, stage="converted"))
    return model
