"""Would one conv with both branches' weights stacked beat SpRe's two convs? (Measured: no.)

    python benchmarks/fused_branches.py

Forward and backward of resnet18's 16 SpRe pairs (3×3 convs at batch 16, 96 px input) as
spre_fx computes them, `BN(conv(x, W)) + BN_r(conv(x, W_r))`, against one conv with
`cat([W, W_r])` (2·O output channels, one pass over x, no sum of two input gradients) and
either two BatchNorms on its halves or one on all 2·O channels. Interleaved rounds; the figure
is the median of per-round ratios against the two-conv form.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

# resnet18's 3×3 convs at 96 px: (in, out, input size, stride)
LAYERS = ([(64, 64, 24, 1)] * 4 + [(64, 128, 24, 2)] + [(128, 128, 12, 1)] * 3 + [(128, 256, 12, 2)]
          + [(256, 256, 6, 1)] * 3 + [(256, 512, 6, 2)] + [(512, 512, 3, 1)] * 3)


def make_layers(batch: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for c, o, size, stride in LAYERS:
        x = torch.randn(batch, c, size, size, generator=g, requires_grad=True)
        w = torch.randn(o, c, 3, 3, generator=g, requires_grad=True)
        w_r = torch.randn(o, c, 3, 3, generator=g, requires_grad=True)
        bn = [torch.nn.BatchNorm2d(o) for _ in range(2)]
        out.append((x, w, w_r, stride, bn))
    return out


def two_convs(layers) -> None:
    for x, w, w_r, s, (bn, bn_r) in layers:
        y = bn(F.conv2d(x, w, stride=s, padding=1)) + bn_r(F.conv2d(x, w_r, stride=s, padding=1))
        y.sum().backward()


def stacked_conv(layers) -> None:
    for x, w, w_r, s, (bn, bn_r) in layers:
        o = w.shape[0]
        z = F.conv2d(x, torch.cat([w, w_r]), stride=s, padding=1)
        y = bn(z[:, :o]) + bn_r(z[:, o:])
        y.sum().backward()


def stacked_conv_one_bn(layers) -> None:
    for x, w, w_r, s, (bn, bn_r) in layers:
        o = w.shape[0]
        z = F.conv2d(x, torch.cat([w, w_r]), stride=s, padding=1)
        z = F.batch_norm(z, None, None, torch.cat([bn.weight, bn_r.weight]), torch.cat([bn.bias, bn_r.bias]),
                         training=True)
        y = z[:, :o] + z[:, o:]
        y.sum().backward()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = make_layers(args.batch)
    variants = {"two convs (spre_fx)": two_convs, "stacked conv, two BNs": stacked_conv,
                "stacked conv, one BN": stacked_conv_one_bn}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn(layers)  # warm-up
    for _ in range(args.rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn(layers)
            times[k].append(time.perf_counter() - t)
    base = times["two convs (spre_fx)"]
    print(f"resnet18's 16 SpRe pairs, batch {args.batch}, {args.threads} threads, {args.rounds} rounds")
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{k:24s} {statistics.median(ts) * 1e3:8.1f} ms  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
