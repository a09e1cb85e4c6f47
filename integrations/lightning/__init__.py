"""spre_fx for PyTorch Lightning 2.x: `SpReCallback` (docs/lightning.md).

    trainer = L.Trainer(callbacks=[SpReCallback(nm=(2, 4))])   # prepares, schedules, resumes, logs
    trainer.fit(lit_module)

Needs the `lightning` extra: `pip install "spre_fx[lightning]"`. `import spre_fx` does not import it.
"""

from .. import requires_extra

with requires_extra(__name__, "lightning", "PyTorch Lightning 2.x"):
    from .callback import SpReCallback

__all__ = ["SpReCallback"]
