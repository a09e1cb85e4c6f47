"""Paired statistics over seeds for the examples: mean ± std, and paired differences with a 95 %
confidence interval from the t distribution (no scipy: a table of its 0.975 quantiles); the
summaries the studies store of them, and the digests that check runs are paired."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# Student t, 0.975 quantile, degrees of freedom 1-30 (standard tables, 4 decimals).
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom (2 seeds), found {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    # Cornish-Fisher expansion around the normal quantile: within 1e-4 of the exact value at df > 30.
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Interval:
    """Mean of n values with its 95 % t interval (sd: their standard deviation)."""

    mean: float
    low: float
    high: float
    sd: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        return (f"{scale * self.mean:+.{digits}f} [{scale * self.low:+.{digits}f}, "
                f"{scale * self.high:+.{digits}f}]")


def mean_interval(values: list[float]) -> Interval:
    """Mean ± t(0.975, n−1)·sd/√n."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    sd = statistics.stdev(values)
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """a − b over the seeds both have, paired by seed."""
    seeds = sorted(set(a) & set(b))
    return mean_interval([a[s] - b[s] for s in seeds])


def by_seed(records: Iterable[Mapping], dataset: str, label: str) -> dict[int, float]:
    """Test accuracy by seed of the runs of one dataset and label (a method at an N:M)."""
    return {r["seed"]: r["test_acc"] for r in records if r["dataset"] == dataset and r["label"] == label}


def mean_summary(values: Mapping[int, float]) -> dict:
    """The stored summary of values over seeds: mean, sd, ci95 (95 % t interval), n."""
    iv = mean_interval(list(values.values()))
    return {"mean": iv.mean, "sd": iv.sd, "ci95": [iv.low, iv.high], "n": iv.n}


def difference_summary(a: Mapping[int, float], b: Mapping[int, float]) -> dict | None:
    """The stored summary of a − b paired by seed (mean, ci95, n, significant); None when they
    share fewer than 2 seeds (no interval)."""
    if len(set(a) & set(b)) < 2:
        return None
    d = paired_difference(a, b)
    return {"mean": d.mean, "ci95": [d.low, d.high], "n": d.n, "significant": d.significant}


def share_closed(unstructured: Mapping[int, float], srste: Mapping[int, float],
                 spre: Mapping[int, float]) -> float | None:
    """mean(SpRe − SR-STE) / mean(unstructured − SR-STE), when that gap is significantly > 0."""
    gap = paired_difference(unstructured, srste)
    if not (gap.significant and gap.mean > 0):
        return None
    return paired_difference(spre, srste).mean / gap.mean


def pairing_check(records: list[Mapping], keys: tuple[str, ...]) -> dict:
    """Runs of one (dataset, seed) must agree on every digest in `keys` they record (the weights they
    start from, the RNG, the batch order): the mismatches found, by group."""
    bad = []
    groups: dict[tuple[str, int], list[Mapping]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["seed"]), []).append(r)
    for (ds, seed), rs in groups.items():
        for key in keys:
            if len({r[key] for r in rs if r.get(key) is not None}) > 1:
                bad.append(f"{ds} seed {seed}: {key} differs")
    return {"groups": len(groups), "mismatches": bad}


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A short digest of tensors' bytes: runs that must share weights, RNG state or batches are
    checked by it (`pairing_check`)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fmt_difference(d: Mapping | None) -> str:
    """A paired difference (a summary dict: mean, ci95) in points: `+x [lo, hi]`, `*` when it excludes 0."""
    if not d:
        return "-"
    lo, hi = d["ci95"]
    mark = " *" if d.get("significant") else ""
    return f"{100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{mark}"


def fmt_mean_sd(d: Mapping | None) -> str:
    """An accuracy summary dict (mean, sd, n) in percent: `mean ± sd`."""
    return "-" if not d else f"{100 * d['mean']:.2f} ± {100 * (d['sd'] if d['n'] > 1 else 0):.2f}"


def mean_std(values: list[float], scale: float = 100.0) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.2f} ± {scale * sd:.2f}"
