"""Part `advisor`: every N:M layer packed by each kernel through torch directly and run, the
advisor's per-layer verdict against what torch accepted and computed."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from spre_fx.compare import relative_error
from spre_fx.deploy import SemiStructuredConv2d, advise, gemm_weight

from .common import (
    CUDA_ONLY,
    KERNELS,
    LAYER_TOL,
    TORCH_CLASSES,
    Context,
    in_dtype,
    layer_io,
    nm_layers,
    randn,
    trained,
)

NAME, CAP, NEED = "advisor", 15, 5


def probe_pack(ctx: Context, kernel: str, weight: Tensor) -> Tensor:
    """`weight` packed by torch's own class for `kernel`, without spre_fx's checks; in the dry
    run, the dense weight itself (the rest of the probe then runs on the CPU)."""
    if ctx.dry:
        return weight
    return TORCH_CLASSES[kernel].from_dense(weight)


def run(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    _, converted = trained(ctx)
    probe_kernels = KERNELS if ctx.cuda else ("dense-weight",)
    if ctx.dry:
        ctx.skip(rec, "kernel probes", CUDA_ONLY + "; the probe loop runs with the dense weight instead")
    rec["by_dtype"] = {}
    for dtype in s.dtypes:
        dense = in_dtype(converted, dtype)
        names = nm_layers(dense)
        verdicts = advise(dense).layers  # what to_semi_structured decides by (no input: weight size)
        at_batch = advise(dense, input_size=(s.batches[0], 3, s.size, s.size)).layers
        x = randn(ctx, (s.check_batch, 3, s.size, s.size), dtype)
        io = layer_io(dense, names, x)
        mods = dict(dense.named_modules())
        rows, mismatches = [], []
        for name in names:
            ctx.deadline.check(f"advisor {dtype} {name}")
            mod, adv = mods[name], verdicts[name]
            inp, out = io[name]
            row = {
                "layer": name,
                "gemm": adv.gemm,
                "verdict": adv.code,
                "backends": list(adv.backends),
                f"verdict_b{s.batches[0]}": at_batch[name].code,
                "ran": {},
            }
            for kernel in probe_kernels:
                try:
                    w = probe_pack(ctx, kernel, gemm_weight(mod))
                    with torch.no_grad():
                        if isinstance(mod, nn.Linear):
                            y = F.linear(inp, w, mod.bias)
                        else:
                            y = SemiStructuredConv2d.from_conv(mod, w)(inp)
                    err = relative_error(out, y)
                    row["ran"][kernel] = {"ok": err <= LAYER_TOL, "error": err}
                except Exception as e:
                    row["ran"][kernel] = {"ok": False, "raised": f"{type(e).__name__}: {e}"[:300]}
                if ctx.cuda:  # the advisor's shape/dtype rule says the kernel takes it: did torch agree?
                    expect = kernel in adv.backends
                    if expect != row["ran"][kernel]["ok"]:
                        mismatches.append(
                            f"{name} {kernel}: advisor {'fits' if expect else 'no'} ({adv.code}), "
                            f"torch {'ran' if row['ran'][kernel]['ok'] else 'did not'}: "
                            f"{row['ran'][kernel].get('raised', row['ran'][kernel].get('error'))}"
                        )
            rows.append(row)
        codes: dict[str, int] = {}
        for r in rows:
            codes[r["verdict"]] = codes.get(r["verdict"], 0) + 1
        rec["by_dtype"][str(dtype)] = {"layers": rows, "verdicts": codes, "mismatches": mismatches}
        print(
            f"  advisor {dtype}: verdicts {codes}; {len(mismatches)} disagreement(s) with torch", flush=True
        )
        del dense


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    lines, checks = [], []
    for dt, a in rec.get("by_dtype", {}).items():
        n = len(a["mismatches"])
        checks.append([f"advisor vs torch ({dt})", f"{n} disagreement(s)", "0", None if dry else not n])
        lines += [f"## Advisor {dt}: verdicts {a['verdicts']}", *[f"- {m}" for m in a["mismatches"]], ""]
    return lines, checks
