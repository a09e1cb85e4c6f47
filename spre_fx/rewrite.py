"""The rewrite pass: swap the modules the user's forward already calls for their train-time form.

No forward is regenerated: the model keeps its class, its methods and its Python control flow
(`self.training` branches stay live), and every original parameter and buffer keeps its name.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .config import SpReConfig
from .discovery import discover
from .layers import NM_CLASSES, SpReBatchNorm2d, SpReConv2d
from .module_tree import model_copy, module_aliases, refuse_added_forwards, set_module
from .permutation import permute_for
from .plan import Treatment, attach_plan, is_prepared
from .registry import norm_spec

__all__ = ["prepare"]

log = logging.getLogger("spre_fx")


def _check_model(model: nn.Module) -> None:
    """Refuse, before anything changes, what prepare cannot do right: TorchScript, lazy modules
    not yet initialised, NaN/inf weights (tensors on the meta device hold no values to check)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"prepare got a TorchScript module ({type(model).__name__}, from torch.jit.script or trace): its "
            "forward is compiled code that spre_fx cannot rewrite, so nothing would be prepared. Prepare "
            "the Python nn.Module, train and convert it, then script the converted model")
    lazy = next(((n, m) for n, m in model.named_modules()
                 if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()), None)
    if lazy is not None:
        raise ValueError(
            f"'{lazy[0] or '<model>'}' ({type(lazy[1]).__name__}) is a lazy module whose parameters are "
            "not initialised yet: run one forward with a real input before spre_fx.prepare(model), "
            "so that its weights have their shapes")
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point() and not t.is_meta]
    # One float64 reduction per tensor, no temporary: NaN and ±inf both survive a sum times 0.
    for name, t in tensors:
        if not torch.isfinite(t.detach().sum(dtype=torch.float64) * 0):
            raise ValueError(f"'{name}' holds NaN or inf values: spre_fx needs finite weights")


def _config(nm, spre, config: SpReConfig | None, options: dict[str, Any]) -> SpReConfig:
    if config is None:
        return SpReConfig(nm=nm, spre=spre, **options)
    if not isinstance(config, SpReConfig):
        raise TypeError(f"config must be a SpReConfig, found {type(config).__name__}")
    if options or tuple(nm) != (2, 4) or spre is not True:
        raise ValueError("pass either config=SpReConfig(...) or nm/spre/options, not both")
    return config


def prepare(
    model: nn.Module,
    nm: tuple[int, int] = (2, 4),
    *,
    spre: bool = True,
    config: SpReConfig | None = None,
    inplace: bool = False,
    concrete_args: dict[str, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Return `model` ready for N:M training, with SpRe branches on its k×k conv→BN pairs.

    options are the other fields of `SpReConfig` (include, skip, dense_stem, decay,
    silent_branch, prune_frozen, permute). `concrete_args` go to fx for the model's own forward
    (e.g. a mode flag). The input model is left untouched unless `inplace=True` (with
    `permute=True`, its channels are reordered too). `spre_fx.report(model)` says what was done
    to every layer and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects a torch.nn.Module, found {type(model).__name__}")
    config = _config(nm, spre, config, options)
    if is_prepared(model):
        raise ValueError("model is already prepared by spre_fx (prepare it once)")
    _check_model(model)
    if not inplace:
        model = model_copy(model)
    if config.permute:
        permute_for(model, config, concrete_args)
    plan = discover(model, config, concrete_args)
    modules = dict(model.named_modules())
    swapped = [(lp.name, lp.norm if lp.treatment == Treatment.SPRE else None)
               for lp in plan.layers if lp.treatment != Treatment.DENSE]
    refuse_added_forwards({n: modules[n] for pair in swapped for n in pair if n}, "spre_fx's N:M layer")
    aliases = module_aliases(model)
    for lp in plan.layers:
        if lp.treatment == Treatment.DENSE:
            continue
        layer = modules[lp.name]
        if lp.treatment == Treatment.SPRE:
            norm = modules[lp.norm]
            set_module(model, lp.name, SpReConv2d.adopt(layer, config.n, config.m, config.decay), aliases)
            set_module(
                model, lp.norm, SpReBatchNorm2d.adopt(norm, norm_spec(norm), config.silent_branch), aliases
            )
        else:
            cls = NM_CLASSES[next(b for b in NM_CLASSES if isinstance(layer, b))]
            set_module(model, lp.name, cls.adopt(layer, config.n, config.m, config.decay), aliases)
    attach_plan(model, plan)
    log.info(
        "spre_fx.prepare: %d spre, %d nm, %d dense layers%s; spre_fx.report(model) says why",
        plan.count(Treatment.SPRE), plan.count(Treatment.NM), plan.count(Treatment.DENSE),
        f", {len(plan.untraced)} modules traced through their children" if plan.untraced else "",
    )
    return model
