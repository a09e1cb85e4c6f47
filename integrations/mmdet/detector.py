"""`SpReDetector`: build any mmdet detector from its config and prepare it for SpRe N:M training.

    model = dict(type='SpReDetector', detector=dict(type='RetinaNet', ...), nm=(2, 4))

A *builder* registered in mmdet's `MODELS` (mmdet registries accept functions): it returns the
detector's own class (a RetinaNet stays a RetinaNet), so mmdet's tools, `init_detector` and
analysis tools work unchanged. With `deploy=True` it returns `spre_fx.convert` of the prepared
detector: the architecture of a deployed checkpoint (`SpReHook` writes one), plain N:M convs
with the SpRe branches and BatchNorms folded in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from mmdet.registry import MODELS
from mmengine.dist import is_distributed
from torch import nn

import spre_fx

__all__ = ["SpReDetector", "SPRE_OPTIONS"]

# Options beyond `nm` that map to spre_fx.SpReConfig (spre, include, skip, dense_stem, decay,
# silent_branch).
SPRE_OPTIONS = tuple(f.name for f in dataclasses.fields(spre_fx.SpReConfig) if f.name != "nm")


def _sync_bn_to_bn2d(module: nn.Module) -> nn.Module:
    """torch SyncBatchNorm -> BatchNorm2d, same parameters, buffers and mode.

    mmengine's Runner reverts SyncBN when it does not train distributed (`Runner.wrap_model`,
    after the model is built): done after `prepare` it would drop the SpRe branches, and its
    `_BatchNormXd` is no BatchNorm2d spre_fx pairs with a Conv2d. mmdet builds SyncBN for 2-d
    feature maps, so BatchNorm2d is the faithful single-process form.
    """
    if isinstance(module, nn.SyncBatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        bn = nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
        )
        with torch.no_grad():
            bn.weight, bn.bias = module.weight, module.bias
        bn.running_mean, bn.running_var = module.running_mean, module.running_var
        bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = _sync_bn_to_bn2d(child)
        if new is not child:
            setattr(module, name, new)
    return module


def SpReDetector(
    detector: dict | nn.Module,
    nm=(2, 4),
    deploy: bool = False,
    backbone: dict | None = None,
    **options: Any,
) -> nn.Module:
    """Build `detector` (an mmdet model config dict) and prepare it with spre_fx.

    Args:
        detector: the detector's config dict (any mmdet detector), or a built detector.
        nm: (N, M) of the N:M sparsity, (2, 4) for sparse tensor cores.
        deploy: return the converted (deployable) detector instead of the prepared one: the
            architecture that `deploy.pth` written by `SpReHook` loads into.
        backbone: keys that replace those of `detector['backbone']`. Tools that read or edit
            `cfg.model.backbone` reach the detector's backbone through it (mmdet's
            `init_detector` sets `model.backbone.init_cfg = None`), and configs say
            `backbone=dict(init_cfg=None)` without repeating the detector.
        options: other fields of `spre_fx.SpReConfig` (spre, include, skip, dense_stem, decay,
            silent_branch).

    Returns:
        The detector, of its own class, prepared in place (or converted with `deploy=True`).
        `spre_fx.report(model)` says what was done to each layer and why.
    """
    unknown = sorted(set(options) - set(SPRE_OPTIONS))
    if unknown:
        raise TypeError(
            f"SpReDetector got unknown option(s) {unknown}; valid: nm, deploy, {', '.join(SPRE_OPTIONS)}"
        )
    if backbone:
        if isinstance(detector, nn.Module) or "backbone" not in detector:
            raise TypeError("SpReDetector(backbone=...) needs a detector config dict with a backbone")
        detector = dict(detector, backbone=dict(detector["backbone"], **backbone))
    model = detector if isinstance(detector, nn.Module) else MODELS.build(detector)
    if not is_distributed():
        model = _sync_bn_to_bn2d(model)  # what the Runner would do, done before prepare
    model = spre_fx.prepare(model, nm=tuple(nm), inplace=True, **options)
    if deploy:
        model = spre_fx.convert(model, inplace=True)
    return model


MODELS.register_module(name="SpReDetector", module=SpReDetector)
