"""What every trainer integration does with a prepared model, whatever the trainer: the order.

A trainer (Lightning, the Hugging Face `Trainer`) builds its optimizer and loads a checkpoint in
its own order, with hooks at fixed points. `TrainingSession` is the framework-free part of the
callbacks in `spre_fx.integrations.lightning` and `spre_fx.integrations.transformers`; each
callback only maps the trainer's hooks onto these steps:

1. `hold()` before the trainer may load a checkpoint: every N:M layer's masks are held as they
   are, so that a checkpoint's masks load bit for bit (a free layer would re-derive them from the
   loaded weights, which differ from the saved masks wherever the schedule held them).
2. `start(optimizer, state)` once the trainer built its optimizer: a `spre_fx.MaskScheduler` is
   attached to it (exactly one: a scheduler left from an earlier run is removed first), the
   holds are let go, and on resume the scheduler continues at the saved step.
3. `scalars()` after each batch: the mask statistics of the last optimizer step, once per step.
4. `state_dict()` into the trainer's checkpoints; `stop()` at the end of training.
5. `deploy(example_inputs, export_dir)`: convert, verify, report, and write them.

Only spre_fx's public API is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import spre_fx

__all__ = ["TrainingSession", "SessionCallback", "Deployment", "find_prepared", "first_input"]

# model -> names of the layers a session holds. Kept per model, not per session: a trainer may
# replace a callback by a new instance (the Hugging Face Trainer does when it restores callback
# states), and the new one must let go of what the old one held.
_HOLDS: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def find_prepared(root: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost module under `root` (itself included) that `spre_fx.prepare` returned, with
    its qualified name; None when there is none. ValueError when there are several side by side
    (one scheduler drives one model) or the one found is already converted."""
    found = []
    for name, module in root.named_modules():
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue
        try:
            spre_fx.plan_of(module)
        except ValueError:
            continue
        found.append((name, module))
    if len(found) > 1:
        names = ", ".join(repr(n) for n, _ in found)
        raise ValueError(f"found several models prepared by spre_fx side by side ({names}); one "
                         "callback drives one: prepare their common parent instead")
    if found and spre_fx.plan_of(found[0][1]).stage != "prepared":
        raise ValueError(f"'{found[0][0] or type(root).__name__}' is a converted model: train the "
                         "prepared one (spre_fx.convert is the last step)")
    return found[0] if found else None


def first_input(batch: Any) -> Any:
    """The model input of a batch, by `spre_fx.recalibrate_bn`'s convention: a tensor is the
    input, a list/tuple's first element is, a mapping is keyword arguments (returned as is)."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    return batch


@contextlib.contextmanager
def _own_forward(model: nn.Module) -> Iterator[None]:
    """Set aside an instance attribute `forward` (accelerate wraps the Trainer's model in autocast
    that way) for the block: the deployed model is the class's own forward, without the training
    wrapper (a copy would keep it, rebound to itself, or be refused where it would still call the
    original), and `verify` sees each model's dtype, not autocast switched on inside a forward."""
    wrapper = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if wrapper is not None:
            model.__dict__["forward"] = wrapper


@dataclass(frozen=True)
class Deployment:
    """What `TrainingSession.deploy` made: the converted model, the verification (None when no
    example input was given), the report of the converted model and the files written."""

    model: nn.Module
    verification: spre_fx.VerifyResult | None
    report: spre_fx.Report
    files: tuple[str, ...] = ()


class TrainingSession:
    """One prepared model trained by one trainer: scheduler, resume, statistics, deployment."""

    def __init__(self, model: nn.Module, schedule: spre_fx.MaskSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.scheduler: spre_fx.MaskScheduler | None = None
        plan = spre_fx.plan_of(model, stage="prepared")
        self.layers = {lp.name: model.get_submodule(lp.name)
                       for lp in plan.layers if lp.treatment != spre_fx.Treatment.DENSE}
        self._logged_step: Any = None
        self._stopped_state: dict[str, Any] | None = None  # the scheduler's state when it was detached

    # ------------------------------------------------------------------ before the optimizer
    def hold(self) -> None:
        """Hold every N:M layer's masks as they are now (layers the user froze stay the user's)."""
        if self.scheduler is not None:
            return  # a scheduler already holds them
        held = _HOLDS.setdefault(self.model, [])
        for name, layer in self.layers.items():
            if not layer.spre_fx.frozen and name not in held:
                layer.freeze_masks()
                held.append(name)

    def _release(self) -> None:
        for name in _HOLDS.pop(self.model, []):
            self.layers[name].freeze_masks(False)

    # ------------------------------------------------------------------ training
    def start(self, optimizer: Any, state: dict[str, Any] | None = None) -> spre_fx.MaskScheduler:
        """Attach the scheduler to `optimizer`; `state` (a `state_dict()`) resumes it."""
        self._detach()  # one scheduler per model: the one of an earlier fit goes first (holds stay)
        if state is None:
            self._release()  # a fresh start: the masks of the weights as they are now
            self.scheduler = spre_fx.MaskScheduler(self.model, optimizer, self.schedule)
        else:
            # The held masks are those the checkpoint brought: the scheduler takes them as they are.
            self.scheduler = spre_fx.MaskScheduler(self.model, optimizer, self.schedule)
            self._release()
            self.scheduler.load_state_dict(state["scheduler"])
        self._logged_step = None
        return self.scheduler

    def scalars(self) -> dict[str, Any]:
        """The last optimizer step's mask statistics (`spre/...`), once per step; {} between steps
        or without `track_stats`. Values are what the scheduler holds (numbers or tensors)."""
        stats = self.scheduler.stats if self.scheduler is not None else None
        if not stats or stats["step"] == self._logged_step:
            return {}
        self._logged_step = stats["step"]
        out = {
            "spre/mask_step": stats["step"],
            "spre/nm_flip_rate": stats["nm_flip_rate"],
            "spre/spatial_mask_changes": stats["spatial_mask_changes"],
        }
        sparsity = list(stats["sparsity"].values())
        if sparsity:
            out["spre/mask_sparsity"] = sum(sparsity) / len(sparsity)
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the model's state dict (which holds the masks)."""
        plan = spre_fx.plan_of(self.model)
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else self._stopped_state
        return {"scheduler": scheduler, "nm": list(plan.config.nm), "version": spre_fx.__version__}

    def stop(self) -> None:
        """Detach the scheduler (`MaskScheduler.remove`) and let go of any hold."""
        self._detach()
        self._release()

    def _detach(self) -> None:
        if self.scheduler is not None:
            self._stopped_state = self.scheduler.state_dict()  # a checkpoint saved after fit resumes here
            self.scheduler.remove()
            self.scheduler = None

    # ------------------------------------------------------------------ after training
    def deploy(self, example_inputs: Any = None,
               export_dir: str | os.PathLike | None = None) -> Deployment:
        """`spre_fx.convert` the model (the masks in force, before the scheduler lets go), then
        `spre_fx.verify` it against the prepared model on `example_inputs` (a tensor, a tuple of
        positional inputs or a mapping of keyword inputs; raises `spre_fx.VerificationError`),
        and, with `export_dir`, write `spre_report.txt`, `spre_report.json` and `deployed.pt`
        (the converted model's state dict). Both models run their class's own forward: a
        forward wrapper in the instance (accelerate's autocast under fp16/bf16) is set aside."""
        with _own_forward(self.model):
            deployed = spre_fx.convert(self.model)
            verification = None
            if isinstance(example_inputs, dict):
                verification = spre_fx.verify(self.model, deployed, (), example_kwargs=example_inputs)
            elif example_inputs is not None:
                verification = spre_fx.verify(self.model, deployed, example_inputs)
        rep = spre_fx.report(deployed)
        files: list[str] = []
        if export_dir is not None:
            os.makedirs(export_dir, exist_ok=True)
            names = ("spre_report.txt", "spre_report.json", "deployed.pt")
            files = [os.path.join(export_dir, n) for n in names]
            with open(files[0], "w", encoding="utf-8") as f:
                f.write(str(rep) + "\n")
            with open(files[1], "w", encoding="utf-8") as f:
                json.dump(rep.to_dict(), f, indent=1)
            torch.save({k: v.detach().cpu() for k, v in deployed.state_dict().items()}, files[2])
        return Deployment(deployed, verification, rep, tuple(files))


class SessionCallback:
    """The framework-free half of a trainer callback (Lightning's, the Hugging Face Trainer's):
    its options, the `TrainingSession` of the model it drives, the hold before a checkpoint may
    load, and the end of training. The callback classes add the trainer's hooks.

    Args:
        schedule: a `spre_fx.MaskSchedule`, or its fields as keyword arguments (counted in
            optimizer steps; `track_stats` follows `log_stats`). Validated here, not after a
            long setup.
        log_stats: the callback logs the mask statistics.
        deploy: convert, verify and report at the end of training (implied by `export_dir`).
        export_dir: where `TrainingSession.deploy` writes its files.
        example_inputs: what `spre_fx.verify` runs (None: the trainer's first training batch).
    """

    def __init__(
        self,
        schedule: spre_fx.MaskSchedule | None = None,
        *,
        log_stats: bool = True,
        deploy: bool = False,
        export_dir: str | os.PathLike | None = None,
        example_inputs: Any = None,
        **schedule_fields: Any,
    ) -> None:
        if schedule is not None and schedule_fields:
            raise ValueError("pass either schedule=spre_fx.MaskSchedule(...) or its fields, not both")
        fields = {**(vars(schedule) if schedule is not None else schedule_fields), "track_stats": log_stats}
        self.schedule = spre_fx.MaskSchedule(**fields)
        self.log_stats = log_stats
        self.deploy = deploy or export_dir is not None
        self.export_dir = export_dir
        self.example_inputs = example_inputs
        self.session: TrainingSession | None = None
        self.deployment: Deployment | None = None

    def attach(self, model: nn.Module) -> TrainingSession:
        """The session of `model`: the one this callback has, or a new one when the trainer's
        prepared model is another object (a new fit, a model rebuilt in `configure_model`)."""
        if self.session is None or self.session.model is not model:
            self.session = TrainingSession(model, self.schedule)
        return self.session

    def hold(self, model: nn.Module) -> None:
        """Before the trainer may load a checkpoint: `model`'s masks held as they are
        (`TrainingSession.hold`), so that the checkpoint's masks load bit for bit."""
        self.attach(model).hold()

    def finish(self, main_process: bool, example: Callable[[], Any]) -> None:
        """The end of training: with `deploy`, on the main process only, `TrainingSession.deploy`
        on `example()` (called only then), kept as `self.deployment`; then the scheduler is
        detached and any hold let go, also when deployment raised."""
        if self.session is None:
            return
        try:
            if self.deploy and main_process:
                self.deployment = self.session.deploy(example(), self.export_dir)
        finally:
            self.session.stop()
