"""The one configuration object of spre_fx: what `prepare` does to which layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SpReConfig"]


def _as_patterns(name: str, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    patterns = tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must hold qualified-name patterns (str), found {p!r}")
    return patterns


@dataclass(frozen=True)
class SpReConfig:
    """Options of `spre_fx.prepare`, validated on construction.

    nm: keep N of every M consecutive weights along the input-channel axis (docs/method.md §1).
    spre: add the SpRe extra branch on k×k conv→BN pairs (False: plain N:M, the SR-STE baseline).
    include / skip: fnmatch patterns on qualified module names; `include=None` means every
        layer, `skip` wins over `include`.
    dense_stem: leave the network's first conv dense (docs/method.md §5).
    decay: λ of the SR-STE "sparse-refined" decay on pruned weights (docs/method.md §1).
    silent_branch: start every SpRe branch's BatchNorm at γ = 0, so that the prepared model
        starts as the N:M projection of the dense one. On by default: both studies of
        docs/results.md (from scratch and from a dense checkpoint) measured the silent start level
        with SR-STE and the paper's initialisation (False) below it (docs/method.md §6).
    permute: reorder channels before pruning so that N:M keeps more |w|, the same function
        (`permute_channels` on prepare's copy, for the layers this config chooses): for a
        pretrained model; a random initialisation gains little (docs/benchmarks.md).
    prune_frozen: also make N:M the weights that do not train (`requires_grad=False`: mmdet's
        `frozen_stages`, ultralytics' DFL bins). Off by default: nothing would train to recover
        what pruning them loses, so they stay dense; on, they get plain N:M without a SpRe
        branch (a deployment that wants every eligible layer 2:4).
    """

    nm: tuple[int, int] = (2, 4)
    spre: bool = True
    include: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()
    dense_stem: bool = True
    decay: float = 2e-4
    silent_branch: bool = True
    prune_frozen: bool = False
    permute: bool = False

    def __post_init__(self) -> None:
        nm = self.nm
        if (
            not isinstance(nm, (tuple, list))
            or len(nm) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
        ):
            raise ValueError(f"nm must be a pair of ints (N, M), found {nm!r}")
        n, m = nm
        if not 1 <= n < m:
            raise ValueError(f"nm=({n}, {m}) is invalid: need 1 <= N < M (e.g. (2, 4))")
        object.__setattr__(self, "nm", (n, m))
        object.__setattr__(self, "include", _as_patterns("include", self.include))
        object.__setattr__(self, "skip", _as_patterns("skip", self.skip) or ())
        if not isinstance(self.decay, (int, float)) or self.decay < 0:
            raise ValueError(f"decay must be a float >= 0, found {self.decay!r}")
        for flag in ("spre", "dense_stem", "silent_branch", "prune_frozen", "permute"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, found {getattr(self, flag)!r}")

    @property
    def n(self) -> int:
        return self.nm[0]

    @property
    def m(self) -> int:
        return self.nm[1]

    @property
    def sparsity(self) -> float:
        """The rate p = 1 - N/M that N:M and the unstructured reference share."""
        return 1.0 - self.n / self.m

    def replace(self, **changes) -> SpReConfig:
        return dataclasses.replace(self, **changes)
