"""spre_fx for mmdetection 3.x / mmengine: `SpReDetector`, `SpReHook`, weights-only resume.

    custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='SpReDetector', detector=<any mmdet detector dict>, nm=(2, 4))
    custom_hooks = [dict(type='SpReHook')]

Importing this package registers `SpReDetector` in mmdet's MODELS, `SpReHook` in mmengine's
HOOKS, and the types mmengine checkpoints need with `torch.serialization.add_safe_globals`
(checkpoint.py). README.md has the commands; configs/ the shipped configs.
"""

from .checkpoint import SAFE_GLOBALS, register_safe_globals

register_safe_globals()

from .detector import SpReDetector  # noqa: E402
from .hook import SpReHook  # noqa: E402

__all__ = ["SpReDetector", "SpReHook", "SAFE_GLOBALS", "register_safe_globals"]
