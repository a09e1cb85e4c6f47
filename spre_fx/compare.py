"""Comparing what two models compute: nested outputs as tensors, relative error, mode safety."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flat_tensors", "relative_error", "modes_restored"]


def flat_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested output (tensors, sequences, mappings, plain objects)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from flat_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from flat_tensors(v)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from flat_tensors(v)


def relative_error(reference: Any, other: Any) -> float:
    """max |reference − other| / max |reference|, worst over all tensors; inf on a mismatch."""
    ta, tb = list(flat_tensors(reference)), list(flat_tensors(other))
    if len(ta) != len(tb):
        return float("inf")
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        if x.numel():
            x, y = x.detach().double(), y.detach().double().to(x.device)
            err = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
            if err != err:  # NaN anywhere: max() would silently drop it
                return float("inf")
            worst = max(worst, err)
    return worst


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that may switch train/eval; every module's own flag is restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
