# RetinaNet-R50-FPN, SpRe 2:4, fine-tuned from mmdet's dense RetinaNet (1x COCO, 36.5 box AP)
# instead of trained from scratch. The dense weights load into the same names (the SpRe branch,
# its BatchNorm and the masks are new and start as below); the 1x schedule is kept.
_base_ = './spre-2-4_retinanet_r50_fpn_1x_coco.py'

model = dict(
    # Every SpRe branch BatchNorm starts at gamma = 0 (SpReHook re-applies it after mmengine's
    # init), so the first step computes the 2:4 projection of the dense detector.
    silent_branch=True,
    # mmdet's fine-tuning settings for a pretrained backbone. With norm_eval=True no backbone
    # BatchNorm trains, and SpRe's branch needs one that does: every backbone conv gets plain 2:4
    # (SR-STE), folded at deploy (spre_report.txt says why per layer). norm_eval=False (with
    # SyncBN) gives stages 2-4 SpRe branches; the frozen stage 1 stays plain 2:4 either way.
    backbone=dict(frozen_stages=1, norm_eval=True),
)

load_from = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'  # noqa: E501
