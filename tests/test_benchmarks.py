"""Every benchmark script docs/benchmarks.md cites still runs (tiny sizes; no timing asserted).

Speed is measured by running the scripts by hand (docs/benchmarks.md); this only keeps the
documented commands from rotting as the library changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torchvision", reason="the benchmarks build torchvision models (pip install '.[vision]')")

SMOKE = [
    ("masks.py --model resnet18 --repeats 1", "spatial_mask, 16 k×k convs"),
    ("fused_branches.py --batch 2 --rounds 1", "stacked conv, one BN"),
    ("train_step.py --model resnet18 --batch 2 --size 32 --rounds 1", "spre / naive-spre:"),
    ("train_step.py --model resnet18 --batch 2 --size 32 --rounds 1 --no-naive --interval 1000 --profile",
     "optimizer step + masks"),
    ("prepare_convert.py --model resnet18 --repeats 1", "median of per-pair ratios"),
    ("latency.py --model resnet18 --batch 1 --size 32 --repeats 1", "median of per-pair ratios"),
    ("scale.py --models resnet18 --modes inplace", "resnet18         inplace"),
    ("train_memory.py --model resnet18 --batch 2 --size 32", "spre"),
]


@pytest.mark.parametrize("command, expect", SMOKE, ids=[c for c, _ in SMOKE])
def test_benchmark_runs(command, expect):
    script, *args = command.split()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout, done.stdout[-2000:]


# --------------------------------------------------------------------------- gpu_check.py
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_gpu_check_dry_run_runs_every_part_and_skips_each_cuda_step_with_its_reason(tmp_path):
    """The GPU machine gets one call: its script must not fail on a path the CPU can reach."""
    done = _gpu_check("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = result["parts"]
    assert result["dry_run"]
    assert list(parts) == ["env", "pytest", "numerics", "advisor", "layers", "e2e", "train"]
    assert {k: p["status"] for k, p in parts.items()} == dict.fromkeys(parts, "ok"), parts
    # the gpu tests are collected, and skip without CUDA
    assert parts["pytest"]["counts"].get("skipped", 0) > 0 and "failed" not in parts["pytest"]["counts"]
    # what the CPU can check it checks: the conversion (float64) and the im2col path
    num = parts["numerics"]
    assert num["verify_fp64"]["ok"] and num["verify_fp64"]["output_error"] < 1e-10
    im2col = [r for r in num["runs"] if r["kernel"] == "im2col"]
    assert im2col and all(r["ok"] and r["layers"] > 0 and r["vs_dense"] < 1e-4 for r in im2col)
    # every CUDA-only step says why it did not run
    kernel_runs = [r for r in num["runs"] if r["kernel"] != "im2col"]
    assert kernel_runs and all("CUDA-only" in r["skipped"] for r in kernel_runs)
    assert all("CUDA-only" in why for why in parts["layers"]["skipped"].values())
    assert "CUDA-only" in parts["e2e"]["skipped"]["semi_structured model"]
    assert "CUDA-only" in parts["advisor"]["skipped"]["kernel probes"]
    # the timing and advisor loops ran over every N:M layer shape
    (run,) = parts["layers"]["runs"]
    assert run["rows"] and not run["left_out"]
    assert all(r["dense_ms"] > 0 and r["gemm_dense_ms"] > 0 and r["sparse"] == {} for r in run["rows"])
    assert all(r["im2col_dense_ms"] > 0 for r in run["rows"] if not r["layers"][0].startswith("fc"))
    advised = parts["advisor"]["by_dtype"]["torch.float32"]["layers"]
    assert advised and all(r["ran"]["dense-weight"]["ok"] for r in advised)
    (e2e,) = parts["e2e"]["runs"]
    assert e2e["dense_ms"] > 0 and e2e["im2col_dense_ms"] > 0
    train = parts["train"]
    assert set(train["ratio"]) == {"dense", "nm", "spre", "nm-held", "spre-held"}
    assert train["flop_ratio"]["nm"] == 1.0 and train["flop_ratio"]["spre"] > 1.0
    assert train["mask_update_ms"]["spre"]["spre_layers"] > 0 and train["mask_update_ms"]["nm"]["all"] > 0
    assert set(train["profile"]) == {"dense", "nm", "spre"}
    for name in ("gpu_check.md", "pytest_gpu.log", "profile_train.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the summary table prints last
    assert done.stdout.rstrip().splitlines()[-1].startswith("| train SpRe step / dense")


def test_gpu_check_deadline_skips_parts_with_the_reason_and_still_writes(tmp_path):
    done = _gpu_check("--dry-run", "--out", str(tmp_path), "--parts", "env,numerics,train", "--budget", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["env", "numerics", "train"]
    assert all(p["status"] == "skipped" and "deadline" in p["reason"] for p in parts.values())
    assert "| train | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_refuses_unknown_parts_and_a_missing_gpu(tmp_path):
    done = _gpu_check("--dry-run", "--out", str(tmp_path), "--parts", "env,kernels")
    assert done.returncode == 2 and "unknown part(s) ['kernels']" in done.stderr
    if not torch.cuda.is_available():
        done = _gpu_check("--out", str(tmp_path))
        assert done.returncode == 2 and "--dry-run" in done.stderr
