"""Part `e2e`: the whole deployed ResNet-50 at training-size batches (dense, semi_structured, the
layers measured faster only, cuSPARSELt with the transpose fused where torch honours it, and the
im2col path with dense weights: what the gather costs end to end), then deployed latency at batch
1-16 (dense against semi_structured)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spre_fx.deploy import SemiStructuredConv2d, advise, gemm_weight, pack_weight, to_semi_structured
from spre_fx.module_tree import set_module

from .common import (
    CUDA_ONLY,
    Context,
    bench_ms,
    im2col_model,
    in_dtype,
    kernels_here,
    nm_layers,
    packed_names,
    randn,
    random_inputs,
    table,
    trained,
)
from .layers import best, fused_transpose_effect

NAME, CAP, NEED = "e2e", 35, 8


def fused_t(model: nn.Module) -> nn.Module:
    """Every cuSPARSELt weight of `model` told to write its result transposed (NHWC for convs)."""
    for name in packed_names(model):
        model.get_submodule(name).weight.fuse_transpose_cusparselt = True
    return model


def fused_t_skipped(ctx: Context, model: nn.Module) -> str | None:
    """Why the fused-t variant is not timed (None: it is): the layers part's finding, else one
    packed weight of `model` asked directly."""
    if "fused_t_skipped" not in ctx.cache:
        names = packed_names(model)
        if not names:
            return "no cuSPARSELt weight packed"
        w = model.get_submodule(names[0]).weight
        ctx.cache["fused_t_skipped"] = fused_transpose_effect(w, randn(ctx, (64, w.shape[1]), w.dtype))
    return ctx.cache["fused_t_skipped"]


def measured_faster(run: dict | None) -> list[str] | None:
    if run is None or not run["rows"]:
        return None
    return [n for r in run["rows"] if best(r) is not None and best(r)["speedup"] > 1 for n in r["layers"]]


def pack_only(dense: nn.Module, names: list[str], kernel: str) -> nn.Module:
    """A copy of `dense` with only the layers `names` on the 2:4 kernel `kernel`."""
    m = copy.deepcopy(dense)
    for name in names:
        mod = m.get_submodule(name)
        packed = pack_weight(gemm_weight(mod), kernel, name=name)
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(packed, requires_grad=False)
        else:
            set_module(m, name, SemiStructuredConv2d.from_conv(mod, packed))
    return m


def time_models(ctx: Context, row: dict, builders: dict[str, Callable[[], nn.Module]], nxt) -> None:
    """`row[name_ms]` for each model built (or `name_raised`), and each one's speed-up on dense."""
    for name, build in builders.items():
        ctx.deadline.check(f"e2e {row['dtype']} batch {row['batch']} {name}")
        try:  # one model's failure is a result; the others still run
            model = build()
            if name == "semi_structured":
                row["packed_layers"] = len(packed_names(model))
            with torch.no_grad():
                # a whole forward is tens of ms: ten times the layers' repeat time, ~10 runs
                row[f"{name}_ms"] = bench_ms(ctx, lambda model=model: model(nxt()), scale=10)
        except Exception as e:
            row[f"{name}_raised"] = f"{type(e).__name__}: {e}"[:300]
        model = None
    for name in builders:
        if name != "dense" and f"{name}_ms" in row and "dense_ms" in row:
            row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    _, converted = trained(ctx)
    kernels = kernels_here(ctx)
    none_here = bool(kernels["cusparselt"] and kernels["cutlass"])
    if none_here:
        ctx.skip(rec, "semi_structured model", CUDA_ONLY if ctx.dry else "no 2:4 kernel here")
    torch.backends.cudnn.benchmark = True
    measured = {(r["dtype"], r["batch"]): r for r in ctx.cache.get("layer_runs", [])}
    rec["runs"] = []
    for dtype, batch in itertools.product(s.dtypes, s.batches):
        ctx.deadline.check(f"e2e {dtype} batch {batch}")
        dense = in_dtype(converted, dtype)
        shape = (batch, 3, s.size, s.size)
        nxt = random_inputs(ctx, shape, dtype)
        row: dict[str, Any] = {"dtype": str(dtype), "batch": batch}
        rec["runs"].append(row)
        flops = advise(dense, input_size=shape).flops
        row["ideal_conv_linear_speedup"] = flops.ideal_speedup if flops else None
        builders: dict[str, Callable[[], nn.Module]] = {"dense": lambda dense=dense: dense}
        if not none_here:
            kernel = next(k for k, why in kernels.items() if why is None)
            chosen = measured_faster(measured.get((str(dtype), batch)))
            builders["semi_structured"] = lambda dense=dense: to_semi_structured(dense)
            if kernel == "cusparselt":
                why = fused_t_skipped(ctx, to_semi_structured(dense, kernel="cusparselt"))
                if why:
                    ctx.skip(rec, "semi_structured_fused_t", why)
                else:  # cuSPARSELt transposing in the kernel: the layers hand on NHWC outputs
                    builders["semi_structured_fused_t"] = lambda dense=dense: fused_t(
                        to_semi_structured(dense)
                    )
            builders["im2col_dense"] = lambda dense=dense: im2col_model(
                dense, packed_names(to_semi_structured(dense))
            )
            if chosen is not None:  # only the layers the per-layer timing found faster on 2:4
                builders["semi_structured_measured"] = lambda d=dense, c=chosen, k=kernel: pack_only(d, c, k)
                row["measured_faster_layers"] = len(chosen)
        else:
            builders["im2col_dense"] = lambda dense=dense: im2col_model(dense, nm_layers(dense))
        time_models(ctx, row, builders, nxt)
        print(
            f"  e2e {dtype} b{batch}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("_ms", "_speedup"))),
            flush=True,
        )
        del dense
        if ctx.cuda:
            torch.cuda.empty_cache()
    latency(ctx, rec, converted, none_here)


def latency(ctx: Context, rec: dict, converted: nn.Module, none_here: bool) -> None:
    """Deployed latency at the small batches a served model sees: dense against semi_structured
    (the advisor's choice of layers), in the first half-precision dtype."""
    s = ctx.sizes
    dtype = s.dtypes[0]
    dense = in_dtype(converted, dtype)
    builders: dict[str, Callable[[], nn.Module]] = {"dense": lambda: dense}
    if not none_here:
        sparse = to_semi_structured(dense)
        builders["semi_structured"] = lambda: sparse
    rec["latency"] = []
    for batch in s.latency_batches:
        shape = (batch, 3, s.size, s.size)
        nxt = random_inputs(ctx, shape, dtype)
        row: dict[str, Any] = {"dtype": str(dtype), "batch": batch}
        rec["latency"].append(row)
        time_models(ctx, row, builders, nxt)
        print(
            f"  latency {dtype} b{batch}: dense {row.get('dense_ms')} 2:4 {row.get('semi_structured_ms')}",
            flush=True,
        )


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    lines, checks = [], []
    for key, title in (
        ("runs", "Whole model (ms per forward)"),
        ("latency", "Deployed latency, batch 1-16 (ms)"),
    ):
        runs = rec.get(key, [])
        if not runs:
            continue
        cols = sorted(
            {k for r in runs for k in r if k.endswith(("_ms", "_speedup")) and not k.startswith("ideal")}
        )
        lines += [
            f"## {title}",
            *table(
                ["dtype", "batch", "ideal", *cols],
                [
                    [r["dtype"], r["batch"], r.get("ideal_conv_linear_speedup"), *[r.get(c) for c in cols]]
                    for r in runs
                ],
            ),
            "",
        ]
        for r in runs:
            if "semi_structured_speedup" in r:
                what = "whole model" if key == "runs" else "latency"
                checks.append(
                    [
                        f"{what} {r['dtype']} b{r['batch']}",
                        f"{r['semi_structured_speedup']:.3f}",
                        "as measured",
                        None,
                    ]
                )
    return lines, checks
