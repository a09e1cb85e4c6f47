"""The export stage: 2:4 sparse kernels in PyTorch, the will-it-accelerate advisor, ONNX export.

- `to_semi_structured` (what `convert(model, backend="semi_structured")` runs): every eligible
  `nn.Linear` gets a `torch.sparse` semi-structured weight; every eligible `nn.Conv2d` becomes a
  `SemiStructuredConv2d`, a channels-last im2col GEMM whose weight is the conv weight read as
  `[O, kh·kw·C]` in exactly the `[O, kh, kw, C]` order of the N:M groups (masks.py), so the
  groups of the N:M mask are the groups the sparse tensor cores see, with no reordering.
- `kernel_advice` / `advise` (what `report` shows): per layer, whether that path applies and
  why not (dtype, groups, divisibility and minimum shapes of each backend, size), and the share
  of conv/linear FLOPs that can run sparse at a given input.
- `export_onnx`: `torch.onnx.export` plus the checks that matter for TensorRT's sparse-weight
  detection (every N:M layer's exported Conv/Gemm/MatMul weight still N:M) and onnxruntime
  agreement.

The kernel constraints are read from the installed torch (`_DTYPE_SHAPE_CONSTRAINTS` of
`torch.sparse.SparseSemiStructuredTensorCUSPARSELT` / `...CUTLASS`), so a torch upgrade that
relaxes them is picked up. docs/deploy.md has the user-facing story.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .compare import flat_tensors, modes_restored, relative_error
from .masks import is_nm, nm_violations
from .modules import effective_weight
from .patterns import DENSE, LayerPlan, Plan
from .prepare import plan_of, set_module

__all__ = [
    "BACKENDS",
    "MIN_WEIGHT_ELEMS",
    "MIN_GEMM_MACS",
    "SemiStructuredConv2d",
    "KernelAdvice",
    "FlopEstimate",
    "Advice",
    "gemm_weight",
    "dense_weight",
    "kernel_advice",
    "advise",
    "pack_weight",
    "to_semi_structured",
    "OnnxWeight",
    "OnnxExport",
    "onnx_weights",
    "export_onnx",
]

log = logging.getLogger("spre_fx")

BACKENDS = ("dense", "semi_structured")
KERNELS = ("auto", "cusparselt", "cutlass")

# "Too small to gain" (heuristics, documented in docs/deploy.md; not measured here, no GPU):
# - a GEMM weight [O, K] with fewer elements than this (e.g. 64x128) is left dense at any batch:
#   a GEMM that narrow is bound by memory and launch latency, not by the multiply-adds 2:4 halves;
MIN_WEIGHT_ELEMS = 1 << 14
# - with an example input, a layer doing fewer multiply-accumulates per call than this
#   (2^27 ≈ 134 M MACs ≈ 0.27 GFLOP, about 1 µs of dense fp16 tensor-core time on an A100/H100)
#   is dominated by per-layer fixed costs (kernel launches, the im2col gather) that 2:4 cannot cut.
MIN_GEMM_MACS = 1 << 27

# The pattern the hardware reads per dtype: 2:4 for 16-bit floats and int8; float32 runs on
# CUTLASS as 1:2 over 32-bit pairs (TF32 math); cuSPARSELt has no float32 kernel.
_HW_PATTERN = {
    torch.float16: (2, 4),
    torch.bfloat16: (2, 4),
    torch.int8: (2, 4),
    torch.float32: (1, 2),
}


def _backend_classes() -> dict[str, type]:
    return {
        "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    }


def _constraints(kernel: str) -> dict:
    return _backend_classes()[kernel]._DTYPE_SHAPE_CONSTRAINTS


def _kernels(kernel: str, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Backends to try, best first: cuSPARSELt (looser shapes) when torch was built with it, then
    CUTLASS, whose torch kernels run on compute capability 8.x only (`capability` None: unknown)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, found {kernel!r}")
    cutlass_ok = capability is None or capability[0] == 8
    if kernel == "cutlass" and not cutlass_ok:
        raise ValueError(f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU is "
                         f"{capability[0]}.{capability[1]}: use kernel='cusparselt' or 'auto'")
    if kernel != "auto":
        return (kernel,)
    have_lt = torch.backends.cusparselt.is_available()
    return ("cusparselt",) * have_lt + ("cutlass",) * cutlass_ok


def _capability(model: nn.Module) -> tuple[int, int] | None:
    """Compute capability of the GPU holding `model` (None when it is not on one)."""
    p = next((p for p in model.parameters() if p.device.type == "cuda"), None)
    return None if p is None else torch.cuda.get_device_capability(p.device)


def _is_packed(weight: Any) -> bool:
    return isinstance(weight, torch.sparse.SparseSemiStructuredTensor)


def _implies(n: int, m: int, hn: int, hm: int) -> bool:
    """Does every N:M weight (groups aligned along K) also satisfy hn:hm?"""
    if m % hm == 0:
        return n <= hn
    if hm % m == 0:
        return n * (hm // m) <= hn
    return False


# --------------------------------------------------------------------------- im2col conv
class SemiStructuredConv2d(nn.Module):
    """A groups=1, zero-padded Conv2d computed as a channels-last im2col GEMM.

    `weight` is `[O, kh·kw·C]`, the conv weight read as `weight.permute(0, 2, 3, 1)`, i.e. the
    `[O, kh, kw, C]` order of the N:M groups; it may be dense or a `torch.sparse`
    semi-structured tensor. The input is viewed as NHWC (no copy for a channels_last input),
    zero-padded, its patches gathered in the same (kh, kw, C) order, and
    `F.linear(patches, weight, bias)` gives `[N·Ho·Wo, O]`, returned as an NCHW-shaped view.
    With a dense weight that is channels_last memory (the next such conv reads it without a
    copy). torch's cuSPARSELt tensor computes `W·patchesᵀ`, `[O, N·Ho·Wo]`, and returns its
    transpose, so the view's memory is `[O, N, Ho, Wo]`, unless the packed weight has
    `fuse_transpose_cusparselt = True` (the kernel then writes `[N·Ho·Wo, O]`; read from torch
    2.11's source, timed by benchmarks/gpu_check.py, not run here).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        super().__init__()
        kh, kw = kernel_size
        if weight.dim() != 2 or weight.shape[1] != kh * kw * in_channels:
            raise ValueError(
                f"expected a GEMM weight [O, {kh}*{kw}*{in_channels}], found shape {tuple(weight.shape)}"
            )
        self.in_channels = in_channels
        self.out_channels = weight.shape[0]
        self.kernel_size = (kh, kw)
        self.stride = tuple(stride)
        self.padding = tuple(padding)  # (left, right, top, bottom), F.pad order for W then H
        self.dilation = tuple(dilation)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight: Tensor | None = None) -> SemiStructuredConv2d:
        """The im2col form of `conv`; `weight` is its GEMM weight (default: the dense one)."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only a zero-padded nn.Conv2d with groups=1 runs as an im2col GEMM")
        w = gemm_weight(conv) if weight is None else weight
        lw, rw, th, bh = conv._reversed_padding_repeated_twice
        return cls(w, conv.bias, conv.in_channels, conv.kernel_size, conv.stride, (lw, rw, th, bh),
                   conv.dilation)

    def dense_weight(self) -> Tensor:
        """The weight as a dense conv weight `[O, C, kh, kw]`."""
        w = self.weight.detach()
        w = w.to_dense() if _is_packed(w) else w
        return w.reshape(self.out_channels, *self.kernel_size, self.in_channels).permute(0, 3, 1, 2)

    def output_size(self, input: Tensor) -> tuple[int, int]:
        """(Ho, Wo) of the conv's output for `input` `[N, C, H, W]` (ValueError on a wrong shape)."""
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, H, W], found shape {tuple(input.shape)}"
            )
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        lw, rw, th, bh = self.padding
        h, w = input.shape[2] + th + bh, input.shape[3] + lw + rw
        ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {tuple(input.shape)} is smaller than the dilated kernel")
        return ho, wo

    def im2col(self, input: Tensor) -> Tensor:
        """The GEMM input `[N·Ho·Wo, kh·kw·C]` of `input`, in the weight's (kh, kw, C) order: a
        view for a stride-1 1×1 conv on a channels_last input, else one strided gather (a copy)."""
        ho, wo = self.output_size(input)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        x = input.permute(0, 2, 3, 1)  # NHWC view
        if any(self.padding):
            lw, rw, th, bh = self.padding
            x = F.pad(x, (0, 0, lw, rw, th, bh))
        n, _, _, c = x.shape
        s_n, s_h, s_w, s_c = x.stride()
        patches = x.as_strided(
            (n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c), x.storage_offset()
        )
        return patches.reshape(n * ho * wo, kh * kw * c)

    def forward(self, input: Tensor) -> Tensor:
        y = F.linear(self.im2col(input), self.weight, self.bias)
        ho, wo = self.output_size(input)
        return y.reshape(input.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        kind = type(self.weight).__name__ if _is_packed(self.weight) else "dense"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding(l,r,t,b)={self.padding}, dilation={self.dilation}, weight={kind}"
        )


def gemm_weight(module: nn.Module) -> Tensor:
    """The dense `[O, K]` GEMM weight of a Linear or Conv2d (`[O, kh·kw·C]`, N:M group order)."""
    w = module.weight.detach()
    if _is_packed(w):
        return w.to_dense()
    if isinstance(module, SemiStructuredConv2d):
        return w
    w = effective_weight(module)
    if w.dim() > 2:
        w = w.movedim(1, -1).reshape(w.shape[0], -1)
    return w.contiguous()


def dense_weight(module: nn.Module) -> Tensor:
    """The layer's weight in its usual dense layout, whatever kernel it runs on (for reports)."""
    if isinstance(module, SemiStructuredConv2d):
        return module.dense_weight()
    if _is_packed(module.weight):
        return module.weight.detach().to_dense()
    return effective_weight(module)


# --------------------------------------------------------------------------- advisor
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
    c = _constraints(kernel).get(dtype)
    if c is None:
        return False
    r, s = c.sparse_min_rows, c.sparse_min_cols
    return o >= r and o % r == 0 and k >= s and k % s == 0


def _shape_needs(kernels: tuple[str, ...], dtype: torch.dtype) -> str:
    parts = []
    for kn in kernels:
        c = _constraints(kn).get(dtype)
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
    if lp.treatment == DENSE:
        return KernelAdvice(False, "dense", f"dense layer ({lp.reason})", macs=macs)
    geo = _geometry(module)
    if geo is None:
        return KernelAdvice(
            False, "layer", f"{type(module).__name__}: the 2:4 path covers Linear and Conv2d only", macs=macs
        )
    kind, o, k, groups, padding_mode = geo
    gemm = (o, k)
    if _is_packed(module.weight):
        return KernelAdvice(True, "packed", f"runs on the {module.weight.BACKEND} 2:4 kernel", gemm,
                            (module.weight.BACKEND,), macs)
    if groups != 1:
        return KernelAdvice(False, "groups", f"grouped conv (groups={groups}): the im2col GEMM takes "
                            "groups=1 only", gemm, macs=macs)
    if padding_mode != "zeros":
        return KernelAdvice(False, "padding", f"padding_mode '{padding_mode}': the im2col GEMM pads "
                            "with zeros only", gemm, macs=macs)
    dtype = dtype or module.weight.dtype
    kernels = _kernels(kernel, capability)
    n, m = nm
    hw = _HW_PATTERN.get(dtype)
    if hw is None or not any(dtype in _constraints(kn) for kn in kernels):
        return KernelAdvice(False, "dtype", f"no 2:4 kernel ({', '.join(kernels) or 'none here'}) for "
                            f"{dtype}; cast the model to float16 or bfloat16", gemm, macs=macs)
    if dtype == torch.int8:
        return KernelAdvice(False, "dtype", "int8 2:4 kernels need a quantised GEMM (e.g. torchao); "
                            "spre_fx layers are floating point", gemm, macs=macs)
    if not _implies(n, m, *hw):
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
    modes = {mod: mod.training for mod in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
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
    capability = _capability(model)
    with torch.no_grad():
        for lp in plan.layers:
            layers[lp.name] = kernel_advice(
                lp, modules[lp.name], plan.config.nm, dtype=dtype,
                macs=None if macs is None else macs[lp.name], kernel=kernel, capability=capability,
                min_weight_elems=min_weight_elems, min_gemm_macs=min_gemm_macs,
            )
    flops = None
    if macs is not None:
        total = sum(macs.values())
        sparse = sum(macs[name] for name, a in layers.items() if a.applies)
        share = sparse / total if total else 0.0
        flops = FlopEstimate(shapes, total, sparse, share, total / (total - sparse / 2) if total else 1.0)
    return Advice(layers, flops)


# --------------------------------------------------------------------------- backend
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
    hw = _HW_PATTERN.get(weight.dtype)
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
    if kernel not in ("cusparselt", "cutlass"):
        raise ValueError(f"kernel must be 'cusparselt' or 'cutlass', found {kernel!r}")
    return _sparse_from_dense(_backend_classes()[kernel], weight.detach().contiguous())


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
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, found {kernel!r}")
    _require_cuda(model)
    capability = _capability(model)
    _kernels(kernel, capability)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        # Decide (and refuse a weight that lost its pattern) for every layer before changing any.
        chosen = []
        for lp in plan.layers:
            advice = kernel_advice(lp, modules[lp.name], plan.config.nm, kernel=kernel, capability=capability,
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


def _has_sparse_kernels(model: nn.Module) -> bool:
    return any(isinstance(m, SemiStructuredConv2d) for m in model.modules()) or any(
        _is_packed(p) for p in model.parameters())


# --------------------------------------------------------------------------- ONNX
@dataclass(frozen=True)
class OnnxWeight:
    """Where an N:M layer's weight went in the ONNX graph, and whether it is still N:M there.

    tensor/op are None when the layer is not in the exported graph (e.g. a training-only head).
    matched_by: "name", "value" (equal, up to the transpose of a MatMul) or "zeros" (same zero
    pattern, e.g. after the exporter fused a BatchNorm scale into it).
    """

    layer: str
    tensor: str | None
    op: str | None
    shape: tuple[int, ...] | None
    matched_by: str | None
    nm: bool | None


@dataclass(frozen=True)
class OnnxExport:
    path: str
    nm: tuple[int, int]
    weights: tuple[OnnxWeight, ...]
    output_error: float | None  # max |torch - onnxruntime| / max |torch|, None when not checked

    @property
    def trtexec(self) -> str:
        """The TensorRT build command that uses the 2:4 weights (needs an NVIDIA GPU)."""
        return f"trtexec --onnx={self.path} --sparsity=enable --fp16"


def _onnx_gemm_weights(model) -> list[tuple[str, str, Any]]:
    """(tensor name, op, weight as [O, K...]) for every Conv/Gemm/MatMul with a constant weight."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        w = consts.get(name)
        if w is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and not attrs.get("transB", 0):
            w = w.T
        elif node.op_type == "MatMul":
            if w.ndim != 2:
                continue
            w = w.T
        out.append((name, node.op_type, w))
    return out


def onnx_weights(onnx_model, converted: nn.Module) -> tuple[OnnxWeight, ...]:
    """Find every N:M layer of `converted` among the Conv/Gemm/MatMul weights of an ONNX model
    (a ModelProto or a path) and check its N:M pattern in the layout TensorRT reads."""
    import numpy as np
    import onnx

    if isinstance(onnx_model, (str, os.PathLike)):
        onnx_model = onnx.load(os.fspath(onnx_model))
    plan = plan_of(converted, stage="converted")
    n, m = plan.config.nm
    modules = dict(converted.named_modules())
    candidates = _onnx_gemm_weights(onnx_model)
    used: set[int] = set()
    found = []
    for lp in plan.layers:
        if lp.treatment == DENSE:
            continue
        ref = dense_weight(modules[lp.name]).detach().cpu().numpy()
        match = _match(candidates, used, f"{lp.name}.weight", ref)
        if match is None:
            found.append(OnnxWeight(lp.name, None, None, None, None, None))
            continue
        i, how = match
        used.add(i)
        name, op, w = candidates[i]
        ok = is_nm(torch.tensor(np.ascontiguousarray(w)), n, m)
        found.append(OnnxWeight(lp.name, name, op, tuple(w.shape), how, ok))
    return tuple(found)


def _match(candidates: list, used: set[int], name: str, ref) -> tuple[int, str] | None:
    """Index of the ONNX weight that is `ref`: by name, else by value, else by zero pattern."""
    import numpy as np

    tests = (
        ("name", lambda t, w: t == name),
        ("value", lambda t, w: np.array_equal(w, ref)),
        ("zeros", lambda t, w: np.array_equal(w != 0, ref != 0)),
    )
    for how, test in tests:
        for i, (tname, _, w) in enumerate(candidates):
            if i not in used and w.shape == ref.shape and test(tname, w):
                return i, how
    return None


def export_onnx(
    converted: nn.Module,
    example_inputs: Tensor | tuple,
    path: str | os.PathLike,
    *,
    dynamo: bool = True,
    check_outputs: bool = True,
    rtol: float = 1e-4,
    **export_kwargs: Any,
) -> OnnxExport:
    """`torch.onnx.export` a converted (dense) model, then check what TensorRT needs.

    Exports in eval mode (modes restored) with `dynamo` (True: the torch.export-based exporter,
    needs onnxscript; False: the TorchScript one) and `export_kwargs` passed through. Then:
    every N:M layer's Conv/Gemm/MatMul weight is found in the graph and must still be N:M in the
    layout TensorRT reads (ValueError otherwise); with `check_outputs` and onnxruntime installed,
    the ONNX outputs must equal PyTorch's (max error relative to the largest output <= rtol).
    `result.trtexec` is the TensorRT build command.
    """
    plan = plan_of(converted, stage="converted")
    if _has_sparse_kernels(converted):
        raise ValueError(
            "this model runs on semi-structured kernels, which ONNX cannot hold: export the dense "
            "conversion (spre_fx.convert(prepared), backend='dense'); TensorRT packs 2:4 weights itself "
            "(--sparsity=enable)"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = os.fspath(path)
    with modes_restored(converted):
        converted.eval()
        torch.onnx.export(converted, args, path, dynamo=dynamo, **export_kwargs)
        with torch.no_grad():
            ref = converted(*args)
    weights = onnx_weights(path, converted)
    broken = [w.layer for w in weights if w.nm is False]
    if broken:
        n, m = plan.config.nm
        raise ValueError(f"exported weights of {broken} are no longer {n}:{m}: TensorRT would run them dense")
    error = None
    if check_outputs:
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feeds = [t for t in args if isinstance(t, Tensor)]
            inputs = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), feeds)}
            got = session.run(None, inputs)
            error = relative_error(ref, [torch.from_numpy(g) for g in got])
            if error > rtol:
                raise ValueError(
                    f"onnxruntime output differs from PyTorch: relative error {error:.3g} > {rtol:g}")
    return OnnxExport(path, plan.config.nm, weights, error)
