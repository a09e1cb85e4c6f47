# Faster R-CNN-R50-FPN, SpRe 2:4, fine-tuned from mmdet's dense Faster R-CNN (1x COCO, 37.4 box AP).
_base_ = './spre-2-4_faster-rcnn_r50_fpn_1x_coco.py'

model = dict(
    silent_branch=True,  # SpRe branches start silent: step one is the 2:4 projection of the dense model
    # mmdet's fine-tuning settings. With norm_eval=True no backbone BatchNorm trains, and SpRe's
    # branch needs one that does: every backbone conv gets plain 2:4 (SR-STE), folded at deploy
    # (spre_report.txt says why per layer); norm_eval=False (with SyncBN) gives stages 2-4 branches.
    backbone=dict(frozen_stages=1, norm_eval=True),
)

load_from = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth'  # noqa: E501
