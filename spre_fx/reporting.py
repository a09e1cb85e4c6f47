"""What was done to each layer and why: `report` and its table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .deploy.advisor import FlopEstimate, KernelAdvice, advise
from .deploy.im2col import dense_weight
from .inputs import check_input_size, describe, example_call, inputs_fit
from .masks import magnitude_mask, mask_kernels, nm_violations, spatial_sparsity
from .permutation import Permutation, permutation_of
from .plan import LayerPlan, Treatment, plan_of

__all__ = ["LayerReport", "Report", "report"]


@dataclass(frozen=True)
class LayerReport:
    """One layer: treatment and why, shape, N:M coverage and spatial sparsity profile.

    nm_coverage: share of M-groups (along [O, *kernel, C]) holding at most N non-zeros, None
        when C is not a multiple of M. sparsity: share of zero weights.
    spatial_sparsity: s(h, w) of the layer's effective weight (convs only).
    unstructured_spatial_sparsity: s_U(h, w) of layer-wise magnitude pruning at 1 - N/M, the
        reference SpRe follows (docs/method.md §2); spatial_mask: the SpRe taps S (spre layers).
    kernel: whether the 2:4 sparse-kernel path applies and why not (`spre_fx.KernelAdvice`).
    """

    name: str
    treatment: Treatment
    reason: str
    norm: str | None
    shape: tuple[int, ...]
    nm_coverage: float | None
    sparsity: float
    spatial_sparsity: list | None
    unstructured_spatial_sparsity: list | None
    spatial_mask: list | None
    kernel: KernelAdvice | None = None


@dataclass(frozen=True)
class Report:
    """flops: conv/linear MACs and the share that can run on 2:4 kernels, when report() was
    given an example input (None otherwise). mask_kernels: what computes the per-step CPU mask
    updates of a prepared model ('native' C kernels, or 'torch (<why not>)'). permutation: what
    `permute_channels` did before prepare, per channel group (None when it was not called)."""

    nm: tuple[int, int]
    stage: str
    layers: tuple[LayerReport, ...]
    untraced: tuple[tuple[str, str], ...]
    flops: FlopEstimate | None = None
    mask_kernels: str | None = None
    permutation: Permutation | None = None

    def count(self, treatment: Treatment | str) -> int:
        return sum(lr.treatment == treatment for lr in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        n, m = self.nm
        rows = [("layer", "treatment", "shape", f"{n}:{m} groups", "zeros", "s(h,w) min-max", "2:4 kernel",
                 "why")]
        for lr in self.layers:
            prof = "-"
            if lr.spatial_sparsity is not None:
                flat = torch.tensor(lr.spatial_sparsity).flatten()
                prof = f"{flat.min():.2f}-{flat.max():.2f}"
            dense = lr.nm_coverage is None or lr.treatment == Treatment.DENSE
            cov = "-" if dense else f"{lr.nm_coverage:.1%}"
            shape = "x".join(map(str, lr.shape))
            kernel = "-" if lr.kernel is None else _kernel_cell(lr.kernel)
            rows.append((lr.name, lr.treatment, shape, cov, f"{lr.sparsity:.1%}", prof, kernel, lr.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"{self.stage} model, {n}:{m}: {self.count(Treatment.SPRE)} spre, {self.count(Treatment.NM)} nm, "
            f"{self.count(Treatment.DENSE)} dense layers"
        )
        if self.mask_kernels is not None:
            lines.append(f"CPU mask updates: {self.mask_kernels}")
        for mod, err in self.untraced:
            lines.append(f"fx could not trace '{mod}' ({err}); its children were traced instead")
        lines += _kernel_footer(self)
        if self.permutation is not None:
            lines.append(str(self.permutation))
        return "\n".join(lines)


def _kernel_cell(k: KernelAdvice) -> str:
    if k.code == "packed":
        return f"runs ({k.backends[0]})"
    return "yes" if k.applies else f"no: {k.code}"


def _kernel_footer(rep: Report) -> list[str]:
    """One line per reason the 2:4 kernel path does not apply, then the FLOP share."""
    first: dict[str, tuple[str, int]] = {}
    for lr in rep.layers:
        k = lr.kernel
        if k is not None and not k.applies and k.code != "dense":
            reason, count = first.get(k.code, (f"{lr.name}: {k.reason}", 0))
            first[k.code] = (reason, count + 1)
    lines = [f"no 2:4 kernel for {count} layer(s) [{code}], e.g. {reason}"
             for code, (reason, count) in first.items()]
    if rep.flops is not None:
        lines.append(str(rep.flops))
    elif any(lr.kernel is not None for lr in rep.layers):
        lines.append("share of FLOPs on 2:4 kernels: pass example_inputs or input_size to report()")
    return lines


def _layer_report(lp: LayerPlan, module: nn.Module, n: int, m: int,
                  kernel: KernelAdvice | None = None) -> LayerReport:
    w = dense_weight(module)
    cov = None
    if w.dim() >= 2 and w.numel() and w.shape[1] % m == 0:
        groups = w.numel() // m
        cov = 1.0 - nm_violations(w, n, m) / groups
    spatial = unstructured = smask = None
    if w.dim() > 2:
        spatial = spatial_sparsity(w != 0).tolist()
    if lp.treatment == Treatment.SPRE and hasattr(module, "spatial_mask"):
        unstructured = spatial_sparsity(magnitude_mask(module.weight, 1.0 - n / m)).tolist()
        smask = module.current_masks()["spatial_mask"].tolist()  # what the layer computes with now
    return LayerReport(
        lp.name, lp.treatment, lp.reason, lp.norm, tuple(w.shape), cov,
        float((w == 0).float().mean()), spatial, unstructured, smask, kernel,
    )


def _given(example_inputs: Any, example_kwargs: Any, input_size: Any) -> str:
    """What report runs the model on, for messages; a wrong container or input_size refused."""
    if input_size is not None:
        check_input_size(input_size, "report")
        return f"input_size={tuple(input_size)}"
    if example_inputs is None:
        return "none"
    return describe(*example_call(example_inputs, example_kwargs, "report"))


def report(
    model: nn.Module,
    example_inputs: Tensor | tuple | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    input_size: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> Report:
    """Per-layer treatment, reason, shape, N:M coverage, spatial sparsity and 2:4-kernel advice
    of a prepared or converted model; `print(report(model))` shows a table.

    Given `example_inputs` (and `example_kwargs`), or `input_size` for a zero input of the
    model's dtype, one eval-mode forward records each layer's MACs: the size rule of the advice
    then uses them, and `Report.flops` estimates the share of conv/linear FLOPs that can run on
    2:4 kernels. `dtype` judges the kernels as if the model were cast to it (e.g. torch.float16
    for a float32 model). Rules and thresholds: spre_fx/deploy/advisor.py, docs/deploy.md.
    """
    plan = plan_of(model)
    modules = dict(model.named_modules())
    n, m = plan.config.nm
    given = _given(example_inputs, example_kwargs, input_size)
    with inputs_fit(model, given, "report", batched=input_size is not None):
        advice = advise(model, example_inputs, example_kwargs=example_kwargs, input_size=input_size,
                        dtype=dtype)
    with torch.no_grad():
        layers = tuple(
            _layer_report(lp, modules[lp.name], n, m, advice.layers[lp.name]) for lp in plan.layers
        )
    kernels = mask_kernels() if plan.stage == "prepared" else None
    return Report(plan.config.nm, plan.stage, layers, plan.untraced, advice.flops, kernels,
                  permutation_of(model))
