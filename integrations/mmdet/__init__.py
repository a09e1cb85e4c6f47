"""spre_fx for mmdetection 3.x / mmengine: `SpReDetector`, `SpReHook`, weights-only resume.

    custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='SpReDetector', detector=<any mmdet detector dict>, nm=(2, 4))
    custom_hooks = [dict(type='SpReHook')]

Importing this package registers `SpReDetector` in mmdet's MODELS, `SpReHook` in mmengine's
HOOKS, and the types mmengine checkpoints need with `torch.serialization.add_safe_globals`
(checkpoint.py). README.md has the commands; configs/ the shipped configs.
"""

from .. import requires_extra

# mmdet, mmcv, mmengine, or numpy, which they need
with requires_extra(__name__, "mmdet", "mmdetection 3.x, mmcv 2.1.0 (built from source for torch 2.14: "
                    "scripts/setup_venv.sh) and mmengine"):
    from .checkpoint import SAFE_GLOBALS, register_safe_globals
    from .detector import SpReDetector
    from .hook import SpReHook

register_safe_globals()

__all__ = ["SpReDetector", "SpReHook", "SAFE_GLOBALS", "register_safe_globals"]
