# RetinaNet-R50-FPN, 1x COCO, SpRe 2:4, trained from scratch (docs/method.md §5: no ImageNet weights).
# mmdet's own config is inherited whole; only the model is wrapped by SpReDetector.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='SpReDetector',
    nm=(2, 4),
    detector={{_base_.model}},  # mmdet's RetinaNet, unchanged
    # Merged into detector.backbone: from scratch, every stage and BatchNorm trains.
    backbone=dict(init_cfg=None, frozen_stages=-1, norm_eval=False),
)

custom_hooks = [dict(type='SpReHook')]
