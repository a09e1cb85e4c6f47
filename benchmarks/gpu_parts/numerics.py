"""Part `numerics`: the trained ResNet-50's conversion, and each 2:4 kernel's numbers.

`verify` in float64 (the fold in float64 too: exact) and float32 (its rounding here, TF32 off);
then in fp16 and bf16 the semi-structured model of each kernel (cuSPARSELt, CUTLASS) and the
dense im2col control against the dense converted model, end to end and per layer.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

import spre_fx
from spre_fx.compare import relative_error
from spre_fx.deploy import SemiStructuredConv2d

from .common import (
    CL,
    E2E_TOL,
    KERNELS,
    LAYER_TOL,
    Context,
    fmt,
    in_dtype,
    kernels_here,
    layer_io,
    packed_names,
    sparse_model,
    table,
    trained,
)

NAME, CAP, NEED = "numerics", 35, 12


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        prepared, converted = trained(ctx)
        if "trained_on_cpu" in ctx.cache:
            rec["trained_on_cpu"] = ctx.cache["trained_on_cpu"]
        x = torch.randn(s.check_batch, 3, s.size, s.size, device=ctx.device)
        prepared64 = copy.deepcopy(prepared).double()
        rec["verify_fp64"] = verify_record(prepared64, spre_fx.convert(prepared64), x[:2].double())
        rec["verify_fp32"] = verify_record(prepared, converted, x)
        del prepared64
        with torch.no_grad():
            ref = converted(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    why_not = kernels_here(ctx)
    rec["runs"] = []
    for dtype in s.dtypes:
        dense = in_dtype(converted, dtype)
        xh = x.to(dtype).contiguous(memory_format=CL)
        with torch.no_grad():
            out_dense = dense(xh)
        dense_err = relative_error(ref, out_dense)
        for kernel in (*KERNELS, "im2col"):
            ctx.deadline.check(f"numerics {dtype} {kernel}")
            row: dict[str, Any] = {"dtype": str(dtype), "kernel": kernel, "dense_vs_fp32": dense_err}
            rec["runs"].append(row)
            if kernel != "im2col" and why_not[kernel]:
                row["skipped"] = why_not[kernel]
                continue
            try:
                sparse = sparse_model(dense, kernel)
            except Exception as e:  # a refusal is a result: record it
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                continue
            names = (
                packed_names(sparse)
                if kernel != "im2col"
                else [n for n, m in sparse.named_modules() if isinstance(m, SemiStructuredConv2d)]
            )
            with torch.no_grad():
                out = sparse(xh)
            row.update(
                layers=len(names),
                finite=bool(torch.isfinite(out).all()),
                vs_fp32=relative_error(ref, out),
                vs_dense=relative_error(out_dense, out),
            )
            mods = dict(sparse.named_modules())
            io = layer_io(dense, names, xh)
            with torch.no_grad():
                errs = {n: relative_error(o, mods[n](i)) for n, (i, o) in io.items()}
            worst = max(errs, key=errs.get) if errs else None
            row.update(
                worst_layer=worst,
                worst_layer_error=errs.get(worst),
                layers_over_tol=[n for n, e in errs.items() if e > LAYER_TOL],
            )
            row["ok"] = (
                bool(names) and row["finite"] and row["vs_dense"] <= E2E_TOL and not row["layers_over_tol"]
            )
            print(
                f"  {dtype} {kernel}: {len(names)} layers, vs dense {row['vs_dense']:.2e}, vs fp32 "
                f"{row['vs_fp32']:.2e} (dense {dense_err:.2e}), worst layer {row['worst_layer_error']}",
                flush=True,
            )
            del sparse
        del dense


def verify_record(prepared: nn.Module, converted: nn.Module, x: Tensor) -> dict:
    """`spre_fx.verify` at its default tolerance; the worst errors whether it passes or not."""
    out: dict[str, Any] = {}
    try:
        v = spre_fx.verify(prepared, converted, x)
        out["ok"] = True
    except spre_fx.VerificationError as e:
        out.update(ok=False, error=str(e)[:1500])
        v = spre_fx.verify(prepared, converted, x, tolerance=math.inf)
    out.update(
        output_error=v.output_error,
        worst_layer_error=max(v.layer_errors.values()),
        nm_violations=sum(v.nm_violations.values()),
        tolerance=v.tolerance if out["ok"] else None,
    )
    return out


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    checks: list[list] = []
    if "trained_on_cpu" in rec:
        checks.append(
            ["prepared ResNet-50 trains on the GPU", rec["trained_on_cpu"][:200], "no error", False]
        )
    for key, tol in (("verify_fp64", "1e-10"), ("verify_fp32", "1e-5")):
        if key in rec:
            v = rec[key]
            checks.append(
                [f"{key} (converted == prepared)", fmt(v.get("output_error")), f"<= {tol}", v["ok"]]
            )
    rows = []
    for r in rec.get("runs", []):
        rows.append(
            [
                r["dtype"],
                r["kernel"],
                r.get("layers"),
                r.get("vs_dense"),
                r.get("vs_fp32"),
                r.get("dense_vs_fp32"),
                r.get("worst_layer_error"),
                r.get("ok"),
                r.get("skipped") or r.get("error"),
            ]
        )
        if "ok" in r:
            checks.append(
                [f"{r['dtype']} {r['kernel']} vs dense", fmt(r["vs_dense"]), f"<= {E2E_TOL}", r["ok"]]
            )
    if not rows:
        return [], checks
    head = [
        "dtype",
        "kernel",
        "layers",
        "vs dense",
        "vs fp32",
        "dense vs fp32",
        "worst layer error",
        "ok",
        "note",
    ]
    return [
        "## Numerics: semi-structured vs dense converted (max |a-b| / max |a|)",
        *table(head, rows),
        "",
    ], checks
