"""spre_fx for mmdetection 3.x / mmengine: `SpReDetector`, `SpReHook`, weights-only resume.

    custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)
    model = dict(type='SpReDetector', detector=<any mmdet detector dict>, nm=(2, 4))
    custom_hooks = [dict(type='SpReHook')]

Importing this package registers `SpReDetector` in mmdet's MODELS, `SpReHook` in mmengine's
HOOKS, and the types mmengine checkpoints need with `torch.serialization.add_safe_globals`
(checkpoint.py). README.md has the commands; configs/ the shipped configs.
"""

try:
    from .checkpoint import SAFE_GLOBALS, register_safe_globals
    from .detector import SpReDetector
    from .hook import SpReHook
except ModuleNotFoundError as err:  # mmdet, mmcv, mmengine, or numpy, which they need
    if (err.name or "spre_fx").partition(".")[0] == "spre_fx":
        raise
    raise ModuleNotFoundError(
        f"spre_fx.integrations.mmdet needs mmdetection 3.x, mmcv and mmengine ('{err.name}' is not "
        'installed): pip install "spre_fx[mmdet]" (mmcv 2.1.0 may need building: scripts/setup_venv.sh)',
        name=err.name,
    ) from err

register_safe_globals()

__all__ = ["SpReDetector", "SpReHook", "SAFE_GLOBALS", "register_safe_globals"]
