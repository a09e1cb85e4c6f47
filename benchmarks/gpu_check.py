"""One call on a CUDA GPU that proves the 2:4 path: the kernels' numbers, their speed, training cost.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT               # GPU machine, <= 5 min
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out /tmp/gc --dry-run  # CPU, tiny sizes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT --parts layers,e2e   # rerun a subset

Parts, in this order (`--parts` picks a subset):
  env       torch, CUDA, cuSPARSELt, triton, the GPU and its compute capability
  pytest    the `gpu`-marked tests (`pytest -m gpu`): summary line, log in pytest_gpu.log
  numerics  torchvision ResNet-50 prepared at 2:4, a few SGD steps, BN statistics, convert;
            float32 `verify`; then fp16 and bf16: the semi-structured model of each kernel
            (cuSPARSELt, CUTLASS) against the dense converted one, end to end and per layer
  advisor   every N:M layer packed by each kernel through torch directly and run: the
            advisor's per-layer verdict against what torch accepted and computed
  layers    every N:M conv/linear of ResNet-50 at batch 64 and 256, 224 px, channels-last:
            cuDNN/cuBLAS dense against the 2:4 layer, with the im2col gather and the GEMMs
            timed alone; the advisor's verdict beside each
  e2e       the whole deployed model: dense, semi_structured, and the im2col path with dense
            weights (what the gather costs end to end)
  train     ResNet-50 batch 64, 224 px, bf16 autocast, channels-last: dense, N:M and SpRe steps
            interleaved (masks moving every step, and held), the per-step mask update, and a
            torch.profiler summary when a goal is missed

Bounds: `--budget` seconds for everything (default 240 on a GPU), a cap per part, and the
minimum each later part needs reserved; a part that no longer fits is skipped with the reason,
a timing loop that reaches its part's deadline stops and says what it left out. Timings are
medians of `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between runs) over
inputs rotated so that caches do not flatter; training steps are timed by the wall clock
between synchronisations, interleaved, as ratios within a round. Every part runs in its own
try/except: an error is recorded and the next part runs. gpu_check.json and gpu_check.md are
rewritten after every part (a killed run leaves what it had); the summary table prints last.
Exit status: 0, or 1 when a part raised. No mmdet or timm import.

--dry-run runs the same code on the CPU at tiny sizes and skips each CUDA-only step (the
sparse kernels, CUTLASS/cuSPARSELt probes, CUDA timing) with its reason.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

import spre_fx
from spre_fx.compare import relative_error
from spre_fx.deploy import SemiStructuredConv2d, advise, gemm_weight, pack_weight, to_semi_structured
from spre_fx.module_tree import set_module
from spre_fx.plan import Treatment, plan_of

try:
    from train_step import training_macs
except ImportError:  # run as a module
    from benchmarks.train_step import training_macs

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("cusparselt", "cutlass")
TORCH_CLASSES = {
    "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
    "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
}
CL = torch.channels_last
# End-to-end and per-layer tolerances of the semi-structured model against the dense one in the
# same dtype (max |a - b| / max |a|), as the gpu tests use them.
E2E_TOL, LAYER_TOL = 2e-2, 1e-2
GOALS = {"layer_speedup": 1.3, "nm_step": 1.05}


class OutOfTime(Exception):
    """A part reached its deadline; what it measured so far is kept."""


@dataclass(frozen=True)
class Sizes:
    model: str  # a torchvision classifier, or "resnet10" (ResNet-18 with one block per stage)
    batches: tuple[int, ...]
    size: int
    dtypes: tuple[torch.dtype, ...]
    check_batch: int  # numerics and advisor forwards
    sgd_steps: int
    bn_batches: int
    train_batch: int
    autocast: torch.dtype | None  # of the training step (None: float32; CPU bf16 convs crawl)
    train_warmup: int
    train_rounds: int
    profile_steps: int
    warmup_ms: float
    rep_ms: float
    cpu_reps: int


GPU = Sizes(
    model="resnet50",
    batches=(64, 256),
    size=224,
    dtypes=(torch.float16, torch.bfloat16),
    check_batch=16,
    sgd_steps=3,
    bn_batches=4,
    train_batch=64,
    autocast=torch.bfloat16,
    train_warmup=3,
    train_rounds=15,
    profile_steps=3,
    warmup_ms=5,
    rep_ms=30,
    cpu_reps=0,
)
DRY = Sizes(
    model="resnet10",
    batches=(2,),
    size=32,
    dtypes=(torch.float32,),
    check_batch=2,
    sgd_steps=1,
    bn_batches=1,
    train_batch=2,
    autocast=None,
    train_warmup=0,
    train_rounds=1,
    profile_steps=1,
    warmup_ms=0,
    rep_ms=0,
    cpu_reps=1,
)

# (name, cap in seconds, minimum left to start it) on the GPU; a part that finishes early leaves
# its time to the later ones. The dry run multiplies both by DRY_SLACK (the CPU is slow and shared).
PARTS = (
    ("env", 15, 0),
    ("pytest", 60, 15),
    ("numerics", 35, 12),
    ("advisor", 15, 5),
    ("layers", 65, 20),
    ("e2e", 30, 8),
    ("train", 40, 15),
)
GPU_BUDGET, DRY_SLACK = 240.0, 4.0
PART_NAMES = tuple(p[0] for p in PARTS)


class Deadline:
    def __init__(self, end: float) -> None:
        self.end = end

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"deadline reached before {what}")


@dataclass
class Context:
    sizes: Sizes
    cuda: bool
    device: torch.device
    out: Path
    deadline: Deadline  # of the part that runs now
    cache: dict

    @property
    def dry(self) -> bool:
        return not self.cuda

    def skip(self, rec: dict, step: str, why: str) -> None:
        rec.setdefault("skipped", {})[step] = why
        print(f"  skip {step}: {why}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


CUDA_ONLY = "CUDA-only: torch's semi-structured kernels (cuSPARSELt, CUTLASS) run on CUDA GPUs only"


# --------------------------------------------------------------------------- timing
def bench_ms(ctx: Context, fn: Callable[[], Any], scale: float = 1.0) -> float:
    """Median milliseconds of `fn`: triton's do_bench on CUDA (CUDA events, L2 flushed before each
    run; warm-up and repeat times of the sizes times `scale`), else perf_counter."""
    if ctx.cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            return _events_ms(fn)
        warmup, rep = ctx.sizes.warmup_ms * scale, ctx.sizes.rep_ms * scale
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(ctx.sizes.cpu_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _events_ms(fn: Callable[[], Any], n: int = 20) -> float:
    """CUDA-event median (when triton is missing): warm-up, then n timed calls."""
    for _ in range(3):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in pairs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in pairs)


def rotation(ctx: Context, make: Callable[[], Tensor], nbytes: int) -> Callable[[], Tensor]:
    """A function returning the next of several inputs, enough that together they exceed the L2
    cache three times over (2 to 8; 2 on the CPU)."""
    count = 2
    if ctx.cuda:
        l2 = getattr(torch.cuda.get_device_properties(ctx.device), "L2_cache_size", 50 << 20) or 50 << 20
        count = min(8, max(2, math.ceil(3 * l2 / max(nbytes, 1))))
    tensors = [make() for _ in range(count)]
    it = itertools.cycle(tensors)
    return lambda: next(it)


def randn(ctx: Context, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    x = torch.randn(shape, device=ctx.device, dtype=dtype)
    return x.contiguous(memory_format=CL) if x.dim() == 4 else x


# --------------------------------------------------------------------------- models
def build(name: str) -> nn.Module:
    """A torchvision classifier by name; "resnet10" is the dry run's: every layer kind ResNet-50
    has except the bottleneck's 1×1 convs, at half ResNet-18's cost."""
    if name == "resnet10":
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1])
    return torchvision.models.get_model(name)


def trained(ctx: Context) -> tuple[nn.Module, nn.Module]:
    """(prepared, converted) ResNet-50 at 2:4 after a few SGD steps and fresh BN statistics,
    float32, on the device; built once and shared by the parts. Should training on the GPU fail
    (the mask code has never run on one), it trains on the CPU and moves the models, so the
    kernel parts still run; the numerics part records why."""
    if "trained" not in ctx.cache:
        try:
            ctx.cache["trained"] = _train_and_convert(ctx.sizes, ctx.device)
        except Exception as e:
            if not ctx.cuda:
                raise
            ctx.cache["trained_on_cpu"] = f"training on the GPU raised {type(e).__name__}: {e}"[:1000]
            print(f"  {ctx.cache['trained_on_cpu']}; training on the CPU instead", flush=True)
            prepared, converted = _train_and_convert(ctx.sizes, torch.device("cpu"))
            ctx.cache["trained"] = prepared.to(ctx.device), converted.to(ctx.device)
    return ctx.cache["trained"]


def _train_and_convert(s: Sizes, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    prepared = spre_fx.prepare(build(s.model).to(device))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = spre_fx.MaskScheduler(prepared, opt)
    prepared.train()
    for _ in range(s.sgd_steps):
        x = torch.randn(s.check_batch, 3, s.size, s.size, device=device)
        y = torch.randint(0, 1000, (s.check_batch,), device=device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(prepared(x), y).backward()
        opt.step()
    sched.remove()
    # Running statistics of the trained weights (cumulative over a few batches), so eval-mode
    # activations have the scale the data gives them (no half-precision overflow from init stats).
    batches = [torch.randn(s.check_batch, 3, s.size, s.size, device=device) for _ in range(s.bn_batches)]
    torch.optim.swa_utils.update_bn(batches, prepared)
    prepared.eval()
    return prepared, spre_fx.convert(prepared).eval()


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a converted model in `dtype`, channels_last, eval."""
    return copy.deepcopy(model).to(dtype=dtype, memory_format=CL).eval()


def nm_layers(model: nn.Module) -> list[str]:
    return [lp.name for lp in plan_of(model).layers if lp.treatment != Treatment.DENSE]


def im2col_model(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy where the named convs run as `SemiStructuredConv2d` with their dense weight: the
    im2col path without the sparse kernel (the control for errors and for the gather's cost)."""
    m = copy.deepcopy(model)
    for name in names:
        mod = m.get_submodule(name)
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros":
            set_module(m, name, SemiStructuredConv2d.from_conv(mod))
    return m


def sparse_model(ctx: Context, dense: nn.Module, kernel: str) -> nn.Module:
    """`to_semi_structured` (kernel 'cusparselt'/'cutlass'), or the dense im2col control ('im2col')."""
    if kernel == "im2col":
        return im2col_model(dense, nm_layers(dense))
    return to_semi_structured(dense, kernel=kernel)


def layer_io(model: nn.Module, names: list[str], x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(input, output) of each named layer in one forward of `model`, copied when seen (an
    in-place ReLU after a folded conv, as in torchvision's ResNets, rewrites them later)."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    mods = dict(model.named_modules())

    def keep(name: str, inputs: tuple, output: Tensor) -> None:  # returns None: the output stays
        if name not in seen:
            seen[name] = (inputs[0].clone(), output.clone())

    hooks = [mods[n].register_forward_hook(lambda _m, i, o, n=n: keep(n, i, o)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def packed_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.sparse.SparseSemiStructuredTensor)
    ]


def kernels_here(ctx: Context) -> dict[str, str | None]:
    """Each kernel: None when torch offers it here, else why not."""
    if not ctx.cuda:
        return dict.fromkeys(KERNELS, CUDA_ONLY)
    why = {"cusparselt": None, "cutlass": None}
    if not torch.backends.cusparselt.is_available():
        why["cusparselt"] = "torch built without cuSPARSELt"
    cap = torch.cuda.get_device_capability(ctx.device)
    if cap[0] != 8:
        why["cutlass"] = (
            f"spre_fx refuses CUTLASS on compute capability {cap[0]}.{cap[1]} (torch's CUTLASS "
            "2:4 kernels are 8.x only); the advisor part asks torch directly"
        )
    return why


# --------------------------------------------------------------------------- parts
def part_env(ctx: Context, rec: dict) -> None:
    rec.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        spre_fx=spre_fx.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        cusparselt_available=torch.backends.cusparselt.is_available(),
        cusparselt=torch.backends.cusparselt.version(),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        force_cutlass=torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS,
    )
    rec["constraints"] = {
        kn: {
            str(dt).replace("torch.", ""): [c.sparse_min_rows, c.sparse_min_cols]
            for dt, c in TORCH_CLASSES[kn]._DTYPE_SHAPE_CONSTRAINTS.items()
        }
        for kn in KERNELS
    }
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    if not ctx.cuda:
        ctx.skip(rec, "gpu", "no CUDA device (dry run)")
        return
    props = torch.cuda.get_device_properties(ctx.device)
    rec.update(
        gpu=props.name,
        capability=list(torch.cuda.get_device_capability(ctx.device)),
        memory_gib=round(props.total_memory / 2**30, 1),
        sms=props.multi_processor_count,
        l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    )
    try:  # read-only query of the card's state as found (clocks, power, temperature)
        q = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu"
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        rec["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        rec["nvidia_smi"] = f"not run: {e}"


def part_pytest(ctx: Context, rec: dict) -> None:
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    rec["command"] = " ".join(["python3", *cmd[1:]])
    timeout = max(1.0, ctx.deadline.left())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        log, rec["returncode"] = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec["returncode"] = None
        rec["timeout_s"] = round(timeout)
    (ctx.out / "pytest_gpu.log").write_text(log)
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected)\b", ln)]
    rec["summary"] = lines[-1].strip("= ") if lines else f"no summary (timed out after {timeout:.0f} s)"
    rec["counts"] = {
        k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", rec["summary"])
    }
    print(f"  pytest -m gpu: {rec['summary']}", flush=True)


def part_numerics(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        prepared, converted = trained(ctx)
        if "trained_on_cpu" in ctx.cache:
            rec["trained_on_cpu"] = ctx.cache["trained_on_cpu"]
        x = torch.randn(s.check_batch, 3, s.size, s.size, device=ctx.device)
        # float64 (the fold in float64 too): the conversion is exact; float32: its rounding here.
        prepared64 = copy.deepcopy(prepared).double()
        rec["verify_fp64"] = _verify(prepared64, spre_fx.convert(prepared64), x[:2].double())
        rec["verify_fp32"] = _verify(prepared, converted, x)
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
                sparse = sparse_model(ctx, dense, kernel)
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


def _verify(prepared: nn.Module, converted: nn.Module, x: Tensor) -> dict:
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


def _probe_pack(ctx: Context, kernel: str, weight: Tensor) -> Tensor:
    """`weight` packed by torch's own class for `kernel`, without spre_fx's checks; in the dry
    run, the dense weight itself (the rest of the probe then runs on the CPU)."""
    if ctx.dry:
        return weight
    return TORCH_CLASSES[kernel].from_dense(weight)


def part_advisor(ctx: Context, rec: dict) -> None:
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
                    w = _probe_pack(ctx, kernel, gemm_weight(mod))
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


def _layer_specs(model: nn.Module, names: list[str], x: Tensor) -> list[dict]:
    """One entry per distinct (layer configuration, input shape), with every layer name sharing it."""
    mods = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        mods[n].register_forward_hook(lambda _m, i, _o, n=n: shapes.setdefault(n, tuple(i[0].shape)) and None)
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
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


def _time_layer(ctx: Context, mod: nn.Module, shape: tuple, dtype: torch.dtype, kernels: dict) -> dict:
    """Dense layer, im2col gather, dense and sparse GEMMs on the gathered input, and the sparse layer."""
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    nxt = rotation(ctx, lambda: randn(ctx, shape, dtype), nbytes)
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
            k_shape = (shape[0], w.shape[1])
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
                row["sparse"][kernel] = _time_sparse(ctx, mod, packed, nxt, pnext, row)
            except Exception as e:
                row["sparse"][kernel] = {"raised": f"{type(e).__name__}: {e}"[:300]}
            if kernel == "cusparselt" and "ms" in row["sparse"][kernel]:
                # cuSPARSELt writes [O, M] unless told to transpose in the kernel; torch's default
                # then hands F.linear a transposed view and SemiStructuredConv2d copies it to NHWC.
                try:
                    packed.fuse_transpose_cusparselt = True
                    fused = _time_sparse(ctx, mod, packed, nxt, pnext, row, gemm=False)
                except Exception as e:
                    fused = {"raised": f"{type(e).__name__}: {e}"[:300]}
                row["sparse"]["cusparselt-fused-t"] = fused
    return row


def _time_sparse(
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


def part_layers(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    _, converted = trained(ctx)
    kernels = kernels_here(ctx)
    for k, why in kernels.items():
        if why:
            ctx.skip(rec, f"sparse {k}", why)
    torch.backends.cudnn.benchmark = True  # the dense baseline gets cuDNN's best algorithm
    rec["runs"] = []
    for dtype, batch in itertools.product(s.dtypes, s.batches):
        dense = in_dtype(converted, dtype)
        names = nm_layers(dense)
        x = randn(ctx, (batch, 3, s.size, s.size), dtype)
        verdicts = advise(dense, input_size=(batch, 3, s.size, s.size)).layers
        specs = _layer_specs(dense, names, x)
        del x
        run = {"dtype": str(dtype), "batch": batch, "rows": [], "left_out": []}
        rec["runs"].append(run)
        mods = dict(dense.named_modules())
        for i, spec in enumerate(specs):
            if ctx.deadline.left() <= 0:
                run["left_out"] = [sp["names"][0] for sp in specs[i:]]
                run["summary"] = summarise_layers(run["rows"])
                raise OutOfTime(
                    f"layers {dtype} batch {batch}: {len(specs) - i} of {len(specs)} shapes left out"
                )
            first = spec["names"][0]
            row = {
                "layers": spec["names"],
                "count": len(spec["names"]),
                "input": list(spec["input"]),
                "verdict": verdicts[first].code,
                "macs": verdicts[first].macs,
            }
            try:
                row.update(_time_layer(ctx, mods[first], spec["input"], dtype, kernels))
            except Exception as e:  # one shape's failure is a result; the others still run
                row["raised"] = f"{type(e).__name__}: {e}"[:300]
            run["rows"].append(row)
            if ctx.cuda:
                torch.cuda.empty_cache()
        run["summary"] = summarise_layers(run["rows"])
        print(f"  layers {dtype} b{batch}: {len(run['rows'])} shapes; {run['summary']}", flush=True)
        del dense


def _best(row: dict, key: str = "ms") -> dict | None:
    """The fastest sparse variant of a layer row by `key` (None when none ran)."""
    ran = [r for r in row.get("sparse", {}).values() if key in r]
    return min(ran, key=lambda r: r[key]) if ran else None


def _variant(row: dict) -> str:
    best = _best(row)
    return next(k for k, v in row["sparse"].items() if v is best)


def summarise_layers(rows: list[dict]) -> dict:
    """Time-weighted speed-ups (each shape counted as often as ResNet-50 has it)."""

    def total(rs, f):
        return sum(r["count"] * f(r) for r in rs)

    ran = [r for r in rows if _best(r) is not None]
    eligible = [r for r in ran if r["verdict"] == "ok"]
    out: dict[str, Any] = {"shapes": len(rows), "shapes_sparse": len(ran), "shapes_eligible": len(eligible)}
    if eligible:
        out["eligible_speedup"] = total(eligible, lambda r: r["dense_ms"]) / total(
            eligible, lambda r: _best(r)["ms"]
        )
        out["eligible_median_speedup"] = statistics.median(_best(r)["speedup"] for r in eligible)
        out["eligible_gemm_speedup"] = total(eligible, lambda r: r["gemm_dense_ms"]) / total(
            eligible, lambda r: _best(r, "gemm_ms")["gemm_ms"]
        )
        out["eligible_best_variant"] = sorted({_variant(r) for r in eligible})
        out["im2col_share_of_sparse"] = total(eligible, lambda r: r["im2col_ms"]) / total(
            eligible, lambda r: _best(r)["ms"]
        )
    if ran:
        dense = total(ran, lambda r: r["dense_ms"])
        out["all_nm_speedup_if_chosen_by_measurement"] = dense / total(
            ran, lambda r: min(r["dense_ms"], _best(r)["ms"])
        )
        agree = sum((r["verdict"] == "ok") == (_best(r)["speedup"] > 1) for r in ran)
        out["advisor_agrees_with_measurement"] = f"{agree}/{len(ran)}"
    gather = [r for r in rows if r.get("im2col_dense_ms")]
    if gather:
        out["im2col_dense_over_cudnn"] = total(gather, lambda r: r["im2col_dense_ms"]) / total(
            gather, lambda r: r["dense_ms"]
        )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def part_e2e(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    _, converted = trained(ctx)
    kernels = kernels_here(ctx)
    if kernels["cusparselt"] and kernels["cutlass"]:
        ctx.skip(rec, "semi_structured model", CUDA_ONLY if ctx.dry else "no 2:4 kernel here")
    torch.backends.cudnn.benchmark = True
    measured = {(r["dtype"], r["batch"]): r for r in ctx.cache.get("layer_runs", [])}
    rec["runs"] = []
    for dtype, batch in itertools.product(s.dtypes, s.batches):
        ctx.deadline.check(f"e2e {dtype} batch {batch}")
        dense = in_dtype(converted, dtype)
        shape = (batch, 3, s.size, s.size)
        nxt = rotation(ctx, lambda shape=shape, dtype=dtype: randn(ctx, shape, dtype), math.prod(shape) * 2)
        row: dict[str, Any] = {"dtype": str(dtype), "batch": batch}
        rec["runs"].append(row)
        flops = advise(dense, input_size=shape).flops
        row["ideal_conv_linear_speedup"] = flops.ideal_speedup if flops else None
        builders: dict[str, Callable[[], nn.Module]] = {"dense": lambda dense=dense: dense}
        if not (kernels["cusparselt"] and kernels["cutlass"]):
            kernel = next(k for k, why in kernels.items() if why is None)
            chosen = _measured_faster(measured.get((str(dtype), batch)))
            builders.update(
                semi_structured=lambda dense=dense: to_semi_structured(dense),
                # cuSPARSELt transposing in the kernel: the layers hand on NHWC outputs
                semi_structured_fused_t=lambda dense=dense: _fused_t(to_semi_structured(dense)),
                im2col_dense=lambda dense=dense: im2col_model(dense, packed_names(to_semi_structured(dense))),
            )
            if chosen is not None:  # only the layers the per-layer timing found faster on 2:4
                builders["semi_structured_measured"] = lambda d=dense, c=chosen, k=kernel: _pack_only(d, c, k)
                row["measured_faster_layers"] = len(chosen)
        else:
            builders["im2col_dense"] = lambda dense=dense: im2col_model(dense, nm_layers(dense))
        for name, build in builders.items():
            ctx.deadline.check(f"e2e {dtype} batch {batch} {name}")
            try:  # one model's failure is a result; the others still run
                model = build()
                if name == "semi_structured":
                    row["packed_layers"] = len(packed_names(model))
                with torch.no_grad():
                    # a whole forward is tens of ms: ten times the layers' repeat time, ~10 runs
                    row[f"{name}_ms"] = bench_ms(ctx, lambda model=model, nxt=nxt: model(nxt()), scale=10)
            except Exception as e:
                row[f"{name}_raised"] = f"{type(e).__name__}: {e}"[:300]
            model = None
        for name in builders:
            if name != "dense" and f"{name}_ms" in row and "dense_ms" in row:
                row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
        print(
            f"  e2e {dtype} b{batch}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("_ms", "_speedup"))),
            flush=True,
        )
        del dense
        if ctx.cuda:
            torch.cuda.empty_cache()


def _fused_t(model: nn.Module) -> nn.Module:
    """Every cuSPARSELt weight of `model` told to write its result transposed (NHWC for convs)."""
    for name in packed_names(model):
        model.get_submodule(name).weight.fuse_transpose_cusparselt = True
    return model


def _measured_faster(run: dict | None) -> list[str] | None:
    if run is None or not run["rows"]:
        return None
    return [n for r in run["rows"] if _best(r) is not None and _best(r)["speedup"] > 1 for n in r["layers"]]


def _pack_only(dense: nn.Module, names: list[str], kernel: str) -> nn.Module:
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


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list, ctx: Context
) -> Callable[[], float]:
    """One SGD step (under autocast when the sizes ask for it) per call, wall seconds between
    synchronisations."""
    it = itertools.cycle(batches)
    dtype = ctx.sizes.autocast

    def step() -> float:
        x, y = next(it)
        ctx.sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctx.sync()
        return time.perf_counter() - t

    return step


def part_train(ctx: Context, rec: dict) -> None:
    s = ctx.sizes
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    base = build(s.model).to(ctx.device, memory_format=CL)
    models = {"dense": base, "nm": spre_fx.prepare(base, spre=False), "spre": spre_fx.prepare(base)}
    macs = {
        k: training_macs(m, torch.randn(1, 3, s.size, s.size, device=ctx.device)) for k, m in models.items()
    }
    rec["flop_ratio"] = {k: macs[k] / macs["dense"] for k in models}
    models["nm-held"], models["spre-held"] = copy.deepcopy(models["nm"]), copy.deepcopy(models["spre"])
    batches = [
        (
            randn(ctx, (s.train_batch, 3, s.size, s.size), torch.float32),
            torch.randint(0, 1000, (s.train_batch,), device=ctx.device),
        )
        for _ in range(2)
    ]
    steps = {}
    for k, m in models.items():
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        if k != "dense":
            every = 10**9 if k.endswith("held") else 1  # held: masks never move, the rest of the cost stays
            spre_fx.MaskScheduler(m, opt, nm_interval=every, spatial_interval=every)
        steps[k] = _train_step(m, opt, batches, ctx)
    for k, step in steps.items():
        for _ in range(s.train_warmup):
            step()
        ctx.deadline.check(f"train warm-up of {k}")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(s.train_rounds):
        if ctx.deadline.left() <= 0 and r >= 2:
            ctx.skip(rec, "rounds", f"deadline: {r} of {s.train_rounds} rounds run")
            break
        for k, step in steps.items():
            times[k].append(step())
    rec["rounds"] = len(times["dense"])
    rec["median_ms"] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rec["ratio"] = {k: statistics.median(t / d for t, d in zip(v, times["dense"])) for k, v in times.items()}
    rec["mask_update_ms"] = _mask_update_ms(ctx, models)
    gap = rec["ratio"]["nm"] > GOALS["nm_step"] or rec["ratio"]["spre"] > rec["flop_ratio"]["spre"]
    rec["goals"] = {
        "nm <= 1.05": rec["ratio"]["nm"] <= GOALS["nm_step"],
        "spre <= flop ratio": rec["ratio"]["spre"] <= rec["flop_ratio"]["spre"],
    }
    print(
        f"  train: ratio {rec['ratio']}, flop ratio {rec['flop_ratio']}, masks {rec['mask_update_ms']}",
        flush=True,
    )
    if gap or ctx.dry:
        ctx.deadline.check("the profile")
        rec["profile"] = _profile(ctx, {k: steps[k] for k in ("dense", "nm", "spre")})


def _wall_ms(ctx: Context, fn: Callable[[], Any], n: int = 5) -> float:
    """Median wall milliseconds of `fn` between synchronisations (after one untimed call)."""
    fn()
    times = []
    for _ in range(n if ctx.cuda else 1):
        ctx.sync()
        t = time.perf_counter()
        fn()
        ctx.sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _mask_update_ms(ctx: Context, models: dict) -> dict:
    """Median milliseconds of one full mask update (what the scheduler does after a step), and
    its N:M and spatial halves, on the device's weights."""
    from spre_fx.masks import nm_mask

    out = {}
    for k in ("nm", "spre"):
        layers = [m for m in models[k].modules() if hasattr(m, "update_masks")]
        spatial = [m for m in layers if hasattr(m, "spatial_from_weight")]

        out[k] = {
            "all": _wall_ms(ctx, lambda layers=layers: [m.update_masks() for m in layers]),
            "nm": _wall_ms(
                ctx, lambda layers=layers: [nm_mask(m.weight, *m.spre_fx.nm, out=m.nm_mask) for m in layers]
            ),
            "layers": len(layers),
            "spre_layers": len(spatial),
        }
        if spatial:
            out[k]["spatial"] = _wall_ms(
                ctx, lambda spatial=spatial: [m.spatial_from_weight() for m in spatial]
            )
    return out


def _profile(ctx: Context, steps: dict) -> dict:
    """torch.profiler over a few steps of each variant: device (or CPU) time per step, the ops
    that take most of it, and the optimizer step (which runs the mask update); tables in
    profile_train.txt."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    n = ctx.sizes.profile_steps
    summary, text = {}, []
    for k, step in steps.items():
        with profile(activities=acts) as prof:
            for _ in range(n):
                step()
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "Optimizer.", "autograd::"))]

        def self_t(e):
            return getattr(e, "self_device_time_total", 0) if ctx.cuda else e.self_cpu_time_total

        top = sorted(events, key=self_t, reverse=True)[:8]
        opt = [e for e in events if e.key.startswith("Optimizer.step")]
        summary[k] = {
            "ms_per_step": sum(self_t(e) for e in events if e.key.startswith("aten::")) / n / 1e3,
            "optimizer_step_cpu_ms": sum(e.cpu_time_total for e in opt) / n / 1e3,
            "top": {e.key: round(self_t(e) / n / 1e3, 3) for e in top},
        }
        sort = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
        text.append(f"== {k}, {n} steps ==\n{prof.key_averages().table(sort_by=sort, row_limit=25)}")
    (ctx.out / "profile_train.txt").write_text("\n\n".join(text))
    return summary


PART_FUNCS = {
    "env": part_env,
    "pytest": part_pytest,
    "numerics": part_numerics,
    "advisor": part_advisor,
    "layers": part_layers,
    "e2e": part_e2e,
    "train": part_train,
}


# --------------------------------------------------------------------------- outputs
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows),
    ]


def _pytest_passed(counts: dict) -> bool:
    """Some tests ran and passed, none failed (all skipped on a GPU machine is a failure)."""
    return counts.get("passed", 0) > 0 and not any(counts.get(k) for k in ("failed", "error", "errors"))


def markdown(result: dict) -> tuple[str, str]:
    """(full report, summary): the summary is what prints last."""
    p = result["parts"]
    env = p.get("env", {})
    head = [
        f"# gpu_check {'(dry run, CPU)' if result['dry_run'] else ''}",
        "",
        f"{result['started']}; {env.get('gpu', 'no GPU')} (capability {env.get('capability', '-')}); torch "
        f"{env.get('torch', torch.__version__)}, CUDA {env.get('cuda')}, cuSPARSELt {env.get('cusparselt')}, "
        f"triton {env.get('triton')}; `{result['command']}`; {result['wall_s']:.0f} s of a "
        f"{result['budget_s']:.0f} s budget",
        "",
    ]
    parts = _table(
        ["part", "status", "s", "note"],
        [
            [
                k,
                v.get("status"),
                v.get("seconds"),
                "; ".join(
                    [v.get("reason", "")] + [f"skipped {a}: {b}" for a, b in v.get("skipped", {}).items()]
                ).strip("; ")[:300],
            ]
            for k, v in p.items()
        ],
    )
    full, summary = [*head, "## Parts", *parts, ""], [*head, *parts, ""]
    checks = []
    if "pytest" in p and "summary" in p["pytest"]:
        checks.append(
            [
                "pytest -m gpu",
                p["pytest"]["summary"],
                "all pass",
                None if result["dry_run"] else _pytest_passed(p["pytest"]["counts"]),
            ]
        )
    num = p.get("numerics", {})
    if "trained_on_cpu" in num:
        checks.append(
            ["prepared ResNet-50 trains on the GPU", num["trained_on_cpu"][:200], "no error", False]
        )
    for key, tol in (("verify_fp64", "1e-10"), ("verify_fp32", "1e-5")):
        if key in num:
            v = num[key]
            checks.append(
                [f"{key} (converted == prepared)", _fmt(v.get("output_error")), f"<= {tol}", v["ok"]]
            )
    rows = []
    for r in num.get("runs", []):
        note = r.get("skipped") or r.get("error")
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
                note,
            ]
        )
        if "ok" in r:
            checks.append(
                [f"{r['dtype']} {r['kernel']} vs dense", _fmt(r["vs_dense"]), f"<= {E2E_TOL}", r["ok"]]
            )
    if rows:
        full += [
            "## Numerics: semi-structured vs dense converted (max |a-b| / max |a|)",
            *_table(
                [
                    "dtype",
                    "kernel",
                    "layers",
                    "vs dense",
                    "vs fp32",
                    "dense vs fp32",
                    "worst layer error",
                    "ok",
                    "note",
                ],
                rows,
            ),
            "",
        ]
    for dt, a in p.get("advisor", {}).get("by_dtype", {}).items():
        checks.append(
            [
                f"advisor vs torch ({dt})",
                f"{len(a['mismatches'])} disagreement(s)",
                "0",
                not a["mismatches"] if not result["dry_run"] else None,
            ]
        )
        full += [f"## Advisor {dt}: verdicts {a['verdicts']}", *[f"- {m}" for m in a["mismatches"]], ""]
    for run in p.get("layers", {}).get("runs", []):
        sm = run.get("summary", {})
        if "eligible_speedup" in sm:
            checks.append(
                [
                    f"layers {run['dtype']} b{run['batch']} eligible speed-up",
                    f"{sm['eligible_speedup']:.3f} (median {sm['eligible_median_speedup']:.3f}, GEMM "
                    f"alone {sm['eligible_gemm_speedup']:.3f}, im2col {sm['im2col_share_of_sparse']:.1%} "
                    "of sparse)",
                    ">= 1.3",
                    sm["eligible_speedup"] >= GOALS["layer_speedup"],
                ]
            )
        rows = []
        for r in run["rows"]:
            b, g, sp = _best(r) or {}, _best(r, "gemm_ms") or {}, r.get("sparse", {})
            plain = sp.get("cusparselt", sp.get("cutlass", {}))
            rows.append(
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
        full += [
            f"## Layers {run['dtype']} batch {run['batch']} (ms; speed-up = dense / sparse)",
            f"summary: {sm}" + (f"; left out: {run['left_out']}" if run["left_out"] else ""),
            *_table(
                [
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
                ],
                rows,
            ),
            "",
        ]
    e2e = p.get("e2e", {}).get("runs", [])
    if e2e:
        cols = sorted(
            {k for r in e2e for k in r if k.endswith(("_ms", "_speedup")) and not k.startswith("ideal")}
        )
        full += [
            "## Whole model (ms per forward)",
            *_table(
                ["dtype", "batch", "ideal", *cols],
                [
                    [r["dtype"], r["batch"], r.get("ideal_conv_linear_speedup"), *[r.get(c) for c in cols]]
                    for r in e2e
                ],
            ),
            "",
        ]
        for r in e2e:
            if "semi_structured_speedup" in r:
                checks.append(
                    [
                        f"whole model {r['dtype']} b{r['batch']}",
                        f"{r['semi_structured_speedup']:.3f}",
                        "as measured",
                        None,
                    ]
                )
    tr = p.get("train", {})
    if "ratio" in tr:
        full += [
            "## Training step (median of per-round ratios vs dense)",
            *_table(
                ["variant", "median ms", "ratio", "FLOP ratio"],
                [
                    [k, tr["median_ms"][k], tr["ratio"][k], tr["flop_ratio"].get(k.replace("-held", ""))]
                    for k in tr["ratio"]
                ],
            ),
            f"mask update ms: {tr['mask_update_ms']}",
            "",
        ]
        checks.append(
            ["train N:M step / dense", _fmt(tr["ratio"]["nm"]), "<= 1.05", tr["goals"]["nm <= 1.05"]]
        )
        checks.append(
            [
                "train SpRe step / dense",
                _fmt(tr["ratio"]["spre"]),
                f"<= {tr['flop_ratio']['spre']:.3f}",
                tr["goals"]["spre <= flop ratio"],
            ]
        )
        for k, v in tr.get("profile", {}).items():
            full.append(
                f"- profile {k}: {v['ms_per_step']:.1f} ms/step, optimizer step (with masks) "
                f"{v['optimizer_step_cpu_ms']:.1f} ms CPU; top {v['top']}"
            )
        full.append("")
    summary += ["## Checks", *_table(["check", "measured", "goal", "met"], checks)]
    full += ["## Checks", *_table(["check", "measured", "goal", "met"], checks)]
    return "\n".join(full) + "\n", "\n".join(summary) + "\n"


def write(result: dict, out: Path, start: float) -> str:
    """Rewrite the JSON and the markdown; returns the summary. The JSON is written first, and a
    table that fails to render is replaced by its traceback: the numbers are never lost."""
    result["wall_s"] = time.monotonic() - start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        full, summary = markdown(result)
    except Exception:
        full = summary = f"markdown failed (the numbers are in gpu_check.json):\n{traceback.format_exc()}"
    (out / "gpu_check.md").write_text(full)
    return summary


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and logs")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes; CUDA-only steps skipped with reasons"
    )
    ap.add_argument(
        "--parts", default=",".join(PART_NAMES), help=f"comma-separated subset of {','.join(PART_NAMES)}"
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run (default 240 on a GPU, 960 in the dry run)",
    )
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PART_NAMES]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PART_NAMES)}")
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        ap.error("no CUDA device here: run with --dry-run for the CPU pass")
    start = time.monotonic()
    slack = 1.0 if cuda else DRY_SLACK
    budget = args.budget if args.budget is not None else GPU_BUDGET * slack
    end = start + budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = Context(GPU if cuda else DRY, cuda, device, out, Deadline(end), {})
    result: dict[str, Any] = {
        "command": "python3 benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dry_run": not cuda,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "sizes": {k: str(v) for k, v in asdict(ctx.sizes).items()},
        "parts": {},
    }
    chosen = [p for p in PARTS if p[0] in parts]
    failed = False
    for i, (name, cap, need) in enumerate(chosen):
        rec: dict[str, Any] = {}
        result["parts"][name] = rec
        now = time.monotonic()
        reserve = sum(n for _, _, n in chosen[i + 1 :]) * slack
        cap, need = cap * slack, need * slack
        part_end = min(end - reserve, now + cap) if name != "env" else end
        left = part_end - now
        if left < need or end - now <= 0:
            rec.update(
                status="skipped",
                seconds=0,
                reason=f"deadline: {max(end - now, 0):.0f} s of the budget left, {reserve:.0f} s reserved "
                f"for later parts; this part needs >= {need:.0f} s",
            )
            print(f"[{name}] skipped: {rec['reason']}", flush=True)
            write(result, out, start)
            continue
        print(f"[{name}] up to {left:.0f} s", flush=True)
        ctx.deadline = Deadline(part_end)
        t = time.monotonic()
        try:
            PART_FUNCS[name](ctx, rec)
            rec["status"] = "ok"
        except OutOfTime as e:
            rec.update(status="truncated", reason=str(e))
        except Exception as e:
            failed = True
            rec.update(
                status="error", reason=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()
            )
            print(rec["traceback"], file=sys.stderr, flush=True)
        rec["seconds"] = round(time.monotonic() - t, 1)
        if name == "layers":
            ctx.cache["layer_runs"] = rec.get("runs", [])
        if cuda:
            torch.cuda.empty_cache()
        print(f"[{name}] {rec['status']} in {rec['seconds']} s", flush=True)
        write(result, out, start)
    # the GPU machine has none of them: nothing on this path may import them
    result["mmdet_or_timm_imported"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("mmdet", "mmcv", "timm")
    )
    summary = write(result, out, start)
    print("\n" + summary, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
