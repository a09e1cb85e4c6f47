"""One call on a CUDA GPU that proves the 2:4 path: the kernels' numbers, their speed, training cost.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT               # GPU machine, <= 5 min
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gc --dry-run  # CPU, tiny sizes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT --parts layers,e2e   # rerun a subset

Parts, in this order (`--parts` picks a subset); each is a module of benchmarks/gpu_parts/:
  env       torch, CUDA, cuSPARSELt, triton, the GPU and its compute capability
  pytest    the `gpu`-marked tests (`pytest -m gpu`): summary line, log in pytest_gpu.log
  numerics  torchvision ResNet-50 prepared at 2:4, a few SGD steps, BN statistics, convert;
            float32 `verify`; then fp16 and bf16: the semi-structured model of each kernel
            (cuSPARSELt, CUTLASS) against the dense converted one, end to end and per layer
  advisor   every N:M layer packed by each kernel through torch directly and run: the
            advisor's per-layer verdict against what torch accepted and computed
  layers    every N:M conv/linear of ResNet-50 at batch 64 and 256, 224 px, channels-last:
            cuDNN/cuBLAS dense against the 2:4 layer, with the im2col gather and the GEMMs
            timed alone; the advisor's verdict beside each
  linear    MLP blocks at ViT-B widths (768 -> 3072 -> 768, 197 tokens): each Linear dense
            against 2:4, and the whole stack deployed
  e2e       the whole deployed model: dense, semi_structured, and the im2col path with dense
            weights (what the gather costs end to end); deployed latency at batch 1, 4, 16
  train     ResNet-50 batch 64, 224 px, channels-last: dense, N:M and SpRe steps interleaved,
            in bf16 autocast and in fp16 with a GradScaler (masks moving every step, and held:
            the mask update's share of a step), the update alone, and a torch.profiler summary
            when a goal is missed

Bounds: `--budget` seconds for everything (default 260 on a GPU), a cap per part, and the
minimum each later part needs reserved; a part that no longer fits is skipped with the reason,
a timing loop that reaches its part's deadline stops and says what it left out. Timings are
medians of `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between runs) over
inputs rotated so that caches do not flatter; training steps are timed by the wall clock
between synchronisations, interleaved, as ratios within a round. Every part runs in its own
try/except: an error is recorded and the next part runs. gpu_check.json and gpu_check.md are
rewritten after every part (a killed run leaves what it had); the summary table prints last.
Exit status: 0, or 1 when a part raised. No mmdet or timm import: the script needs torch,
torchvision and spre_fx, not the project's pins.

--dry-run runs the same code on the CPU at tiny sizes and skips each CUDA-only step (the
sparse kernels, CUTLASS/cuSPARSELt probes, CUDA timing) with its reason; its timings judge no
goal (the checks table says "not judged").
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

try:
    from gpu_parts import advisor, e2e, env, gpu_tests, layers, linear, numerics, train
    from gpu_parts.common import DRY, GPU, Context, Deadline, OutOfTime
    from gpu_parts.report import write
except ImportError:  # imported as benchmarks.gpu_check
    from benchmarks.gpu_parts import advisor, e2e, env, gpu_tests, layers, linear, numerics, train
    from benchmarks.gpu_parts.common import DRY, GPU, Context, Deadline, OutOfTime
    from benchmarks.gpu_parts.report import write

# In this order; each module's CAP (seconds on the GPU) and NEED (seconds left to start it). A
# part that finishes early leaves its time to the later ones. The dry run multiplies both by
# DRY_SLACK (the CPU is slow and shared).
PARTS = {m.NAME: m for m in (env, gpu_tests, numerics, advisor, layers, linear, e2e, train)}
GPU_BUDGET, DRY_SLACK = 260.0, 4.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and logs")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only steps skipped with reasons"
    )
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {GPU_BUDGET:.0f} on a GPU, {GPU_BUDGET * DRY_SLACK:.0f} "
        "in the dry run)",
    )
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        ap.error("no CUDA device here: run with --dry-run for the CPU pass")
    start = time.monotonic()
    slack = 1.0 if cuda else DRY_SLACK
    budget = args.budget if args.budget is not None else GPU_BUDGET * slack
    end = start + budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = Context(GPU if cuda else DRY, cuda, device, out, Deadline(end), {})
    result: dict[str, Any] = {
        "command": "python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": not cuda,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "sizes": {k: str(v) for k, v in asdict(ctx.sizes).items()},
        "parts": {},
    }
    chosen = [m for name, m in PARTS.items() if name in names]
    failed = False
    for i, part in enumerate(chosen):
        rec: dict[str, Any] = {}
        result["parts"][part.NAME] = rec
        now = time.monotonic()
        reserve = sum(m.NEED for m in chosen[i + 1 :]) * slack
        cap, need = part.CAP * slack, part.NEED * slack
        part_end = min(end - reserve, now + cap) if part.NAME != "env" else end
        left = part_end - now
        if left < need or end - now <= 0:
            rec.update(
                status="skipped",
                seconds=0,
                reason=f"deadline: {max(end - now, 0):.0f} s of the budget left, {reserve:.0f} s reserved "
                f"for later parts; this part needs >= {need:.0f} s",
            )
            print(f"[{part.NAME}] skipped: {rec['reason']}", flush=True)
            write(result, out, start, PARTS)
            continue
        print(f"[{part.NAME}] up to {left:.0f} s", flush=True)
        ctx.deadline = Deadline(part_end)
        t = time.monotonic()
        try:
            part.run(ctx, rec)
            rec["status"] = "ok"
        except OutOfTime as e:
            rec.update(status="truncated", reason=str(e))
        except Exception as e:
            failed = True
            rec.update(
                status="error", reason=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()
            )
            print(rec["traceback"], file=sys.stderr, flush=True)
        rec["seconds"] = round(time.monotonic() - t, 1)
        if part is layers:
            ctx.cache["layer_runs"] = rec.get("runs", [])
        if cuda:
            torch.cuda.empty_cache()
        print(f"[{part.NAME}] {rec['status']} in {rec['seconds']} s", flush=True)
        write(result, out, start, PARTS)
    # the GPU machine has none of them: nothing on this path may import them
    result["mmdet_or_timm_imported"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("mmdet", "mmcv", "timm")
    )
    summary = write(result, out, start, PARTS)
    print("\n" + summary, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
