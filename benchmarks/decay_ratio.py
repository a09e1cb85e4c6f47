"""How much of SR-STE's decay reaches the weights in one optimizer step, per training setup.

    python benchmarks/decay_ratio.py --model resnet18

Two copies of a prepared model, with decay λ and with λ = 0, take the same SGD step (no momentum)
on the same data. On the pruned weights of every N:M layer, (W_λ − W_0) / (−lr·λ·W) is 1 when the
decay λ(1 − M)⊙W entered the step once, on the unscaled gradient (docs/method.md §1). Prints the
median and the 1st-99th percentile of that ratio for each setup (plain float32, with one and
with 4 accumulated backwards; a GradScaler at 2^16, with one and with 4; fused SGD under the
scaler; float16 autocast with the scaler; bfloat16 autocast), with a MaskScheduler attached and
without one; a step the scaler skips (float16's first) is retried. Then whether a step that a
fused optimizer's kernel skipped counted as a schedule step. Run it on another checkout to compare, e.g.

    PYTHONPATH=/path/to/old/checkout python benchmarks/decay_ratio.py
"""

from __future__ import annotations

import argparse
import copy

import torch

import spre_fx

LR, LAM = 0.1, 2e-4

SETUPS = {  # name: (GradScaler init scale or None, accumulated backwards, fused, autocast dtype)
    "fp32": (None, 1, False, None),
    "fp32, 4 accumulated": (None, 4, False, None),
    "GradScaler 2^16": (2.0**16, 1, False, None),
    "GradScaler 2^16, 4 accumulated": (2.0**16, 4, False, None),
    "fused SGD, GradScaler 2^16": (2.0**16, 1, True, None),
    "fp16 autocast, GradScaler 2^16": (2.0**16, 1, False, torch.float16),
    "bf16 autocast": (None, 1, False, torch.bfloat16),
}


def build(model_name: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return spre_fx.prepare(getattr(torchvision.models, model_name)(num_classes=10), decay=LAM)


def one_step(model, opt, scaler, xs, dtype) -> None:
    opt.zero_grad()
    for x in xs:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x).float().square().mean()
        (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def ratio(base: torch.nn.Module, setup: tuple, scheduler: bool, batch: int, size: int) -> torch.Tensor:
    init_scale, k, fused, dtype = setup
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    for m in models[1].modules():
        if hasattr(m, "nm_mask"):
            m.spre_fx.decay = 0.0
    opts = [torch.optim.SGD(m.parameters(), lr=LR, fused=fused or None) for m in models]
    if scheduler:
        for m, o in zip(models, opts):
            spre_fx.MaskScheduler(m, o)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale) if init_scale else None for _ in models]
    g = torch.Generator().manual_seed(0)
    layers = [m for m in models[0].modules() if hasattr(m, "nm_mask")]
    for _ in range(10):  # until a step is taken (the scaler skips on overflow)
        before = [(m.weight.detach().clone(), ~m.nm_mask) for m in layers]
        xs = list(torch.randn(batch * k, 3, size, size, generator=g).chunk(k))
        for m, o, s in zip(models, opts, scalers):
            one_step(m, o, s, xs, dtype)
        if not torch.equal(layers[0].weight, before[0][0]):
            break
    others = [m for m in models[1].modules() if hasattr(m, "nm_mask")]
    out = []
    for (w, pruned), a, b in zip(before, layers, others):
        moved = (a.weight.detach() - b.weight.detach()) / (-LR * LAM * w)
        out.append(moved[pruned & (w != 0)].double())
    return torch.cat(out)


def skipped_fused_step_counts(base: torch.nn.Module, size: int) -> bool:
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=LR, fused=True)
    sched = spre_fx.MaskScheduler(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt.zero_grad()
    scaler.scale(model(torch.randn(2, 3, size, size)).square().mean()).backward()
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    return sched.step == 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="a torchvision model name")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = build(args.model)
    print(f"{args.model}, batch {args.batch} at {args.size} px, SGD lr {LR}, λ {LAM}: "
          "(W_λ − W_0) / (−lr·λ·W) on pruned weights, median [1st, 99th percentile]")
    print(f"{'setup':34s} {'with MaskScheduler':>26s} {'without':>26s}")
    for name, setup in SETUPS.items():
        cells = []
        for scheduler in (True, False):
            r = ratio(base, setup, scheduler, args.batch, args.size)
            q = torch.quantile(r, torch.tensor([0.5, 0.01, 0.99], dtype=torch.float64)).tolist()
            q = [v + 0.0 for v in q]  # no "-0.00" for an exact zero divided by a negative number
            cells.append(f"{q[0]:.2f} [{q[1]:.2f}, {q[2]:.2f}]")
        print(f"{name:34s} {cells[0]:>26s} {cells[1]:>26s}")
    print(f"a fused step the scaler skipped counted as a schedule step: "
          f"{'yes' if skipped_fused_step_counts(base, args.size) else 'no'}")


if __name__ == "__main__":
    main()
