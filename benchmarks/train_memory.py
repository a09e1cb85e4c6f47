"""Extra training memory of SpRe (and plain N:M) over dense, against what the branches must hold.

Each variant trains a few SGD steps in its own subprocess; the figure is peak RSS minus the RSS
before the first step. The expected extra of SpRe is its new state (branch weights with their
gradients and momentum, masks, the branch BatchNorms) plus the activations the branches keep
for backward (each branch conv's output and its BatchNorm's output), plus the masked weight
copies each N:M conv keeps for its backward and the cached float masks (1 − M for every N:M
layer, M ⊙ S for each SpRe branch).

    python benchmarks/train_memory.py --model resnet18 --batch 16 --size 96
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(variant: str, model_name: str, batch: int, size: int, threads: int) -> dict:
    import torch
    import torchvision

    import spre_fx
    from spre_fx.layers import SpReConv2d

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=100)
    if variant != "dense":
        model = spre_fx.prepare(model, spre=variant == "spre")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant != "dense":
        spre_fx.MaskScheduler(model, opt)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    rep_out = 0

    def count(m, inp, out):
        nonlocal rep_out
        rep_out += out.rep.numel() * out.rep.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, SpReConv2d)]
    model.train()
    base = _rss_mb()
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i == 0:
            for h in hooks:
                h.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    new_state = sum(
        t.numel() * t.element_size()
        for n, t in model.state_dict().items()
        if n.rpartition(".")[2] in {"weight_rep", "nm_mask", "spatial_mask"} or ".rep." in n
    )
    rep_params = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if n.endswith("weight_rep") or ".rep." in n)
    # the masked weights (W ⊙ M, and W_r ⊙ M ⊙ S) that each conv keeps for its backward, plus
    # the cached float masks the layers multiply by (1 − M; M ⊙ S for a SpRe branch)
    masked = sum(m.weight.numel() * m.weight.element_size() * (4 if isinstance(m, SpReConv2d) else 2)
                 for m in model.modules() if hasattr(m, "nm_mask"))
    # branch params get a gradient and a momentum buffer; each branch keeps conv and BN outputs
    expected = new_state + masked + 2 * rep_params + 2 * rep_out
    return dict(variant=variant, extra_mb=peak - base, expected_mb=expected / 2**20)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.model, args.batch, args.size, args.threads)))
        return
    rows = {}
    for variant in ("dense", "nm", "spre"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--size",
               str(args.size), "--threads", str(args.threads), "--child", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.model}, batch {args.batch} at {args.size}px: peak RSS growth over 3 SGD steps")
    print(f"{'variant':8s} {'training MB':>11s} {'extra vs dense':>14s} {'expected extra':>14s}")
    dense = rows["dense"]["extra_mb"]
    for v, r in rows.items():
        print(f"{v:8s} {r['extra_mb']:11.0f} {r['extra_mb'] - dense:14.0f} {r['expected_mb']:14.0f}")


if __name__ == "__main__":
    main()
