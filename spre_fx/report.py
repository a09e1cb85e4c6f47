"""What was done to each layer, and a check that a converted model equals its prepared form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _native
from .compare import flat_tensors, mismatch, modes_restored, relative_error
from .export import FlopEstimate, KernelAdvice, advise, dense_weight
from .masks import magnitude_mask, nm_violations, spatial_sparsity
from .patterns import DENSE, SPRE
from .prepare import plan_of

__all__ = ["LayerReport", "Report", "report", "verify", "VerifyResult", "VerificationError"]


@dataclass(frozen=True)
class LayerReport:
    """One layer: treatment and why, shape, N:M coverage and spatial sparsity profile.

    nm_coverage: share of M-groups (along [O, *kernel, C]) holding at most N non-zeros, None
        when C is not a multiple of M. sparsity: share of zero weights.
    spatial_sparsity: s(h, w) of the layer's effective weight (convs only).
    unstructured_spatial_sparsity: s_U(h, w) of layer-wise magnitude pruning at 1 - N/M, the
        reference SpRe follows (docs/method.md §2); spatial_mask: the SpRe taps S (spre layers).
    kernel: whether the 2:4 sparse-kernel path applies and why not (spre_fx.export.KernelAdvice).
    """

    name: str
    treatment: str
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
    updates of a prepared model ('native' C kernels, or 'torch (<why not>)')."""

    nm: tuple[int, int]
    stage: str
    layers: tuple[LayerReport, ...]
    untraced: tuple[tuple[str, str], ...]
    flops: FlopEstimate | None = None
    mask_kernels: str | None = None

    def count(self, treatment: str) -> int:
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
            cov = "-" if lr.nm_coverage is None or lr.treatment == DENSE else f"{lr.nm_coverage:.1%}"
            shape = "x".join(map(str, lr.shape))
            kernel = "-" if lr.kernel is None else _kernel_cell(lr.kernel)
            rows.append((lr.name, lr.treatment, shape, cov, f"{lr.sparsity:.1%}", prof, kernel, lr.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"{self.stage} model, {n}:{m}: {self.count('spre')} spre, {self.count('nm')} nm, "
            f"{self.count('dense')} dense layers"
        )
        if self.mask_kernels is not None:
            lines.append(f"CPU mask updates: {self.mask_kernels}")
        for mod, err in self.untraced:
            lines.append(f"fx could not trace '{mod}' ({err}); its children were traced instead")
        lines += _kernel_footer(self)
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


def _layer_report(lp, module: nn.Module, n: int, m: int, kernel: KernelAdvice | None = None) -> LayerReport:
    w = dense_weight(module)
    cov = None
    if w.dim() >= 2 and w.numel() and w.shape[1] % m == 0:
        groups = w.numel() // m
        cov = 1.0 - nm_violations(w, n, m) / groups
    spatial = unstructured = smask = None
    if w.dim() > 2:
        spatial = spatial_sparsity(w != 0).tolist()
    if lp.treatment == SPRE and hasattr(module, "spatial_mask"):
        unstructured = spatial_sparsity(magnitude_mask(module.weight, 1.0 - n / m)).tolist()
        smask = module.current_masks()["spatial_mask"].tolist()  # what the layer computes with now
    return LayerReport(
        lp.name, lp.treatment, lp.reason, lp.norm, tuple(w.shape), cov,
        float((w == 0).float().mean()), spatial, unstructured, smask, kernel,
    )


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
    for a float32 model). Rules and thresholds: spre_fx/export.py, docs/deploy.md.
    """
    plan = plan_of(model)
    modules = dict(model.named_modules())
    n, m = plan.config.nm
    advice = advise(model, example_inputs, example_kwargs=example_kwargs, input_size=input_size, dtype=dtype)
    with torch.no_grad():
        layers = tuple(
            _layer_report(lp, modules[lp.name], n, m, advice.layers[lp.name]) for lp in plan.layers
        )
    kernels = _native.backend() if plan.stage == "prepared" else None
    return Report(plan.config.nm, plan.stage, layers, plan.untraced, advice.flops, kernels)


# --------------------------------------------------------------------------- verify
class VerificationError(AssertionError):
    """A converted model differs from its prepared form, or a layer is not N:M."""


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` compared. output_error: max |prepared - converted| / max |prepared| over the
    model's outputs (inf when they differ in structure, shape or dtype: see `mismatches`).
    layer_errors: the worst call of each compared layer; call_errors: every call, in order.
    mismatches: each difference other than in float values ("output [0]['boxes']: shape ...")."""

    output_error: float
    layer_errors: dict[str, float]
    nm_violations: dict[str, int]
    tolerance: float
    call_errors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    mismatches: tuple[str, ...] = ()


def _default_tolerance(model: nn.Module) -> float:
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


def _tree_map(fn, obj: Any) -> Any:
    """`fn` applied to every tensor of a layer's output (tensors, tuples, lists, dicts)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_tree_map(fn, o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: _tree_map(fn, v) for k, v in obj.items()}
    return obj


def _stored(out: Any) -> Any:
    """A detached copy of a layer's output on the CPU: later in-place ops (ReLU(inplace=True))
    cannot change it, and the accelerator does not hold every call of every layer at once."""
    return _tree_map(lambda t: t.detach().to("cpu", copy=True), out)


def _on_device_of(reference: Any, other: Any) -> Any:
    """`reference` (stored on the CPU) moved to where `other` was computed."""
    device = next((t.device for t in flat_tensors(other)), None)
    if device is None or device.type == "cpu":
        return reference
    return _tree_map(lambda t: t.to(device), reference)


def _run(model: nn.Module, names: list[str], args: tuple, kwargs: dict, on_call) -> Any:
    """The model's own output in eval mode (no_grad, modes restored); `on_call(name, output)` sees
    every call of every module in `names`, in order. The hooks observe: they return nothing."""
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for n in names:
        mod = model.get_submodule(n)
        by_module.setdefault(id(mod), (mod, []))[1].append(n)
    def observer(names_of_module: list[str]):
        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            for n in names_of_module:
                on_call(n, out)
        return hook

    handles = [mod.register_forward_hook(observer(ns)) for mod, ns in by_module.values()]
    try:
        with modes_restored(model), torch.no_grad():
            model.eval()  # not chained: some train() overrides (mmdet's ResNet) return None
            return model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def _error_text(error: float, tol: float) -> str:
    if error == float("inf"):
        return "NaN or inf values (relative error inf)"
    return f"relative error {error:.3g} > {tol:g}"


def _call_label(name: str, i: int, count: int) -> str:
    return f"layer '{name}'" if count == 1 else f"layer '{name}' call {i + 1} of {count}"


def verify(
    prepared: nn.Module,
    converted: nn.Module,
    example_inputs: Tensor | tuple,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tolerance: float | None = None,
) -> VerifyResult:
    """Check, in eval mode, that `converted` computes what `prepared` does and is N:M.

    Compares the model's outputs, and every call of every converted layer (its output after the
    folded BatchNorm; call i of one model against call i of the other), as max-abs error
    relative to the prepared value; default tolerance 1e-5 for float32 and 1e-10 for float64.
    Raises VerificationError naming each failing layer and call, and any difference in
    structure, shape, dtype or number of calls.
    """
    plan = plan_of(prepared, stage="prepared")
    plan_of(converted, stage="converted")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_kwargs or {}
    tol = _default_tolerance(prepared) if tolerance is None else tolerance
    names = list(dict.fromkeys(lp.norm or lp.name for lp in plan.layers))

    # The prepared model's calls are stored (on the CPU); the converted model's are compared
    # as they happen and the stored copy freed, so only one model's activations are held.
    reference: dict[str, list[Any]] = {n: [] for n in names}
    out_p = _run(prepared, names, args, kwargs, lambda n, out: reference[n].append(_stored(out)))
    counts = {n: len(calls) for n, calls in reference.items()}
    errors: dict[str, list[float]] = {n: [] for n in names}
    mismatches: list[str] = []
    mismatched: set[tuple[str, int]] = set()
    seen = dict.fromkeys(names, 0)

    def compare(n: str, out: Any) -> None:
        i, seen[n] = seen[n], seen[n] + 1
        if i >= counts[n]:
            return  # reported below, from the number of calls
        ref, reference[n][i] = _on_device_of(reference[n][i], out), None
        label = _call_label(n, i, counts[n])
        found = mismatch(ref, out)
        if found:
            mismatches.append(f"{label}: {found}")
            mismatched.add((n, i))
        errors[n].append(float("inf") if found else relative_error(ref, out))

    out_c = _run(converted, names, args, kwargs, compare)
    mismatches += [
        f"layer '{n}': called {counts[n]} times in the prepared model, {seen[n]} in the converted one"
        for n in names if seen[n] != counts[n]
    ]
    found = mismatch(out_p, out_c)
    if found:
        mismatches.insert(0, f"output {found}")
    output_error = float("inf") if found else relative_error(out_p, out_c)

    conv_modules = dict(converted.named_modules())
    n, m = plan.config.nm
    violations = {
        lp.name: nm_violations(conv_modules[lp.name].weight, n, m)
        for lp in plan.layers
        if lp.treatment != DENSE
    }
    call_errors = {k: tuple(v) for k, v in errors.items() if v}
    layer_errors = {k: max(v) for k, v in call_errors.items()}
    result = VerifyResult(output_error, layer_errors, violations, tol, call_errors, tuple(mismatches))
    problems = list(mismatches)
    if not found and output_error > tol:
        problems.append(f"output: {_error_text(output_error, tol)}")
    problems += [
        f"{_call_label(k, i, counts[k])}: {_error_text(e, tol)}"
        for k, v in call_errors.items() for i, e in enumerate(v) if e > tol and (k, i) not in mismatched
    ]
    problems += [f"layer '{k}': {v} groups break {n}:{m}" for k, v in violations.items() if v]
    if problems:
        raise VerificationError(
            "converted model does not match (prepared vs converted):\n  " + "\n  ".join(problems))
    return result
