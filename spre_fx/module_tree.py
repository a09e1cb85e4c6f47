"""The module tree: names, swaps, copies, adoption and train/eval modes of a model's modules.

Every stage that changes or runs a model goes through these: `set_module` replaces a module at
all of its names, `adopt` builds a module of another class on the same state, `model_copy`
copies what `copy.deepcopy` cannot, `modes_restored` undoes train/eval switches.
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "module_aliases",
    "set_module",
    "model_copy",
    "modes_restored",
    "adopt",
    "unwrap_model",
    "class_name",
]

M = TypeVar("M", bound=nn.Module)


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


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may switch train/eval; every module's own flag is restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def adopt(cls: type[M], module: nn.Module) -> M:
    """A `cls` instance sharing `module`'s attributes, parameters, buffers and children (no
    `__init__` runs): the user's state, seen through another class's methods."""
    new = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    new.__dict__.update(state)
    return new


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside wrappers that hold it as `.module` (DistributedDataParallel, DataParallel,
    mmengine's model wrappers, EMA-style wrappers)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def class_name(cls: type) -> str:
    """The shortest public path of a class: `timm.layers.Linear`, `torch.nn.Conv2d`."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        if getattr(sys.modules.get(".".join(parts[:i])), cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"
