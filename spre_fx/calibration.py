"""BatchNorm recalibration: running statistics re-estimated under the model's current masks.

While N:M (and SpRe spatial) masks move at every step, each BatchNorm's running statistics are
an exponential average over activations of many different masks, lagging the final ones; the
eval-mode model (and the BN folding of `convert`) then normalises with stale statistics. One
pass over training data with the masks held fixed gives the statistics of the final network.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

__all__ = ["recalibrate_bn"]

_EMPTY = object()


def default_forward(model: nn.Module, batch: Any) -> Any:
    """A tensor is the input; a list/tuple is `(inputs, targets, ...)` as `update_bn` reads it
    (its first element is the input); a mapping holds keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


class _Norms(nn.Module):
    """What `update_bn` sees: the chosen BatchNorms as its only modules, so it resets, averages
    and restores exactly those; `train()` reaches them alone (the rest of the model stays in
    eval: masks hold, dropout is off, a detector's forward does not ask for targets)."""

    def __init__(self, model: nn.Module, norms: list[_BatchNorm], forward: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.norms = nn.ModuleList(norms)
        self._call = lambda batch: forward(model, batch)  # the model itself is no child

    def train(self, mode: bool = True) -> _Norms:
        self.training = mode
        for bn in self.norms:
            bn.train(mode)
        return self

    def forward(self, batch: Any) -> Any:
        return self._call(batch)


def _norms_in_training(model: nn.Module, include_frozen: bool) -> list[tuple[str, _BatchNorm]]:
    """BatchNorms with running statistics; unless `include_frozen`, only those the model's own
    `train()` puts in training mode (not mmdet's `norm_eval` or `frozen_stages` ones)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        return [(name, m) for name, m in model.named_modules()
                if isinstance(m, _BatchNorm) and m.track_running_stats and (include_frozen or m.training)]
    finally:
        for m, mode in modes.items():
            m.training = mode


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    num_batches: int | None = None,
    include_frozen: bool = False,
) -> list[str]:
    """Re-estimate the running mean and variance of every BatchNorm of `model` (both SpRe
    branches included) from `batches`, under the masks in force (held ones, or those of the current weights).

    `torch.optim.swa_utils.update_bn` does the averaging: statistics are reset, then the
    equal-weight mean over batches of each batch's mean and (unbiased) variance replaces them;
    momenta are restored. Unlike `update_bn`, only the BatchNorms run in training mode: every
    other module stays in eval, so no mask moves (with or without a `MaskScheduler`), weights
    are untouched, dropout is off and `self.training` branches take their eval path. Every
    module's mode is restored afterwards.

    batches: an iterable of inputs (a DataLoader of `(x, y)` works); `forward(model, batch)`
        runs one (default: a tensor is the input, a list/tuple's first element is, a mapping
        holds keyword arguments). mmdet dataloader batches:
        `forward=lambda m, b: m(**m.data_preprocessor(b, False), mode="tensor")`.
    num_batches: read at most this many batches.
    include_frozen: also re-estimate the BatchNorms the model's own `train()` keeps in eval
        (mmdet `norm_eval=True`, `frozen_stages`). Off by default: the weights were trained
        against those BNs' fixed statistics, so re-estimating them changes the trained function.

    Returns the names of the BatchNorms re-estimated. Raises ValueError when `batches` is empty
    (before any statistic changes).
    """
    forward = forward or default_forward
    chosen = _norms_in_training(model, include_frozen)
    if not chosen:
        return []
    batches = iter(batches if num_batches is None else itertools.islice(batches, num_batches))
    first = next(batches, _EMPTY)
    if first is _EMPTY:
        raise ValueError("recalibrate_bn got no batches: running statistics left as they were")
    modes = {m: m.training for m in model.modules()}
    wrapper = _Norms(model, [bn for _, bn in chosen], forward)
    try:
        model.eval()
        with torch.no_grad():
            # update_bn feeds `input[0]` of a list/tuple batch: wrap each batch whole.
            update_bn(((b,) for b in itertools.chain([first], batches)), wrapper)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return [name for name, _ in chosen]

