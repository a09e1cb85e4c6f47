"""The semi-structured backend: a converted model's eligible layers on torch's 2:4 kernels (CUDA).

`to_semi_structured` (what `convert(model, backend="semi_structured")` runs) packs every eligible
`nn.Linear` weight as a `torch.sparse` semi-structured tensor and turns every eligible
`nn.Conv2d` into a `SemiStructuredConv2d`; the advisor decides which layers are eligible.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..masks import nm_violations
from ..module_tree import model_copy, set_module
from ..plan import plan_of
from .advisor import MIN_WEIGHT_ELEMS, kernel_advice
from .im2col import SemiStructuredConv2d, gemm_weight
from .kernels import HW_PATTERN, backend_classes, capability, check_kernel, is_packed, kernels_to_try

__all__ = [
    "BACKENDS",
    "pack_weight",
    "check_backend",
    "apply_backend",
    "to_semi_structured",
    "has_sparse_kernels",
]

log = logging.getLogger("spre_fx")

BACKENDS = ("dense", "semi_structured")


def _sparse_from_dense(cls: type, weight: Tensor) -> Tensor:
    """The one call into torch's packing (tests replace it to run the pipeline on CPU)."""
    return cls.from_dense(weight)


def pack_weight(weight: Tensor, kernel: str = "cusparselt", *, name: str = "weight") -> Tensor:
    """`weight` ([O, K], CUDA) as a semi-structured tensor of `kernel`, after checking its pattern.

    The N:M check runs first: a weight with more than 2 non-zeros in some group of 4 along K
    (1 of 2 for float32) raises ValueError instead of letting the packer drop weights.
    """
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D GEMM weight, found shape {tuple(weight.shape)}")
    hw = HW_PATTERN.get(weight.dtype)
    if hw is None:
        raise ValueError(f"{name}: no 2:4 kernel for {weight.dtype}")
    if weight.shape[1] % hw[1]:
        raise ValueError(f"{name}: K={weight.shape[1]} is not a multiple of {hw[1]}")
    bad = nm_violations(weight, *hw)
    if bad:
        raise ValueError(
            f"{name}: {bad} groups of {hw[1]} along K hold more than {hw[0]} non-zeros; the weight is not "
            f"{hw[0]}:{hw[1]} and packing it would drop weights"
        )
    check_kernel(kernel, auto=False)
    return _sparse_from_dense(backend_classes()[kernel], weight.detach().contiguous())


def _require_cuda(model: nn.Module) -> None:
    """Raise unless `model` can run torch's semi-structured kernels here (nothing is changed)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend='semi_structured' needs a CUDA GPU with sparse tensor cores (compute capability "
            ">= 8.0: Ampere, Ada, Hopper or newer): torch's semi-structured kernels (cuSPARSELt, CUTLASS) "
            "are CUDA-only and torch.cuda.is_available() is False here. Use backend='dense' (runs "
            "everywhere), or spre_fx.export_onnx and TensorRT (docs/deploy.md)."
        )
    devices = {p.device for p in model.parameters()}
    off = sorted(str(d) for d in devices if d.type != "cuda")
    if off:
        raise ValueError(
            f"backend='semi_structured' packs weights on the GPU, but the model has parameters on "
            f"{', '.join(off)}: move it first (model.cuda(), and .half() or .bfloat16() for 2:4)"
        )
    for d in devices:
        cap = torch.cuda.get_device_capability(d)
        if cap < (8, 0):
            raise RuntimeError(
                f"backend='semi_structured' needs sparse tensor cores (compute capability >= 8.0); "
                f"{torch.cuda.get_device_name(d)} ({d}) has {cap[0]}.{cap[1]}"
            )


def check_backend(backend: str, model: nn.Module) -> None:
    """Validate `backend` for `model` before anything changes (convert calls it first)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, found {backend!r}")
    if backend == "semi_structured":
        _require_cuda(model)


def apply_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run a converted model's eligible layers on `backend` (in place; convert calls it last)."""
    if backend == "semi_structured":
        return to_semi_structured(model, inplace=True)
    return model


def to_semi_structured(
    model: nn.Module,
    *,
    kernel: str = "auto",
    inplace: bool = False,
    min_weight_elems: int = MIN_WEIGHT_ELEMS,
) -> nn.Module:
    """Run every eligible layer of a converted model on torch's 2:4 semi-structured kernels (CUDA).

    Eligible (see `kernel_advice`): an N:M Linear or groups=1 Conv2d whose dtype, pattern and
    GEMM shape a backend takes and whose weight has at least `min_weight_elems` elements.
    Linears keep their class and get a semi-structured weight; convs become
    `SemiStructuredConv2d`. Every other layer stays as it is; `spre_fx.report(model)` says why.
    `kernel`: "auto" (cuSPARSELt where it takes the layer, else CUTLASS on compute capability
    8.x, the only GPUs torch's CUTLASS 2:4 kernels run on), "cusparselt", "cutlass".
    """
    plan = plan_of(model, stage="converted")
    check_kernel(kernel)
    _require_cuda(model)
    gpu = capability(model)
    kernels_to_try(kernel, gpu)
    if not inplace:
        model = model_copy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        # Decide (and refuse a weight that lost its pattern) for every layer before changing any.
        chosen = []
        for lp in plan.layers:
            advice = kernel_advice(lp, modules[lp.name], plan.config.nm, kernel=kernel, capability=gpu,
                                   min_weight_elems=min_weight_elems)
            if advice.code == "weight":  # the plan says N:M but the weight is not: never pack silently
                raise ValueError(f"layer '{lp.name}': {advice.reason}")
            if advice.code == "ok":
                chosen.append((lp.name, advice.backends[0]))
        for name, backend in chosen:
            module = modules[name]
            sparse = pack_weight(gemm_weight(module), backend, name=name)
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(sparse, requires_grad=False)
            else:
                set_module(model, name, SemiStructuredConv2d.from_conv(module, sparse))
    packed = len(chosen)
    if packed == 0:
        log.warning("spre_fx: no layer runs on a 2:4 kernel; spre_fx.report(model) says why "
                    "(a float32 model needs .half() or .bfloat16())")
    else:
        log.info("spre_fx: %d of %d layers run on 2:4 kernels", packed, len(plan.layers))
    return model


def has_sparse_kernels(model: nn.Module) -> bool:
    return any(isinstance(m, SemiStructuredConv2d) for m in model.modules()) or any(
        is_packed(p) for p in model.parameters())
