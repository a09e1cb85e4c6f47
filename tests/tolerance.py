"""Tolerances of numeric tests from what a computation sums, not from the size of its result.

A floating-point sum of K products, in any order (blocked, pairwise, vectorised, with or without
FMA), errs by at most γ_K·Σ|a_i·b_i|, γ_K = K·u / (1 − K·u), u the unit roundoff (Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1). So the bound of each output
element is the same computation run on |x| and |w| (its *magnitude*: subtractions become
additions), times a multiple of u that depends on the length of the sums, never on the result.
A result that cancels to near zero (the case a relative tolerance `rtol · max|expected|` gets
wrong) keeps the bound of the terms that cancelled.

Two computations that should agree (the code under test and a reference written by hand) each
err by at most γ·magnitude, so they may differ by twice that, plus a few roundings per element
for the elementwise steps around the sums (a BatchNorm's subtract, divide, multiply, add; a fold's
products). `OPS` counts those; it is a stated constant, not a fudge factor fitted to a run.

The bound stays tight where it matters: a wrong fold, a missing tap or a wrong mask changes an
element by a whole term |w_i·x_i| ~ magnitude / K, orders of magnitude above (2K + OPS)·u·magnitude
for the layer sizes the tests draw (K up to a few thousand; float32 u = 6e-8). tests/test_layers.py
shows two such mutations failing.
"""

from __future__ import annotations

import torch
from torch import nn

OPS = 16  # roundings per element outside the sums, both sides together (BN, fold, bias, decay)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def sum_bound(dtype: torch.dtype, terms: int, ops: int = OPS) -> float:
    """The factor that multiplies a magnitude: two computations, each summing `terms` products
    (γ_terms ≤ 1.01·terms·u while terms·u ≤ 0.01), plus `ops` elementwise roundings."""
    u = unit_roundoff(dtype)
    if terms * u > 0.01:
        raise ValueError(f"{terms} terms in {dtype}: the first-order bound needs terms·u ≤ 0.01")
    return (2 * 1.01 * terms + ops) * u


def assert_within(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                  dtype: torch.dtype, terms: int, ops: int = OPS, what: str = "") -> None:
    """|actual − expected| ≤ sum_bound(dtype, terms, ops) · magnitude, element by element."""
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    magnitude = magnitude.detach().double().expand_as(expected)
    bound = sum_bound(dtype, terms, ops) * magnitude
    err = (actual - expected).abs()
    over = err > bound
    if over.any():
        i = int((err - bound).flatten().argmax())
        head = f"{what}: " if what else ""
        raise AssertionError(
            f"{head}{int(over.sum())} of {err.numel()} elements beyond the rounding bound: worst "
            f"|error| {err.flatten()[i]:.3g} against {bound.flatten()[i]:.3g} = "
            f"{sum_bound(dtype, terms, ops):.3g} × magnitude {magnitude.flatten()[i]:.3g} "
            f"({dtype}, {terms} terms per sum)")


def conv_terms(weight: torch.Tensor) -> int:
    """Products summed per output of a conv or linear with this weight: C_in/groups · prod(kernel)."""
    return weight[0].numel()


def _shape(y: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (y.dim() - 2)


def bn_eval_magnitude(a: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Magnitude of an eval-mode BN's output given the magnitude `a` of its input:
    (a + |μ|) / sqrt(σ² + ε) · |γ| + |β|."""
    s = _shape(a)
    out = (a + bn.running_mean.abs().view(s)) / torch.sqrt(bn.running_var.view(s) + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.abs().view(s) + bn.bias.abs().view(s)
    return out


def bn_train_magnitude(y: torch.Tensor, a: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Magnitude of a train-mode BN's output, to first order, given its input `y` and the input's
    magnitude `a`. With A the largest magnitude of the channel, the errors of y and of the batch
    mean are each within γ·A, the batch std's within 2γ·A, so the output's within
    γ·|g|/s · A · (2 + 2|z|) with z = (y − mean)/s: a near-constant channel (s ~ sqrt(ε)) amplifies
    its input's rounding, and the bound says by how much. The mean sums N·H·W terms: pass those to
    `terms` as well as the conv's."""
    dims = (0, *range(2, y.dim()))
    s = _shape(y)
    std = torch.sqrt(y.var(dims, unbiased=False, keepdim=True) + bn.eps)
    z = (y - y.mean(dims, keepdim=True)) / std
    big = a.amax(dims, keepdim=True)
    gain = bn.weight.abs().view(s) if bn.weight is not None else torch.ones_like(std)
    out = gain / std * big * (2 + 2 * z.abs()) + gain * z.abs()
    if bn.bias is not None:
        out = out + bn.bias.abs().view(s)
    return out


def positions(y: torch.Tensor) -> int:
    """Elements per channel of an [N, C, *spatial] (or [N, C]) tensor: the terms of a batch
    statistic or of a weight gradient's sum."""
    return y.numel() // y.shape[1]
