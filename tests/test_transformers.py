"""spre_fx.integrations.transformers: real `Trainer.train` runs of a few steps on generated images.

Tiny `ResNetForImageClassification` / `ConvNextForImageClassification` built from configs (no
download, HF_HUB_OFFLINE), CPU: statistics in the Trainer's logs, bit-exact
`resume_from_checkpoint` (also when the Trainer rebuilds the callback from its saved state),
gradient accumulation, fp16/bf16, deployment at on_train_end, full coverage of HF models that
trace only below their top level.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="pip install -e .[transformers]")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate: pip install -e .[transformers]")

from safetensors.torch import load_file  # noqa: E402
from spre_fx.integrations.transformers import SpReTrainerCallback  # noqa: E402
from transformers import (  # noqa: E402
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
)

import spre_fx  # noqa: E402
from spre_fx.masks import nm_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Images(torch.utils.data.Dataset):
    """Generated 16x16 images with 4 labels, as an image-classification dataset yields them."""

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _resnet() -> nn.Module:
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=4)
    torch.manual_seed(0)
    return ResNetForImageClassification(config)


def _train(model, callback, out, max_steps, resume=None, **args):
    defaults = dict(per_device_train_batch_size=4, learning_rate=0.1, logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, **{**defaults, **args})
    trainer = Trainer(model=model, args=args, train_dataset=Images(), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def _conv_and_linear(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_train_logs_statistics_and_deploys_with_full_coverage(tmp_path):
    original = _resnet()
    model = spre_fx.prepare(original)
    plan = spre_fx.plan_of(model)
    # HF forwards return ModelOutput and branch on the input: fx traces below the top level only,
    # and every conv and linear is still found.
    assert plan.untraced and {lp.name for lp in plan.layers} == _conv_and_linear(original)
    assert plan.count("spre") == 4 and plan.count("nm") == 2 and plan.count("dense") == 1  # the stem

    cb = SpReTrainerCallback(export_dir=tmp_path / "deploy")
    trainer = _train(model, cb, tmp_path, 4)
    logged = [h for h in trainer.state.log_history if "spre/mask_step" in h]
    assert [h["spre/mask_step"] for h in logged] == [1, 2, 3, 4]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert all(h["spre/mask_sparsity"] == 0.5 and 0 <= h["spre/nm_flip_rate"] <= 1 for h in logged)
    dep = cb.deployment
    assert dep.verification.output_error <= 1e-5  # verified on the first batch (pixel_values, labels)
    assert len(dep.verification.nm_violations) == 6 and not any(dep.verification.nm_violations.values())
    assert sorted(os.listdir(tmp_path / "deploy")) == ["deployed.pt", "spre_report.json", "spre_report.txt"]
    assert cb.state()["attributes"]["mask_scheduler"] == {"step": 4}
    layers = [model.get_submodule(lp.name) for lp in plan.layers if lp.treatment != "dense"]
    assert not any(layer.spre_fx.scheduled or layer.spre_fx.frozen for layer in layers)  # let go at the end


@pytest.mark.parametrize("rebuild_callback", [False, True], ids=["callback-kept", "callback-rebuilt"])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, rebuild_callback):
    """nm_interval=3: the step-4 checkpoint holds step 3's N:M masks, not those of its weights.
    `restore_callback_states_from_checkpoint=True` makes the Trainer replace the callback by one
    built from trainer_state.json; the holds of the first one must still be let go."""
    args = dict(save_steps=4, save_strategy="steps", restore_callback_states_from_checkpoint=rebuild_callback)
    straight = spre_fx.prepare(_resnet())
    _train(straight, SpReTrainerCallback(nm_interval=3), tmp_path, 8, **args)

    checkpoint = tmp_path / "checkpoint-4"
    saved = load_file(checkpoint / "model.safetensors")
    held = [k for k in saved if k.endswith("nm_mask")
            and not torch.equal(saved[k], nm_mask(saved[k.removesuffix("nm_mask") + "weight"], 2, 4))]
    assert held, "the test needs masks held away from their weights at the checkpoint"

    resumed = spre_fx.prepare(_resnet())
    cb = SpReTrainerCallback(nm_interval=3)
    trainer = _train(resumed, cb, tmp_path / "again", 8, resume=str(checkpoint), **args)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    active = [c for c in trainer.callback_handler.callbacks if isinstance(c, SpReTrainerCallback)]
    assert len(active) == 1 and (active[0] is not cb) == rebuild_callback
    assert active[0].state()["attributes"]["mask_scheduler"] == {"step": 8}
    plan = spre_fx.plan_of(resumed)
    layers = [resumed.get_submodule(lp.name) for lp in plan.layers if lp.treatment != "dense"]
    assert not any(layer.spre_fx.frozen or layer.spre_fx.scheduled for layer in layers)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = spre_fx.prepare(_resnet())
    cb = SpReTrainerCallback()
    trainer = _train(model, cb, tmp_path, 3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert trainer.state.global_step == 3
    assert cb.state()["attributes"]["mask_scheduler"] == {"step": 3}  # 6 batches, 3 optimizer steps


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    """On CPU accelerate runs both as autocast without a GradScaler; the weights, masks and the
    decay stay float32 (a GradScaler's skipped steps: tests/test_lightning.py, same hook)."""
    model = spre_fx.prepare(_resnet())
    cb = SpReTrainerCallback(deploy=True)
    trainer = _train(model, cb, tmp_path, 2, **{precision: True})
    assert trainer.accelerator.mixed_precision == precision
    assert cb.state()["attributes"]["mask_scheduler"] == {"step": 2}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Converted and verified in float32, without accelerate's autocast wrapper of the forward.
    assert cb.deployment.verification.output_error <= 1e-5
    assert "forward" not in vars(cb.deployment.model)


def test_convnext_and_a_model_never_prepared(tmp_path):
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=4,
                            patch_size=2)
    torch.manual_seed(0)
    original = ConvNextForImageClassification(config)
    model = spre_fx.prepare(original)
    plan = spre_fx.plan_of(model)
    assert {lp.name for lp in plan.layers} == _conv_and_linear(original)
    assert plan.count("nm") > 0  # the pointwise linears; depthwise 7x7 convs stay dense, with a reason
    cb = SpReTrainerCallback()
    _train(model, cb, tmp_path, 2)
    assert cb.state()["attributes"]["mask_scheduler"] == {"step": 2}

    with pytest.raises(RuntimeError, match=r"spre_fx.prepare\(model\) before Trainer"):
        Trainer(model=_resnet(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                callbacks=[SpReTrainerCallback()])
