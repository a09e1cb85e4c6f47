"""The inverse pass: collapse SpRe branches and BatchNorms into single plain N:M layers."""

from __future__ import annotations

import dataclasses

from torch import nn

from .export import apply_backend, check_backend
from .modules import deploy_layer, masks_of
from .patterns import DENSE
from .prepare import attach_plan, model_copy, module_aliases, plan_of, set_module

__all__ = ["convert"]


def _copy_except(model: nn.Module, replaced: list[str]) -> nn.Module:
    """A deep copy of `model` that shares, instead of copying, the tensors of `replaced` modules
    (and holds detached copies of tensors a training forward left in attributes).

    `convert` builds new parameters for every one of those modules, so the copy never holds
    the shared tensors once it is returned, and the input model is never written to.
    """
    memo: dict[int, object] = {}
    modules = dict(model.named_modules())
    for name in replaced:
        for t in (*modules[name].parameters(recurse=False), *modules[name].buffers(recurse=False)):
            memo[id(t)] = t
    return model_copy(model, memo)


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "dense") -> nn.Module:
    """Return the deployable form of a prepared model.

    Every SpRe pair becomes one conv with bias (docs/method.md §4), every conv→BN pair found by
    `prepare` (dense ones too) is folded, and masks are baked into the weights: the result holds
    the user's own conv / linear classes only, each N:M layer exactly N:M along [O, kh, kw, C],
    and equals the prepared model in eval mode.

    backend="semi_structured" (CUDA, compute capability >= 8.0; model on the GPU, fp16/bf16)
    then runs every eligible Linear and groups=1 Conv2d on torch's 2:4 sparse kernels
    (`spre_fx.export.to_semi_structured`); `spre_fx.report(model)` says why any layer stayed
    dense. Without CUDA it raises RuntimeError before anything changes. docs/deploy.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, found {type(model).__name__}")
    plan = plan_of(model, stage="prepared")
    check_backend(backend, model)
    folded = [lp for lp in plan.layers if lp.treatment != DENSE or lp.norm is not None]
    # Taken from the input model (a copy is driven by no scheduler): stale masks of layers that
    # follow their weights are computed afresh, out of place; held ones are used as they are.
    masks = {lp.name: masks_of(model.get_submodule(lp.name)) for lp in folded}
    if not inplace:
        model = _copy_except(model, [n for lp in folded for n in (lp.name, lp.norm) if n])
    aliases = module_aliases(model)
    for lp in folded:
        # Looked up one at a time: a replaced layer's tensors are freed as soon as it is swapped.
        norm = model.get_submodule(lp.norm) if lp.norm else None
        layer, replacement = deploy_layer(model.get_submodule(lp.name), norm, masks.pop(lp.name))
        set_module(model, lp.name, layer, aliases)
        if replacement is not None:
            set_module(model, lp.norm, replacement, aliases)
    attach_plan(model, dataclasses.replace(plan, stage="converted"))
    return apply_backend(model, backend)
