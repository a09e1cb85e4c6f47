"""Micro-benchmark of spre_fx.layers.tapconv: one SpRe extra branch, forward + backward, per plan.

For each layer shape (batch 16) and tap layout, every plan of `tap_conv2d` and the full 3×3 conv
run interleaved (full, bbox, rows, ...) for `--rounds` rounds; each figure is the median of the
per-round ratios of the plan's time over the full conv's time in the same round (< 1: faster).
`tuned` is the plan the autotuner picks for that layer (measured once, then cached; "?" when
20 calls did not decide it).

    python benchmarks/tapconv.py                    # 2 threads, float32, NCHW
    python benchmarks/tapconv.py --channels-last
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from spre_fx.layers import tapconv

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, spatial size)
# Tap layouts as SpRe's spatial masks look: the centre and its edge neighbours ("cross"), and a
# seeded random draw of the same count ("random").
CROSS = ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2))


def layout(count: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    taps = torch.zeros(3, 3, dtype=torch.bool)
    if kind == "cross":
        cells = CROSS[:count]
    else:
        cells = [divmod(int(i), 3) for i in torch.randperm(9, generator=gen)[:count]]
    for i, j in cells:
        taps[i, j] = True
    return taps


def step(x, w, taps, plan):
    y = tapconv.tap_conv2d(x, w, taps, 1, 1, 1, 1, plan=plan) if plan else F.conv2d(x, w, None, 1, 1)
    y.backward(torch.ones_like(y))
    x.grad = w.grad = None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--taps", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--layouts", nargs="+", default=["cross", "random"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shapes", type=int, nargs="+", help="channel counts to run (default: all four)")
    args = ap.parse_args(argv)
    tapconv.set_enabled(True)  # the tuned column: the autotuner is opt-in
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    plans = tapconv.PLANS
    print(f"tap_conv2d fwd+bwd / full 3x3 conv fwd+bwd, batch {args.batch}, {args.threads} threads, "
          f"{args.dtype}, {'channels-last' if args.channels_last else 'NCHW'}, {args.device}, "
          f"median of {args.rounds} interleaved rounds, torch {torch.__version__}")
    print(f"{'shape':12s} {'taps':>4s} {'layout':7s} {'full ms':>8s} "
          + " ".join(f"{p:>6s}" for p in plans[1:]) + f" {'tuned':>6s}")
    for c, hw in SHAPES:
        if args.shapes and c not in args.shapes:
            continue
        x = torch.randn(args.batch, c, hw, hw, device=args.device, dtype=dtype).to(memory_format=fmt)
        x.requires_grad_(True)
        base = torch.randn(c, c, 3, 3, device=args.device, dtype=dtype).to(memory_format=fmt)
        for count in args.taps:
            for kind in args.layouts:
                taps = layout(count, kind, gen).to(args.device)
                w = (base * taps).requires_grad_(True)
                times = {p: [] for p in plans}
                for r in range(args.rounds + 1):
                    for p in plans:
                        if args.device != "cpu":
                            torch.cuda.synchronize()
                        t = time.perf_counter()
                        step(x, w, taps, p)
                        if args.device != "cpu":
                            torch.cuda.synchronize()
                        if r:  # round 0 warms up
                            times[p].append(time.perf_counter() - t)
                ratio = {p: statistics.median(a / b for a, b in zip(times[p], times["full"])) for p in plans}
                tapconv.clear_cache()
                for _ in range(20):  # a layout is decided over a few calls (a few pieces timed each)
                    y = tapconv.tap_conv2d(x, w, taps, 1, 1)
                    y.sum().backward()
                    x.grad = w.grad = None
                    if tapconv.tuned_plans():
                        break
                tuned = next(iter(tapconv.tuned_plans().values()), "?")
                full_ms = statistics.median(times["full"]) * 1e3
                print(f"{c}x{hw}x{hw}".ljust(12) + f" {count:4d} {kind:7s} {full_ms:8.1f} "
                      + " ".join(f"{ratio[p]:6.2f}" for p in plans[1:]) + f" {tuned:>6s}", flush=True)


if __name__ == "__main__":
    main()
