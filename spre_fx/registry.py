"""What fx must not enter, and how each kind of BatchNorm is split around the SpRe sum (or only folded).

Users and integrations extend both tables; the core never special-cases a model family.
Classes may be named by their qualified name (a string), so that the core knows about
timm or mmcv classes without importing them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "NormSpec",
    "register_leaf_module",
    "register_leaf_function",
    "register_norm",
    "is_leaf_class",
    "is_norm",
    "leaf_functions",
    "norm_spec",
    "scoped_registrations",
]

_LEAF_MODULES: set[str] = set()
_LEAF_FUNCTIONS: list[Callable] = []


def _qualname(cls: type | str) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_leaf_module(cls: type | str) -> type | str:
    """Mark a module class (or its qualified name) as opaque to fx: traced as one call.

    Use it for modules whose forward does not trace (data-dependent control flow). Convs and
    norms inside such a module still get N:M; they cannot be paired with a BatchNorm.
    Usable as a class decorator.
    """
    _LEAF_MODULES.add(_qualname(cls))
    return cls


def register_leaf_function(fn: Callable) -> Callable:
    """Mark a free function as opaque to fx (it appears as one call_function node).

    As with `torch.fx.wrap`, the forward must call it through a module-level name that does not
    start with an underscore (fx only patches such globals).
    """
    if fn not in _LEAF_FUNCTIONS:
        _LEAF_FUNCTIONS.append(fn)
    return fn


def is_leaf_class(cls: type) -> bool:
    return any(_qualname(c) in _LEAF_MODULES for c in cls.__mro__)


def leaf_functions() -> tuple[Callable, ...]:
    return tuple(_LEAF_FUNCTIONS)


@dataclass(frozen=True)
class NormSpec:
    """How a BatchNorm class splits into "normalise" and "what follows inside the module".

    post: applied to the *sum* of the two SpRe branches (e.g. timm's BatchNormAct2d runs its
        dropout and activation there), `post(module, y) -> y`.
    after_fold: what runs after the normalisation once it is folded into the conv (`convert`
        puts it inside the `FoldedBatchNorm` that replaces the module; an `nn.Identity`: nothing).
    frozen: the norm never trains (torchvision's FrozenBatchNorm2d): folded at convert, but its
        conv gets plain N:M, since SpRe's branch needs a BatchNorm that trains.
    """

    post: Callable[[nn.Module, Tensor], Tensor]
    after_fold: Callable[[nn.Module], nn.Module]
    frozen: bool = False


def _identity_post(module: nn.Module, y: Tensor) -> Tensor:
    return y


def _identity_after_fold(module: nn.Module) -> nn.Module:
    return nn.Identity()


def _act_post(module: nn.Module, y: Tensor) -> Tensor:
    return module.act(module.drop(y))


def _act_after_fold(module: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict(drop=module.drop, act=module.act))


_PLAIN = NormSpec(_identity_post, _identity_after_fold)
_NORMS: dict[str, NormSpec] = {
    # timm's norm+act layers: F.batch_norm, then self.drop, then self.act.
    "timm.layers.norm_act.BatchNormAct2d": NormSpec(_act_post, _act_after_fold),
    "timm.layers.norm_act.SyncBatchNormAct": NormSpec(_act_post, _act_after_fold),
    # How torchvision builds every pretrained detection backbone: fixed statistics and affine
    # buffers, `x * scale + shift`; no _BatchNorm subclass.
    "torchvision.ops.misc.FrozenBatchNorm2d": NormSpec(_identity_post, _identity_after_fold, frozen=True),
    # mmdet's `norm_cfg=dict(type='FrozenBN')`: the same state; its forward branches on
    # `x.requires_grad`, which fx cannot trace.
    "mmdet.models.layers.brick_wrappers.FrozenBatchNorm2d": NormSpec(
        _identity_post, _identity_after_fold, frozen=True),
}
# The stock forwards, whose semantics the train-time module reproduces.
_STOCK_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def register_norm(
    cls: type | str,
    *,
    post: Callable[[nn.Module, Tensor], Tensor] = _identity_post,
    after_fold: Callable[[nn.Module], nn.Module] = _identity_after_fold,
    frozen: bool = False,
) -> None:
    """Declare a norm class whose forward is `post(module, batch_norm(x))`.

    A class that is no `_BatchNorm` must hold BatchNorm's state under its names (`weight`,
    `bias`, `running_mean`, `running_var`, `eps`); `frozen=True` says it never trains, so its
    convs are folded but get no SpRe branch (torchvision's FrozenBatchNorm2d is built in).
    """
    _NORMS[_qualname(cls)] = NormSpec(post, after_fold, frozen)


def _registered(cls: type) -> NormSpec | None:
    for c in cls.__mro__:
        if _qualname(c) in _NORMS:
            return _NORMS[_qualname(c)]
    return None


def is_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm fx keeps whole: any `_BatchNorm`, or a registered norm class."""
    return isinstance(module, _BatchNorm) or _registered(type(module)) is not None


def norm_spec(module: nn.Module) -> NormSpec | None:
    """The split of `module`, or None when it is no norm spre_fx can pair with a conv."""
    spec = _registered(type(module))
    if spec is not None or not isinstance(module, _BatchNorm):
        return spec
    return _PLAIN if type(module).forward in _STOCK_FORWARDS else None


@contextmanager
def scoped_registrations() -> Iterator[None]:
    """Undo, on leaving the block, every registration made inside it (leaf modules, leaf
    functions, norms): tests and notebooks register without leaking into what runs next.

        with spre_fx.registry.scoped_registrations():
            spre_fx.register_leaf_module(MyBlock)
            prepared = spre_fx.prepare(model)
    """
    leaf_modules, leaf_functions, norms = set(_LEAF_MODULES), list(_LEAF_FUNCTIONS), dict(_NORMS)
    try:
        yield
    finally:
        _LEAF_MODULES.clear()
        _LEAF_MODULES.update(leaf_modules)
        _LEAF_FUNCTIONS[:] = leaf_functions
        _NORMS.clear()
        _NORMS.update(norms)
