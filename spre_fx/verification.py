"""`verify`: proof that a converted model computes what its prepared form does, and is N:M.

Both models run the same input in eval mode; every call of every compared layer is recorded on
the prepared model and compared, call for call, on the converted one as it runs. In bfloat16 or
float16 (the parameters', or autocast's) both are also measured against a float32 run of the
prepared model: the converted model may be at most twice as far from it as the prepared one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .compare import flat_tensors, mismatch, relative_error
from .deploy import dense_weight
from .inputs import describe, example_call, inputs_fit
from .layers import NMLayer, masks_of
from .masks import nm_violations
from .module_tree import forwards_reaching, model_copy, modes_restored
from .plan import Treatment, plan_of

__all__ = ["verify", "VerifyResult", "VerificationError"]


class VerificationError(AssertionError):
    """A converted model differs from its prepared form, or a layer is not N:M."""


@dataclass(frozen=True)
class VerifyResult:
    """What `verify` compared. output_error: max |reference - converted| / max |reference| over
    the model's outputs (inf when they differ in structure, shape or dtype: see `mismatches`),
    the reference being the prepared model (float32/64) or its float32 run (`precision` bfloat16
    or float16). layer_errors: the worst call of each compared layer; call_errors: every call, in
    order. mismatches: each difference other than in float values ("output [0]['boxes']: shape ...").
    In reduced precision, prepared_errors / prepared_output_error are the prepared model's own
    distance from its float32 run, and a converted call passes when its error is at most twice the
    prepared one's there plus `tolerance`."""

    output_error: float
    layer_errors: dict[str, float]
    nm_violations: dict[str, int]
    tolerance: float
    call_errors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    mismatches: tuple[str, ...] = ()
    precision: str = "float32"
    prepared_errors: dict[str, float] = field(default_factory=dict)
    prepared_output_error: float | None = None


REDUCED = (torch.bfloat16, torch.float16)


def _compute_dtype(model: nn.Module) -> tuple[torch.dtype, str]:
    """The dtype the model computes in (autocast's where it is on for the parameters' device, else
    the parameters'), and that device type."""
    p = next(model.parameters(), None)
    device = p.device.type if p is not None else "cpu"
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), device
    return (p.dtype if p is not None else torch.float32), device


def _default_tolerance(dtype: torch.dtype) -> float:
    """float32 1e-5, float64 1e-10; in reduced precision the dtype's resolution (bfloat16 2^-7,
    float16 2^-10), added to twice the prepared model's own error."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)


def _float32_twin(prepared: nn.Module) -> nn.Module:
    """The prepared model in float32 (itself when its parameters are already float32), computing
    with the masks in force in `prepared`: the exact function both reduced-precision runs approximate."""
    if all(t.dtype in (torch.float32, torch.float64) for t in prepared.parameters() if t.is_floating_point()):
        return prepared
    twin = model_copy(prepared)
    originals = dict(prepared.named_modules())
    for name, layer in twin.named_modules():
        if isinstance(layer, NMLayer):
            for mask_name, mask in masks_of(originals[name]).items():
                getattr(layer, mask_name).copy_(mask)
            layer.spre_fx.frozen = True  # the masks of the low-precision weights, not of their float32 copy
    return twin.float()


def _as_float32(obj: Any) -> Any:
    return _tree_map(lambda t: t.float() if t.is_floating_point() else t, obj)


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


def _independence_problems(prepared: nn.Module, converted: nn.Module) -> list[str]:
    """What makes `converted` compute with `prepared` itself: shared parameters or buffers, or an
    instance `forward` (a wrapper) that calls into the prepared model. Either would let the
    comparison pass without the converted model's own layers computing."""
    own = {id(t): n for n, t in (*prepared.named_parameters(), *prepared.named_buffers())}
    shared = [f"tensor '{n}': the prepared model's '{own[id(t)]}'"
              for n, t in (*converted.named_parameters(), *converted.named_buffers()) if id(t) in own]
    wrappers = [f"{f'module {n!r}' if n else 'the model'}: its forward reaches the prepared model ({target})"
                for n, target in forwards_reaching(converted, prepared).items()]
    return shared + wrappers


def _error_text(error: float, tol: float, own: float | None = None) -> str:
    if error == float("inf"):
        return "NaN or inf values (relative error inf)"
    if own is None:
        return f"relative error {error:.3g} > {tol:g}"
    return (f"relative error {error:.3g} against the float32 run > {2 * own + tol:.3g} (2 × the prepared "
            f"model's {own:.3g} + {tol:g})")


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
    relative to the reference value; default tolerance 1e-5 for float32 and 1e-10 for float64.
    In bfloat16 or float16 (the parameters' dtype, or autocast's when `verify` runs inside
    `torch.autocast`) rounding differs between any two correct models, so both are measured
    against the prepared model run in float32: a converted call passes when its error is at most
    twice the prepared model's own there, plus `tolerance` (default: the dtype's resolution).
    N:M is checked on every sparsified weight, read densely from packed semi-structured ones.
    Raises VerificationError naming each failing layer and call, and any difference in
    structure, shape, dtype or number of calls.
    """
    plan = plan_of(prepared, stage="prepared")
    plan_of(converted, stage="converted")
    borrowed = _independence_problems(prepared, converted)
    if borrowed:
        raise VerificationError(
            "the converted model calls into the prepared model, so its own layers would go unchecked "
            "(pass the result of spre_fx.convert(prepared) as it was returned):\n  " + "\n  ".join(borrowed))
    args, kwargs = example_call(example_inputs, example_kwargs, "verify")  # a tensor or a tuple, a dict
    dtype, device = _compute_dtype(prepared)
    reduced = dtype in REDUCED
    tol = _default_tolerance(dtype) if tolerance is None else tolerance
    names = list(dict.fromkeys(lp.norm or lp.name for lp in plan.layers))

    # The prepared model's calls are stored (on the CPU); the converted model's are compared
    # as they happen and the stored copy freed, so only one model's activations are held (two,
    # the prepared model's and its float32 run's, in reduced precision).
    exact: dict[str, list[Any]] = {n: [] for n in names}
    out_x = None
    if reduced:
        with torch.autocast(device, enabled=False):
            out_x = _run(_float32_twin(prepared), names, _as_float32(args), _as_float32(kwargs),
                         lambda n, out: exact[n].append(_stored(out)))
    reference: dict[str, list[Any]] = {n: [] for n in names}
    with inputs_fit(prepared, describe(args, kwargs), "verify"):  # each layer says what does not fit
        out_p = _run(prepared, names, args, kwargs, lambda n, out: reference[n].append(_stored(out)))
    counts = {n: len(calls) for n, calls in reference.items()}
    errors: dict[str, list[float]] = {n: [] for n in names}
    own: dict[str, list[float | None]] = {n: [] for n in names}  # the prepared call's, reduced precision
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
        if reduced and not found and i >= len(exact[n]):
            found = "not called in the prepared model's float32 run"
        if found:
            mismatches.append(f"{label}: {found}")
            mismatched.add((n, i))
            errors[n].append(float("inf"))
            own[n].append(None)
        elif reduced:
            x, exact[n][i] = _on_device_of(exact[n][i], out), None
            own[n].append(relative_error(x, ref))
            errors[n].append(relative_error(x, out))
        else:
            errors[n].append(relative_error(ref, out))
            own[n].append(None)

    out_c = _run(converted, names, args, kwargs, compare)
    mismatches += [
        f"layer '{n}': called {counts[n]} times in the prepared model, {seen[n]} in the converted one"
        for n in names if seen[n] != counts[n]
    ]
    found = mismatch(out_p, out_c)
    if found:
        mismatches.insert(0, f"output {found}")
    output_own = None
    if found:
        output_error = float("inf")
    elif reduced:
        output_error, output_own = relative_error(out_x, out_c), relative_error(out_x, out_p)
    else:
        output_error = relative_error(out_p, out_c)

    conv_modules = dict(converted.named_modules())
    n, m = plan.config.nm
    violations = {
        lp.name: nm_violations(dense_weight(conv_modules[lp.name]), n, m)
        for lp in plan.layers
        if lp.treatment != Treatment.DENSE
    }
    call_errors = {k: tuple(v) for k, v in errors.items() if v}
    layer_errors = {k: max(v) for k, v in call_errors.items()}
    result = VerifyResult(output_error, layer_errors, violations, tol, call_errors, tuple(mismatches),
                          str(dtype).removeprefix("torch."),
                          {k: max(o for o in v if o is not None) for k, v in own.items() if any(
                              o is not None for o in v)}, output_own)

    def bound(own_error: float | None) -> float:
        return tol if own_error is None else 2 * own_error + tol

    problems = list(mismatches)
    if not found and output_error > bound(output_own):
        problems.append(f"output: {_error_text(output_error, tol, output_own)}")
    for k, v in call_errors.items():
        for i, e in enumerate(v):
            own_error = own[k][i]
            if (k, i) not in mismatched and e > bound(own_error):
                problems.append(f"{_call_label(k, i, counts[k])}: {_error_text(e, tol, own_error)}")
    problems += [f"layer '{k}': {v} groups break {n}:{m}" for k, v in violations.items() if v]
    if problems:
        raise VerificationError(
            "converted model does not match (prepared vs converted):\n  " + "\n  ".join(problems))
    return result
