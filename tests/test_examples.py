"""The examples run end to end on tiny configurations (the real runs are `make demo` and the docs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def write_image_folder(root: Path, classes: int = 2, per_class: int = 6, size: int = 32) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(size, size, 3, generator=g) * 127 + 128 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_train_imagefolder_checkpoint_resume_deploy(tmp_path, capsys):
    example = load_example("train_imagefolder")
    write_image_folder(tmp_path / "data")
    common = ["--data", str(tmp_path / "data"), "--arch", "resnet18", "--batch-size", "4",
              "--image-size", "32", "--workers", "0", "--device", "cpu", "--warmup-epochs", "1",
              "--out", str(tmp_path / "out")]
    first = example.main([*common, "--epochs", "1"])
    assert first["checkpoint"].is_file() and first["deployed"].is_file()
    ckpt = torch.load(first["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["mask_scheduler"]["step"] == 3  # 12 images / batch 4
    assert first["output_error"] < 1e-5

    second = example.main([*common, "--epochs", "2", "--resume", str(first["checkpoint"])])
    assert "resumed from" in capsys.readouterr().out
    resumed = torch.load(second["checkpoint"], weights_only=True)
    assert resumed["epoch"] == 2 and resumed["mask_scheduler"]["step"] == 6

    # Resuming is exact: the same weights, masks and momentum as two epochs in one go.
    common[-1] = str(tmp_path / "straight")
    straight = torch.load(example.main([*common, "--epochs", "2"])["checkpoint"], weights_only=True)
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key], value, rtol=0, atol=0)

    deployed = example.load_deployed(second["deployed"])
    out = deployed(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_digits_tiny(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    example = load_example("digits")
    records = example.main(["--seeds", "0", "--epochs", "1", "--methods", "srste-2:4", "spre-2:4",
                            "--no-progress", "--out", str(tmp_path / "digits")])
    out = capsys.readouterr().out
    assert "max convert error" in out and "spre-2:4" in out and "srste-2:4" in out
    assert [r["method"] for r in records] == ["srste-2:4", "spre-2:4"]
    for r in records:
        assert abs(r["sparsity"] - 0.5) < 0.01 and r["max_convert_error"] < 1e-5
    pngs = sorted(p.name for p in (tmp_path / "digits").glob("*.png"))
    assert pngs == ["spatial_sparsity_2-4.png", "training_curves.png"]
