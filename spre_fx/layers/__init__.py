"""Train-time layers: what `prepare` puts in place of the user's convs, linears and BatchNorms.

`nm`: plain N:M layers and the mask ownership every train-time layer shares (`NMLayer`).
`spre`: the SpRe dual branch (`SpReConv2d` with its `SpReNorm`).
`tapconv`: the extra branch's conv over the kernel taps its spatial mask keeps.
"""

from .nm import (
    NM_CLASSES,
    LayerState,
    MaskStep,
    NMConv1d,
    NMConv2d,
    NMConv3d,
    NMLayer,
    NMLinear,
    effective_weight,
    freeze_masks,
    masks_of,
)
from .spre import (
    NormState,
    SpReBatchNorm2d,
    SpReBranches,
    SpReConv2d,
    SpReNorm,
    SpReSyncBatchNorm,
    convert_sync_batchnorm,
)

__all__ = [
    "NM_CLASSES",
    "LayerState",
    "MaskStep",
    "NMLayer",
    "NMConv1d",
    "NMConv2d",
    "NMConv3d",
    "NMLinear",
    "effective_weight",
    "masks_of",
    "freeze_masks",
    "SpReBranches",
    "SpReConv2d",
    "NormState",
    "SpReNorm",
    "SpReBatchNorm2d",
    "SpReSyncBatchNorm",
    "convert_sync_batchnorm",
]
