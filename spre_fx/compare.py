"""Comparing what two models compute: nested outputs as tensors, structure, relative error."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["flat_tensors", "mismatch", "relative_error"]


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


def mismatch(reference: Any, other: Any, path: str = "") -> str:
    """Where and how two nested outputs differ other than in float values ('' when they do not).

    Walks both in step: container types, lengths and keys, tensor shapes and dtypes, and the
    values of non-float tensors (labels, indices), e.g. "[0]['boxes']: shape (12, 4) vs (11, 4)".
    """
    where = path or "value"
    if isinstance(reference, Tensor) or isinstance(other, Tensor):
        if not (isinstance(reference, Tensor) and isinstance(other, Tensor)):
            return f"{where}: {type(reference).__name__} vs {type(other).__name__}"
        if reference.shape != other.shape:
            return f"{where}: shape {tuple(reference.shape)} vs {tuple(other.shape)}"
        if reference.dtype != other.dtype:
            return f"{where}: dtype {reference.dtype} vs {other.dtype}"
        if not reference.is_floating_point() and not torch.equal(reference, other.to(reference.device)):
            return f"{where}: {reference.dtype} values differ"
        return ""
    if isinstance(reference, Mapping) and isinstance(other, Mapping):
        if list(reference) != list(other):
            return f"{where}: keys {list(reference)} vs {list(other)}"
        pairs = [(f"{path}[{k!r}]", reference[k], other[k]) for k in reference]
    elif isinstance(reference, (list, tuple)) and isinstance(other, (list, tuple)):
        if type(reference) is not type(other) or len(reference) != len(other):
            return (f"{where}: {type(reference).__name__} of {len(reference)} vs "
                    f"{type(other).__name__} of {len(other)}")
        pairs = [(f"{path}[{i}]", a, b) for i, (a, b) in enumerate(zip(reference, other))]
    elif type(reference) is not type(other):
        return f"{where}: {type(reference).__name__} vs {type(other).__name__}"
    elif hasattr(reference, "__dict__") and not isinstance(reference, type):
        ra, rb = vars(reference), vars(other)
        if list(ra) != list(rb):
            return f"{where}: attributes {list(ra)} vs {list(rb)}"
        pairs = [(f"{path}.{k}", ra[k], rb[k]) for k in ra]
    else:
        return ""  # plain values (numbers, strings, None) hold no tensors to compare
    for sub, a, b in pairs:
        found = mismatch(a, b, sub)
        if found:
            return found
    return ""


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
