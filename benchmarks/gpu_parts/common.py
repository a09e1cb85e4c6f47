"""What every part shares: sizes, the run context and its deadlines, timing, the models."""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

import spre_fx
from spre_fx.deploy import SemiStructuredConv2d, to_semi_structured
from spre_fx.module_tree import set_module
from spre_fx.plan import Treatment, plan_of

ROOT = Path(__file__).resolve().parents[2]
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
CUDA_ONLY = "CUDA-only: torch's semi-structured kernels (cuSPARSELt, CUTLASS) run on CUDA GPUs only"
DRY_GOAL = "not judged (CPU dry run)"  # CPU timings at tiny sizes say nothing about a GPU goal


class OutOfTime(Exception):
    """A part reached its deadline; what it measured so far is kept."""


@dataclass(frozen=True)
class Sizes:
    """How large each part runs. The defaults are the GPU run's (`GPU`); `DRY` shrinks every one
    of them for the CPU pass, which only proves the code path."""

    model: str = "resnet50"  # a torchvision classifier, or "resnet10" (ResNet-18 with one block per stage)
    batches: tuple[int, ...] = (64, 256)  # layers and e2e, training-size batches
    latency_batches: tuple[int, ...] = (1, 4, 16)  # e2e, deployed latency
    size: int = 224
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
    check_batch: int = 16  # numerics and advisor forwards
    sgd_steps: int = 3
    bn_batches: int = 4
    train_batch: int = 64
    # of the training step (None: float32; CPU bf16 convs crawl)
    autocast: torch.dtype | None = torch.bfloat16
    train_warmup: int = 3
    train_rounds: int = 12
    profile_steps: int = 3
    mlp_width: int = 768  # the Linear-heavy model: MLP blocks of a ViT (ViT-B: 768 -> 3072 -> 768)
    mlp_hidden: int = 3072
    mlp_blocks: int = 4
    mlp_tokens: int = 197  # per image (ViT at 224 px, patch 16: 197)
    mlp_batches: tuple[int, ...] = (8, 64)
    warmup_ms: float = 5
    rep_ms: float = 30
    cpu_reps: int = 0


GPU = Sizes()
DRY = Sizes(
    model="resnet10",
    batches=(2,),
    latency_batches=(1,),
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
    mlp_width=32,
    mlp_hidden=64,
    mlp_blocks=1,
    mlp_tokens=5,
    mlp_batches=(2,),
    warmup_ms=0,
    rep_ms=0,
    cpu_reps=1,
)


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


def goal(dry: bool, met: bool) -> bool | None:
    """A goal's verdict: met or not on a GPU; None (not judged) on the dry run's CPU."""
    return None if dry else bool(met)


def verdict(dry: bool, met: bool | None) -> str | bool | None:
    """The checks table's "met" cell: yes/NO on a GPU, DRY_GOAL in the dry run."""
    return DRY_GOAL if dry and met is None else met


# --------------------------------------------------------------------------- timing
def bench_ms(ctx: Context, fn: Callable[[], Any], scale: float = 1.0) -> float:
    """Median milliseconds of `fn`: triton's do_bench on CUDA (CUDA events, L2 flushed before each
    run; warm-up and repeat times of the sizes times `scale`), else perf_counter."""
    if ctx.cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            return events_ms(fn)
        warmup, rep = ctx.sizes.warmup_ms * scale, ctx.sizes.rep_ms * scale
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(ctx.sizes.cpu_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def events_ms(fn: Callable[[], Any], n: int = 20) -> float:
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


def wall_ms(ctx: Context, fn: Callable[[], Any], n: int = 5) -> float:
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


def random_inputs(ctx: Context, shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[], Tensor]:
    """A `rotation` of `randn` inputs of `shape` and `dtype`: what a timed forward is fed, so
    that no timing reads its input from the L2 cache."""
    return rotation(ctx, lambda: randn(ctx, shape, dtype), math.prod(shape) * dtype.itemsize)


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
    float32, on the device; built once and shared by the parts. Should training on the GPU fail,
    it trains on the CPU and moves the models, so the kernel parts still run; the numerics part
    records why."""
    if "trained" not in ctx.cache:
        try:
            ctx.cache["trained"] = train_and_convert(ctx.sizes, ctx.device)
        except Exception as e:
            if not ctx.cuda:
                raise
            ctx.cache["trained_on_cpu"] = f"training on the GPU raised {type(e).__name__}: {e}"[:1000]
            print(f"  {ctx.cache['trained_on_cpu']}; training on the CPU instead", flush=True)
            prepared, converted = train_and_convert(ctx.sizes, torch.device("cpu"))
            ctx.cache["trained"] = prepared.to(ctx.device), converted.to(ctx.device)
    return ctx.cache["trained"]


def train_and_convert(s: Sizes, device: torch.device) -> tuple[nn.Module, nn.Module]:
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


def sparse_model(dense: nn.Module, kernel: str) -> nn.Module:
    """`to_semi_structured` (kernel 'cusparselt'/'cutlass'), or the dense im2col control ('im2col')."""
    if kernel == "im2col":
        return im2col_model(dense, nm_layers(dense))
    return to_semi_structured(dense, kernel=kernel)


def first_calls(model: nn.Module, names: list[str], x: Tensor, keep: Callable[[tuple, Any], Any]) -> dict:
    """`keep(inputs, output)` of each named layer's first call in one no-grad forward of `model`."""
    seen: dict[str, Any] = {}
    mods = dict(model.named_modules())

    def hook(name: str, inputs: tuple, output: Any) -> None:  # returns None: the output stays
        if name not in seen:
            seen[name] = keep(inputs, output)

    hooks = [mods[n].register_forward_hook(lambda _m, i, o, n=n: hook(n, i, o)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def layer_io(model: nn.Module, names: list[str], x: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """(input, output) of each named layer in one forward of `model`, copied when seen (an
    in-place ReLU after a folded conv, as in torchvision's ResNets, rewrites them later)."""
    return first_calls(model, names, x, lambda inputs, output: (inputs[0].clone(), output.clone()))


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
    why: dict[str, str | None] = {"cusparselt": None, "cutlass": None}
    if not torch.backends.cusparselt.is_available():
        why["cusparselt"] = "torch built without cuSPARSELt"
    cap = torch.cuda.get_device_capability(ctx.device)
    if cap[0] != 8:
        why["cutlass"] = (
            f"spre_fx refuses CUTLASS on compute capability {cap[0]}.{cap[1]} (torch's CUTLASS "
            "2:4 kernels are 8.x only); the advisor part asks torch directly"
        )
    return why


# --------------------------------------------------------------------------- markdown helpers
def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2e}" if v and abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(fmt(c) for c in r) + " |" for r in rows),
    ]
