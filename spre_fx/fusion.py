"""BatchNorm folding and the SpRe collapse as pure tensor math (docs/method.md §4).

No modules, no state: `fold_bn` and `merge_spre` take weights and `BNStats` and return the
folded weight and bias, the way `torch.nn.utils.fusion` stands apart from the modules it serves.
BatchNorm scale and shift are computed in float64, weight products in the weight's dtype (at
least float32), so a fold costs one rounding per product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["BNStats", "fold_bn", "merge_spre"]


class BNStats(NamedTuple):
    """What a BatchNorm contributes to a fold; `weight`/`bias` are None when not affine."""

    mean: Tensor
    var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def of(cls, bn: nn.Module) -> BNStats:
        """Read from a `_BatchNorm`, or any norm holding the same state under the same names
        (torchvision's FrozenBatchNorm2d: buffers `weight`, `bias`, `running_*`, and `eps`)."""
        if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError("a BatchNorm without running statistics cannot be folded")
        return cls(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(t, β − μ·t) in float64, with t = γ / sqrt(σ² + ε)."""
        var = self.var.detach().double()
        t = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            t = t * self.weight.detach().double()
        shift = -self.mean.detach().double() * t
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return t, shift


def _per_out(t: Tensor, weight: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (weight.dim() - 1)))


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is folded in float32 (one rounding per product)."""
    return torch.promote_types(weight.dtype, torch.float32)


def fold_bn(weight: Tensor, bias: Tensor | None, bn: BNStats) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it: `BN(conv(x, W) + b) = conv(x, W') + b'`."""
    dtype = _compute_dtype(weight)
    t, shift = bn.scale_shift()
    w = weight.detach().to(dtype) * _per_out(t.to(dtype), weight)
    b = shift if bias is None else shift + t * bias.detach().double()
    return w.to(weight.dtype), b.to(weight.dtype)


def merge_spre(
    weight: Tensor,
    bias: Tensor | None,
    weight_rep: Tensor,
    nm: Tensor,
    spatial: Tensor,
    bn: BNStats,
    bn_rep: BNStats,
) -> tuple[Tensor, Tensor]:
    """Collapse the two SpRe branches and their BatchNorms into one N:M conv (docs/method.md §4).

    W' = (t_main·W + t_rep·(W_r ⊙ S)) ⊙ M_nm,  b' = shift_main + shift_rep (+ t_main·bias).
    supp(W') ⊆ supp(M_nm): the result is N:M without any projection.
    """
    dtype = _compute_dtype(weight)
    t, shift = bn.scale_shift()
    t_rep, shift_rep = bn_rep.scale_shift()
    w = _per_out(t.to(dtype), weight) * weight.detach().to(dtype)
    w += _per_out(t_rep.to(dtype), weight) * (weight_rep.detach().to(dtype) * spatial)
    w *= nm
    b = shift + shift_rep
    if bias is not None:
        b = b + t * bias.detach().double()
    return w.to(weight.dtype), b.to(weight.dtype)
