"""Framework plugins for spre_fx (mmdetection, ...): each needs its framework, named by an extra.

`import spre_fx` imports none of them. An integration imported without its framework raises a
ModuleNotFoundError that names the extra to install (`requires_extra`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["requires_extra"]


@contextmanager
def requires_extra(integration: str, extra: str, needs: str) -> Iterator[None]:
    """Imports inside the block that fail for a missing package (not for spre_fx's own modules)
    raise a ModuleNotFoundError naming the extra to install: `pip install "spre_fx[<extra>]"`.

        with requires_extra(__name__, "mmdet", "mmdetection 3.x, mmcv and mmengine"):
            from .detector import SpReDetector
    """
    try:
        yield
    except ModuleNotFoundError as err:
        if (err.name or "spre_fx").partition(".")[0] == "spre_fx":
            raise
        raise ModuleNotFoundError(f"{integration} needs {needs} ('{err.name}' is not installed): "
                                  f'pip install "spre_fx[{extra}]"', name=err.name) from err
