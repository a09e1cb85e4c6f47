"""`SpReHook`: mask schedule, logging, checkpoint state, report and deployment for mmengine runs.

    custom_hooks = [dict(type='SpReHook')]                     # defaults: SR-STE, masks every step
    custom_hooks = [dict(type='SpReHook', warmup_steps=1000)]  # or any spre_fx.MaskSchedule field

The model must have been built prepared (`SpReDetector`): a hook runs after the Runner built the
model and its optimizer, too late to add parameters.
"""

from __future__ import annotations

import copy
import json
import os.path as osp
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
from torch import nn

import spre_fx
from spre_fx.layers import SpReNorm

from .detector import SpReDetector

__all__ = ["SpReHook"]

CHECKPOINT_KEY = "spre_fx"  # the hook's entry in mmengine checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


def _is_spre_hook(cfg: Any) -> bool:
    t = cfg.get("type") if isinstance(cfg, dict) else None
    return t in ("SpReHook", SpReHook) or (isinstance(t, str) and t.endswith(".SpReHook"))


@HOOKS.register_module()
class SpReHook(Hook):
    """Drive the N:M / spatial masks of a SpRe model from the optimizer, log and export it.

    - before_train: attaches `spre_fx.MaskScheduler` to the runner's optimizer (inside its
      OptimWrapper; a DDP model is unwrapped). On a fresh start the masks are recomputed from
      the weights `init_weights` / `load_from` left (they changed after `prepare`), and with
      `silent_branch` the SpRe branch BatchNorms start at γ = 0 again (mmengine's init resets
      every BatchNorm's γ to 1), unless the loaded checkpoint carried them. On resume the
      scheduler's step is restored from the checkpoint.
    - after_train_iter: mask statistics (`train/spre/...`) go to the runner's message hub, so
      the LoggerHook prints them and the visualizer backends (TensorBoard when configured) get
      them.
    - before_save_checkpoint / after_load_checkpoint: the scheduler state rides in the
      checkpoint under `spre_fx`.
    - after_train (main process): `spre_report.txt` / `spre_report.json` (spre_fx.report),
      `deploy.pth` (the state_dict of `spre_fx.convert(model)`) and `deploy_config.py` (the
      run's config, model built with `deploy=True`) in `runner.work_dir`:
      `python tools/test.py work_dir/deploy_config.py work_dir/deploy.pth` evaluates it.

    Args:
        warmup_steps, nm_interval, nm_freeze_after, spatial_interval, spatial_freeze_after,
            decay: the fields of `spre_fx.MaskSchedule`, counted in optimizer steps.
        log_stats: log mask statistics (the scheduler's `track_stats`).
        export: write the report and the deployed model after training.
        deploy_checkpoint / deploy_config: file names inside `runner.work_dir`.
    """

    priority = "NORMAL"

    def __init__(
        self,
        warmup_steps: int = 0,
        nm_interval: int = 1,
        nm_freeze_after: int | None = None,
        spatial_interval: int = 1,
        spatial_freeze_after: int | None = None,
        decay: float | None = None,
        log_stats: bool = True,
        export: bool = True,
        deploy_checkpoint: str = "deploy.pth",
        deploy_config: str = "deploy_config.py",
    ) -> None:
        self.schedule = spre_fx.MaskSchedule(  # validated now, not at the end of a long setup
            warmup_steps=warmup_steps,
            nm_interval=nm_interval,
            nm_freeze_after=nm_freeze_after,
            spatial_interval=spatial_interval,
            spatial_freeze_after=spatial_freeze_after,
            decay=decay,
            track_stats=log_stats,
        )
        self.export = export
        self.deploy_checkpoint = deploy_checkpoint
        self.deploy_config = deploy_config
        self.scheduler: spre_fx.MaskScheduler | None = None
        self._loaded_state: dict | None = None
        self._loaded_keys: set[str] | None = None
        self._logged_step = -1

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _plan(runner):
        model = _unwrap(runner.model)
        try:
            return spre_fx.plan_of(model)
        except ValueError as err:
            raise RuntimeError(
                f"SpReHook needs a model prepared by spre_fx: build it with "
                f"model=dict(type='SpReDetector', detector=..., nm=(2, 4)) ({err})"
            ) from err

    def before_run(self, runner) -> None:
        plan = self._plan(runner)
        if plan.stage != "prepared":
            return
        modules = dict(_unwrap(runner.model).named_modules())
        lost = [
            lp.norm for lp in plan.layers
            if lp.treatment == spre_fx.Treatment.SPRE and not isinstance(modules.get(lp.norm), SpReNorm)
        ]
        if lost:
            raise RuntimeError(
                f"the SpRe BatchNorms {lost[:3]}{'...' if len(lost) > 3 else ''} were replaced after "
                "SpReDetector built the model. mmengine's `sync_bn` config option does that: use "
                "norm_cfg=dict(type='SyncBN') in the detector config instead."
            )

    # ------------------------------------------------------------------ training
    def before_train(self, runner) -> None:
        plan = self._plan(runner)
        if plan.stage != "prepared":
            raise RuntimeError("SpReHook cannot train a converted (deploy=True) model")
        model = _unwrap(runner.model)
        optim_wrapper = runner.optim_wrapper
        if not hasattr(optim_wrapper, "optimizer"):
            raise TypeError(
                f"SpReHook drives one optimizer; {type(optim_wrapper).__name__} exposes no `.optimizer`"
            )
        if self.scheduler is not None:  # train() called again on the same runner
            self.scheduler.remove()
        self.scheduler = spre_fx.MaskScheduler(model, optim_wrapper, self.schedule)
        state = (self._loaded_state or {}).get("scheduler")
        if state is not None and runner.iter > 0:
            self.scheduler.load_state_dict(state)
            runner.logger.info(f"SpReHook: resumed the mask scheduler at step {self.scheduler.step}")
        else:
            self._fresh_start(plan, model)
        self._logged_step = -1

    def _fresh_start(self, plan, model: nn.Module) -> None:
        with torch.no_grad():
            if not self.schedule.warmup_steps:
                for layer in self.scheduler.layers.values():
                    layer.update_masks()
            if plan.config.silent_branch:
                modules = dict(model.named_modules())
                for lp in plan.layers:
                    if lp.treatment != spre_fx.Treatment.SPRE:
                        continue
                    rep = modules[lp.norm].rep
                    if rep.weight is not None and f"{lp.norm}.rep.weight" not in (self._loaded_keys or ()):
                        rep.weight.zero_()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        stats = self.scheduler.stats if self.scheduler is not None else None
        if not stats or stats["step"] == self._logged_step:
            return
        self._logged_step = stats["step"]
        hub = runner.message_hub
        hub.update_scalar("train/spre/mask_step", stats["step"])
        hub.update_scalar("train/spre/nm_flip_rate", stats["nm_flip_rate"])
        hub.update_scalar("train/spre/spatial_mask_changes", stats["spatial_mask_changes"])
        sparsity = list(stats["sparsity"].values())
        if sparsity:
            hub.update_scalar("train/spre/mask_sparsity", sum(sparsity) / len(sparsity))

    # ------------------------------------------------------------------ checkpoints
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.scheduler is not None:
            plan = self._plan(runner)
            checkpoint[CHECKPOINT_KEY] = dict(
                scheduler=self.scheduler.state_dict(), nm=list(plan.config.nm), version=spre_fx.__version__
            )

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Called before the weights are loaded and before before_train: keep what is needed.
        self._loaded_state = checkpoint.get(CHECKPOINT_KEY)
        keys = checkpoint.get("state_dict", checkpoint)
        self._loaded_keys = {k[len("module."):] if k.startswith("module.") else k for k in keys}

    # ------------------------------------------------------------------ export
    def after_train(self, runner) -> None:
        try:
            if self.export and is_main_process():
                self._export(runner)
        finally:
            if self.scheduler is not None:
                self.scheduler.remove()
                self.scheduler = None

    def _export(self, runner) -> None:
        model = _unwrap(runner.model)
        work_dir = runner.work_dir
        rep = spre_fx.report(model)
        with open(osp.join(work_dir, "spre_report.txt"), "w", encoding="utf-8") as f:
            f.write(str(rep) + "\n")
        with open(osp.join(work_dir, "spre_report.json"), "w", encoding="utf-8") as f:
            json.dump(rep.to_dict(), f, indent=1)

        deployed = spre_fx.convert(model)
        meta = dict(epoch=runner.epoch, iter=runner.iter, spre_fx=dict(nm=list(rep.nm), stage="converted"))
        dataset = getattr(runner.train_dataloader, "dataset", None)
        if getattr(dataset, "metainfo", None) is not None:
            meta["dataset_meta"] = dataset.metainfo  # init_detector reads the class names here
        ckpt_path = osp.join(work_dir, self.deploy_checkpoint)
        save_checkpoint(dict(meta=meta, state_dict=weights_to_cpu(deployed.state_dict())), ckpt_path)
        del deployed

        cfg_path = osp.join(work_dir, self.deploy_config)
        model_cfg = runner.cfg.get("model")
        model_type = model_cfg.get("type") if isinstance(model_cfg, dict) else None
        if model_type not in ("SpReDetector", "mmdet.SpReDetector", SpReDetector):
            runner.logger.warning(
                f"SpReHook: wrote {ckpt_path}, but no {self.deploy_config}: the runner's config has no "
                "model=dict(type='SpReDetector', ...) to build the deployed detector from"
            )
            return
        cfg = copy.deepcopy(runner.cfg)
        cfg.model = dict(copy.deepcopy(model_cfg), type="SpReDetector", deploy=True)
        if cfg.get("custom_hooks"):
            cfg.custom_hooks = [h for h in cfg.custom_hooks if not _is_spre_hook(h)]
        cfg.load_from = osp.abspath(ckpt_path)
        cfg.resume = False
        cfg.dump(cfg_path)
        runner.logger.info(
            f"SpReHook: deployed model written: python tools/test.py {cfg_path} {ckpt_path}; "
            f"sparsity report in {osp.join(work_dir, 'spre_report.txt')}"
        )
