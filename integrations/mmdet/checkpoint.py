"""Let mmengine checkpoints load under torch's default `torch.load(weights_only=True)`.

mmengine 0.10.7 resumes with a plain `torch.load` (weights_only=True by default since torch 2.6),
and its checkpoints hold a few non-tensor objects the weights-only unpickler refuses. The list
below is exactly what a real mmengine/mmdet checkpoint (Runner with CheckpointHook, SGD,
LinearLR + MultiStepLR, LoggerHook) needed, found with
`torch.serialization.get_unsafe_globals_in_checkpoint` and checked by loading it with
`weights_only=True` (tests/test_mmdet.py resumes that way):

- `mmengine.logging.history_buffer.HistoryBuffer`: every logged scalar in `message_hub`.
- `numpy.ndarray`, `numpy.dtype`, `numpy._core.multiarray._reconstruct`: the arrays inside a
  HistoryBuffer (`numpy.core.multiarray._reconstruct` in checkpoints written with numpy 1.x).
- `numpy.dtypes.Float64DType`, `numpy.dtypes.Int64DType` (numpy >= 1.25: the class of a dtype
  instance, which the unpickler checks when it restores the dtype's state): a HistoryBuffer's
  values (float64) and counts (int64). The platform's default int dtype is added where it differs.
- `numpy._core.multiarray.scalar`: numpy scalars, e.g. the `eta` in `message_hub.runtime_info`
  (`numpy.core.multiarray.scalar` from numpy 1.x).
- `builtins.getattr`: a HistoryBuffer pickles its statistics methods by qualified name
  (`getattr(HistoryBuffer, 'mean')`). The real `getattr` is NOT allowed: the name is bound to a
  stand-in that only looks up HistoryBuffer's registered statistics methods and refuses
  anything else.

Registered once, on import of `spre_fx.integrations.mmdet`; nothing else is turned off.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ["SAFE_GLOBALS", "register_safe_globals"]


# HistoryBuffer's built-in statistics; custom ones join `HistoryBuffer._statistics_methods`.
_STATISTICS = ("min", "max", "mean", "current")


def _history_buffer_getattr(owner, name: str):
    """`builtins.getattr` as HistoryBuffer pickles use it, and nothing more."""
    if owner is HistoryBuffer and (name in _STATISTICS or name in HistoryBuffer._statistics_methods):
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f"weights-only load: getattr({owner!r}, {name!r}) is not allowed; spre_fx.integrations.mmdet "
        "allows only HistoryBuffer statistics methods"
    )


def _numpy_multiarray():
    core = getattr(np, "_core", None)  # numpy >= 2
    return core.multiarray if core is not None else np.core.multiarray


_MA = _numpy_multiarray()
# The dtype classes of float64 / int64 values (numpy >= 1.25 has one class per dtype).
_DTYPE_CLASSES = {type(np.dtype(t)) for t in (np.float64, np.int64, np.int_)} - {np.dtype}

# (object, the name pickles refer to it by)
SAFE_GLOBALS: list[tuple[object, str]] = [
    (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    (_MA._reconstruct, "numpy._core.multiarray._reconstruct"),
    (_MA._reconstruct, "numpy.core.multiarray._reconstruct"),
    (_MA.scalar, "numpy._core.multiarray.scalar"),
    (_MA.scalar, "numpy.core.multiarray.scalar"),
    (_history_buffer_getattr, "builtins.getattr"),
    *((cls, f"{cls.__module__}.{cls.__qualname__}") for cls in sorted(_DTYPE_CLASSES, key=str)),
]


def register_safe_globals() -> None:
    """Allow exactly `SAFE_GLOBALS` in weights-only loads (idempotent)."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
