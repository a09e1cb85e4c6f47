"""mmdetection 3.x plugin: SpReDetector + SpReHook through mmengine's Runner, on generated COCO data.

Small on purpose (CPU, two cores): ResNet-18 backbones, 64-channel necks and heads, 128-pixel
images, a few iterations. The shipped configs (integrations/mmdet/configs) are the starting
point of every run; only sizes, data and schedule are shrunk.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="mmdetection not installed: pip install -e .[mmdet]")
pytest.importorskip("mmcv.ops", reason="mmcv with its ops is needed by mmdet")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import spre_fx  # noqa: E402
from spre_fx.layers import SpReBatchNorm2d  # noqa: E402
from spre_fx.masks import is_nm  # noqa: E402
from spre_fx.plan import plan_of  # noqa: E402

from ._dist import end_worker, rendezvous  # noqa: E402

pytestmark = pytest.mark.mmdet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "integrations" / "mmdet" / "configs"
SHIPPED = {
    "retinanet": "spre-2-4_retinanet_r50_fpn_1x_coco.py",
    "fcos": "spre-2-4_fcos_r50_fpn_1x_coco.py",
    "faster-rcnn": "spre-2-4_faster-rcnn_r50_fpn_1x_coco.py",
}
CLASSES = ("rectangle", "circle")
SIZE = 128


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one intra-op thread is faster, and far faster on a loaded machine (two
    threads spinning on shared cores made a 64-channel conv 17x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- data
def make_coco(root: Path, n_train: int = 8, n_val: int = 4, seed: int = 0) -> Path:
    """Filled rectangles (red) and circles (green) on noise, with COCO-format annotations."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [dict(id=k + 1, name=c) for k, c in enumerate(CLASSES)]
    for split, n in (("train", n_train), ("val", n_val)):
        images, anns = [], []
        for i in range(n):
            img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, len(CLASSES)))
                w, h = (int(v) for v in rng.integers(20, 48, 2))
                h = w if cls == 1 else h
                x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
                if cls == 0:
                    cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), (40, 40, 230), -1)
                else:
                    cv2.circle(img, (x + w // 2, y + w // 2), w // 2, (40, 230, 40), -1)
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cls + 1,
                                 bbox=[x, y, w, h], area=float(w * h), iscrowd=0))
            name = f"{split}_{i:03d}.png"
            cv2.imwrite(str(root / "images" / name), img)
            images.append(dict(id=i + 1, file_name=name, width=SIZE, height=SIZE))
        with open(root / f"{split}.json", "w") as f:
            json.dump(dict(images=images, annotations=anns, categories=cats), f)
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


# --------------------------------------------------------------------------- configs
def _shrink(det, kind: str, width: int = 64) -> None:
    """ResNet-18 (`width` channels in its first stage), 64-channel neck and heads, 2 classes,
    every box kept at test time."""
    det.backbone.depth = 18
    det.backbone.base_channels = width
    det.neck.in_channels = [width, 2 * width, 4 * width, 8 * width]
    det.neck.out_channels = 64
    if kind == "faster-rcnn":
        det.rpn_head.in_channels = det.rpn_head.feat_channels = 64
        det.roi_head.bbox_roi_extractor.out_channels = 64
        det.roi_head.bbox_head.in_channels = 64
        det.roi_head.bbox_head.fc_out_channels = 64
        det.roi_head.bbox_head.num_classes = len(CLASSES)
        det.train_cfg.rpn_proposal.nms_pre = det.test_cfg.rpn.nms_pre = 200
        det.train_cfg.rpn_proposal.max_per_img = det.test_cfg.rpn.max_per_img = 100
        det.train_cfg.rcnn.sampler.num = 64
        det.test_cfg.rcnn.score_thr = 0.0  # an untrained detector scores under 0.05
    else:
        det.bbox_head.in_channels = det.bbox_head.feat_channels = 64
        det.bbox_head.num_classes = len(CLASSES)
        det.test_cfg.score_thr = 0.0


def tiny_config(kind: str, data: Path, work_dir: Path, max_iters: int, *, width: int = 64,
                from_dense: bool = False, **hook) -> Config:
    """The shipped config of `kind` (or its `_from-dense` variant), shrunk to the generated data
    and a few iterations; `hook` are SpReHook options."""
    name = SHIPPED[kind].replace(".py", "_from-dense.py") if from_dense else SHIPPED[kind]
    cfg = Config.fromfile(str(CONFIGS / name))
    _shrink(cfg.model.detector, kind, width)
    meta = dict(classes=CLASSES)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(SIZE, SIZE), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(SIZE, SIZE), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs",
             meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

    def loader(split, pipeline, **kw):
        return dict(
            batch_size=2, num_workers=0, persistent_workers=False,
            sampler=dict(type="DefaultSampler", shuffle=split == "train"),
            dataset=dict(type="CocoDataset", data_root=str(data), ann_file=f"{split}.json",
                         data_prefix=dict(img="images/"), metainfo=meta, pipeline=pipeline, **kw),
        )

    cfg.train_dataloader = loader("train", train_pipeline, filter_cfg=dict(filter_empty_gt=True, min_size=4))
    cfg.test_dataloader = loader("val", test_pipeline, test_mode=True)
    cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(data / "val.json"), metric="bbox")
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters)
    # The 1x schedule's shape (linear warm-up, step decay), in iterations; its MultiStepLR state
    # (a Counter) is part of what resume must load with weights_only=True.
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2),
        dict(type="MultiStepLR", by_epoch=False, begin=0, end=100, milestones=[3], gamma=0.1),
    ]
    cfg.optim_wrapper.optimizer.lr = 0.01
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                       dist_cfg=dict(backend="gloo"))
    cfg.randomness = dict(seed=0)
    cfg.custom_hooks = [dict(type="SpReHook", **hook)]
    cfg.work_dir = str(work_dir)
    cfg.pop("tta_model", None)
    return cfg


def _spre_hook(runner):
    from spre_fx.integrations.mmdet import SpReHook

    return next(h for h in runner.hooks if isinstance(h, SpReHook))


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _assert_close_up_to_row_order(got: torch.Tensor, want: torch.Tensor) -> None:
    """`got` equals `want` within the conversion's rounding, rows allowed to come in another order.

    A two-stage detector's RoI head runs on the RPN's top-k proposals: two proposals whose scores
    tie to within float rounding may swap places after the fold (rows 85 and 86 of Faster R-CNN's
    class scores did), which moves rows but changes none. Each row of `got` must then match one
    row of `want`, one to one."""
    tol = dict(rtol=1e-4, atol=1e-4 * float(want.abs().max().clamp_min(1)))
    if got.shape == want.shape and torch.allclose(got, want, **tol):
        return
    assert got.dim() == 2 and got.shape == want.shape, (got.shape, want.shape)
    nearest = torch.cdist(got.double(), want.double()).argmin(dim=1)
    assert sorted(nearest.tolist()) == list(range(len(want))), "rows of got match no permutation of want"
    torch.testing.assert_close(got, want[nearest], **tol)


# --------------------------------------------------------------------------- the runs
def _train_resume_test_deploy(kind: str, data: Path, work_dir: Path, iters: int) -> dict:
    # 1. train `iters` iterations from scratch; a checkpoint every iteration
    cfg = tiny_config(kind, data, work_dir, max_iters=iters, export=False)
    runner = Runner.from_cfg(cfg)
    assert type(runner.model).__name__ == cfg.model.detector.type  # still mmdet's own class
    runner.train()
    ckpt = work_dir / f"iter_{iters}.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # the plugin's safe globals
    assert state["spre_fx"]["scheduler"]["step"] == iters
    assert not (work_dir / "deploy.pth").exists()  # export=False
    del runner

    # 2. resume (weights_only=True load inside mmengine) and train to 2 * iters; export
    cfg = tiny_config(kind, data, work_dir, max_iters=2 * iters)
    cfg.resume = True
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 2 * iters
    # Scheduler steps continue from the checkpoint (1..2*iters), not from 1 again.
    steps = runner.message_hub.get_scalar("train/spre/mask_step").data[0].tolist()
    assert steps == list(range(1, 2 * iters + 1)), steps
    assert _spre_hook(runner).scheduler is None  # detached after training

    # 3. CocoMetric on the prepared model
    metrics = runner.test()
    assert "coco/bbox_mAP" in metrics, metrics

    # 4. the deployed model, as mmdet's tools/test.py runs it: Config.fromfile(deploy_config.py),
    #    load_from=deploy.pth, Runner.from_cfg(cfg).test()
    rep = json.loads((work_dir / "spre_report.json").read_text())
    assert rep["stage"] == "prepared" and any(lr["treatment"] == "spre" for lr in rep["layers"])
    assert "spre" in (work_dir / "spre_report.txt").read_text()
    dcfg = Config.fromfile(str(work_dir / "deploy_config.py"))
    assert dcfg.model.type == "SpReDetector" and dcfg.model.deploy is True
    assert not any(h["type"] == "SpReHook" for h in dcfg.get("custom_hooks", []))
    assert dcfg.load_from == str(work_dir / "deploy.pth")
    dcfg.work_dir = str(work_dir / "test_deploy")
    test_runner = Runner.from_cfg(dcfg)
    deployed_metrics = test_runner.test()
    assert "coco/bbox_mAP" in deployed_metrics, deployed_metrics  # (both ~0 untrained: not compared)
    deployed, prepared = test_runner.model, runner.model
    assert type(deployed) is type(prepared) and type(deployed).__name__ == cfg.model.detector.type
    saved = torch.load(work_dir / "deploy.pth", map_location="cpu")["state_dict"]
    assert set(saved) == set(deployed.state_dict())  # the architecture matches the checkpoint

    # What the metric sees, compared directly: the raw head outputs on every test image.
    prepared.eval()
    deployed.eval()
    images = 0
    for batch in runner.test_dataloader:
        data_batch = runner.model.data_preprocessor(batch, False)
        images += len(data_batch["data_samples"])
        with torch.no_grad():
            want = _flat(prepared(**data_batch, mode="tensor"))
            got = _flat(deployed(**data_batch, mode="tensor"))
        assert len(want) == len(got) > 0
        for w, g in zip(want, got):
            _assert_close_up_to_row_order(g, w)
    assert images == len(runner.test_dataloader.dataset)
    plan = plan_of(deployed, stage="converted")
    modules = dict(deployed.named_modules())
    sparse = [lp for lp in plan.layers if lp.treatment != "dense"]
    assert sparse and all(is_nm(modules[lp.name].weight, 2, 4) for lp in sparse)
    assert sum(lp.treatment == "spre" for lp in plan.layers) == 16  # every 3x3 conv of ResNet-18
    return metrics


def test_retinanet_train_resume_test_deploy(coco, tmp_path):
    work_dir = tmp_path / "work"
    metrics = _train_resume_test_deploy("retinanet", coco, work_dir, iters=2)

    # mask statistics reached the visualizer backend (LocalVisBackend here; TensorBoard alike)
    scalars = list(work_dir.glob("*/vis_data/scalars.json"))
    assert scalars, list(work_dir.iterdir())
    logged = [json.loads(line) for p in scalars for line in p.read_text().splitlines()]
    assert any("spre/nm_flip_rate" in rec for rec in logged)

    # mmdet's own tools/test.py evaluates the deployed model, as a user runs it
    import mmdet

    tool = Path(mmdet.__file__).parent / ".mim" / "tools" / "test.py"
    out = subprocess.run(
        [sys.executable, str(tool), str(work_dir / "deploy_config.py"), str(work_dir / "deploy.pth"),
         "--work-dir", str(tmp_path / "tools_test")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"coco/bbox_mAP: {metrics['coco/bbox_mAP']:.4f}" in out.stdout + out.stderr

    # and mmdet's inference API
    from mmdet.apis import inference_detector, init_detector

    model = init_detector(str(work_dir / "deploy_config.py"), str(work_dir / "deploy.pth"), device="cpu")
    assert type(model).__name__ == "RetinaNet" and model.dataset_meta["classes"] == CLASSES
    result = inference_detector(model, str(coco / "images" / "val_000.png"))
    assert len(result.pred_instances.bboxes) > 0


@pytest.mark.parametrize("kind", ["fcos", "faster-rcnn"])
def test_other_detectors_train_resume_test_deploy(coco, tmp_path, kind):
    _train_resume_test_deploy(kind, coco, tmp_path / "work", iters=1)


def test_from_dense_checkpoint_starts_as_its_nm_projection(coco, tmp_path):
    """The `_from-dense` variant: a dense detector checkpoint loads into the SpRe model, the masks
    are computed from the loaded weights and the SpRe branches start silent (gamma = 0), although
    mmengine's init_weights ran after prepare."""
    from mmdet.registry import MODELS

    from spre_fx.masks import nm_mask

    # no mask moves after the fresh start (intervals beyond the run), lr 0: what before_train set
    cfg = tiny_config("retinanet", coco, tmp_path / "work", max_iters=1, width=16, from_dense=True,
                      export=False, nm_interval=100, spatial_interval=100)
    cfg.optim_wrapper.optimizer.lr = 0.0
    dense_cfg = copy.deepcopy(cfg.model.detector)
    dense_cfg.backbone.update(cfg.model.backbone)  # what SpReDetector merges in (no ImageNet init)
    dense = MODELS.build(dense_cfg)
    dense.init_weights()
    ckpt = tmp_path / "dense.pth"
    torch.save(dict(meta={}, state_dict=dense.state_dict()), ckpt)
    cfg.load_from = str(ckpt)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model, sd = runner.model, dense.state_dict()
    modules = dict(model.named_modules())
    plan = plan_of(model)
    for lp in plan.layers:
        m = modules[lp.name]
        if lp.treatment == "dense":
            continue
        assert torch.equal(m.weight, sd[f"{lp.name}.weight"]), lp.name  # loaded (and lr 0)
        assert torch.equal(m.nm_mask, nm_mask(sd[f"{lp.name}.weight"], 2, 4)), lp.name
        if lp.treatment == "spre":
            assert not modules[lp.norm].rep.weight.any(), lp.norm  # silent branch


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init_method: str, data: str, work_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # first: a forked child must not reuse the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # mmengine's pytorch launcher calls torch.cuda.set_device, which fails without a GPU: the
    # process group is made here, and the Runner (launcher='pytorch') runs inside it.
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    cfg = tiny_config("retinanet", Path(data), Path(work_dir), max_iters=2, width=16)
    cfg.launcher = "pytorch"
    # CPU modules take no device_ids (the Runner passes [LOCAL_RANK] unless the config says otherwise)
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", broadcast_buffers=False, device_ids=None)
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model.module
    agree = {}
    for kind, tensors in (("masks", [b for n, b in model.named_buffers() if n.endswith("_mask")]),
                          ("weights", [p.detach() for p in model.parameters()])):
        flat = torch.cat([t.flatten().double() for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        agree[kind] = all(torch.equal(gathered[0], t) for t in gathered)
    torch.save(dict(agree=agree, iter=runner.iter, wrapper=type(runner.model).__name__,
                    step=int(runner.message_hub.get_scalar("train/spre/mask_step").current())),
               os.path.join(work_dir, f"rank{rank}.pt"))
    end_worker()


def test_ddp_two_cpu_processes(coco, tmp_path):
    """mmengine Runner with launcher='pytorch' on 2 gloo processes: DDP-wrapped model, masks and
    weights identical on both ranks, checkpoint and export from rank 0.

    Forked, not spawned, where the platform forks: a spawned child imports torch, mmdet and this
    module again before its first step (most of the test's time); a forked one starts from this
    process's imports. Each child makes its own gloo group and Runner after the fork."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, rendezvous(tmp_path), str(coco), str(work_dir)), nprocs=2,
                       join=True, start_method=start)
    for rank in range(2):
        res = torch.load(work_dir / f"rank{rank}.pt")
        assert res["wrapper"] == "MMDistributedDataParallel" and res["iter"] == 2
        assert res["step"] == 2 and res["agree"] == dict(masks=True, weights=True), res
    assert (work_dir / "deploy.pth").exists() and (work_dir / "deploy_config.py").exists()
    assert (work_dir / "iter_2.pth").exists()


# --------------------------------------------------------------------------- building
@pytest.mark.parametrize("from_dense", [False, True], ids=["scratch", "from-dense"])
@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_config_loads_and_builds(kind, from_dense):
    """Every shipped config, as shipped (ResNet-50): loads, builds on CPU into mmdet's own class."""
    from mmdet.registry import MODELS

    name = SHIPPED[kind].replace(".py", "_from-dense.py") if from_dense else SHIPPED[kind]
    cfg = Config.fromfile(str(CONFIGS / name))
    assert cfg.custom_imports == dict(imports=["spre_fx.integrations.mmdet"], allow_failed_imports=False)
    assert cfg.model.type == "SpReDetector" and tuple(cfg.model.nm) == (2, 4)
    assert cfg.model.backbone.init_cfg is None  # no ImageNet init (merged into detector.backbone)
    assert cfg.model.detector.backbone.depth == 50
    assert [h["type"] for h in cfg.custom_hooks] == ["SpReHook"]
    assert cfg.train_cfg.max_epochs == 12  # 1x schedule
    assert cfg.train_dataloader.dataset.data_root == "data/coco/"
    if from_dense:
        assert cfg.model.silent_branch is True and cfg.load_from.startswith("https://download.openmmlab.com/")
    else:
        assert cfg.load_from is None
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == cfg.model.detector.type
    assert model.backbone.frozen_stages == (1 if from_dense else -1)
    assert model.backbone.norm_eval is from_dense
    assert "Pretrained" not in str(model.backbone.init_cfg)
    plan = plan_of(model)
    spre = sum(lp.treatment == "spre" for lp in plan.layers)
    # From scratch: the 3x3 convs of ResNet-50. From a dense checkpoint (frozen_stages=1,
    # norm_eval=True): no BatchNorm trains, so no SpRe branch; every 3x3 conv says why.
    assert spre == (0 if from_dense else 16)
    dense = {lp.name for lp in plan.layers if lp.treatment == "dense"}
    # The stem; from a dense checkpoint also the frozen stage, whose weights do not train.
    frozen = {lp.name for lp in plan.layers if from_dense and lp.name.startswith("backbone.layer1.")}
    assert dense == {"backbone.conv1"} | frozen
    if from_dense:
        reasons = {lp.name: lp.reason for lp in plan.layers}
        assert "weight does not train" in reasons["backbone.layer1.0.conv2"]
        assert "norm_eval=True" in reasons["backbone.layer2.0.conv2"]


def test_frozen_stages_and_norm_eval_get_no_branch():
    """frozen_stages=1: the frozen stage's convs stay dense, no branch; with norm_eval=False
    the other stages get SpRe, their branch BatchNorms train with them. SyncBN in a single
    process becomes BN (the Runner would)."""
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(CONFIGS / SHIPPED["retinanet"]))
    _shrink(cfg.model.detector, "retinanet", width=16)
    sync_bn = dict(type="SyncBN", requires_grad=True)
    cfg.model.backbone.update(frozen_stages=1, norm_eval=False, norm_cfg=sync_bn)
    model = MODELS.build(cfg.model)
    assert type(model).__name__ == "RetinaNet"
    model.train()
    frozen, free = model.backbone.layer1[0].bn1, model.backbone.layer2[0].bn1
    assert type(frozen) is torch.nn.BatchNorm2d and not frozen.training  # no branch, still frozen
    assert not hasattr(model.backbone.layer1[0].conv1, "weight_rep")
    assert isinstance(free, SpReBatchNorm2d) and free.training and free.rep.training
    assert all(p.requires_grad for p in free.rep.parameters())
    reasons = {lp.name: lp.reason for lp in plan_of(model).layers}
    assert reasons["backbone.layer1.0.conv1"].startswith("weight does not train")
    assert plan_of(model).layer("backbone.layer1.0.conv1").treatment == "dense"
    x = torch.randn(1, 3, 64, 64)
    model.backbone(x)  # trains: the branches reach their BatchNorms

    # mmengine's `sync_bn='torch'` option converts BatchNorms after the build: SpReHook says so
    from types import SimpleNamespace

    from mmengine.model import convert_sync_batchnorm
    from spre_fx.integrations.mmdet import SpReHook

    SpReHook().before_run(SimpleNamespace(model=model))
    with pytest.raises(RuntimeError, match="sync_bn"):
        SpReHook().before_run(SimpleNamespace(model=convert_sync_batchnorm(model)))


@pytest.mark.parametrize("norm_eval", [True, False])
def test_frozen_stage_computes_what_its_nm_counterpart_computes(norm_eval):
    """mmdet's fine-tuning settings (frozen_stages=1, norm_eval=True) on a ResNet: prepared with
    spre=True, the frozen stage computes exactly what it computes with spre=False (no branch adds
    anything to its features), in training mode, before and after optimizer steps. With
    norm_eval=True no BatchNorm trains, so no conv gets a branch; with norm_eval=False the stages
    after the frozen one do."""
    from mmdet.registry import MODELS

    torch.manual_seed(0)
    backbone = MODELS.build(dict(type="ResNet", depth=18, base_channels=16, frozen_stages=1,
                                 norm_eval=norm_eval, init_cfg=None))
    runs = {}
    for spre in (True, False):
        p = spre_fx.prepare(backbone, spre=spre)
        opt = torch.optim.SGD([q for q in p.parameters() if q.requires_grad], lr=0.1)
        runs[spre] = (p, opt, spre_fx.MaskScheduler(p, opt))
    plan = plan_of(runs[True][0])
    assert sum(lp.treatment == "spre" for lp in plan.layers) == (0 if norm_eval else 12)
    for lp in plan.layers:
        if lp.name.startswith("layer1."):
            assert lp.treatment == "dense" and lp.reason.startswith("weight does not train"), lp.reason
        elif norm_eval and lp.treatment == "nm" and lp.shape[-1] == 3:
            assert "stays in eval mode while the model trains (mmdet: norm_eval=True)" in lp.reason
    x = torch.randn(2, 3, 64, 64)
    first = None
    for _ in range(3):
        outs = {}
        for spre, (p, opt, _) in runs.items():
            p.train()
            outs[spre] = p(x)
            opt.zero_grad()
            sum(o.square().mean() for o in outs[spre]).backward()
            opt.step()
        assert torch.equal(outs[True][0], outs[False][0])  # stem + layer1: the frozen stage
        first = outs[True][0] if first is None else first
        assert torch.equal(outs[True][0], first)  # and it does not train
        if norm_eval:
            assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))


def test_mmdet_frozen_batchnorm_is_folded_without_branch():
    """mmdet's FrozenBN (norm_cfg=dict(type='FrozenBN')) is a norm: its convs are paired and
    folded at convert, exactly, and get plain N:M with a reason instead of a SpRe branch."""
    from mmdet.models.layers import FrozenBatchNorm2d
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):  # 'FrozenBN' is in mmdet's registry
        backbone = MODELS.build(dict(type="ResNet", depth=18, base_channels=16, frozen_stages=-1,
                                     norm_cfg=dict(type="FrozenBN"), norm_eval=False, init_cfg=None))
    g = torch.Generator().manual_seed(1)
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    # In a Sequential: mmdet's ResNet.train() returns None, which verify's `model.eval()(x)` calls.
    p = spre_fx.prepare(torch.nn.Sequential(backbone).double())
    plan = plan_of(p)
    assert not any(lp.treatment == "spre" for lp in plan.layers)
    lp = next(lp for lp in plan.layers if lp.name == "0.layer2.0.conv1")
    assert lp.norm == "0.layer2.0.bn1" and "is frozen (FrozenBatchNorm2d)" in lp.reason, lp.reason
    assert sum(lp.norm is not None for lp in plan.layers) == 20  # every conv of ResNet-18
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    p.train()
    opt = torch.optim.SGD(p.parameters(), lr=0.1)
    sum(o.square().mean() for o in p(x)).backward()
    opt.step()
    p.eval()
    c = spre_fx.convert(p)
    assert spre_fx.verify(p, c, x).output_error <= 1e-10
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in c.modules())


def test_options_reach_the_core():
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(CONFIGS / SHIPPED["retinanet"]))
    _shrink(cfg.model.detector, "retinanet", width=16)
    cfg.model.skip = ["bbox_head.*"]
    cfg.model.spre = False
    model = MODELS.build(cfg.model)
    plan = plan_of(model)
    assert not any(lp.treatment == "spre" for lp in plan.layers)
    assert all(lp.treatment == "dense" for lp in plan.layers if lp.name.startswith("bbox_head."))
    with pytest.raises(TypeError, match="unknown option"):
        MODELS.build(dict(type="SpReDetector", detector=cfg.model.detector, sparsity=0.5))


def test_import_spre_fx_does_not_import_mmdet():
    code = (
        "import sys, spre_fx; bad = [m for m in ('mmdet', 'mmengine', 'mmcv') if m in sys.modules]; "
        "assert not bad, bad; import spre_fx.integrations.mmdet; assert 'mmdet' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_safe_globals_are_narrow():
    import pickle

    from spre_fx.integrations.mmdet import SAFE_GLOBALS

    getattr_stand_in = dict((name, obj) for obj, name in SAFE_GLOBALS)["builtins.getattr"]
    assert getattr_stand_in is not getattr
    with pytest.raises(pickle.UnpicklingError):
        getattr_stand_in(os, "system")
    assert spre_fx.__version__
