"""The will-it-accelerate advisor: per layer, whether the 2:4 kernel path applies and why not.

Judged from the layer's dtype, groups, padding, N:M pattern and GEMM shape against what each
backend takes (spre_fx/deploy/kernels.py), and from its size; with an example input, the MACs of
each layer and the share of conv/linear FLOPs that can run sparse. `report` shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..compare import flat_tensors
from ..masks import nm_violations
from ..module_tree import modes_restored
from ..plan import LayerPlan, Plan, Treatment, plan_of
from .im2col import SemiStructuredConv2d, gemm_weight
from .kernels import HW_PATTERN, capability, constraints, implies, is_packed, kernels_to_try

__all__ = [
    "MIN_WEIGHT_ELEMS",
    "MIN_GEMM_MACS",
    "KernelAdvice",
    "FlopEstimate",
    "Advice",
    "kernel_advice",
    "advise",
]

# "Too small to gain" (heuristics, documented in docs/deploy.md; not measured here, no GPU):
# - a GEMM weight [O, K] with fewer elements than this (e.g. 64x128) is left dense at any batch:
#   a GEMM that narrow is bound by memory and launch latency, not by the multiply-adds 2:4 halves;
MIN_WEIGHT_ELEMS = 1 << 14
# - with an example input, a layer doing fewer multiply-accumulates per call than this
#   (2^27 ≈ 134 M MACs ≈ 0.27 GFLOP, about 1 µs of dense fp16 tensor-core time on an A100/H100)
#   is dominated by per-layer fixed costs (kernel launches, the im2col gather) that 2:4 cannot cut.
MIN_GEMM_MACS = 1 << 27

@dataclass(frozen=True)
class KernelAdvice:
    """Whether a layer can run on a 2:4 sparse-tensor-core kernel, and why (not).

    code: "packed" (runs on one now), "ok" (would), or what blocks it: "dense" (not N:M),
        "layer" (not Linear/Conv2d), "groups", "padding", "dtype", "pattern" (N:M is not
        2:4), "weight" (weight breaks the pattern), "shape" (no backend takes the GEMM
        shape), "small" (too small to gain).
    gemm: the weight GEMM shape (O, K), K in [kh, kw, C] order for convs.
    backends: kernels whose dtype and shape constraints the layer meets, preferred first.
    macs: multiply-accumulates per forward at the example input (None without one).
    """

    applies: bool
    code: str
    reason: str
    gemm: tuple[int, int] | None = None
    backends: tuple[str, ...] = ()
    macs: int | None = None


@dataclass(frozen=True)
class FlopEstimate:
    """Conv/linear multiply-accumulates per forward at an example input, and the 2:4 share.

    Only the layers spre_fx plans (every Conv and Linear) are counted: other ops (norms,
    activations, pooling, attention matmuls) are not. ideal_speedup bounds the conv/linear
    time if every 2:4 layer ran exactly twice as fast: total / (total - sparse / 2).
    """

    input_shapes: tuple[tuple[int, ...], ...]
    total_macs: int
    sparse_macs: int
    share: float
    ideal_speedup: float

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        return (
            f"2:4 kernels apply to {self.share:.1%} of conv/linear MACs ({self.sparse_macs / 1e6:.1f} M of "
            f"{self.total_macs / 1e6:.1f} M at input {shapes}); conv/linear speed-up at most "
            f"{self.ideal_speedup:.2f}x"
        )


@dataclass(frozen=True)
class Advice:
    layers: dict[str, KernelAdvice]
    flops: FlopEstimate | None


def _geometry(module: nn.Module) -> tuple[str, int, int, int, str] | None:
    """(kind, O, K, groups, padding_mode) of a layer the 2:4 path knows, else None."""
    if isinstance(module, SemiStructuredConv2d):
        return "conv2d", module.out_channels, module.weight.shape[1], 1, "zeros"
    if isinstance(module, nn.Conv2d):
        k = module.in_channels // module.groups * math.prod(module.kernel_size)
        return "conv2d", module.out_channels, k, module.groups, module.padding_mode
    if isinstance(module, nn.Linear):
        return "linear", module.out_features, module.in_features, 1, "zeros"
    return None


def _fits(kernel: str, dtype: torch.dtype, o: int, k: int) -> bool:
    c = constraints(kernel).get(dtype)
    if c is None:
        return False
    r, s = c.sparse_min_rows, c.sparse_min_cols
    return o >= r and o % r == 0 and k >= s and k % s == 0


def _shape_needs(kernels: tuple[str, ...], dtype: torch.dtype) -> str:
    parts = []
    for kn in kernels:
        c = constraints(kn).get(dtype)
        if c is not None:
            parts.append(f"{kn} needs O and K multiples of ({c.sparse_min_rows}, {c.sparse_min_cols})")
    return "; ".join(parts)


def kernel_advice(
    lp: LayerPlan,
    module: nn.Module,
    nm: tuple[int, int],
    *,
    dtype: torch.dtype | None = None,
    macs: int | None = None,
    kernel: str = "auto",
    capability: tuple[int, int] | None = None,
    min_weight_elems: int = MIN_WEIGHT_ELEMS,
    min_gemm_macs: int = MIN_GEMM_MACS,
) -> KernelAdvice:
    """Whether layer `lp` (module `module` of a prepared or converted model) can run on a 2:4 kernel.

    dtype: the dtype to judge for (default: the layer's own). macs: its multiply-accumulates per
    forward, when an example input is known; with them the size rule is `min_gemm_macs`,
    without them only `min_weight_elems` applies. capability: of the GPU to judge for (None:
    any, CUTLASS included).
    """
    if lp.treatment == Treatment.DENSE:
        return KernelAdvice(False, "dense", f"dense layer ({lp.reason})", macs=macs)
    geo = _geometry(module)
    if geo is None:
        return KernelAdvice(
            False, "layer", f"{type(module).__name__}: the 2:4 path covers Linear and Conv2d only", macs=macs
        )
    kind, o, k, groups, padding_mode = geo
    gemm = (o, k)
    if is_packed(module.weight):
        return KernelAdvice(True, "packed", f"runs on the {module.weight.BACKEND} 2:4 kernel", gemm,
                            (module.weight.BACKEND,), macs)
    if groups != 1:
        return KernelAdvice(False, "groups", f"grouped conv (groups={groups}): the im2col GEMM takes "
                            "groups=1 only", gemm, macs=macs)
    if padding_mode != "zeros":
        return KernelAdvice(False, "padding", f"padding_mode '{padding_mode}': the im2col GEMM pads "
                            "with zeros only", gemm, macs=macs)
    dtype = dtype or module.weight.dtype
    kernels = kernels_to_try(kernel, capability)
    n, m = nm
    hw = HW_PATTERN.get(dtype)
    if hw is None or not any(dtype in constraints(kn) for kn in kernels):
        return KernelAdvice(False, "dtype", f"no 2:4 kernel ({', '.join(kernels) or 'none here'}) for "
                            f"{dtype}; cast the model to float16 or bfloat16", gemm, macs=macs)
    if dtype == torch.int8:
        return KernelAdvice(False, "dtype", "int8 2:4 kernels need a quantised GEMM (e.g. torchao); "
                            "spre_fx layers are floating point", gemm, macs=macs)
    if not implies(n, m, *hw):
        if dtype == torch.float32:
            why = (f"float32: CUTLASS runs float32 only as 1:2 (TF32, compute capability 8.x) and "
                   f"cuSPARSELt has no float32 kernel; a {n}:{m} weight needs float16 or bfloat16 "
                   "(model.half())")
            return KernelAdvice(False, "dtype", why, gemm, macs=macs)
        return KernelAdvice(False, "pattern", f"{n}:{m} is not {hw[0]}:{hw[1]}: sparse tensor cores take "
                            f"{hw[0]}:{hw[1]} only", gemm, macs=macs)
    fits = tuple(kn for kn in kernels if _fits(kn, dtype, o, k))
    if not fits:
        return KernelAdvice(False, "shape", f"GEMM {o}x{k} ({dtype}) fits no backend: "
                            f"{_shape_needs(kernels, dtype)}", gemm, macs=macs)
    bad = nm_violations(gemm_weight(module), *hw)
    if bad:
        return KernelAdvice(False, "weight", f"{bad} groups of the weight break {hw[0]}:{hw[1]} along K "
                            "(changed after convert?)", gemm, fits, macs)
    if o * k < min_weight_elems:
        return KernelAdvice(False, "small", f"too small to gain: {o}x{k} weight < {min_weight_elems} "
                            "elements", gemm, fits, macs)
    if macs is not None and macs < min_gemm_macs:
        return KernelAdvice(False, "small", f"too small to gain at this input: {macs / 1e6:.1f} M MACs < "
                            f"{min_gemm_macs / 1e6:.0f} M per call", gemm, fits, macs)
    return KernelAdvice(True, "ok", f"2:4 kernel applies ({', '.join(fits)})", gemm, fits, macs)


def _macs_per_output(module: nn.Module) -> int:
    if isinstance(module, SemiStructuredConv2d):
        return module.weight.shape[1]
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return module.in_features
    return 0


def _example(model: nn.Module, example_inputs: Any, input_size: tuple[int, ...] | None) -> tuple:
    if example_inputs is not None and input_size is not None:
        raise ValueError("pass example_inputs or input_size, not both")
    if input_size is not None:
        ref = next((p for p in model.parameters() if p.dtype.is_floating_point), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        return (torch.zeros(tuple(input_size), dtype=dtype, device=device),)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _count_macs(model: nn.Module, plan: Plan, args: tuple, kwargs: dict) -> dict[str, int]:
    """MACs of every planned layer in one eval-mode forward (forward hooks; modes restored)."""
    modules = dict(model.named_modules())
    macs = dict.fromkeys((lp.name for lp in plan.layers), 0)

    def hook(mod, _inp, out, name):
        t = next(flat_tensors(out), None)
        if t is not None:
            macs[name] += t.numel() * _macs_per_output(mod)

    handles = [modules[lp.name].register_forward_hook(lambda mod, i, o, n=lp.name: hook(mod, i, o, n))
               for lp in plan.layers]
    try:
        with modes_restored(model), torch.no_grad():
            model.eval()
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return macs


def advise(
    model: nn.Module,
    example_inputs: Tensor | tuple | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    input_size: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    kernel: str = "auto",
    min_weight_elems: int = MIN_WEIGHT_ELEMS,
    min_gemm_macs: int = MIN_GEMM_MACS,
) -> Advice:
    """Per-layer `KernelAdvice` of a prepared or converted model and, given an example input
    (`example_inputs`, or `input_size` for a zero tensor of the model's dtype), its FLOP share
    that can run on 2:4 kernels. `dtype` judges as if the model were cast to it."""
    plan = plan_of(model)
    modules = dict(model.named_modules())
    macs: dict[str, int] | None = None
    shapes: tuple = ()
    if example_inputs is not None or input_size is not None:
        args = _example(model, example_inputs, input_size)
        macs = _count_macs(model, plan, args, example_kwargs or {})
        shapes = tuple(tuple(t.shape) for t in flat_tensors((args, example_kwargs or {})))
    layers = {}
    gpu = capability(model)
    with torch.no_grad():
        for lp in plan.layers:
            layers[lp.name] = kernel_advice(
                lp, modules[lp.name], plan.config.nm, dtype=dtype,
                macs=None if macs is None else macs[lp.name], kernel=kernel, capability=gpu,
                min_weight_elems=min_weight_elems, min_gemm_macs=min_gemm_macs,
            )
    flops = None
    if macs is not None:
        total = sum(macs.values())
        sparse = sum(macs[name] for name, a in layers.items() if a.applies)
        share = sparse / total if total else 0.0
        flops = FlopEstimate(shapes, total, sparse, share, total / (total - sparse / 2) if total else 1.0)
    return Advice(layers, flops)
