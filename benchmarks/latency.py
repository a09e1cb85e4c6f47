"""CPU latency of a deployed spre_fx model against the same architecture with BN folded by fx.

- A: `spre_fx.convert(spre_fx.prepare(model))`: every SpRe pair and conv→BN pair collapsed into
  one conv with bias (N:M weights, still run by the dense CPU kernels).
- B: `torch.fx.experimental.optimization.fuse(model.eval())`: the dense model with its BatchNorms
  folded into the convs by fx.

Both have the same parameter count (asserted) and do the same dense arithmetic, so the goal is
a ratio of 1.00 ± 0.03: SpRe costs nothing at inference. Forwards run in eval mode under
`torch.no_grad()`, interleaved (A, B, A, B, ...) after a warm-up; the figure of merit is the
median of the per-pair ratios A/B.

    PYTHONPATH=. .venv/bin/python benchmarks/latency.py --model resnet50 --batch 8 --size 224 --repeats 10
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch
import torchvision
from torch.fx.experimental.optimization import fuse

import spre_fx

GOAL, TOLERANCE = 1.00, 0.03


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seconds(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Wall and CPU (all threads) seconds of one forward."""
    t0, c0 = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (weights=None)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--repeats", type=int, default=10, help="timed A/B pairs after the warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = torchvision.models.get_model(args.model, weights=None)
    deployed = spre_fx.convert(spre_fx.prepare(dense)).eval()
    folded = fuse(dense.eval())  # fx's conv+BN folding (a copy; needs eval mode)
    # Same folding, user's own (eager) class, no sparsity: separates fx-vs-eager from sparsity.
    eager_folded = spre_fx.convert(spre_fx.prepare(dense, include=())).eval()

    pa, pb = n_params(deployed), n_params(folded)
    print(f"parameters: spre_fx deployed {pa:,}, fx-folded dense {pb:,}")
    assert pa == pb, f"parameter counts differ: {pa} != {pb}"

    x = torch.randn(args.batch, 3, args.size, args.size)
    ta, tb, eager_ratios, ratios, cpu_ratios = [], [], [], [], []
    with torch.no_grad():
        for _ in range(2):  # warm-up: oneDNN primitive caches, allocator
            deployed(x)
            folded(x)
        for i in range(args.repeats):
            gc.collect()
            (a, ca), (b, cb), (c, _) = seconds(deployed, x), seconds(folded, x), seconds(eager_folded, x)
            eager_ratios.append(a / c)
            ta.append(a)
            tb.append(b)
            ratios.append(a / b)
            cpu_ratios.append(ca / cb)
            print(f"pair {i + 1}/{args.repeats}: spre_fx {a * 1e3:.1f} ms, fx-folded {b * 1e3:.1f} ms, "
                  f"ratio {ratios[-1]:.3f} (CPU time ratio {cpu_ratios[-1]:.3f})", flush=True)

    ratio = statistics.median(ratios)
    ok = abs(ratio - GOAL) <= TOLERANCE
    print()
    print(f"{args.model}, batch {args.batch} at {args.size}x{args.size}, {args.repeats} interleaved pairs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("median per forward")
    print(f"{'spre_fx convert(prepare())':<30}{statistics.median(ta) * 1e3:>8.1f}")
    print(f"{'fx fuse (dense, BN folded)':<30}{statistics.median(tb) * 1e3:>8.1f}")
    print(f"median of per-pair ratios spre_fx/fx-folded: {ratio:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}), CPU time {statistics.median(cpu_ratios):.3f}; "
          f"goal {GOAL:.2f} ± {TOLERANCE}: "
          f"{'met' if ok else 'NOT met'}")
    print(f"median of per-pair ratios spre_fx / same class BN-folded dense (no fx): "
          f"{statistics.median(eager_ratios):.3f}")


if __name__ == "__main__":
    main()
