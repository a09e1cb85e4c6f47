"""`SpReCallback`: prepare, mask schedule, checkpoints, logging and deployment for Lightning 2.x.

Where each step sits in `Trainer.fit` (lightning/pytorch/trainer/trainer.py, `_run`):

    setup (callbacks, then the module)    <- prepare here, in place; hold the masks
    LightningModule.configure_model
    restore the module and callbacks from ckpt_path   (model state dict: masks bit for bit;
                                                       load_state_dict: the scheduler's state)
    strategy.setup: DDP wrap, configure_optimizers, precision
    on_fit_start                          <- attach the MaskScheduler to the built optimizer
    restore optimizer and loop state, train ...
    on_train_batch_end                    <- log the mask statistics
    state_dict (every checkpoint)         <- the scheduler's state
    on_fit_end                            <- convert, verify, report (optional); detach

`prepare` must run before `configure_optimizers` (the SpRe branches are new parameters) and
before a checkpoint is restored (its state dict holds them): `setup` is the one callback hook
before both. A module that builds its layers in `configure_model` (which runs after `setup`)
calls `spre_fx.prepare` there itself; the callback then finds the prepared model at `on_fit_start`.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

import spre_fx

from ..session import SessionCallback, find_prepared, first_input

__all__ = ["SpReCallback"]


class SpReCallback(pl.Callback, SessionCallback):
    """Train a LightningModule's model with N:M / SpRe masks.

        trainer = L.Trainer(callbacks=[SpReCallback(nm=(2, 4), export_dir="deploy")])

    - setup: unless a model under the LightningModule is already prepared (the module itself or
      one submodule: `spre_fx.prepare` in `__init__` or `configure_model`), the LightningModule
      (or its submodule named `module`) is prepared in place, with `nm` / `config`. In place
      because the Trainer trains the object it was given: there is no copy to hand back.
    - on_fit_start: a `spre_fx.MaskScheduler` is attached to the optimizer Lightning built (the
      one holding the N:M weights when there are several); on `ckpt_path=` resume it continues
      at the saved step with the masks the checkpoint holds, bit for bit.
    - on_train_batch_end: `spre/mask_step`, `spre/nm_flip_rate`, `spre/spatial_mask_changes`,
      `spre/mask_sparsity` through `LightningModule.log`, once per optimizer step (any logger).
    - on_fit_end: with `deploy=True` (or `export_dir`), `spre_fx.convert`, `spre_fx.verify` on
      `example_inputs` (default: the first training batch's input) and `spre_fx.report`, kept as
      `self.deployment`; `export_dir` also gets `spre_report.txt`, `spre_report.json` and
      `deployed.pt` (global rank 0). Then the scheduler is detached (`MaskScheduler.remove`).

    Args:
        nm: N:M of `spre_fx.prepare` (default 2:4); for a model prepared before fit, a check.
        config: a `spre_fx.SpReConfig` instead of `nm` (include, skip, dense_stem, ...).
        module: attribute path of the submodule to prepare (e.g. "model"); None = the LightningModule.
        schedule: a `spre_fx.MaskSchedule`, or its fields as keyword arguments (counted in
            optimizer steps; `track_stats` follows `log_stats`).
        log_stats: log the mask statistics.
        deploy, export_dir, example_inputs: see on_fit_end above.
    """

    def __init__(
        self,
        nm: tuple[int, int] | None = None,
        *,
        config: spre_fx.SpReConfig | None = None,
        module: str | None = None,
        schedule: spre_fx.MaskSchedule | None = None,
        log_stats: bool = True,
        deploy: bool = False,
        export_dir: str | os.PathLike | None = None,
        example_inputs: Any = None,
        **schedule_fields: Any,
    ) -> None:
        if nm is not None and config is not None:
            raise ValueError("pass either nm=(N, M) or config=spre_fx.SpReConfig(...), not both")
        super().__init__(schedule, log_stats=log_stats, deploy=deploy, export_dir=export_dir,
                         example_inputs=example_inputs, **schedule_fields)
        self.config = config if config is not None else spre_fx.SpReConfig(nm=tuple(nm or (2, 4)))
        # What to check on a model prepared before fit: the whole config, its N:M, or nothing.
        self._check_config = "config" if config is not None else "nm" if nm is not None else None
        self.module = module
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ prepare
    def _prepared_model(self, pl_module: pl.LightningModule, *, prepare: bool) -> nn.Module | None:
        found = find_prepared(pl_module)
        if found is not None:
            name, model = found
            config = spre_fx.plan_of(model).config
            if self._check_config and (config != self.config if self._check_config == "config"
                                       else config.nm != self.config.nm):
                raise ValueError(
                    f"'{name or type(pl_module).__name__}' was prepared with {config}, but SpReCallback "
                    f"was given {self.config}: drop the callback's nm/config or prepare with them"
                )
            return model
        if not prepare:
            return None
        target = pl_module.get_submodule(self.module) if self.module else pl_module
        return spre_fx.prepare(target, config=self.config, inplace=True)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        builds_later = is_overridden("configure_model", pl_module)
        model = self._prepared_model(pl_module, prepare=not builds_later)
        if model is None:
            return  # configure_model prepares it (checked at on_fit_start)
        self.hold(model)  # a checkpoint restored next loads its masks as they are

    # ------------------------------------------------------------------ train
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._prepared_model(pl_module, prepare=False)
        if model is None:
            raise RuntimeError(
                f"SpReCallback found no model prepared by spre_fx in {type(pl_module).__name__}: it "
                "overrides configure_model, which runs after the callback's setup; call "
                "spre_fx.prepare(...) on the model you build there"
            )
        session = self.attach(model)
        optimizer = self._optimizer(trainer, model)
        state, self._resume_state = self._resume_state, None
        session.start(optimizer, state if state and state.get("scheduler") else None)

    @staticmethod
    def _optimizer(trainer: pl.Trainer, model: nn.Module):
        weights = {id(p) for m in model.modules() for p in m.parameters(recurse=False)}
        holding = [o for o in trainer.optimizers
                   if any(id(p) in weights for g in o.param_groups for p in g["params"])]
        if len(holding) != 1:
            raise RuntimeError(
                f"SpReCallback drives the masks from one optimizer; {len(holding)} of the "
                f"{len(trainer.optimizers)} optimizers from configure_optimizers hold the prepared "
                "model's weights: return one optimizer for them"
            )
        return holding[0]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.session is None or not self.log_stats:
            return
        for key, value in self.session.scalars().items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
        if self.deploy and self.example_inputs is None:
            self.example_inputs = first_input(batch)  # for verify at on_fit_end

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict() if self.session is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after the model and before on_fit_start.
        if self.session is not None and self.session.scheduler is not None:
            self.session.scheduler.load_state_dict(state_dict["scheduler"])  # a strategy restoring late
        else:
            self._resume_state = state_dict

    # ------------------------------------------------------------------ end
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def example() -> Any:
            inputs = self.example_inputs
            return inputs.to(pl_module.device) if hasattr(inputs, "to") else inputs

        self.finish(trainer.is_global_zero, example)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.session is not None:
            self.session.stop()  # also after an exception; nothing when on_fit_end stopped it

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.session is not None:
            self.session.stop()
