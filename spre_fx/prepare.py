"""The rewrite pass: swap the modules the user's forward already calls for their train-time form.

No forward is regenerated: the model keeps its class, its methods and its Python control flow
(`self.training` branches stay live), and every original parameter and buffer keeps its name.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from .config import SpReConfig
from .modules import NM_CLASSES, SpReBatchNorm2d, SpReConv2d
from .patterns import DENSE, SPRE, Plan, discover
from .registry import norm_spec

__all__ = ["prepare", "plan_of"]

log = logging.getLogger("spre_fx")
_STATE = "_spre_fx_plan"


def plan_of(model: nn.Module, *, stage: str | None = None) -> Plan:
    """The plan `prepare` attached to `model`; ValueError when it was never prepared."""
    plan = getattr(model, _STATE, None)
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{type(model).__name__} was not prepared by spre_fx: call spre_fx.prepare(model) first"
        )
    if stage is not None and plan.stage != stage:
        raise ValueError(f"expected a {stage} model, found a {plan.stage} one")
    return plan


def attach_plan(model: nn.Module, plan: Plan) -> None:
    object.__setattr__(model, _STATE, plan)  # a plain attribute: not a parameter, buffer or child


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name each module object is registered under, keyed by `id(module)`."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, mod in model.named_modules(remove_duplicate=False):
        aliases[id(mod)].append(name)
    return aliases


def set_module(model: nn.Module, name: str, new: nn.Module, aliases: dict | None = None) -> None:
    """Put `new` at `name`, and at every other name the replaced module object is known by.

    Pass `aliases` (from `module_aliases`, kept up to date here) when swapping many modules.
    """
    aliases = module_aliases(model) if aliases is None else aliases
    old = model.get_submodule(name)
    names = aliases.pop(id(old), [name])
    for alias in names:
        parent, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    aliases[id(new)] = names


def _with_history(obj: Any, found: dict[int, torch.Tensor], seen: set[int]) -> None:
    """Collect the tensors with autograd history held in `obj` (containers, plain objects)."""
    if isinstance(obj, torch.Tensor):
        if obj.grad_fn is not None:
            found[id(obj)] = obj
        return
    if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, bool)) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        values = obj
    else:
        values = getattr(obj, "__dict__", {}).values()
    for v in values:
        _with_history(v, found, seen)


def model_copy(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """`copy.deepcopy(model, memo)` that also copies what a training forward left behind.

    Tensors with autograd history in plain attributes (a cache of the last forward, e.g.
    torchvision RAFT's correlation pyramid) make `copy.deepcopy` fail ("Only Tensors created
    explicitly by the user support the deepcopy protocol"); the copy holds them detached.
    """
    memo = {} if memo is None else memo
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    for mod in model.modules():
        for key, value in vars(mod).items():
            if key not in ("_parameters", "_modules"):
                _with_history(value, found, seen)
    for key, t in found.items():
        memo.setdefault(key, t.detach().clone())
    return copy.deepcopy(model, memo)


def _check_finite(model: nn.Module) -> None:
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_floating_point() and not isinstance(t, nn.parameter.UninitializedParameter)]
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
    silent_branch). `concrete_args` go to fx for the model's own forward (e.g. a mode flag).
    The input model is left untouched unless `inplace=True`. `spre_fx.report(model)` says what
    was done to every layer and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects a torch.nn.Module, found {type(model).__name__}")
    config = _config(nm, spre, config, options)
    if isinstance(getattr(model, _STATE, None), Plan):
        raise ValueError("model is already prepared by spre_fx (prepare it once)")
    _check_finite(model)
    if not inplace:
        model = model_copy(model)
    plan = discover(model, config, concrete_args)
    modules = dict(model.named_modules())
    aliases = module_aliases(model)
    for lp in plan.layers:
        if lp.treatment == DENSE:
            continue
        layer = modules[lp.name]
        if lp.treatment == SPRE:
            norm = modules[lp.norm]
            set_module(model, lp.name, SpReConv2d.adopt(layer, config.n, config.m, config.decay), aliases)
            set_module(
                model, lp.norm, SpReBatchNorm2d.adopt(norm, norm_spec(norm), config.silent_branch), aliases
            )
        else:
            cls = NM_CLASSES[next(b for b in NM_CLASSES if isinstance(layer, b))]
            set_module(model, lp.name, cls.adopt(layer, config.n, config.m, config.decay), aliases)
    attach_plan(model, plan)
    counts = Counter(lp.treatment for lp in plan.layers)
    log.info(
        "spre_fx.prepare: %d spre, %d nm, %d dense layers%s; spre_fx.report(model) says why",
        counts["spre"], counts["nm"], counts["dense"],
        f", {len(plan.untraced)} modules traced through their children" if plan.untraced else "",
    )
    return model
