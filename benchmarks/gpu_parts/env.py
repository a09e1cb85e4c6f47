"""Part `env`: torch, CUDA, cuSPARSELt, triton, the GPU and its compute capability."""

from __future__ import annotations

import os
import platform
import subprocess

import torch
import torchvision

import spre_fx

from .common import KERNELS, TORCH_CLASSES, Context

NAME, CAP, NEED = "env", 15, 0


def run(ctx: Context, rec: dict) -> None:
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


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    """The header line of gpu_check.md carries the environment; no section, no check."""
    return [], []
