"""spre_fx.integrations.lightning: real `Trainer.fit` runs of a few steps on generated images (CPU).

Prepare in setup, a scheduler on the optimizer Lightning built (once, also on re-fit), bit-exact
`ckpt_path=` resume, statistics through `self.log` (a CSVLogger here), GradScaler-skipped steps,
bf16-mixed, deployment at on_fit_end, and DDP with two gloo processes (ranks' masks agree).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning", reason="Lightning not installed: pip install -e .[lightning]")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402
from spre_fx.integrations.lightning import SpReCallback  # noqa: E402

import spre_fx  # noqa: E402
from spre_fx.masks import nm_mask  # noqa: E402

from ._dist import end_worker, rendezvous  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


class Classifier(L.LightningModule):
    """A user's LightningModule, unchanged by spre_fx."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _net()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, batch_size=len(x))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class BuildsInConfigureModel(Classifier):
    """Lightning's deferred construction: layers made in configure_model, prepared there."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = spre_fx.prepare(_net(), nm=(1, 4))


def _loader(same_batch: bool = False, n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if same_batch:  # every batch equal: resume is exact whatever batch Lightning replays
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
        return DataLoader(TensorDataset(x.repeat(n // 4, 1, 1, 1), y.repeat(n // 4)), batch_size=4)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _fit(module, callbacks, max_steps, loader=None, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, **QUIET, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers, resumable loaders, tips
        trainer.fit(module, loader or _loader(), ckpt_path=ckpt_path)
    return trainer


def _masks(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if k.endswith("_mask")}


class _HookCount(L.Callback):
    """How many step post-hooks the optimizer has while training (one per MaskScheduler)."""

    def on_train_end(self, trainer, pl_module):
        self.hooks = len(trainer.optimizers[0]._optimizer_step_post_hooks)


def test_fit_prepares_in_place_schedules_logs_and_deploys(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    cb = SpReCallback(nm=(2, 4), export_dir=tmp_path / "deploy")
    count = _HookCount()
    trainer = _fit(module, [cb, count], 4, logger=CSVLogger(tmp_path), log_every_n_steps=1)

    plan = spre_fx.plan_of(module)  # the LightningModule itself, prepared in place
    assert type(module) is Classifier and plan.count("spre") == 1 and plan.count("nm") == 1
    assert count.hooks == 1 and cb.state_dict()["scheduler"] == {"step": 4}
    # The statistics reached the user's logger, once per optimizer step.
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("spre/mask_step")]
    assert [float(r["spre/mask_step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["spre/mask_sparsity"]) == 0.5 for r in rows)  # every N:M layer is 2:4
    assert all(0 <= float(r["spre/nm_flip_rate"]) <= 1 for r in rows)
    assert any(float(r["spre/nm_flip_rate"]) > 0 for r in rows)  # masks moved with the weights
    # on_fit_end: converted, verified on the first training batch's input, written.
    dep = cb.deployment
    assert dep.verification is not None and dep.verification.output_error <= 1e-5
    assert set(dep.verification.nm_violations) == {"model.3", "model.8"}
    assert not any(dep.verification.nm_violations.values())
    assert sorted(os.listdir(tmp_path / "deploy")) == ["deployed.pt", "spre_report.json", "spre_report.txt"]
    state = torch.load(tmp_path / "deploy" / "deployed.pt", weights_only=True)
    assert state.keys() == dep.model.state_dict().keys() and not any(k.endswith("_mask") for k in state)
    # The scheduler let go at the end; the module is still the prepared one.
    sparse = [module.get_submodule(lp.name) for lp in plan.layers if lp.treatment != "dense"]
    assert not any(layer.spre_fx.scheduled for layer in sparse)


def test_ckpt_path_resume_is_bit_exact(tmp_path):
    """nm_interval=3: at the step-4 checkpoint the N:M masks are step 3's, not those of the saved
    weights, so a resume that re-derived masks from the weights would differ."""
    def run(ckpt_path=None):
        torch.manual_seed(0)
        module = Classifier()
        cb = SpReCallback(nm=(2, 4), nm_interval=3)
        ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
        _fit(module, [cb, ckpt], 8, _loader(same_batch=True), ckpt_path, enable_checkpointing=True)
        return module, cb

    straight, cb = run()
    assert cb.state_dict()["scheduler"] == {"step": 8}
    path = os.path.join(tmp_path, "epoch=0-step=4.ckpt")
    saved = torch.load(path, weights_only=False)
    assert saved["callbacks"]["SpReCallback"]["scheduler"] == {"step": 4}
    sd = saved["state_dict"]
    held = [k for k in sd if k.endswith("nm_mask")
            and not torch.equal(sd[k], nm_mask(sd[k.removesuffix("nm_mask") + "weight"], 2, 4))]
    assert held, "the test needs masks held away from their weights at the checkpoint"

    resumed, cb = run(ckpt_path=path)
    assert cb.state_dict()["scheduler"] == {"step": 8}
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_refit_and_model_prepared_in_configure_model():
    torch.manual_seed(0)
    module = BuildsInConfigureModel()
    cb, count = SpReCallback(), _HookCount()
    _fit(module, [cb, count], 2)
    assert spre_fx.plan_of(module.model).config.nm == (1, 4)  # the user's preparation, found
    assert count.hooks == 1 and cb.state_dict()["scheduler"] == {"step": 2}
    _fit(module, [cb, count], 3)  # fit again: a new optimizer, still one scheduler
    assert count.hooks == 1 and cb.state_dict()["scheduler"] == {"step": 3}

    with pytest.raises(ValueError, match=r"prepared with .*nm=\(1, 4\).* was given .*nm=\(2, 4\)"):
        _fit(BuildsInConfigureModel(), [SpReCallback(nm=(2, 4))], 1)


def test_two_optimizers_holding_the_model_are_refused():
    class TwoOptimizers(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False  # what Lightning asks of several optimizers

        def configure_optimizers(self):
            params = list(self.parameters())
            return [torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)]

        def training_step(self, batch, batch_idx):  # manual optimization: never reached
            raise AssertionError

    with pytest.raises(RuntimeError, match="2 of the 2 optimizers"):
        _fit(TwoOptimizers(), [SpReCallback()], 1)


def test_16_mixed_skipped_steps_move_no_mask():
    """GradScaler (Lightning's 16-mixed plugin; on CPU it must be passed explicitly, as
    precision='16-mixed' on CPU becomes bf16-mixed): a step the scaler skips is no mask step."""
    torch.manual_seed(0)
    module = Classifier()
    cb = SpReCallback()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # overflows for the first steps
    _fit(module, [cb], 6, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped = round(math.log2(2.0**20 / scaler.get_scale()))
    assert 0 < skipped < 6
    assert cb.state_dict()["scheduler"] == {"step": 6 - skipped}


def test_bf16_mixed():
    torch.manual_seed(0)
    module = Classifier()
    cb = SpReCallback(deploy=True)
    _fit(module, [cb], 2, precision="bf16-mixed")
    assert cb.state_dict()["scheduler"] == {"step": 2}
    assert module.model[3].weight.dtype == torch.float32  # bf16 compute, float32 weights and masks
    assert cb.deployment.verification.output_error <= 1e-5


def _ddp_worker(rank: int, world: int, init_method: str, result_dir: str) -> None:
    torch.set_num_threads(1)  # first: a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    # Lightning's environment reads the ranks from here and skips its own process launch.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # the group exists: no port is opened
    torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
    module = Classifier()
    cb = SpReCallback()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    trainer = L.Trainer(max_steps=3, callbacks=[cb], devices=world, strategy="ddp", logger=False,
                        enable_checkpointing=False, use_distributed_sampler=False, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    torch.save({"masks": _masks(module), "step": cb.state_dict()["scheduler"]["step"],
                "rank": trainer.global_rank}, os.path.join(result_dir, f"rank{rank}.pt"))
    end_worker()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_two_processes_masks_agree(tmp_path):
    """Forked, not spawned, where the platform forks: a spawned child imports torch, Lightning and
    this module again before its first step (most of the test's time, ~90 s of a loaded CI run);
    a forked one starts from this process's imports. Each child makes its own gloo group and
    Lightning trainer after the fork, as a spawned one does."""
    world = 2
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(world, rendezvous(tmp_path), str(tmp_path)), nprocs=world,
                       join=True, start_method=start)
    results = [torch.load(p, weights_only=True) for p in sorted(glob.glob(str(tmp_path / "rank*.pt")))]
    assert [r["rank"] for r in results] == [0, 1] and [r["step"] for r in results] == [3, 3]
    a, b = results[0]["masks"], results[1]["masks"]
    assert a.keys() == b.keys() and len(a) == 3  # nm_mask x2, spatial_mask
    assert all(torch.equal(a[k], b[k]) for k in a)
