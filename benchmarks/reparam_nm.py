"""timm's `reparameterize_model` on a converted model: is it still equal, and still 2:4?

For each timm re-parameterisable model (random init, BatchNorm statistics randomised so that
folded shifts are not 0): prepare with 2:4, convert (default, and `keep_norms=True`), run
`timm.utils.model.reparameterize_model`, and print the output's largest difference to the
converted model (relative to its largest output), and the share of 4-groups (along
[O, kh, kw, C], every conv whose in-channels per group divide by 4) holding more than 2
non-zeros after the branches were summed.

    PYTHONPATH=. .venv/bin/python benchmarks/reparam_nm.py repvgg_a0 mobileone_s0 fastvit_t8 repvit_m0_9
"""

from __future__ import annotations

import argparse

import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

import spre_fx
from spre_fx.masks import nm_violations


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def broken_groups(model: nn.Module) -> tuple[int, int]:
    bad = total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[1] % 4 == 0:
            bad += nm_violations(m.weight, 2, 4)
            total += m.weight.numel() // 4
    return bad, total


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*",
                        default=["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9"])
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':<14}{'error, default':>16}{'error, keep_norms':>19}{'groups not 2:4 after reparam':>32}")
    for arch in args.models:
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=10).eval()
        randomise_norms(model)
        prepared = spre_fx.prepare(model).eval()
        x = torch.randn(1, 3, args.size, args.size)
        row: dict = {"model": arch}
        for keep in (False, True):
            deployed = spre_fx.convert(prepared, keep_norms=keep)
            with torch.no_grad():
                y = deployed(x)
                fused = reparameterize_model(deployed)
                row[f"error_keep_norms={keep}"] = ((fused(x) - y).abs().max() / y.abs().max()).item()
        bad, total = broken_groups(fused)
        row["broken"], row["groups"] = bad, total
        rows.append(row)
        print(f"{arch:<14}{row['error_keep_norms=False']:>16.2e}{row['error_keep_norms=True']:>19.2e}"
              f"{f'{bad}/{total} = {bad / total:.2%}':>32}")
    return rows


if __name__ == "__main__":
    main()
