"""Wall time of `spre_fx.prepare` + `spre_fx.convert` against torch.ao's `prepare_fx` + `convert_fx`.

Both are whole-model fx rewrites of the same torchvision model (weights=None):

- A: `spre_fx.convert(spre_fx.prepare(model))`, called as a user would (both steps copy the model
  they are given, so those copies are timed).
- B: `convert_fx(prepare_fx(copy, get_default_qconfig_mapping("x86"), (x,)))` on a copy made
  before the timer starts (torch.ao rewrites the model it is given), x = 1x3x224x224.

The model is in eval mode for both, as torch.ao's post-training quantisation requires.

The two are interleaved in one process (warm-up, then A, B, A, B, ...) so that load from other
processes hits both alike; the figure of merit is the median of the per-pair ratios A/B.

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_convert.py --model resnet50 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import time
import warnings

import torch
import torchvision
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import spre_fx

GOAL = 0.5  # spre_fx time / torch.ao time


Times = tuple[float, float, float]  # wall seconds of prepare, of convert; CPU seconds of both


def time_spre(model: torch.nn.Module) -> Times:
    """Seconds spent in spre_fx.prepare and spre_fx.convert (default arguments, model copied)."""
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = spre_fx.prepare(model)
    t1 = time.perf_counter()
    spre_fx.convert(prepared)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c0


def time_ao(model: torch.nn.Module, example: torch.Tensor) -> Times:
    """Seconds spent in prepare_fx and convert_fx on a fresh eval-mode copy of `model`."""
    fresh = copy.deepcopy(model)
    qconfig_mapping = get_default_qconfig_mapping("x86")
    with warnings.catch_warnings():  # torch.ao's deprecation and observer warnings
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), time.process_time()
        prepared = prepare_fx(fresh, qconfig_mapping, (example,))
        t1 = time.perf_counter()
        convert_fx(prepared)
        t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (weights=None)")
    parser.add_argument("--repeats", type=int, default=7, help="timed A/B pairs after one warm-up pair")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Eval mode, as torch.ao's post-training quantisation requires; spre_fx traces both modes anyway.
    model = torchvision.models.get_model(args.model, weights=None).eval()
    example = torch.randn(1, 3, 224, 224)

    time_spre(model)  # warm-up: imports, fx/tracer caches, allocator
    time_ao(model, example)

    spre: list[Times] = []
    ao: list[Times] = []
    ratios, cpu_ratios = [], []
    for i in range(args.repeats):
        gc.collect()
        a = time_spre(model)
        gc.collect()
        b = time_ao(model, example)
        spre.append(a)
        ao.append(b)
        ratios.append((a[0] + a[1]) / (b[0] + b[1]))
        cpu_ratios.append(a[2] / b[2])
        print(f"pair {i + 1}/{args.repeats}: spre_fx {a[0] + a[1]:.3f} s, torch.ao {b[0] + b[1]:.3f} s, "
              f"ratio {ratios[-1]:.3f} (CPU time ratio {cpu_ratios[-1]:.3f})", flush=True)

    def med(rows: list[Times], k: int | None) -> float:
        return statistics.median(r[0] + r[1] if k is None else r[k] for r in rows)

    ratio = statistics.median(ratios)
    print()
    print(f"{args.model}, {args.repeats} interleaved pairs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'median seconds':<22}{'prepare':>10}{'convert':>10}{'total':>10}{'CPU':>10}")
    for label, rows in (("spre_fx", spre), ("torch.ao (fx, x86)", ao)):
        print(f"{label:<22}{med(rows, 0):>10.3f}{med(rows, 1):>10.3f}{med(rows, None):>10.3f}"
              f"{med(rows, 2):>10.3f}")
    print(f"median of per-pair ratios spre_fx/torch.ao: wall {ratio:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}), CPU {statistics.median(cpu_ratios):.3f}; "
          f"goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
