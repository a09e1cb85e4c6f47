"""Mask scheduling: when the N:M and spatial masks move, driven by the optimizer's own steps.

The scheduler attaches through the optimizer's step hooks, so it sees exactly the steps that
happen: a step skipped by `torch.amp.GradScaler` or held back by gradient accumulation changes no
mask. The pre-step hook adds SR-STE's decay λ(1 − M) ⊙ W to the gradient once per step, unscaled
(docs/method.md §1); the post-step hook moves the masks. Masks live in module buffers, so a model
checkpoint holds them.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import MaskStep, NMLayer, SpReConv2d, SpReNorm
from .layers.nm import scheduled_updates
from .module_tree import unwrap_model

__all__ = ["MaskSchedule", "MaskScheduler"]


@dataclass(frozen=True)
class MaskSchedule:
    """When masks change, counted in optimizer steps (validated on construction).

    warmup_steps: train dense (all-ones N:M masks) for the first K steps, then prune.
    nm_interval: recompute N:M masks every `nm_interval` steps (1 = SR-STE).
    nm_freeze_after: keep N:M masks fixed after this step (ASP-style fine-tuning); None = never.
    spatial_interval / spatial_freeze_after: the same for the SpRe spatial mask S.
    decay: λ of the SR-STE decay, a float or a function of the step.
    track_stats: compute per-step mask statistics (`MaskScheduler.stats`).
    """

    warmup_steps: int = 0
    nm_interval: int = 1
    nm_freeze_after: int | None = None
    spatial_interval: int = 1
    spatial_freeze_after: int | None = None
    decay: float | Callable[[int], float] | None = None
    track_stats: bool = False

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "nm_interval", "spatial_interval"):
            v = getattr(self, name)
            low = 0 if name == "warmup_steps" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, found {v!r}")
        for name in ("nm_freeze_after", "spatial_freeze_after"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be None or an int >= 0, found {v!r}")
        if self.decay is not None and not callable(self.decay):
            if not isinstance(self.decay, (int, float)) or self.decay < 0:
                raise ValueError(f"decay must be a float >= 0 or a function of the step, not {self.decay!r}")

    def updates(self, step: int, interval: int, freeze: int | None) -> bool:
        """Whether masks of this kind move after optimizer step `step` (1-based)."""
        if step < self.warmup_steps or (freeze is not None and step > freeze):
            return False
        return step == self.warmup_steps or (step - self.warmup_steps) % interval == 0


def _to_host(values: list[torch.Tensor | int]) -> list[int]:
    """Ints from a list of 0-dim integer tensors and ints, the tensors copied over in one stack."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [int(v) for v in values]
    device = tensors[0].device
    read = iter(torch.stack([t.to(device) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else int(v) for v in values]


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost torch optimizer inside wrappers that expose one as `.optimizer`: mmengine's
    OptimWrapper, and accelerate's AcceleratedOptimizer, an Optimizer subclass that skips
    `Optimizer.__init__` (no step hooks of its own) and steps the one it wraps."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
        if optimizer is None or seen > 8:
            raise TypeError("MaskScheduler needs a torch.optim.Optimizer or a wrapper exposing `.optimizer`")
    return optimizer


# optimizer -> the schedulers attached to it (weakly: a scheduler lives as long as its hook)
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _branch_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, branch parameter, the user's parameter it sits beside) for every SpRe branch."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, SpReConv2d):
            found.append((f"{name}.weight_rep", m.weight_rep, m.weight))
        elif isinstance(m, SpReNorm) and m.weight is not None:
            found += [(f"{name}.rep.{n}", p, m.weight) for n, p in m.rep.named_parameters()]
    return found


def _attached(scheduler: MaskScheduler | None) -> bool:
    handles = getattr(scheduler, "_handles", ())  # (): its __init__ raised before attaching
    return any(h.id in h.hooks_dict_ref() for h in handles)


def _check_attachable(scheduler: MaskScheduler, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything changes, a scheduler that would train nothing or the wrong thing:
    an optimizer without the model's (or the SpRe branches') parameters, and a second scheduler
    on the same model or optimizer. Then record `scheduler` as the optimizer's."""
    if any(_attached(ref()) for ref in _ATTACHED.get(optimizer, ())):
        raise ValueError(
            "this optimizer already drives a MaskScheduler: a second one would move masks on the same "
            "steps under another schedule. Call .remove() on the first before attaching another (one "
            "scheduler per optimizer; for two models, prepare and schedule them as one nn.ModuleDict)")
    scheduled = next((name for name, m in scheduler.layers.items() if m.spre_fx.scheduled), None)
    if scheduled is not None:
        raise ValueError(
            f"the masks of this model are already moved by a MaskScheduler (layer '{scheduled}'): a "
            "second one would override its schedule. Call .remove() on the first before attaching another")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable and not any(id(p) in held for p in trainable):
        raise ValueError(
            "the optimizer holds none of the prepared model's parameters, so nothing would train: it was "
            "probably built before spre_fx.prepare, which returns a copy by default. Build it from the "
            "prepared model (torch.optim.SGD(prepared.parameters(), ...)), or prepare(model, inplace=True)")
    missing = [name for name, p, beside in _branch_parameters(model)
               if p.requires_grad and id(p) not in held and id(beside) in held]
    if missing:
        raise ValueError(
            f"the optimizer lacks {len(missing)} SpRe branch parameter(s) (e.g. '{missing[0]}'), so the "
            "branches would never train: it was built before prepare(model, inplace=True) added them. "
            "Build the optimizer after prepare, from model.parameters()")
    _ATTACHED.setdefault(optimizer, []).append(weakref.ref(scheduler))


class MaskScheduler:
    """Moves the masks of a prepared model once per optimizer step, following a `MaskSchedule`.

        model = spre_fx.prepare(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = spre_fx.MaskScheduler(model, opt, warmup_steps=100)

    While attached, the layers' forwards leave their masks alone (`scheduled`) and their backwards add
    no decay: the scheduler adds λ(1 − M) ⊙ W to each weight's gradient inside `step()`, once per
    step, after a GradScaler unscaled it and after gradient clipping. `stats` holds the last step's
    statistics when `track_stats=True`: they stay tensors on the model's device until read, then one
    copy brings them all to the host. `state_dict()` / `load_state_dict()` resume.
    """

    def __init__(self, model: nn.Module, optimizer: Any, schedule: MaskSchedule | None = None,
                 **options: Any) -> None:
        if schedule is not None and options:
            raise ValueError("pass either schedule=MaskSchedule(...) or its fields, not both")
        self.schedule = schedule or MaskSchedule(**options)
        self.optimizer = _unwrap_optimizer(optimizer)
        self.layers = {n: m for n, m in unwrap_model(model).named_modules() if isinstance(m, NMLayer)}
        if not self.layers:
            raise ValueError("the model has no N:M layers: call spre_fx.prepare(model) first")
        _check_attachable(self, unwrap_model(model), self.optimizer)
        self.step = 0
        self._stats: dict[str, Any] = {}
        self._pending: tuple[int, dict[str, MaskStep]] | None = None
        for m in self.layers.values():
            m.attach_schedule()  # the scheduler holds the masks in force, not stale buffers
        self._set_warmup(self.schedule.warmup_steps > 0)
        self._apply_decay()
        self._handles = (self.optimizer.register_step_pre_hook(self._add_decay),
                         self.optimizer.register_step_post_hook(self._after_step))

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _add_decay(self, optimizer, args, kwargs) -> None:
        """SR-STE's decay, once per step: grad += λ (1 − M) ⊙ W on every layer that has a gradient.

        Runs inside `step()`. A GradScaler has unscaled a plain (or foreach) optimizer's gradients
        by then, and does not call `step()` on inf/NaN; a fused optimizer gets the scale as
        `optimizer.grad_scale` and unscales in its kernel, so the term is scaled by it here (a power
        of two: exact), and a step its kernel skips (`optimizer.found_inf`) applies none of it.
        """
        groups: dict[float, tuple[list, list, list]] = {}
        for m in self.layers.values():
            grad, decay = m.weight.grad, m.spre_fx.decay
            if grad is None or not decay:
                continue
            grads, weights, pruned = groups.setdefault(decay, ([], [], []))
            grads.append(grad)
            weights.append(m.weight.detach())
            pruned.append(m.pruned())
        scale = getattr(optimizer, "grad_scale", None)
        for decay, (grads, weights, pruned) in groups.items():
            if scale is not None:
                weights = torch._foreach_mul(weights, scale)
            torch._foreach_addcmul_(grads, weights, pruned, value=decay)

    def _after_step(self, optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return  # a fused optimizer's kernel skipped this step for a GradScaler: no step (one sync)
        self.step += 1
        s = self.schedule
        move_nm = s.updates(self.step, s.nm_interval, s.nm_freeze_after)
        move_spatial = s.updates(self.step, s.spatial_interval, s.spatial_freeze_after)
        if move_nm or move_spatial:
            self._update(move_nm, move_spatial)
        self._apply_decay()

    def _moving(self):
        """The layers whose masks this scheduler moves (frozen ones are held by the user)."""
        return ((name, m) for name, m in self.layers.items() if not m.spre_fx.frozen)

    def _update(self, move_nm: bool, move_spatial: bool) -> None:
        track = self.schedule.track_stats
        steps = scheduled_updates(list(self.layers.values()), move_nm, move_spatial, track=track)
        if track:
            self._pending = (self.step, dict(zip(self.layers, steps)))

    @property
    def stats(self) -> dict[str, Any]:
        """The last tracked update (`track_stats=True`; else empty): `step`, `nm_flip_rate` (share
        of N:M mask entries that flipped), `spatial_mask_changes` (taps that moved) and `sparsity`
        per layer name. Computed as tensors in the step; the first read after it copies them to
        the host at once (on a GPU, the one sync that tracking costs)."""
        if self._pending is not None:
            step, steps = self._pending
            self._pending = None
            counts = [c for s in steps.values() for c in (s.nm_flips, s.spatial_changes, s.nm_kept)]
            values = _to_host(counts)
            flips, changes, kept = values[0::3], values[1::3], values[2::3]
            total = sum(s.nm_total for s in steps.values())
            self._stats = {
                "step": step,
                "nm_flip_rate": sum(flips) / total if total else 0.0,
                "spatial_mask_changes": sum(changes),
                "sparsity": {name: 1.0 - k / s.numel for (name, s), k in zip(steps.items(), kept)},
            }
        return self._stats

    def _set_warmup(self, dense: bool) -> None:
        for _, m in self._moving():
            m.set_dense_warmup(dense)

    def _apply_decay(self) -> None:
        decay = self.schedule.decay
        if decay is None:
            return
        value = float(decay(self.step) if callable(decay) else decay)
        for m in self.layers.values():
            m.spre_fx.decay = value

    # ------------------------------------------------------------------ lifecycle
    def refresh_masks(self) -> None:
        """Recompute every mask from the current weights now (after re-initialising or loading
        weights without their masks); during a dense warm-up the N:M masks stay all-ones. The
        step count is kept."""
        self._update(move_nm=self.step >= self.schedule.warmup_steps, move_spatial=True)

    def _settled(self, freeze: int | None) -> bool:
        """Whether the schedule has fixed masks of this kind for good (no step moves them again)."""
        return freeze is not None and self.step >= freeze

    def remove(self) -> None:
        """Detach from the optimizer. Layers whose masks the schedule has fixed for good (every
        kind past its `*_freeze_after`) keep them frozen, as the schedule says, through eval,
        copies and convert; the others go back to following their weights."""
        for handle in self._handles:
            handle.remove()
        s = self.schedule
        nm_done, spatial_done = self._settled(s.nm_freeze_after), self._settled(s.spatial_freeze_after)
        partly = []
        for name, m in self.layers.items():
            kinds = (nm_done, spatial_done) if "spatial_mask" in m.mask_names else (nm_done,)
            if any(kinds) and not all(kinds):
                partly.append(name)
            m.detach_schedule(freeze=all(kinds))
        if partly:
            warnings.warn(
                f"MaskScheduler.remove(): the schedule fixed only some masks of {len(partly)} SpRe "
                f"layer(s) (e.g. '{partly[0]}'); they now follow their weights. Call "
                "spre_fx.freeze_masks(model) before remove() to keep every mask as it is.",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step (the masks themselves come with the model's state dict)."""
        self.step = int(state["step"])
        self._set_warmup(self.step < self.schedule.warmup_steps)
        self._apply_decay()
