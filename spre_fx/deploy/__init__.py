"""The deploy stage: a converted model on 2:4 sparse kernels, the advice on where they pay, ONNX.

`kernels`: what torch's 2:4 kernels take. `im2col`: a conv as the channels-last GEMM they run.
`advisor`: per layer, whether the 2:4 path applies and why not. `backend`: the semi-structured
backend of `convert`. `onnx`: export with the checks TensorRT's sparse-weight detection needs.
"""

from .advisor import (
    MIN_GEMM_MACS,
    MIN_WEIGHT_ELEMS,
    Advice,
    FlopEstimate,
    KernelAdvice,
    advise,
    kernel_advice,
)
from .backend import BACKENDS, apply_backend, check_backend, pack_weight, to_semi_structured
from .im2col import SemiStructuredConv2d, dense_weight, gemm_weight
from .onnx import OnnxExport, OnnxWeight, export_onnx, onnx_weights

__all__ = [
    "MIN_GEMM_MACS",
    "MIN_WEIGHT_ELEMS",
    "Advice",
    "FlopEstimate",
    "KernelAdvice",
    "advise",
    "kernel_advice",
    "BACKENDS",
    "apply_backend",
    "check_backend",
    "pack_weight",
    "to_semi_structured",
    "SemiStructuredConv2d",
    "dense_weight",
    "gemm_weight",
    "OnnxExport",
    "OnnxWeight",
    "export_onnx",
    "onnx_weights",
]
