"""`SpReTrainerCallback`: mask schedule, checkpoints, logs and deployment for the Hugging Face Trainer.

Where each step sits (transformers/trainer.py, `Trainer.__init__` and `Trainer.train`):

    spre_fx.prepare(model)                     <- the user, before the Trainer (new parameters)
    Trainer(..., callbacks=[cb]): on_init_end  <- hold the masks
    train(resume_from_checkpoint=...): the model's weights and masks load; the optimizer is built
        (accelerate wraps it), its state loads; TrainerState loads from trainer_state.json
    on_train_begin                             <- attach the MaskScheduler; on resume, its saved step
    on_log                                     <- the mask statistics join the Trainer's logs
    checkpoint: trainer_state.json             <- the scheduler's state (`ExportableState.state()`)
    on_train_end                               <- convert, verify, report (optional); detach

Gradient accumulation and fp16/bf16 need nothing: the scheduler counts the optimizer's real
steps (accelerate calls `step()` once per accumulated batch; a step the fp16 GradScaler skips is
no step, though `state.global_step` counts it).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.trainer_callback import ExportableState, TrainerCallback

from ..session import SessionCallback, find_prepared, first_input

__all__ = ["SpReTrainerCallback"]


class SpReTrainerCallback(TrainerCallback, ExportableState, SessionCallback):
    """Drive the N:M / SpRe masks of a prepared model from the Trainer's optimizer.

        model = spre_fx.prepare(model, nm=(2, 4))
        trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpReTrainerCallback()])

    - on_init_end: finds the prepared model (the Trainer's model or one submodule) and holds its
      masks, so that `resume_from_checkpoint` loads them bit for bit.
    - on_train_begin: attaches a `spre_fx.MaskScheduler` to the Trainer's optimizer (once; a
      scheduler from an earlier `train()` is removed first); on resume it continues at the step
      saved in the checkpoint's trainer_state.json.
    - on_log: `spre/mask_step`, `spre/nm_flip_rate`, `spre/spatial_mask_changes`,
      `spre/mask_sparsity` of the last optimizer step are added to the logs: the Trainer's
      `state.log_history` and every callback after this one (the progress bar, and reporters
      passed after it in `callbacks=`: `report_to` integrations come first, so see docs/transformers.md).
    - on_train_end: with `deploy=True` (or `export_dir`), `spre_fx.convert`, `spre_fx.verify` on
      `example_inputs` (default: the first training batch, as keyword arguments) and
      `spre_fx.report`, kept as `self.deployment`; `export_dir` also gets `spre_report.txt`,
      `spre_report.json`, `deployed.pt` (main process). Then the scheduler is detached.

    Args (`SessionCallback`'s, integrations/session.py):
        schedule: a `spre_fx.MaskSchedule`, or its fields as keyword arguments (counted in
            optimizer steps, accumulation included; `track_stats` follows `log_stats`).
        log_stats, deploy, export_dir, example_inputs: see above.
    """

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict[str, Any]:
        """What trainer_state.json keeps: the constructor's plain arguments (the Trainer rebuilds
        the callback from them with `restore_callback_states_from_checkpoint=True`) and the
        scheduler's state."""
        plain = {k: v for k, v in vars(self.schedule).items()
                 if k != "track_stats" and (v is None or isinstance(v, (int, float)))}
        args = {**plain, "log_stats": self.log_stats, "deploy": self.deploy,
                "export_dir": None if self.export_dir is None else os.fspath(self.export_dir)}
        scheduler = self.session.state_dict()["scheduler"] if self.session is not None else None
        return {"args": args, "attributes": {"mask_scheduler": scheduler}}

    @staticmethod
    def _saved_scheduler(state) -> dict[str, Any] | None:
        """The scheduler state in a TrainerState loaded from a checkpoint (None on a fresh start)."""
        if not state.global_step:
            return None
        saved = (state.stateful_callbacks or {}).get(SpReTrainerCallback.__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        return (saved or {}).get("attributes", {}).get("mask_scheduler")

    # ------------------------------------------------------------------ events
    @staticmethod
    def _prepared(model: nn.Module) -> nn.Module:
        found = find_prepared(model)
        if found is None:
            raise RuntimeError(
                f"SpReTrainerCallback found no model prepared by spre_fx in the Trainer's "
                f"{type(model).__name__}: call model = spre_fx.prepare(model) before Trainer(model, ...) "
                "(the optimizer must see the SpRe parameters)"
            )
        return found[1]

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.hold(self._prepared(model))  # a checkpoint loaded by train() keeps its masks

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        session = self.attach(self._prepared(model))
        saved = self._saved_scheduler(state)
        # accelerate's AcceleratedOptimizer subclasses torch's Optimizer without its hook tables;
        # its step() calls the wrapped optimizer's (through the GradScaler under fp16): hook that.
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        session.start(optimizer, {"scheduler": saved} if saved else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.session is None or not self.log_stats or logs is None:
            return
        scalars = {k: float(v) for k, v in self.session.scalars().items()}
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # the Trainer appended this log's copy already

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        def example() -> Any:
            if self.example_inputs is None and train_dataloader is not None:
                return first_input(next(iter(train_dataloader)))
            return self.example_inputs

        self.finish(state.is_world_process_zero, example)
