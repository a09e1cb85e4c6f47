"""Part `layers`: every N:M conv/linear of ResNet-50 at batch 64 and 256, 224 px, channels-last:
cuDNN/cuBLAS dense against the 2:4 layer, with the im2col gather and the GEMMs timed alone; the
advisor's verdict beside each. `time_layer` and `summarise` serve the Linear part too."""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spre_fx.compare import relative_error
from spre_fx.deploy import SemiStructuredConv2d, advise, gemm_weight, pack_weight

from .common import (
    GOALS,
    Context,
    OutOfTime,
    bench_ms,
    first_calls,
    goal,
    in_dtype,
    kernels_here,
    nm_layers,
    randn,
    random_inputs,
    rotation,
    table,
    trained,
)

NAME, CAP, NEED = "layers", 60, 20


def fused_transpose_effect(packed: Tensor, x: Tensor) -> str | None:
    """None when `fuse_transpose_cusparselt = True` changes what a cuSPARSELt weight computes
    (its result's layout), else why the "fused-t" variant is not timed: torch 2.14's `_mm` passes
    `should_transpose_dense` as the kernel's transpose flag and ignores the attribute, so the
    variant would time the same call twice."""
    with torch.no_grad():
        plain = F.linear(x, packed)
        packed.fuse_transpose_cusparselt = True
        try:
            fused = F.linear(x, packed)
        finally:
            packed.fuse_transpose_cusparselt = False
    if plain.stride() != fused.stride():
        return None
    return (
        f"torch {torch.__version__} ignores fuse_transpose_cusparselt (same result layout "
        f"{tuple(plain.stride())} with and without): a fused-t variant would time the same call"
    )


def layer_specs(model: nn.Module, names: list[str], x: Tensor) -> list[dict]:
    """One entry per distinct (layer configuration, input shape), with every layer name sharing it."""
    mods = dict(model.named_modules())
    shapes = first_calls(model, names, x, lambda inputs, _output: tuple(inputs[0].shape))
    specs: dict[tuple, dict] = {}
    for n in names:
        m = mods[n]
        conf = (
            type(m).__name__,
            tuple(m.weight.shape),
            getattr(m, "stride", None),
            getattr(m, "padding", None),
            getattr(m, "dilation", None),
            shapes[n],
        )
        specs.setdefault(conf, {"names": [], "input": shapes[n]})["names"].append(n)
    return list(specs.values())


def time_layer(
    ctx: Context, mod: nn.Module, shape: tuple, dtype: torch.dtype, kernels: dict, fused_t: bool = True
) -> dict:
    """Dense layer, im2col gather, dense and sparse GEMMs on the gathered input, and the sparse
    layer; with `fused_t`, cuSPARSELt once more with the transpose fused into the kernel, where
    this torch honours the flag (`ctx.cache["fused_t_skipped"]` says why not otherwise)."""
    nxt = random_inputs(ctx, shape, dtype)
    row: dict[str, Any] = {}
    with torch.no_grad():
        row["dense_ms"] = bench_ms(ctx, lambda: mod(nxt()))
        w = gemm_weight(mod)
        if isinstance(mod, nn.Conv2d):
            col = SemiStructuredConv2d.from_conv(mod)
            ho, wo = col.output_size(nxt())
            view = mod.kernel_size == (1, 1) and mod.stride == (1, 1) and not any(col.padding)
            row["im2col_ms"] = 0.0 if view else bench_ms(ctx, lambda: col.im2col(nxt()))
            k_shape = (shape[0] * ho * wo, w.shape[1])
            gather = col.im2col
        else:
            row["im2col_ms"] = 0.0
            k_shape = (math.prod(shape[:-1]), w.shape[1])
            gather = None
        row["gemm_mkn"] = [k_shape[0], k_shape[1], w.shape[0]]
        pnext = (
            nxt
            if gather is None
            else rotation(
                ctx, lambda: gather(nxt()).contiguous(), math.prod(k_shape) * torch.finfo(dtype).bits // 8
            )
        )
        row["gemm_dense_ms"] = bench_ms(ctx, lambda: F.linear(pnext(), w, mod.bias))
        if isinstance(mod, nn.Conv2d):
            row["im2col_dense_ms"] = bench_ms(ctx, lambda: col(nxt()))
        row["sparse"] = {}
        for kernel, why in kernels.items():
            if why:
                continue
            try:
                packed = pack_weight(w, kernel)  # spre_fx's 2:4 check, then torch's packer
                row["sparse"][kernel] = time_sparse(ctx, mod, packed, nxt, pnext, row)
            except Exception as e:
                row["sparse"][kernel] = {"raised": f"{type(e).__name__}: {e}"[:300]}
            if not (fused_t and kernel == "cusparselt" and "ms" in row["sparse"][kernel]):
                continue
            # cuSPARSELt writes [O, M] unless told to transpose in the kernel; torch's default
            # then hands F.linear a transposed view and SemiStructuredConv2d copies it to NHWC.
            if "fused_t_skipped" not in ctx.cache:
                ctx.cache["fused_t_skipped"] = fused_transpose_effect(packed, pnext())
            if ctx.cache["fused_t_skipped"]:
                continue
            try:
                packed.fuse_transpose_cusparselt = True
                fused = time_sparse(ctx, mod, packed, nxt, pnext, row, gemm=False)
            except Exception as e:
                fused = {"raised": f"{type(e).__name__}: {e}"[:300]}
            row["sparse"]["cusparselt-fused-t"] = fused
    return row


def timed_row(
    ctx: Context,
    mods: dict,
    spec: dict,
    verdicts: dict,
    dtype: torch.dtype,
    kernels: dict,
    fused_t: bool = True,
) -> dict:
    """One row of a per-layer table: a layer shape (`layer_specs`), its advisor verdict, and its
    timings; a failure is recorded in the row (one shape's failure is a result, the others run)."""
    first = spec["names"][0]
    row = {
        "layers": spec["names"],
        "count": len(spec["names"]),
        "input": list(spec["input"]),
        "verdict": verdicts[first].code,
        "macs": verdicts[first].macs,
    }
    try:
        row.update(time_layer(ctx, mods[first], spec["input"], dtype, kernels, fused_t))
    except Exception as e:
        row["raised"] = f"{type(e).__name__}: {e}"[:300]
    return row


def time_sparse(
    ctx: Context, mod: nn.Module, packed: Tensor, nxt, pnext, dense_row: dict, gemm: bool = True
) -> dict:
    """The layer on its packed weight (and its error against the dense layer), and the sparse
    GEMM alone on the gathered input."""
    if isinstance(mod, nn.Conv2d):
        layer = SemiStructuredConv2d.from_conv(mod, packed)
    else:

        def layer(t: Tensor) -> Tensor:
            return F.linear(t, packed, mod.bias)

    x = nxt()
    r = {"error_vs_dense": relative_error(mod(x), layer(x)), "ms": bench_ms(ctx, lambda: layer(nxt()))}
    r["speedup"] = dense_row["dense_ms"] / r["ms"]
    if gemm:
        r["gemm_ms"] = bench_ms(ctx, lambda: F.linear(pnext(), packed, mod.bias))
        r["gemm_speedup"] = dense_row["gemm_dense_ms"] / r["gemm_ms"]
    return r


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    _, converted = trained(ctx)
    kernels = kernels_here(ctx)
    for k, why in kernels.items():
        if why:
            ctx.skip(rec, f"sparse {k}", why)
    torch.backends.cudnn.benchmark = True  # the dense baseline gets cuDNN's best algorithm
    rec["runs"] = []
    try:
        for dtype, batch in itertools.product(s.dtypes, s.batches):
            dense = in_dtype(converted, dtype)
            names = nm_layers(dense)
            x = randn(ctx, (batch, 3, s.size, s.size), dtype)
            verdicts = advise(dense, input_size=(batch, 3, s.size, s.size)).layers
            specs = layer_specs(dense, names, x)
            del x
            run_rec = {"dtype": str(dtype), "batch": batch, "rows": [], "left_out": []}
            rec["runs"].append(run_rec)
            mods = dict(dense.named_modules())
            for i, spec in enumerate(specs):
                if ctx.deadline.left() <= 0:
                    run_rec["left_out"] = [sp["names"][0] for sp in specs[i:]]
                    run_rec["summary"] = summarise(run_rec["rows"])
                    raise OutOfTime(
                        f"layers {dtype} batch {batch}: {len(specs) - i} of {len(specs)} shapes left out"
                    )
                run_rec["rows"].append(timed_row(ctx, mods, spec, verdicts, dtype, kernels))
                if ctx.cuda:
                    torch.cuda.empty_cache()
            run_rec["summary"] = summarise(run_rec["rows"])
            print(
                f"  layers {dtype} b{batch}: {len(run_rec['rows'])} shapes; {run_rec['summary']}", flush=True
            )
            del dense
    finally:
        if ctx.cache.get("fused_t_skipped"):
            ctx.skip(rec, "cusparselt-fused-t", ctx.cache["fused_t_skipped"])


def best(row: dict, key: str = "ms") -> dict | None:
    """The fastest sparse variant of a layer row by `key` (None when none ran)."""
    ran = [r for r in row.get("sparse", {}).values() if key in r]
    return min(ran, key=lambda r: r[key]) if ran else None


def variant(row: dict) -> str:
    fastest = best(row)
    return next(k for k, v in row["sparse"].items() if v is fastest)


def summarise(rows: list[dict]) -> dict:
    """Time-weighted speed-ups (each shape counted as often as the model has it)."""

    def total(rs, f):
        return sum(r["count"] * f(r) for r in rs)

    ran = [r for r in rows if best(r) is not None]
    eligible = [r for r in ran if r["verdict"] == "ok"]
    out: dict[str, Any] = {"shapes": len(rows), "shapes_sparse": len(ran), "shapes_eligible": len(eligible)}
    if eligible:
        out["eligible_speedup"] = total(eligible, lambda r: r["dense_ms"]) / total(
            eligible, lambda r: best(r)["ms"]
        )
        out["eligible_median_speedup"] = statistics.median(best(r)["speedup"] for r in eligible)
        out["eligible_gemm_speedup"] = total(eligible, lambda r: r["gemm_dense_ms"]) / total(
            eligible, lambda r: best(r, "gemm_ms")["gemm_ms"]
        )
        out["eligible_best_variant"] = sorted({variant(r) for r in eligible})
        out["im2col_share_of_sparse"] = total(eligible, lambda r: r["im2col_ms"]) / total(
            eligible, lambda r: best(r)["ms"]
        )
    if ran:
        dense = total(ran, lambda r: r["dense_ms"])
        out["all_nm_speedup_if_chosen_by_measurement"] = dense / total(
            ran, lambda r: min(r["dense_ms"], best(r)["ms"])
        )
        agree = sum((r["verdict"] == "ok") == (best(r)["speedup"] > 1) for r in ran)
        out["advisor_agrees_with_measurement"] = f"{agree}/{len(ran)}"
    gather = [r for r in rows if r.get("im2col_dense_ms")]
    if gather:
        out["im2col_dense_over_cudnn"] = total(gather, lambda r: r["im2col_dense_ms"]) / total(
            gather, lambda r: r["dense_ms"]
        )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def layer_rows(rows: list[dict]) -> list[list]:
    """The per-shape table's rows (ResNet-50's layers, or the Linear part's)."""
    out = []
    for r in rows:
        b, g, sp = best(r) or {}, best(r, "gemm_ms") or {}, r.get("sparse", {})
        plain = sp.get("cusparselt", sp.get("cutlass", {}))
        out.append(
            [
                ",".join(r["layers"][:2]) + ("..." if r["count"] > 2 else ""),
                r["count"],
                "x".join(map(str, r.get("gemm_mkn", []))) or r.get("raised", "-"),
                r["verdict"],
                r.get("dense_ms"),
                r.get("im2col_dense_ms"),
                plain.get("ms"),
                sp.get("cusparselt-fused-t", {}).get("ms"),
                b.get("speedup"),
                r.get("im2col_ms"),
                r.get("gemm_dense_ms"),
                g.get("gemm_ms"),
                g.get("gemm_speedup"),
                max((v["error_vs_dense"] for v in sp.values() if "error_vs_dense" in v), default=None),
            ]
        )
    return out


LAYER_HEAD = [
    "layers",
    "n",
    "GEMM MxKxO",
    "advisor",
    "cuDNN/cuBLAS",
    "im2col+dense GEMM",
    "2:4",
    "2:4 fused-t",
    "best speed-up",
    "im2col",
    "GEMM dense",
    "GEMM 2:4",
    "GEMM speed-up",
    "2:4 error",
]


def speedup_check(label: str, sm: dict, dry: bool) -> list:
    return [
        f"{label} eligible speed-up",
        f"{sm['eligible_speedup']:.3f} (median {sm['eligible_median_speedup']:.3f}, GEMM alone "
        f"{sm['eligible_gemm_speedup']:.3f}, im2col {sm['im2col_share_of_sparse']:.1%} of sparse)",
        f">= {GOALS['layer_speedup']}",
        goal(dry, sm["eligible_speedup"] >= GOALS["layer_speedup"]),
    ]


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    lines, checks = [], []
    for run_rec in rec.get("runs", []):
        sm = run_rec.get("summary", {})
        if "eligible_speedup" in sm:
            checks.append(speedup_check(f"layers {run_rec['dtype']} b{run_rec['batch']}", sm, dry))
        left = f"; left out: {run_rec['left_out']}" if run_rec["left_out"] else ""
        lines += [
            f"## Layers {run_rec['dtype']} batch {run_rec['batch']} (ms; speed-up = dense / sparse)",
            f"summary: {sm}{left}",
            *table(LAYER_HEAD, layer_rows(run_rec["rows"])),
            "",
        ]
    return lines, checks
