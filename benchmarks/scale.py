"""prepare + convert on big models: wall time against layer count, and peak memory.

Each model runs in its own subprocess so that its peak RSS is its own. Memory is reported as
(peak RSS during prepare+convert − RSS with the built model) / model size, in place
(`inplace=True`, what one does with a model that barely fits) and as the default copy.

    python benchmarks/scale.py                      # resnet18/50/101/152
    python benchmarks/scale.py --models regnet_y_128gf --modes inplace
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(name: str, mode: str, threads: int) -> dict:
    import torch
    import torchvision

    import spre_fx

    torch.set_num_threads(threads)
    with torch.no_grad():
        model = getattr(torchvision.models, name)()
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    base = _rss_mb()
    peak_before = _peak_mb()
    t = time.perf_counter()
    prepared = spre_fx.prepare(model, inplace=mode == "inplace")
    t_prepare = time.perf_counter() - t
    deployed = spre_fx.convert(prepared, inplace=mode == "inplace")
    total = time.perf_counter() - t
    assert deployed is not None
    peak = max(_peak_mb(), peak_before)
    return dict(model=name, mode=mode, convs=convs, size_mb=size_mb, prepare_s=t_prepare,
                total_s=total, extra_peak_over_size=(peak - base) / size_mb)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet101", "resnet152"])
    ap.add_argument("--modes", nargs="+", default=["inplace", "copy"], choices=["inplace", "copy"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.threads)))
        return
    print(f"{'model':16s} {'mode':8s} {'convs':>5s} {'size MB':>8s} {'prepare s':>9s} {'total s':>8s} "
          f"{'s/conv':>7s} {'peak extra / size':>17s}")
    for name in args.models:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", name, mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            per_conv = r["total_s"] / r["convs"] * 1e3
            print(f"{r['model']:16s} {r['mode']:8s} {r['convs']:5d} {r['size_mb']:8.0f} "
                  f"{r['prepare_s']:9.2f} {r['total_s']:8.2f} {per_conv:6.1f}m "
                  f"{r['extra_peak_over_size']:17.2f}")


if __name__ == "__main__":
    main()
