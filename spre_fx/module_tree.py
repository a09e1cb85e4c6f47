"""The module tree: names, swaps, copies, adoption and train/eval modes of a model's modules.

Every stage that changes or runs a model goes through these: `set_module` replaces a module at
all of its names, `adopt` builds a module of another class on the same state, `model_copy`
copies what `copy.deepcopy` cannot, `modes_restored` undoes train/eval switches.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
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
    "forwards_reaching",
    "modes_restored",
    "adopt",
    "added_forward",
    "refuse_added_forwards",
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
    An instance `forward` that would still run the original model (a closure over its bound
    forward) raises ValueError; bound methods and partials are rebound to the copy by deepcopy.
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
    copied = copy.deepcopy(model, memo)
    _check_own_forwards(model, copied)
    return copied


_ATOMS = (type, types.ModuleType, types.CodeType, str, bytes, int, float, complex, bool, type(None))


def _global_names(code: types.CodeType) -> set[str]:
    """The names `code` (and the functions defined in it) may read from its globals."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _references(obj: Any) -> list[Any]:
    """What calling `obj` may reach: a bound method's object and function, a function's closure,
    defaults, attributes (functools.wraps' `__wrapped__`) and the globals its code reads, a
    partial's function and arguments, a container's items, an object's attributes."""
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                pass
        read = [obj.__globals__[n] for n in _global_names(obj.__code__) if n in obj.__globals__]
        return [*cells, *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values(),
                *vars(obj).values(), *read]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, types.BuiltinMethodType):  # a C method bound to an object (dict.get)
        return [obj.__self__]
    try:
        return list(vars(obj).values())
    except TypeError:  # no __dict__ (slots, C objects): nothing a wrapper keeps there
        return []


def _reached(start: Any, originals: dict[int, str]) -> str | None:
    """The first of `originals` (modules and tensors, by id) that calling `start` may reach."""
    stack, seen = [start], set()
    while stack:
        obj = stack.pop()
        if id(obj) in originals:
            return originals[id(obj)]
        if id(obj) in seen or isinstance(obj, (nn.Module, torch.Tensor, *_ATOMS)):
            continue
        seen.add(id(obj))
        stack.extend(_references(obj))
    return None


def _described(forward: Any) -> str:
    """A forward wrapper as an error names it: `'TinyNet.forward' (function)`."""
    return f"{getattr(forward, '__qualname__', '?')!r} ({type(forward).__name__})"


def forwards_reaching(model: nn.Module, other: nn.Module) -> dict[str, str]:
    """The modules of `model` whose instance attribute `forward` may call into `other`: name
    (`""` for `model` itself) -> which module or tensor of `other` it reaches, e.g. "module 'head'"."""
    wrapped = {name: vars(m)["forward"] for name, m in model.named_modules() if "forward" in vars(m)}
    if not wrapped:
        return {}
    targets = {id(m): f"module '{n}'" if n else "the model itself" for n, m in other.named_modules()}
    targets |= {id(t): f"tensor '{n}'" for n, t in (*other.named_parameters(), *other.named_buffers())}
    found = {name: _reached(forward, targets) for name, forward in wrapped.items()}
    return {name: target for name, target in found.items() if target is not None}


def _check_own_forwards(model: nn.Module, copied: nn.Module) -> None:
    """Refuse a copy whose modules' instance `forward` still runs `model`.

    `copy.deepcopy` rebinds a bound method (and a partial over the module) to the copy, but keeps
    a function as it is: a wrapper closing over the original's bound forward (accelerate's
    `convert_outputs_to_fp32` over a plain function, `torch.compile(model.forward)`, a
    `functools.wraps` closure) would make the copy compute with the original's modules.
    """
    problems = []
    for name, target in forwards_reaching(copied, model).items():
        where = f"module {name!r}" if name else "the model"
        what = _described(vars(copied.get_submodule(name))["forward"])
        problems.append(f"{where}: forward {what} reaches the original model ({target})")
    if problems:
        raise ValueError(
            "cannot copy the model: an instance attribute `forward` (a wrapper set on the object, not "
            "its class's method) would make the copy run the original model instead of itself:\n  "
            + "\n  ".join(problems)
            + "\nSet the wrapper aside while spre_fx copies the model and put it on the result if it "
            "is wanted there (`wrapper = module.__dict__.pop('forward')`; accelerate: "
            "`accelerator.unwrap_model(model, keep_fp32_wrapper=False)`), or install it as a bound "
            "method (`types.MethodType(function, module)`), which a copy rebinds to itself")


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
    `__init__` runs): the user's state, seen through another class's methods.

    An instance attribute `forward` would hide `cls.forward` (and stay bound to `module`): it is
    dropped when it is only the module's own class forward bound to it, refused otherwise."""
    refuse_added_forwards({f"a {class_name(type(module))} layer ({module!r})": module}, cls.__name__)
    new = cls.__new__(cls)
    state = {k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()}
    state.pop("forward", None)
    new.__dict__.update(state)
    return new


def added_forward(module: nn.Module) -> Any | None:
    """`module`'s instance attribute `forward` when it adds something to the class's forward; None
    when there is none or it is only that forward bound to the module
    (`module.forward = types.MethodType(type(module).forward, module)`)."""
    forward = vars(module).get("forward")
    own = getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(
        module).forward
    return None if own else forward


def refuse_added_forwards(modules: dict[str, nn.Module], new_class: str) -> None:
    """ValueError naming every module (name -> module) whose `added_forward` would run instead of
    the forward of `new_class`, the class spre_fx is about to give it."""
    found = {name: f for name, m in modules.items() if (f := added_forward(m)) is not None}
    if found:
        raise ValueError(
            f"an instance attribute forward would run instead of {new_class}.forward (the class spre_fx "
            "gives these layers), so their N:M masks would not apply:\n  "
            + "\n  ".join(f"{name}: forward {_described(f)}" for name, f in found.items())
            + "\nRemove it before spre_fx swaps the layer (`del layer.forward`; accelerate's device-map "
            "hooks: `accelerate.hooks.remove_hook_from_module(layer)`), or leave the layer dense (skip=...)")


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
