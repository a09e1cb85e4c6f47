"""Time of one mask update of a model's layers, and of the bool-vs-uint8 casts the layers use.

    python benchmarks/masks.py --model resnet18

Prints the median over repeats of: `nm_mask` for every N:M-eligible conv (what a
`MaskScheduler` step computes) and `spatial_mask` for every k×k conv (the SpRe layers), each
with the C kernels (spre_fx/_native.c) and with the grouped torch code (what CUDA weights run,
`nm_masks` / `spatial_masks` with the kernels off), interleaved, with
the median of per-repeat ratios; and, for the largest weight, a bool mask cast to float read as
bool and as uint8. `--baseline-source FILE` also times both masks with another version of the C
source against the shipped one, interleaved (e.g. the kernels before a change):

    git show d25e6cf:spre_fx/_native.c > /tmp/native_before.c
    python benchmarks/masks.py --model resnet18 --baseline-source /tmp/native_before.c

`--in-step` times the masks where a training run computes them instead: the SGD step of a
prepared model (default batch 16 at 96 px), whose `MaskScheduler` hook updates every mask right after
the optimizer wrote the weights, so they are read from memory, not cache (calls on the same
weights over and over, above, are up to 2x faster than this). Interleaved against the same step
with the spatial masks held (their cost in the step) and, with `--baseline-source`, against the
other kernels (each model keeps its own hints):

    python benchmarks/masks.py --model resnet18 --in-step --baseline-source /tmp/native_before.c
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from spre_fx import _native
from spre_fx.masks import (
    nm_mask,
    nm_masks,
    spatial_hint,
    spatial_mask,
    spatial_masks,
)


def torch_path(fn):
    """`fn` run with the C kernels off: the grouped torch code CUDA weights take."""
    def run():
        with _native.using(None):
            return fn()
    return run


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def interleaved_ms(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Times of `a` and `b` in ms, run alternately after one warm-up each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, ts in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return ta, tb


def in_step(model_name: str, repeats: int, baseline_source: str | None, batch: int, size: int) -> None:
    """Optimizer step + mask update of prepared SpRe models, interleaved (see the module doc)."""
    import spre_fx

    torch.manual_seed(0)
    dense = getattr(torchvision.models, model_name)(num_classes=100)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    baseline = _native.build(baseline_source) if baseline_source else None
    variants = {"shipped kernels": (_native.library(), 1), "spatial masks held": (_native.library(), 10**9)}
    if baseline is not None:
        variants[f"kernels of {baseline_source}"] = (baseline, 1)
    runs = {}
    for name, (lib, spatial_interval) in variants.items():
        model = spre_fx.prepare(dense)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        spre_fx.MaskScheduler(model, opt, spatial_interval=spatial_interval)
        runs[name] = (lib, model, opt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats + 3):  # the first 3 rounds warm up
        for name, (lib, model, opt) in runs.items():
            with _native.using(lib):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                t = time.perf_counter()
                opt.step()
                if r >= 3:
                    times[name].append((time.perf_counter() - t) * 1e3)
    first = times["shipped kernels"]
    print(f"{model_name} (SpRe), batch {batch} at {size}px, optimizer step with the mask update, median of "
          f"{repeats} interleaved rounds")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(first, ts))
        print(f"{name:30s} {statistics.median(ts):7.2f} ms   shipped / this {ratio:.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-source", help="another version of spre_fx/_native.c to compare against")
    ap.add_argument("--batch", type=int, default=16, help="--in-step: batch size")
    ap.add_argument("--size", type=int, default=96, help="--in-step: input size")
    ap.add_argument("--in-step", action="store_true",
                    help="time the masks inside SGD steps of a prepared model instead (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.in_step:
        in_step(args.model, args.repeats, args.baseline_source, args.batch, args.size)
        return
    model = getattr(torchvision.models, args.model)()
    convs = [m.weight.detach() for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0]
    spatial = [w for w in convs if w.shape[-1] > 1]
    masks = [torch.empty(w.shape, dtype=torch.bool) for w in convs]
    taps = [torch.empty(w.shape[2:], dtype=torch.bool) for w in spatial]
    hints = [spatial_hint() for _ in spatial]
    baseline_hints = [spatial_hint() for _ in spatial]  # its own: another source may read them otherwise
    print(f"{args.model}, {args.threads} threads, median of {args.repeats}, C kernels: {_native.backend()}")
    rate = 0.5
    pairs = {
        f"nm_mask 2:4, {len(convs)} convs, {sum(w.numel() for w in convs) / 1e6:.1f}M weights": (
            lambda: [nm_mask(w, 2, 4, out=o) for w, o in zip(convs, masks)],
            torch_path(lambda: nm_masks(convs, 2, 4, masks)),
        ),
        f"spatial_mask, {len(spatial)} k×k convs, {sum(w.numel() for w in spatial) / 1e6:.1f}M weights": (
            lambda: [spatial_mask(w, rate) for w in spatial],
            torch_path(lambda: spatial_masks(spatial, rate, taps)),
        ),
        # what a SpRe layer calls: its hint holds here (the same weights each time), one pass
        f"spatial_mask with each layer's hint, {len(spatial)} k×k convs": (
            lambda: [spatial_mask(w, rate, h) for w, h in zip(spatial, hints)],
            torch_path(lambda: spatial_masks(spatial, rate, taps)),
        ),
    }
    for name, (native, torch_code) in pairs.items():
        t_native, t_torch = interleaved_ms(native, torch_code, args.repeats)
        ratio = statistics.median(a / b for a, b in zip(t_native, t_torch))
        native_ms, torch_ms = statistics.median(t_native), statistics.median(t_torch)
        print(f"{name}: {native_ms:.1f} ms, torch code {torch_ms:.1f} ms, ratio {ratio:.2f}")
    if args.baseline_source:
        baseline = _native.build(args.baseline_source)
        for name, (native, _) in pairs.items():
            def with_baseline(native=native):
                with _native.using(baseline):
                    hints[:], baseline_hints[:] = baseline_hints[:], hints[:]
                    try:
                        native()
                    finally:
                        hints[:], baseline_hints[:] = baseline_hints[:], hints[:]
            t_native, t_base = interleaved_ms(native, with_baseline, args.repeats)
            ratio = statistics.median(a / b for a, b in zip(t_native, t_base))
            print(f"{name}: {statistics.median(t_native):.1f} ms, {args.baseline_source} "
                  f"{statistics.median(t_base):.1f} ms, ratio {ratio:.2f}")
    big = max(masks, key=torch.Tensor.numel)
    for name, src in (("bool", big), ("uint8 view", big.view(torch.uint8))):
        ms = median_ms(lambda src=src: src.to(torch.float32), args.repeats)
        print(f"mask {tuple(big.shape)} -> float32, read as {name}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
