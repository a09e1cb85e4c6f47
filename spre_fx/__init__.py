"""spre_fx: SpRe (Spatial Re-parameterization for N:M sparsity) for any PyTorch model.

    model = spre_fx.prepare(model, nm=(2, 4))     # train this
    deployed = spre_fx.convert(model)            # single N:M convs, exact in eval mode
    print(spre_fx.report(deployed))
    sparse = spre_fx.convert(model.half().cuda(), backend="semi_structured")  # 2:4 kernels, CUDA
    spre_fx.export_onnx(deployed, x, "model.onnx")   # then TensorRT: docs/deploy.md
"""

from .calibration import recalibrate_bn
from .config import SpReConfig
from .convert import convert
from .export import OnnxExport, SemiStructuredConv2d, export_onnx
from .modules import convert_sync_batchnorm, freeze_masks
from .prepare import prepare
from .registry import register_leaf_function, register_leaf_module, register_norm
from .report import Report, VerificationError, VerifyResult, report, verify
from .scheduler import MaskSchedule, MaskScheduler

__all__ = [
    "SpReConfig",
    "prepare",
    "convert",
    "export_onnx",
    "OnnxExport",
    "SemiStructuredConv2d",
    "convert_sync_batchnorm",
    "report",
    "MaskScheduler",
    "MaskSchedule",
    "freeze_masks",
    "recalibrate_bn",
    "verify",
    "Report",
    "VerifyResult",
    "VerificationError",
    "register_leaf_module",
    "register_leaf_function",
    "register_norm",
]

__version__ = "0.1.0"
