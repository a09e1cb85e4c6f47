"""What torch's 2:4 semi-structured kernels take: backends, dtypes, patterns, shapes, GPUs.

The constraints are read from the installed torch (`_DTYPE_SHAPE_CONSTRAINTS` of
`torch.sparse.SparseSemiStructuredTensorCUSPARSELT` / `...CUTLASS`), so a torch upgrade that
relaxes them is picked up. The advisor and the backend both decide from here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "KERNELS",
    "HW_PATTERN",
    "backend_classes",
    "constraints",
    "check_kernel",
    "kernels_to_try",
    "capability",
    "is_packed",
    "implies",
]

KERNELS = ("auto", "cusparselt", "cutlass")

# The pattern the hardware reads per dtype: 2:4 for 16-bit floats and int8; float32 runs on
# CUTLASS as 1:2 over 32-bit pairs (TF32 math); cuSPARSELt has no float32 kernel.
HW_PATTERN = {
    torch.float16: (2, 4),
    torch.bfloat16: (2, 4),
    torch.int8: (2, 4),
    torch.float32: (1, 2),
}


def backend_classes() -> dict[str, type]:
    return {
        "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    }


def constraints(kernel: str) -> dict:
    return backend_classes()[kernel]._DTYPE_SHAPE_CONSTRAINTS


def check_kernel(kernel: str, *, auto: bool = True) -> None:
    """Raise ValueError unless `kernel` names a 2:4 backend ("auto" too, unless `auto=False`)."""
    allowed = KERNELS if auto else KERNELS[1:]
    if kernel not in allowed:
        raise ValueError(f"kernel must be one of {allowed}, found {kernel!r}")


def kernels_to_try(kernel: str, capability: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Backends to try, best first: cuSPARSELt (looser shapes) when torch was built with it, then
    CUTLASS, whose torch kernels run on compute capability 8.x only (`capability` None: unknown)."""
    check_kernel(kernel)
    cutlass_ok = capability is None or capability[0] == 8
    if kernel == "cutlass" and not cutlass_ok:
        raise ValueError(f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only, this GPU is "
                         f"{capability[0]}.{capability[1]}: use kernel='cusparselt' or 'auto'")
    if kernel != "auto":
        return (kernel,)
    have_lt = torch.backends.cusparselt.is_available()
    return ("cusparselt",) * have_lt + ("cutlass",) * cutlass_ok


def capability(model: nn.Module) -> tuple[int, int] | None:
    """Compute capability of the GPU holding `model` (None when it is not on one)."""
    p = next((p for p in model.parameters() if p.device.type == "cuda"), None)
    return None if p is None else torch.cuda.get_device_capability(p.device)


def is_packed(weight: Any) -> bool:
    return isinstance(weight, torch.sparse.SparseSemiStructuredTensor)


def implies(n: int, m: int, hn: int, hm: int) -> bool:
    """Does every N:M weight (groups aligned along K) also satisfy hn:hm?"""
    if m % hm == 0:
        return n <= hn
    if hm % m == 0:
        return n * (hm // m) <= hn
    return False
