"""`convert`: the collapse, then the deploy backend, as one call; `deployed_like`: the same
architecture rebuilt from the user's own model, for loading a converted state dict."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .collapse import FoldedBatchNorm, collapsed
from .config import SpReConfig
from .deploy.backend import apply_backend, check_backend
from .masks import is_nm
from .module_tree import model_copy, module_aliases, set_module
from .plan import LayerPlan, Plan, Treatment, attach_plan, is_prepared, plan_of
from .registry import norm_spec
from .tracing import is_layer

__all__ = ["convert", "deployed_like"]


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "dense",
            keep_norms: bool = False) -> nn.Module:
    """Return the deployable form of a prepared model.

    Every SpRe pair becomes one conv with bias (docs/method.md §4), every conv→BN pair found by
    `prepare` (dense ones too) is folded, and masks are baked into the weights: the result holds
    the user's own conv / linear classes only, each N:M layer exactly N:M along [O, kh, kw, C],
    and equals the prepared model in eval mode. Each folded norm becomes a `FoldedBatchNorm`
    (an exact identity holding identity statistics), so fusers that expect a BatchNorm there
    (ultralytics' `fuse()`, torch's `fuse_conv_bn_eval`) run and change nothing.

    keep_norms=True puts each folded shift in the `FoldedBatchNorm` (a per-channel add) instead
    of a new conv bias, so every conv keeps the bias it was built with: for fusers that read
    only the norm's shift and ignore a conv's bias (timm's `reparameterize_model`: RepVGG,
    MobileOne, FastViT, RepViT). One extra add per layer at inference (docs/deploy.md).

    backend="semi_structured" (CUDA, compute capability >= 8.0; model on the GPU, fp16/bf16)
    then runs every eligible Linear and groups=1 Conv2d on torch's 2:4 sparse kernels
    (`spre_fx.to_semi_structured`); `spre_fx.report(model)` says why any layer stayed dense.
    Without CUDA it raises RuntimeError before anything changes. docs/deploy.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, found {type(model).__name__}")
    plan_of(model, stage="prepared")
    check_backend(backend, model)
    return apply_backend(collapsed(model, inplace=inplace, keep_norms=keep_norms), backend)


def _state_keys(module: nn.Module, name: str) -> list[str]:
    prefix = f"{name}." if name else ""
    return [prefix + k for k in module.state_dict(keep_vars=True)]


def _rebuilt_plan(model: nn.Module, nm: tuple[int, int]) -> Plan:
    """A converted-stage plan read off the loaded weights: N:M where the weight is, else dense."""
    layers = []
    for name, m in model.named_modules():
        if not is_layer(m):
            continue
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        pattern = f"{nm[0]}:{nm[1]}"
        if is_nm(m.weight, *nm):
            treatment, reason = Treatment.NM, f"deployed_like: the loaded weight is {pattern}"
        else:
            treatment, reason = Treatment.DENSE, f"deployed_like: the loaded weight is not {pattern}"
        layers.append(LayerPlan(name, kind, treatment, reason, None, tuple(m.weight.shape)))
    return Plan(SpReConfig(nm=nm), tuple(layers), stage="converted")


def deployed_like(model: nn.Module, state_dict: Mapping[str, Tensor], *,
                  nm: tuple[int, int] = (2, 4), inplace: bool = False) -> nn.Module:
    """The deployed form of `model` (freshly built, never prepared) holding `state_dict`, the
    `state_dict()` of `spre_fx.convert(prepared)` for a model built the same way.

    No prepare, no trace, no training-time state: a converted model differs from the user's
    only where a BatchNorm was folded (its keys are gone from the state dict but for `bias`
    under `keep_norms=True`; it becomes a `FoldedBatchNorm`, as `convert` leaves it) and where a
    conv or linear without bias got one (its `bias` key appears). Both are read from the state
    dict's keys, then the state dict is loaded strictly, so `torch.load(path, weights_only=True)`
    of a saved `converted.state_dict()` is all a deployment needs besides the code that builds
    the model:

        deployed = spre_fx.deployed_like(build_model(), torch.load(path, weights_only=True))

    A converted plan is attached, read off the loaded weights with `nm` (a layer is "nm" when
    its weight is N:M, else "dense"), so `report`, `advise`, `to_semi_structured` and
    `export_onnx` take the result. `model` is copied unless `inplace`; its train/eval mode is
    left as it is (call `.eval()` for inference). Raises ValueError for a prepared or converted
    model, and for a state dict that does not fit (the keys that differ, and what to check).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"deployed_like expects a torch.nn.Module, found {type(model).__name__}")
    if is_prepared(model):
        raise ValueError(
            f"deployed_like expects the user's model as built (never prepared), found a "
            f"{plan_of(model).stage} one: pass a freshly built model, e.g. torchvision.models.resnet50()")
    if not inplace:
        model = model_copy(model)
    keys = set(state_dict)
    aliases = module_aliases(model)
    folded = []
    for name, module in model.named_modules():
        spec = norm_spec(module)
        bias = f"{name}.bias".lstrip(".")
        own = set(_state_keys(module, name)) - {bias}
        if spec is not None and own and keys.isdisjoint(own):
            mean = module.running_mean
            shift = torch.empty_like(mean) if bias in keys else None  # filled by the load below
            folded.append((name, FoldedBatchNorm.replacing(module, spec.after_fold(module), shift)))
        elif is_layer(module) and module.bias is None and bias in keys:
            weight = module.weight
            value = state_dict[bias]
            empty = torch.empty(value.shape, dtype=weight.dtype, device=weight.device)
            module.bias = nn.Parameter(empty, requires_grad=weight.requires_grad)
    for name, replacement in folded:
        set_module(model, name, replacement, aliases)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the state dict does not fit the deployed form of this {type(model).__name__} "
            f"({len(folded)} BatchNorm(s) taken as folded: those whose keys are all missing): {error}\n"
            "Pass the state_dict() of spre_fx.convert(prepared) for a model built with the same code "
            "and arguments") from error
    attach_plan(model, _rebuilt_plan(model, nm))
    return model
