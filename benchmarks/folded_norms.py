"""What a folded norm costs at inference (CPU): the forms `convert` can leave where a BatchNorm was.

From one prepared torchvision model, four deployed forms with the same N:M weights:
- default: `convert(p)`: the shift in the conv's bias, a `FoldedBatchNorm` returning its input;
- identity: the same with `nn.Identity` in the norm's place (what `convert` left before 0.2.1);
- keep_norms: `convert(p, keep_norms=True)`: the conv as built (no bias), the shift added by the
  `FoldedBatchNorm` (what timm's `reparameterize_model` needs);
- batchnorm: the conv as built and torch's own eval-mode `nn.BatchNorm2d` holding mean 0,
  variance 1, eps 0, weight 1 and the shift (a real norm kept in place).
Forwards run under `torch.no_grad()`, interleaved, after a warm-up; the figure is the median of
the per-round ratios to `default` (and the outputs' largest difference to it).

    PYTHONPATH=. .venv/bin/python benchmarks/folded_norms.py --model resnet50 --batch 8 --size 224 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import time

import torch
import torchvision
from torch import nn

import spre_fx


def with_modules(model: nn.Module, make) -> nn.Module:
    """A copy of `model` with every FoldedBatchNorm replaced by `make(folded)`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, spre_fx.FoldedBatchNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, make(module))
    return model


def as_batchnorm(folded: spre_fx.FoldedBatchNorm) -> nn.Module:
    bn = nn.BatchNorm2d(folded.num_features, eps=0.0).eval()
    with torch.no_grad():
        bn.bias.copy_(folded.bias)
    return bn if folded.post is None else nn.Sequential(bn, folded.post)


def forms(arch: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    prepared = spre_fx.prepare(torchvision.models.get_model(arch, weights=None)).eval()
    default = spre_fx.convert(prepared)
    keep = spre_fx.convert(prepared, keep_norms=True)
    return {
        "default": default,
        "identity": with_modules(default, lambda f: nn.Identity() if f.post is None else f.post),
        "keep_norms": keep,
        "batchnorm": with_modules(keep, as_batchnorm),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (weights=None)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = forms(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        reference = models["default"](x)
        diffs = {k: (m(x) - reference).abs().max().item() for k, m in models.items()}
        for _ in range(args.rounds):
            gc.collect()
            for name, model in models.items():
                t = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t)
    ratios = {k: statistics.median(a / b for a, b in zip(v, times["default"]))
              for k, v in times.items()}
    print(f"{args.model}, batch {args.batch} at {args.size}x{args.size}, {args.rounds} rounds, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'form':<12}{'median ms':>10}{'ratio to default':>18}{'max |y - y_default|':>22}")
    for name, v in times.items():
        print(f"{name:<12}{statistics.median(v) * 1e3:>10.1f}{ratios[name]:>18.3f}{diffs[name]:>22.2e}")
    return ratios


if __name__ == "__main__":
    main()
