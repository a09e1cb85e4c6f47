"""Training-step speed of plain N:M and SpRe against dense and the naive SpRe build.

One training step = forward, backward, optimizer step (SGD), mask scheduling. Variants run
interleaved in one process (dense, nm, spre, naive, dense, ...), and each figure is the median
of per-round ratios against the dense step of the same round, beside their quartiles. The
training-FLOP ratio of the prepared model over the dense one (forward, weight and input
gradients of every conv and linear) is printed beside the measurement: `FLOP ratio` with both
SpRe branches as full convs, `tap FLOP ratio` with the extra branch counting only the taps its
spatial mask keeps (what spre_fx.layers.tapconv computes; the naive build runs the full conv).

    python benchmarks/train_step.py --model resnet18 --batch 16 --size 96
    python benchmarks/train_step.py --model resnet50 --batch 8 --size 96

`--baseline-native FILE` adds `nm-baseline` and `spre-baseline`: the same steps with another
version of the C mask kernels (`git show REV:spre_fx/_native.c > FILE`), interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import spre_fx
from spre_fx import _native
from spre_fx.layers import SpReConv2d, tapconv

try:
    from naive_spre import naive_spre
except ImportError:  # run as a module
    from benchmarks.naive_spre import naive_spre


def training_macs(model: nn.Module, x: torch.Tensor, taps_only: bool = False) -> float:
    """Multiply-accumulates of one training step's convs and linears (both SpRe branches).

    Forward, plus the weight gradient (weights that train) and the input gradient (inputs that
    need one: not the stem's image), each as many MACs as the forward. `taps_only`: the SpRe
    branch counts only the kernel taps it uses, |S|/(kh·kw) of a full conv (its spatial_mask).
    """
    total = 0.0

    def count(m, inp, out, per_out: int):
        nonlocal total
        outs = out if isinstance(out, tuple) else (out,)
        passes = 1 + m.weight.requires_grad + inp[0].requires_grad
        tap_share = m.spatial_mask.float().mean().item() if taps_only and isinstance(m, SpReConv2d) else 1.0
        share = (1.0, tap_share)
        for o, f in zip(outs, share):  # a SpReConv2d returns (main, rep): two convs' worth of work
            total += passes * o.numel() * per_out * f

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(lambda m, i, o: count(m, i, o, m.weight[0].numel())))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(lambda m, i, o: count(m, i, o, m.in_features)))
    model.eval()  # no BN statistics updated; autograd on, so `requires_grad` tells what backward computes
    model(x)
    for h in handles:
        h.remove()
    return total


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scheduled: bool, compiled: bool = False,
              interval: int = 1):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if scheduled:
        spre_fx.MaskScheduler(model, opt, nm_interval=interval, spatial_interval=interval)
    loss_fn = nn.CrossEntropyLoss()
    run = torch.compile(model) if compiled else model

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(run(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    return step


def with_tapconv(step, on: bool):
    """`step` with spre_fx.layers.tapconv switched on (the SpRe branch over its taps, autotuned)
    or off (the branch as the full k×k conv, spre_fx's default)."""

    def run() -> float:
        before = tapconv.enabled()
        tapconv.set_enabled(on)
        try:
            return step()
        finally:
            tapconv.set_enabled(before)

    return run


def with_library(step, lib):
    """`step` with `lib` (spre_fx._native.build of another C source) as the mask kernels."""

    def run() -> float:
        with _native.using(lib):
            return step()

    return run


def profile_steps(steps: dict, n: int = 5, top: int = 6) -> None:
    """Per step: self time of the convolution kernels (forward and backward), and the whole
    optimizer step, which includes the MaskScheduler's mask update (the C kernels count as the
    step's own time); then, per variant, the ops whose self time grew most over dense."""
    from torch.profiler import ProfilerActivity, profile

    print(f"{'profiled':12s} {'conv ms/step':>12s} {'optimizer step + masks ms/step':>31s}")
    self_ms: dict[str, dict[str, float]] = {}
    for k, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                step()
        events = prof.key_averages()
        self_ms[k] = {e.key: e.self_cpu_time_total / n / 1e3 for e in events}
        conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
        opt = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
        print(f"{k:12s} {conv / n / 1e3:12.1f} {opt / n / 1e3:31.1f}")
    base = self_ms.get("dense", {})
    for k, ops in self_ms.items():
        if k == "dense":
            continue
        grown = sorted(((ms - base.get(op, 0.0), op) for op, ms in ops.items()), reverse=True)[:top]
        print(f"{k}: self ms/step over dense: " + ", ".join(f"{op} +{d:.1f}" for d, op in grown))


def quartiles(values: list[float]) -> str:
    """The first and third quartiles of per-round ratios: how far one round strays on this machine
    (an effect inside them is not resolved by the run)."""
    if len(values) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}-{q3:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first (tapconv times its plans' pieces in the first ones)")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--full-branch", action="store_true",
                    help="also time SpRe with spre_fx.layers.tapconv off (the extra branch as the full conv)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of dense and spre")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 5 steps of each variant: convolution time and optimizer step "
                         "(with the mask update) per step")
    ap.add_argument("--interval", type=int, default=1,
                    help="mask update interval in steps (1 = SR-STE); a large value isolates the cost of the "
                         "masked forward/backward from the mask updates")
    ap.add_argument("--baseline-native", metavar="FILE",
                    help="also time nm and spre with this version of spre_fx/_native.c")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = getattr(torchvision.models, args.model)(num_classes=100)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 100, (args.batch,))
    variants = {
        "dense": (dense, False),
        "nm": (spre_fx.prepare(dense, spre=False), True),
        "spre": (spre_fx.prepare(dense), True),
    }
    if args.full_branch:
        variants["spre-fullconv"] = (spre_fx.prepare(dense), True)
    if args.baseline_native:
        variants["nm-baseline"] = (spre_fx.prepare(dense, spre=False), True)
        variants["spre-baseline"] = (spre_fx.prepare(dense), True)
    if not args.no_naive:
        variants["naive-spre"] = (naive_spre(dense), False)
    # The naive build calls its convs functionally (no hooks fire): it does SpRe's work.
    flops = {k: training_macs(m, x[:1]) for k, (m, _) in variants.items() if k != "naive-spre"}
    flops["naive-spre"] = flops["spre"]
    for k in ("spre-fullconv", "spre-baseline"):
        if k in variants:
            flops[k] = flops["spre"]
    spre_taps = training_macs(variants["spre"][0], x[:1], taps_only=True)
    tap_flops = dict(flops, spre=spre_taps, **({"spre-baseline": spre_taps} if args.baseline_native else {}))
    steps = {k: make_step(m, x, y, s, interval=args.interval) for k, (m, s) in variants.items()}
    steps["spre"] = with_tapconv(steps["spre"], True)
    if "spre-fullconv" in steps:
        steps["spre-fullconv"] = with_tapconv(steps["spre-fullconv"], False)
    if args.baseline_native:
        baseline = _native.build(args.baseline_native)
        steps["nm-baseline"] = with_library(steps["nm-baseline"], baseline)
        steps["spre-baseline"] = with_library(with_tapconv(steps["spre-baseline"], True), baseline)
    if args.compile:
        import copy

        for k in ("dense", "spre"):
            m, s = variants[k]
            steps[f"{k}-compiled"] = make_step(copy.deepcopy(m), x, y, s, compiled=True)
            flops[f"{k}-compiled"] = flops[k]
            tap_flops[f"{k}-compiled"] = flops[k]  # compiled: the full conv (no data-dependent plan)
    for step in steps.values():  # warm-up
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, step in steps.items():
            times[k].append(step())
    print(f"{args.model}, batch {args.batch} at {args.size}px, {args.threads} threads, {args.rounds} "
          f"interleaved rounds, masks move every {args.interval} step(s), torch {torch.__version__}")
    print(f"{'variant':12s} {'median step':>12s} {'ratio vs dense':>15s} {'quartiles':>13s} "
          f"{'FLOP ratio':>11s} {'tap FLOP ratio':>15s}")
    for k in steps:
        ratios = [t / d for t, d in zip(times[k], times["dense"])]
        print(f"{k:12s} {statistics.median(times[k]) * 1e3:10.1f}ms {statistics.median(ratios):15.3f} "
              f"{quartiles(ratios):>13s} {flops[k] / flops['dense']:11.3f} "
              f"{tap_flops.get(k, flops[k]) / flops['dense']:15.3f}")
    if "naive-spre" in times:
        r = [a / b for a, b in zip(times["spre"], times["naive-spre"])]
        print(f"spre / naive-spre: {statistics.median(r):.3f} (goal: clearly below 1)")
    for k in ("nm", "spre"):
        if f"{k}-baseline" in times:
            r = [a / b for a, b in zip(times[k], times[f"{k}-baseline"])]
            print(f"{k} / {k}-baseline (kernels of {args.baseline_native}): {statistics.median(r):.3f} "
                  f"(quartiles {quartiles(r)})")
    if args.profile:
        profile_steps(steps)
    n_spre = sum(isinstance(m, SpReConv2d) for m in variants["spre"][0].modules())
    print(f"SpRe branches: {n_spre}; goals: nm <= 1.05, spre <= FLOP ratio")


if __name__ == "__main__":
    main()
