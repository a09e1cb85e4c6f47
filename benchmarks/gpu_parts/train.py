"""Part `train`: ResNet-50 training steps, dense / N:M / SpRe, batch 64, 224 px, channels-last.

Two precisions, each variant's ratio against the dense step of its own precision: bf16 autocast
(the dry run: float32), and fp16 autocast with a GradScaler (what most mixed-precision loops
run). Masks move every step; the "-held" variants never move them (the rest of the cost stays),
so (moving − held) / moving is the mask update's share of a step, measured within each round.
The mask update alone is also timed (its N:M and spatial halves), and a torch.profiler summary
is taken when a goal is missed. Steps are timed by the wall clock between synchronisations,
interleaved, as ratios within a round (a round runs every variant once).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import spre_fx

from .common import CL, GOALS, Context, build, fmt, goal, randn, table, wall_ms

try:
    from train_step import training_macs
except ImportError:  # imported as benchmarks.gpu_parts
    from benchmarks.train_step import training_macs

NAME, CAP, NEED = "train", 55, 15
FP16 = "fp16+scaler"  # the prefix of the fp16 GradScaler variants


def baseline(variant: str) -> str:
    """The dense step a variant's ratio is taken against: that of its own precision."""
    return f"{FP16}/dense" if variant.startswith(FP16) else "dense"


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list,
    ctx: Context,
    dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[], float]:
    """One SGD step (under autocast when `dtype` is given, through `scaler` when given) per call,
    wall seconds between synchronisations."""
    it = itertools.cycle(batches)

    def step() -> float:
        x, y = next(it)
        ctx.sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        ctx.sync()
        return time.perf_counter() - t

    return step


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = build(s.model).to(ctx.device, memory_format=CL)
    models = {"dense": base, "nm": spre_fx.prepare(base, spre=False), "spre": spre_fx.prepare(base)}
    macs = {
        k: training_macs(m, torch.randn(1, 3, s.size, s.size, device=ctx.device)) for k, m in models.items()
    }
    rec["flop_ratio"] = {k: macs[k] / macs["dense"] for k in models}
    models["nm-held"], models["spre-held"] = copy.deepcopy(models["nm"]), copy.deepcopy(models["spre"])
    for k in ("dense", "nm", "spre"):
        models[f"{FP16}/{k}"] = copy.deepcopy(models[k])
    batches = [
        (
            randn(ctx, (s.train_batch, 3, s.size, s.size), torch.float32),
            torch.randint(0, 1000, (s.train_batch,), device=ctx.device),
        )
        for _ in range(2)
    ]
    main = f"{str(s.autocast).replace('torch.', '')} autocast" if s.autocast else "float32"
    rec["precision"] = {"": main, FP16: "float16 autocast, GradScaler"}
    steps = {}
    for k, m in models.items():
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        if not k.endswith("dense"):
            every = 10**9 if k.endswith("held") else 1  # held: masks never move, the rest of the cost stays
            spre_fx.MaskScheduler(m, opt, nm_interval=every, spatial_interval=every)
        if k.startswith(FP16):
            steps[k] = train_step(m, opt, batches, ctx, torch.float16, torch.amp.GradScaler(ctx.device.type))
        else:
            steps[k] = train_step(m, opt, batches, ctx, s.autocast)
    for k, step in steps.items():
        for _ in range(s.train_warmup):
            step()
        ctx.deadline.check(f"train warm-up of {k}")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(s.train_rounds):
        if ctx.deadline.left() <= 0 and r >= 2:
            ctx.skip(rec, "rounds", f"deadline: {r} of {s.train_rounds} rounds run")
            break
        for k, step in steps.items():
            times[k].append(step())
    rec["rounds"] = len(times["dense"])
    rec["median_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rec["ratio"] = {
        k: statistics.median(t / d for t, d in zip(v, times[baseline(k)])) for k, v in times.items()
    }
    # the mask update's share of a step: moving masks against held ones, round by round
    rec["mask_share"] = {
        k: statistics.median((t - h) / t for t, h in zip(times[k], times[f"{k}-held"]))
        for k in ("nm", "spre")
    }
    rec["mask_update_ms"] = mask_update_ms(ctx, models)
    rec["mask_update_share"] = {
        k: rec["mask_update_ms"][k]["all"] / rec["median_ms"][k] for k in ("nm", "spre")
    }
    met = {}
    for prefix in ("", f"{FP16}/"):
        met[f"{prefix}nm <= {GOALS['nm_step']}"] = rec["ratio"][f"{prefix}nm"] <= GOALS["nm_step"]
        met[f"{prefix}spre <= flop ratio"] = rec["ratio"][f"{prefix}spre"] <= rec["flop_ratio"]["spre"]
    rec["goals"] = {k: goal(ctx.dry, v) for k, v in met.items()}
    print(
        f"  train: ratio {rec['ratio']}, flop ratio {rec['flop_ratio']}, mask share {rec['mask_share']}, "
        f"mask update {rec['mask_update_ms']}",
        flush=True,
    )
    if not all(met.values()) or ctx.dry:
        ctx.deadline.check("the profile")
        rec["profile"] = profile(ctx, {k: steps[k] for k in ("dense", "nm", "spre")})


def mask_update_ms(ctx: Context, models: dict) -> dict:
    """Median milliseconds of one full mask update (what the scheduler does after a step), and
    its N:M and spatial halves, on the device's weights."""
    from spre_fx.masks import nm_mask

    out: dict[str, Any] = {}
    for k in ("nm", "spre"):
        layers = [m for m in models[k].modules() if hasattr(m, "update_masks")]
        spatial = [m for m in layers if hasattr(m, "spatial_from_weight")]
        out[k] = {
            "all": wall_ms(ctx, lambda layers=layers: [m.update_masks() for m in layers]),
            "nm": wall_ms(
                ctx, lambda layers=layers: [nm_mask(m.weight, *m.spre_fx.nm, out=m.nm_mask) for m in layers]
            ),
            "layers": len(layers),
            "spre_layers": len(spatial),
        }
        if spatial:
            out[k]["spatial"] = wall_ms(
                ctx, lambda spatial=spatial: [m.spatial_from_weight() for m in spatial]
            )
    return out


def profile(ctx: Context, steps: dict) -> dict:
    """torch.profiler over a few steps of each variant: device (or CPU) time per step, the ops
    that take most of it, and the optimizer step (which runs the mask update); tables in
    profile_train.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    n = ctx.sizes.profile_steps
    summary, text = {}, []
    for k, step in steps.items():
        with torch_profile(activities=acts) as prof:
            for _ in range(n):
                step()
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "Optimizer.", "autograd::"))]

        def self_t(e):
            return getattr(e, "self_device_time_total", 0) if ctx.cuda else e.self_cpu_time_total

        top = sorted(events, key=self_t, reverse=True)[:8]
        opt = [e for e in events if e.key.startswith("Optimizer.step")]
        summary[k] = {
            "ms_per_step": sum(self_t(e) for e in events if e.key.startswith("aten::")) / n / 1e3,
            "optimizer_step_cpu_ms": sum(e.cpu_time_total for e in opt) / n / 1e3,
            "top": {e.key: round(self_t(e) / n / 1e3, 3) for e in top},
        }
        sort = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
        text.append(f"== {k}, {n} steps ==\n{prof.key_averages().table(sort_by=sort, row_limit=25)}")
    (ctx.out / "profile_train.txt").write_text("\n\n".join(text))
    return summary


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    if "ratio" not in rec:
        return [], []
    lines = [
        "## Training step (median of per-round ratios vs the dense step of the same precision)",
        f"precisions: {rec.get('precision')}",
        *table(
            ["variant", "median ms", "ratio", "FLOP ratio"],
            [
                [
                    k,
                    rec["median_ms"][k],
                    rec["ratio"][k],
                    rec["flop_ratio"].get(k.split("/")[-1].replace("-held", "")),
                ]
                for k in rec["ratio"]
            ],
        ),
        f"mask update's share of a step (moving - held) / moving: {rec.get('mask_share')}; the update alone: "
        f"{rec.get('mask_update_share')} of a step, ms {rec['mask_update_ms']}",
        "",
    ]
    checks = []
    for prefix in ("", f"{FP16}/"):
        label = prefix.rstrip("/") or rec.get("precision", {}).get("", "")
        checks.append(
            [
                f"train N:M step / dense ({label})",
                fmt(rec["ratio"][f"{prefix}nm"]),
                f"<= {GOALS['nm_step']}",
                rec["goals"][f"{prefix}nm <= {GOALS['nm_step']}"],
            ]
        )
        checks.append(
            [
                f"train SpRe step / dense ({label})",
                fmt(rec["ratio"][f"{prefix}spre"]),
                f"<= {rec['flop_ratio']['spre']:.3f}",
                rec["goals"][f"{prefix}spre <= flop ratio"],
            ]
        )
    for k in ("nm", "spre"):
        checks.append([f"mask update share of a {k} step", fmt(rec["mask_share"][k]), "as measured", None])
    for k, v in rec.get("profile", {}).items():
        lines.append(
            f"- profile {k}: {v['ms_per_step']:.1f} ms/step, optimizer step (with masks) "
            f"{v['optimizer_step_cpu_ms']:.1f} ms CPU; top {v['top']}"
        )
    return [*lines, ""], checks
