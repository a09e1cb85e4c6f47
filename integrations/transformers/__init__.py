"""spre_fx for the Hugging Face `Trainer` (transformers 5.x): `SpReTrainerCallback` (docs/transformers.md).

    model = spre_fx.prepare(ResNetForImageClassification(config), nm=(2, 4))   # before the Trainer
    trainer = Trainer(model, args, train_dataset=..., callbacks=[SpReTrainerCallback()])

Needs the `transformers` extra: `pip install "spre_fx[transformers]"` (transformers and accelerate).
`import spre_fx` does not import it.
"""

from .. import requires_extra

with requires_extra(__name__, "transformers", "transformers 5.x and accelerate"):
    from .callback import SpReTrainerCallback

__all__ = ["SpReTrainerCallback"]
