"""Every benchmark script docs/benchmarks.md cites still runs (tiny sizes; no timing asserted).

Speed is measured by running the scripts by hand (docs/benchmarks.md); this only keeps the
documented commands from rotting as the library changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
