"""`convert`: the collapse, then the deploy backend, as one call."""

from __future__ import annotations

from torch import nn

from .collapse import collapsed
from .deploy.backend import apply_backend, check_backend
from .plan import plan_of

__all__ = ["convert"]


def convert(model: nn.Module, *, inplace: bool = False, backend: str = "dense") -> nn.Module:
    """Return the deployable form of a prepared model.

    Every SpRe pair becomes one conv with bias (docs/method.md §4), every conv→BN pair found by
    `prepare` (dense ones too) is folded, and masks are baked into the weights: the result holds
    the user's own conv / linear classes only, each N:M layer exactly N:M along [O, kh, kw, C],
    and equals the prepared model in eval mode.

    backend="semi_structured" (CUDA, compute capability >= 8.0; model on the GPU, fp16/bf16)
    then runs every eligible Linear and groups=1 Conv2d on torch's 2:4 sparse kernels
    (`spre_fx.to_semi_structured`); `spre_fx.report(model)` says why any layer stayed dense.
    Without CUDA it raises RuntimeError before anything changes. docs/deploy.md.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, found {type(model).__name__}")
    plan_of(model, stage="prepared")
    check_backend(backend, model)
    return apply_backend(collapsed(model, inplace=inplace), backend)
