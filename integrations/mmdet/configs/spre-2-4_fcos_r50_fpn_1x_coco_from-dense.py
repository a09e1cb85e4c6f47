# FCOS-R50-FPN (GN head), 2:4, fine-tuned from mmdet's dense caffe-style FCOS (1x COCO,
# 36.6 box AP): the caffe backbone style and input normalisation of that checkpoint come back;
# the BatchNorms' affine parameters train (requires_grad=True, from the scratch config).
# With mmdet's fine-tuning settings (frozen_stages=1, norm_eval=True) no backbone BatchNorm
# trains, and SpRe's branch needs one that does: every backbone conv gets plain 2:4 (SR-STE),
# folded at deploy (spre_report.txt says why per layer). norm_eval=False (with SyncBN) gives
# stages 2-4 SpRe branches, which silent_branch=True then starts at gamma = 0.
_base_ = './spre-2-4_fcos_r50_fpn_1x_coco.py'

model = dict(
    silent_branch=True,
    detector=dict(
        data_preprocessor=dict(mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], bgr_to_rgb=False)),
    backbone=dict(style='caffe', frozen_stages=1, norm_eval=True),
)

load_from = 'https://download.openmmlab.com/mmdetection/v2.0/fcos/fcos_r50_caffe_fpn_gn-head_1x_coco/fcos_r50_caffe_fpn_gn-head_1x_coco-821213aa.pth'  # noqa: E501
