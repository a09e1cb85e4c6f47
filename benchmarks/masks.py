"""Time of one mask update of a model's layers, and of the bool-vs-uint8 casts the layers use.

    python benchmarks/masks.py --model resnet18

Prints the median over repeats of: `nm_mask` for every N:M-eligible conv (what a
`MaskScheduler` step computes), `spatial_mask` for every k×k conv (the SpRe layers), and, for
the largest weight, a bool mask cast to float read as bool and as uint8.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from spre_fx.masks import nm_mask, spatial_mask


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = getattr(torchvision.models, args.model)()
    convs = [m.weight.detach() for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0]
    spatial = [w for w in convs if w.shape[-1] > 1]
    masks = [torch.empty(w.shape, dtype=torch.bool) for w in convs]
    print(f"{args.model}, {args.threads} threads, median of {args.repeats}")
    ms = median_ms(lambda: [nm_mask(w, 2, 4, out=o) for w, o in zip(convs, masks)], args.repeats)
    print(f"nm_mask 2:4, {len(convs)} convs, {sum(w.numel() for w in convs) / 1e6:.1f}M weights: {ms:.1f} ms")
    ms = median_ms(lambda: [spatial_mask(w, 0.5) for w in spatial], args.repeats)
    mw = sum(w.numel() for w in spatial) / 1e6
    print(f"spatial_mask, {len(spatial)} k×k convs, {mw:.1f}M weights: {ms:.1f} ms")
    big = max(masks, key=torch.Tensor.numel)
    for name, src in (("bool", big), ("uint8 view", big.view(torch.uint8))):
        ms = median_ms(lambda src=src: src.to(torch.float32), args.repeats)
        print(f"mask {tuple(big.shape)} -> float32, read as {name}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
