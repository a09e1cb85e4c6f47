"""spre_fx: SpRe (Spatial Re-parameterization for N:M sparsity) for any PyTorch model.

    model = spre_fx.prepare(model, nm=(2, 4))     # train this
    deployed = spre_fx.convert(model)            # single N:M convs, exact in eval mode
    same = spre_fx.deployed_like(build_model(), deployed.state_dict())   # rebuilt, no prepare
    print(spre_fx.report(deployed))
    sparse = spre_fx.convert(model.half().cuda(), backend="semi_structured")  # 2:4 kernels, CUDA
    spre_fx.export_onnx(deployed, x, "model.onnx")   # then TensorRT: docs/deploy.md

The stages, in the order data flows (docs/pipeline.md): discovery, rewrite (`prepare`),
layers, scheduling (`MaskScheduler`), calibration, collapse and deploy (`convert`), reporting
and verification (`report`, `verify`).
"""

from .calibration import recalibrate_bn
from .collapse import FoldedBatchNorm
from .config import SpReConfig
from .conversion import convert, deployed_like
from .deploy import (
    Advice,
    FlopEstimate,
    KernelAdvice,
    OnnxExport,
    OnnxWeight,
    advise,
    export_onnx,
    to_semi_structured,
)
from .layers import convert_sync_batchnorm, freeze_masks
from .permutation import Permutation, permutation_of, permute_channels
from .plan import LayerPlan, Plan, Treatment, plan_of
from .registry import register_leaf_function, register_leaf_module, register_norm
from .reporting import LayerReport, Report, report
from .rewrite import prepare
from .scheduling import MaskSchedule, MaskScheduler
from .verification import VerificationError, VerifyResult, verify

__all__ = [
    # configure, prepare, train
    "SpReConfig",
    "permute_channels",
    "permutation_of",
    "Permutation",
    "prepare",
    "MaskScheduler",
    "MaskSchedule",
    "freeze_masks",
    "recalibrate_bn",
    "convert_sync_batchnorm",
    "register_leaf_module",
    "register_leaf_function",
    "register_norm",
    # what prepare decided
    "plan_of",
    "Plan",
    "LayerPlan",
    "Treatment",
    # convert, deploy
    "convert",
    "deployed_like",
    "FoldedBatchNorm",
    "to_semi_structured",
    "advise",
    "Advice",
    "KernelAdvice",
    "FlopEstimate",
    "export_onnx",
    "OnnxExport",
    "OnnxWeight",
    # report, verify
    "report",
    "Report",
    "LayerReport",
    "verify",
    "VerifyResult",
    "VerificationError",
]

__version__ = "0.2.0"
