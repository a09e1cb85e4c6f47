"""Part `linear`: a Linear-heavy model, so that a Linear 2:4 figure exists (ResNet-50's only
Linear, the fc, is refused by the kernels' shape rules).

The model is a stack of ViT MLP blocks at ViT-B widths (LayerNorm, 768 -> 3072, GELU, 3072 -> 768,
residual), fed 197 tokens per image, built here (no timm: the GPU machine's packages are not the
project's pins). Per distinct Linear shape: cuBLAS dense against each 2:4 kernel (`layers.py`'s
timing); then the whole stack deployed dense and semi-structured, and their difference.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import Tensor, nn

import spre_fx
from spre_fx.compare import relative_error
from spre_fx.deploy import advise, to_semi_structured

from .common import (
    CUDA_ONLY,
    Context,
    bench_ms,
    kernels_here,
    nm_layers,
    packed_names,
    randn,
    random_inputs,
    table,
)
from .layers import LAYER_HEAD, layer_rows, layer_specs, speedup_check, summarise, timed_row

NAME, CAP, NEED = "linear", 25, 8


class MLPBlock(nn.Module):
    """A transformer block's MLP half, as in ViT: x + fc2(GELU(fc1(LayerNorm(x))))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def mlp_model(width: int, hidden: int, blocks: int) -> nn.Module:
    return nn.Sequential(*(MLPBlock(width, hidden) for _ in range(blocks)))


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    torch.manual_seed(0)
    prepared = spre_fx.prepare(mlp_model(s.mlp_width, s.mlp_hidden, s.mlp_blocks).to(ctx.device)).eval()
    converted = spre_fx.convert(prepared)
    names = nm_layers(converted)
    rec["model"] = (
        f"{s.mlp_blocks} MLP blocks {s.mlp_width}->{s.mlp_hidden}->{s.mlp_width}, {s.mlp_tokens} tokens"
    )
    rec["nm_linears"] = len(names)
    kernels = kernels_here(ctx)
    for k, why in kernels.items():
        if why:
            ctx.skip(rec, f"sparse {k}", why)
    rec["runs"] = []
    for dtype, batch in itertools.product(s.dtypes, s.mlp_batches):
        ctx.deadline.check(f"linear {dtype} batch {batch}")
        run_rec = measure(ctx, rec, copy.deepcopy(converted).to(dtype).eval(), names, kernels, batch)
        print(
            f"  linear {dtype} b{batch}: {run_rec['summary']}, whole stack dense {run_rec['dense_ms']:.3f} "
            f"ms, 2:4 {run_rec.get('semi_structured_ms')} ms",
            flush=True,
        )


def measure(ctx: Context, rec: dict, dense: nn.Module, names: list[str], kernels: dict, batch: int) -> dict:
    """Each distinct Linear of `dense` timed alone, then the whole stack, dense and 2:4."""
    s = ctx.sizes
    dtype = next(dense.parameters()).dtype
    shape = (batch * s.mlp_tokens, s.mlp_width)  # tokens as rows: what a ViT's Linear sees
    x = randn(ctx, shape, dtype)
    verdicts = advise(dense, input_size=shape).layers
    run_rec: dict[str, Any] = {"dtype": str(dtype), "batch": batch, "tokens": shape[0], "rows": []}
    rec["runs"].append(run_rec)
    mods = dict(dense.named_modules())
    for spec in layer_specs(dense, names, x):
        ctx.deadline.check(f"linear {dtype} batch {batch} {spec['names'][0]}")
        run_rec["rows"].append(timed_row(ctx, mods, spec, verdicts, dtype, kernels, fused_t=False))
    run_rec["summary"] = summarise(run_rec["rows"])
    nxt = random_inputs(ctx, shape, dtype)
    with torch.no_grad():
        run_rec["dense_ms"] = bench_ms(ctx, lambda: dense(nxt()), scale=5)
        if all(kernels.values()):
            ctx.skip(rec, "semi_structured model", CUDA_ONLY)
            return run_rec
        try:
            sparse = to_semi_structured(dense)
            run_rec["packed_layers"] = len(packed_names(sparse))
            run_rec["error_vs_dense"] = relative_error(dense(x), sparse(x))
            run_rec["semi_structured_ms"] = bench_ms(ctx, lambda: sparse(nxt()), scale=5)
            run_rec["semi_structured_speedup"] = run_rec["dense_ms"] / run_rec["semi_structured_ms"]
        except Exception as e:
            run_rec["semi_structured_raised"] = f"{type(e).__name__}: {e}"[:300]
    return run_rec


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    lines, checks = [], []
    for r in rec.get("runs", []):
        label = f"Linear {r['dtype']} b{r['batch']} ({r['tokens']} tokens)"
        sm = r.get("summary", {})
        if "eligible_speedup" in sm:
            checks.append(speedup_check(label, sm, dry))
        if "semi_structured_speedup" in r:
            checks.append(
                [f"{label} whole MLP stack 2:4", f"{r['semi_structured_speedup']:.3f}", "as measured", None]
            )
        lines += [
            f"## {label}: {rec.get('model')} (ms; speed-up = dense / sparse)",
            f"summary: {sm}; whole stack dense {r.get('dense_ms')} ms, 2:4 {r.get('semi_structured_ms')} ms "
            f"(error vs dense {r.get('error_vs_dense')})",
            *table(LAYER_HEAD, layer_rows(r["rows"])),
            "",
        ]
    return lines, checks
