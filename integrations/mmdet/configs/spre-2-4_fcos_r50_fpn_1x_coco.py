# FCOS-R50-FPN (GN head), 1x COCO, SpRe 2:4, trained from scratch (docs/method.md §5).
# mmdet's FCOS 1x config is the caffe-style one with frozen BatchNorms, made for Caffe ImageNet
# weights; from scratch the backbone is pytorch-style, its BatchNorms train, and the input is
# normalised with ImageNet statistics. The GN head convs get plain N:M (no BatchNorm to pair).
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'

custom_imports = dict(imports=['spre_fx.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='SpReDetector',
    nm=(2, 4),
    detector=dict(
        _base_.model,  # mmdet's FCOS, with ImageNet input statistics
        data_preprocessor=dict(
            _base_.model.data_preprocessor,
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True)),
    # Merged into detector.backbone.
    backbone=dict(
        style='pytorch',
        norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=None,
        frozen_stages=-1,
        norm_eval=False),
)

custom_hooks = [dict(type='SpReHook')]
