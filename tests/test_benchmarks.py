"""Every benchmark script docs/benchmarks.md cites still runs (tiny sizes; no timing asserted).

Speed is measured by running the scripts by hand (docs/benchmarks.md); this only keeps the
documented commands from rotting as the library changes. Run elsewhere: op_counts.py
(tests/test_op_counts.py), folded_norms.py and reparam_nm.py (tests/test_fusers.py), tapconv.py
(tests/test_tapconv.py); naive_spre.py is train_step.py's baseline. Not run: decay_ratio.py
(2 min even at batch 2, 32 px; what it measures is asserted step by step in
tests/test_mixed_precision.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from spre_fx.deploy import SemiStructuredConv2d, backend
from spre_fx.masks import nm_mask

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torchvision", reason="the benchmarks build torchvision models (pip install '.[vision]')")

# One torch thread in every script run here (OMP_NUM_THREADS for what sets none itself, `--threads 1`
# for the scripts that default to 2): under `pytest -n 2`, two runs with two threads each put four
# spinning OpenMP threads on two cores, 3-4x slower here (train_step's first smoke run: 87 s wall
# with 2 threads, 29 s with 1, on the same loaded machine). The code paths are the same.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# Options share runs where one covers another (a run with --baseline-source also prints the lines
# without it; --interval rides with the naive build, --profile with --baseline-native): each
# option still runs once, with two process starts (imports, models, warm-up) fewer.
SMOKE = [
    ("masks.py --model resnet18 --repeats 1 --threads 1 --baseline-source spre_fx/_native.c",
     ("spatial_mask, 16 k×k convs", "spre_fx/_native.c")),
    ("masks.py --model resnet18 --repeats 1 --threads 1 --in-step --batch 2 --size 32 "
     "--baseline-source spre_fx/_native.c", ("spatial masks held",)),
    ("fused_branches.py --batch 2 --rounds 1 --threads 1", ("stacked conv, one BN",)),
    ("train_step.py --model resnet18 --batch 2 --size 32 --rounds 1 --threads 1 --interval 1000",
     ("spre / naive-spre:", "masks move every 1000 step(s)")),
    # masks moving every step here, so that the other kernels compute them
    ("train_step.py --model resnet18 --batch 2 --size 32 --rounds 1 --threads 1 --no-naive --warmup 0 "
     "--profile --baseline-native spre_fx/_native.c",
     ("optimizer step + masks", "spre-baseline", "spre / spre-baseline")),
    ("prepare_convert.py --model resnet18 --repeats 1 --threads 1", ("median of per-pair ratios",)),
    ("latency.py --model resnet18 --batch 1 --size 32 --repeats 1 --threads 1",
     ("median of per-pair ratios",)),
    ("scale.py --models resnet18 --modes inplace --threads 1", ("resnet18         inplace",)),
    ("train_memory.py --model resnet18 --batch 2 --size 32 --threads 1", ("spre",)),
    ("permutation.py --models tv:resnet18 --nm 2:4 --no-trained --threads 1", ("| tv:resnet18 | 2:4 |",)),
]


@pytest.mark.parametrize("command, expect", SMOKE, ids=[c for c, _ in SMOKE])
def test_benchmark_runs(command, expect):
    script, *args = command.split()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(e in done.stdout for e in expect), done.stdout[-2000:]


# --------------------------------------------------------------------------- gpu_check.py
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=ONE_THREAD)


def test_gpu_check_dry_run_runs_every_part_and_skips_each_cuda_step_with_its_reason(tmp_path):
    """The GPU machine gets one call: its script must not fail on a path the CPU can reach."""
    done = _gpu_check("--dry-run", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = result["parts"]
    assert result["dry_run"]
    assert list(parts) == ["env", "pytest", "numerics", "advisor", "layers", "linear", "e2e", "train"]
    assert {k: p["status"] for k, p in parts.items()} == dict.fromkeys(parts, "ok"), parts
    assert result["mmdet_or_timm_imported"] == []
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
    assert [r["batch"] for r in parts["e2e"]["latency"]] == [1] and parts["e2e"]["latency"][0]["dense_ms"] > 0
    # the Linear-heavy model: each distinct Linear timed dense, and the whole stack
    (linear,) = parts["linear"]["runs"]
    assert parts["linear"]["nm_linears"] == 2 and len(linear["rows"]) == 2 and linear["dense_ms"] > 0
    assert all(r["dense_ms"] > 0 and r["gemm_dense_ms"] > 0 for r in linear["rows"])
    train = parts["train"]
    fp16 = {"fp16+scaler/dense", "fp16+scaler/nm", "fp16+scaler/spre"}
    assert set(train["ratio"]) == {"dense", "nm", "spre", "nm-held", "spre-held"} | fp16
    assert train["ratio"]["fp16+scaler/dense"] == 1.0 and set(train["mask_share"]) == {"nm", "spre"}
    assert train["flop_ratio"]["nm"] == 1.0 and train["flop_ratio"]["spre"] > 1.0
    assert train["mask_update_ms"]["spre"]["spre_layers"] > 0 and train["mask_update_ms"]["nm"]["all"] > 0
    assert set(train["profile"]) == {"dense", "nm", "spre"}
    for name in ("gpu_check.md", "pytest_gpu.log", "profile_train.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    # CPU timings judge no goal: none is "met" (or missed), each row says it was not judged
    assert len(train["goals"]) == 4 and all(v is None for v in train["goals"].values())
    summary = done.stdout.rstrip().splitlines()
    rows = ("| train N:M", "| train SpRe", "| mask update share")
    timed = [line for line in summary if line.startswith(rows)]
    assert len(timed) == 6 and all(line.endswith("| not judged (CPU dry run) |") for line in timed), timed
    # the summary table prints last
    assert summary[-1].startswith("| mask update share of a spre step")


def _load_gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


# The command line's own checks run in this process (gc.main with an argv): a subprocess would
# spend its time importing torch and torchvision again (~15-35 s a run on a loaded machine);
# the dry run above is the one run as the GPU machine runs it.
def test_gpu_check_deadline_skips_parts_with_the_reason_and_still_writes(tmp_path, monkeypatch):
    gc = _load_gpu_check(monkeypatch)
    argv = ["--dry-run", "--out", str(tmp_path), "--parts", "env,numerics,train", "--budget", "0"]
    assert gc.main(argv) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["env", "numerics", "train"]
    assert all(p["status"] == "skipped" and "deadline" in p["reason"] for p in parts.values())
    assert "| train | skipped |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_refuses_unknown_parts_and_a_missing_gpu(tmp_path, monkeypatch, capsys):
    gc = _load_gpu_check(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        gc.main(["--dry-run", "--out", str(tmp_path), "--parts", "env,kernels"])
    assert exit_.value.code == 2 and "unknown part(s) ['kernels']" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, on any machine
    with pytest.raises(SystemExit) as exit_:
        gc.main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--dry-run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before writing anything


def _part(name: str):
    """A module of benchmarks/gpu_parts/ (after _load_gpu_check put benchmarks/ on the path)."""
    return importlib.import_module(f"gpu_parts.{name}")


def _nm_(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    return layer.to(torch.bfloat16)


def test_gpu_check_sparse_branches_and_tables_run_with_identity_packing(tmp_path, monkeypatch):
    """The branches only a GPU reaches (2:4 layer timing, fused-transpose variant, summaries,
    the selective model, every table of a GPU run) run here with torch's packing call replaced
    by the identity, as tests/test_deploy.py does: a Python error there would cost the call."""
    gc = _load_gpu_check(monkeypatch)
    common, layers, e2e, report = (_part(n) for n in ("common", "layers", "e2e", "report"))
    monkeypatch.setattr(backend, "_sparse_from_dense", lambda cls, weight: weight)
    # a flag that changes nothing (torch 2.14 ignores fuse_transpose_cusparselt) is found out, and
    # the fused-t variant is not timed: it would time the same call twice
    ctx = common.Context(common.DRY, False, torch.device("cpu"), tmp_path,
                         common.Deadline(time.monotonic() + 600), {})
    kernels = {"cusparselt": None, "cutlass": "not here"}
    torch.manual_seed(0)
    row = layers.time_layer(ctx, _nm_(nn.Linear(64, 32)), (4, 64), torch.bfloat16, kernels)
    assert set(row["sparse"]) == {"cusparselt"} and "ignores fuse_transpose" in ctx.cache["fused_t_skipped"]
    # where the flag takes effect, every branch of the timing runs
    monkeypatch.setattr(layers, "fused_transpose_effect", lambda packed, x: None)
    ctx.cache.clear()
    rows = []
    for name, mod, shape in (("conv", _nm_(nn.Conv2d(16, 32, 3, padding=1)), (2, 16, 8, 8)),
                             ("point", _nm_(nn.Conv2d(32, 16, 1)), (2, 32, 8, 8)),
                             ("fc", _nm_(nn.Linear(64, 32)), (4, 64))):
        row = layers.time_layer(ctx, mod, shape, torch.bfloat16, kernels)
        assert set(row["sparse"]) == {"cusparselt", "cusparselt-fused-t"}, row["sparse"]
        assert all(v["error_vs_dense"] < 1e-2 and v["ms"] > 0 for v in row["sparse"].values())
        assert (row["im2col_ms"] > 0) == (name == "conv")  # a 1×1 conv and a linear read their input in place
        row.update(layers=[name], count=2, input=list(shape), verdict="ok" if name != "point" else "small")
        rows.append(row)
    summary = layers.summarise(rows)
    assert summary["shapes_sparse"] == 3 and summary["shapes_eligible"] == 2
    assert summary["eligible_speedup"] > 0 and summary["eligible_best_variant"]
    # the selective model packs exactly the layers measured faster, and computes the same
    net = nn.Sequential(_nm_(nn.Conv2d(16, 32, 3, padding=1)), nn.ReLU(), _nm_(nn.Conv2d(32, 16, 1)))
    timed = [{"layers": [n], "sparse": {"cusparselt": {"ms": 1, "speedup": v}}}
             for n, v in (("0", 1.5), ("2", 0.5))]
    chosen = e2e.measured_faster({"rows": timed})
    assert chosen == ["0"]
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    selective = e2e.pack_only(net, chosen, "cusparselt")
    assert isinstance(selective[0], SemiStructuredConv2d) and type(selective[2]) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(selective(x), net(x), rtol=2e-2, atol=2e-2)
    # every table of a GPU run renders, with the fields the parts write
    result = {
        "dry_run": False, "started": "now", "command": "gpu_check.py --out x", "budget_s": 240, "wall_s": 200,
        "parts": {
            "env": {"status": "ok", "seconds": 1, "gpu": "H200", "capability": [9, 0], "torch": "2.11.0"},
            "pytest": {"status": "ok", "seconds": 20, "summary": "6 passed in 9s", "counts": {"passed": 6}},
            "numerics": {"status": "ok", "seconds": 9,
                         "verify_fp64": {"ok": True, "output_error": 1e-14},
                         "verify_fp32": {"ok": False, "output_error": 2e-5, "error": "layer 'fc' ..."},
                         "runs": [{"dtype": "torch.float16", "kernel": "cusparselt", "dense_vs_fp32": 1e-3,
                                   "layers": 52, "finite": True, "vs_fp32": 2e-3, "vs_dense": 3e-3,
                                   "worst_layer": "layer1.0.conv2", "worst_layer_error": 4e-3,
                                   "layers_over_tol": [], "ok": True},
                                  {"dtype": "torch.float16", "kernel": "cutlass", "dense_vs_fp32": 1e-3,
                                   "skipped": "compute capability 9.0"},
                                  {"dtype": "torch.bfloat16", "kernel": "cusparselt", "dense_vs_fp32": 1e-3,
                                   "error": "RuntimeError: ..."}]},
            "advisor": {"status": "ok", "seconds": 3, "by_dtype": {"torch.float16": {
                "layers": [], "verdicts": {"ok": 50}, "mismatches": ["fc cusparselt: advisor no"]}}},
            "layers": {"status": "truncated", "seconds": 70, "reason": "deadline",
                       "runs": [{"dtype": "torch.float16", "batch": 64, "rows": rows, "left_out": ["x"],
                                 "summary": summary}]},
            "linear": {"status": "ok", "seconds": 10, "model": "4 MLP blocks", "nm_linears": 8, "runs": [
                {"dtype": "torch.float16", "batch": 64, "tokens": 12608, "rows": rows[2:], "summary": summary,
                 "dense_ms": 5.0, "semi_structured_ms": 4.0, "semi_structured_speedup": 1.25,
                 "error_vs_dense": 1e-3}]},
            "e2e": {"status": "ok", "seconds": 20, "runs": [
                {"dtype": "torch.float16", "batch": 64, "ideal_conv_linear_speedup": 1.9, "packed_layers": 50,
                 "dense_ms": 10.0, "semi_structured_ms": 8.0, "im2col_dense_ms": 12.0,
                 "semi_structured_measured_ms": 7.5, "semi_structured_speedup": 1.25,
                 "im2col_dense_speedup": 0.83, "semi_structured_measured_speedup": 1.33}],
                "latency": [{"dtype": "torch.float16", "batch": 1, "dense_ms": 2.0, "semi_structured_ms": 2.5,
                             "semi_structured_speedup": 0.8}]},
            "train": {"status": "ok", "seconds": 30, "flop_ratio": {"dense": 1.0, "nm": 1.0, "spre": 1.46},
                      "precision": {"": "bfloat16 autocast", "fp16+scaler": "float16 autocast, GradScaler"},
                      "median_ms": {"dense": 50, "nm": 55, "spre": 80, "nm-held": 52, "spre-held": 75,
                                    "fp16+scaler/dense": 48, "fp16+scaler/nm": 50, "fp16+scaler/spre": 70},
                      "ratio": {"dense": 1.0, "nm": 1.1, "spre": 1.6, "nm-held": 1.04, "spre-held": 1.5,
                                "fp16+scaler/dense": 1.0, "fp16+scaler/nm": 1.04, "fp16+scaler/spre": 1.45},
                      "mask_share": {"nm": 0.05, "spre": 0.06},
                      "mask_update_share": {"nm": 0.04, "spre": 0.05},
                      "mask_update_ms": {"nm": {"all": 3.0}},
                      "goals": {"nm <= 1.05": False, "spre <= flop ratio": False,
                                "fp16+scaler/nm <= 1.05": True, "fp16+scaler/spre <= flop ratio": True},
                      "profile": {"dense": {"ms_per_step": 40.0, "optimizer_step_cpu_ms": 2.0, "top": {}}}},
        },
    }
    full, short = report.markdown(result, gc.PARTS)
    assert "| conv | 2 | 128x144x32 | ok |" in full and "fc cusparselt: advisor no" in full
    assert "| layers torch.float16 b64 eligible speed-up |" in short
    assert "| Linear torch.float16 b64 (12608 tokens) whole MLP stack 2:4 | 1.250 |" in short
    assert "## Deployed latency, batch 1-16 (ms)" in full and "| latency torch.float16 b1 | 0.800 |" in short
    assert "| train SpRe step / dense (bfloat16 autocast) | 1.600 | <= 1.460 | NO |" in short
    assert "| train SpRe step / dense (fp16+scaler) | 1.450 | <= 1.460 | yes |" in short
    assert "| mask update share of a spre step | 0.060 | as measured | - |" in short
    assert "| pytest -m gpu | 6 passed in 9s | all pass | yes |" in short


def test_gpu_check_trains_on_cpu_if_the_gpu_fails_and_e2e_runs_every_variant(tmp_path, monkeypatch):
    """The kernel parts share one trained model: a failure of the (never run) CUDA mask code must
    not take them down with it."""
    _load_gpu_check(monkeypatch)
    common, e2e = _part("common"), _part("e2e")
    real, devices = common.train_and_convert, []

    def first_call_fails(sizes, device):
        devices.append(device.type)
        if len(devices) == 1:
            raise RuntimeError("no kernel image is available")
        return real(sizes, device)

    monkeypatch.setattr(common, "train_and_convert", first_call_fails)
    ctx = common.Context(common.DRY, True, torch.device("cpu"), tmp_path,
                         common.Deadline(time.monotonic() + 600), {})
    prepared, converted = common.trained(ctx)
    assert devices == ["cpu", "cpu"] and "no kernel image" in ctx.cache["trained_on_cpu"]
    assert common.trained(ctx) == (prepared, converted)  # built once
    # on that model, the whole-model part's GPU branch (every variant built and timed) runs with
    # torch's packing call replaced by the identity, in bfloat16 (what the 2:4 path takes)
    monkeypatch.setattr(backend, "_sparse_from_dense", lambda cls, weight: weight)
    monkeypatch.setattr(backend, "_require_cuda", lambda model: None)
    monkeypatch.setattr(e2e, "kernels_here", lambda ctx: {"cusparselt": None, "cutlass": "not here"})
    monkeypatch.setattr(e2e, "fused_t_skipped", lambda ctx, model: None)  # a torch that honours the flag
    bf16 = dataclasses.replace(common.DRY, dtypes=(torch.bfloat16,))
    deadline = common.Deadline(time.monotonic() + 600)
    ctx = common.Context(bf16, False, torch.device("cpu"), tmp_path, deadline, ctx.cache)
    ctx.cache["layer_runs"] = [{"dtype": "torch.bfloat16", "batch": 2, "rows": [
        {"layers": ["layer1.0.conv1"], "sparse": {"cusparselt": {"ms": 1.0, "speedup": 2.0}}}]}]
    rec: dict = {}
    e2e.run(ctx, rec)
    (row,) = rec["runs"]
    variants = ("dense", "semi_structured", "semi_structured_fused_t", "im2col_dense",
                "semi_structured_measured")
    assert not [k for k in row if k.endswith("_raised")], row
    assert all(row[f"{v}_ms"] > 0 for v in variants) and row["measured_faster_layers"] == 1
    # deployed latency at each small batch, dense and 2:4
    (small,) = rec["latency"]
    assert small["batch"] == 1 and small["dense_ms"] > 0 and small["semi_structured_ms"] > 0
