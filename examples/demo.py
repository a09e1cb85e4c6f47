"""spre_fx end to end: prepare a ResNet-18 with SpRe 2:4, train a few steps, convert, verify.

The data are a fixed random tensor dataset with a learnable signal: each class adds its own
smooth mean pattern to Gaussian noise, so the loss visibly falls within a few SGD steps.
About 25 s on 2 otherwise idle CPU cores (torch 2.14.1); longer when the cores are shared.
(`make demo` runs examples/digits.py, the method comparison on real digits; this script is the
quick end-to-end check, run by hand:)

    PYTHONPATH=. .venv/bin/python examples/demo.py --steps 20 --batch 16 --size 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import spre_fx

NUM_CLASSES = 10


def make_dataset(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images `3 x size x size`: class-dependent smooth mean pattern plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(NUM_CLASSES, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    images = patterns[labels] + torch.randn(n, 3, size, size, generator=g)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="SGD steps")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--lr", type=float, default=0.005, help="SGD learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()

    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    prepared = spre_fx.prepare(model, nm=(2, 4))  # SpRe branches on the 3x3 conv->BN pairs
    counts = spre_fx.report(prepared)
    print(f"prepared ResNet-18: {counts.count('spre')} spre, {counts.count('nm')} nm, "
          f"{counts.count('dense')} dense layers")

    images, labels = make_dataset(max(8 * args.batch, 160), args.size)
    # docs/method.md §5 recipe scaled to a tiny run: SGD momentum 0.9, label smoothing 0.1, and an LR near
    # 0.1 x batch / 256 (no warm-up or cosine schedule over 20 steps).
    opt = torch.optim.SGD(prepared.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(1)
    prepared.train()
    every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(images), (args.batch,), generator=g)
        loss = loss_fn(prepared(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # the N:M masks follow the updated weights at the next forward (SR-STE)
        if step == 1 or step % every == 0 or step == args.steps:
            print(f"step {step:3d}/{args.steps}  loss {loss.item():.3f}", flush=True)

    prepared.eval()  # convert folds the BatchNorms' running statistics: eval-mode semantics

    converted = spre_fx.convert(prepared)
    result = spre_fx.verify(prepared, converted, images[:4])
    print()
    print(spre_fx.report(converted))
    print()
    print(f"verify: output error {result.output_error:.2e} (tolerance {result.tolerance:g}), "
          f"N:M violations {sum(result.nm_violations.values())} in {len(result.nm_violations)} "
          f"N:M layers; {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
