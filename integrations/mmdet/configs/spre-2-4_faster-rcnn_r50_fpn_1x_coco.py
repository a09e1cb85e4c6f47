# Faster R-CNN-R50-FPN, 1x COCO, SpRe 2:4, trained from scratch (docs/method.md §5).
# Two-stage detectors do not trace whole with fx: spre_fx prepares the backbone, neck, RPN and
# RoI heads where they trace (spre_report.txt in the work dir lists every layer and why).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='SpReDetector',
    nm=(2, 4),
    detector={{_base_.model}},  # mmdet's Faster R-CNN, unchanged
    # Merged into detector.backbone: from scratch, every stage and BatchNorm trains.
    backbone=dict(init_cfg=None, frozen_stages=-1, norm_eval=False),
)

custom_hooks = [dict(type='SpReHook')]
