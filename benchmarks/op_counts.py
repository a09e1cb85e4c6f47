"""Aten ops and host-device syncs of one SpRe training step on the torch (CUDA) mask path.

    SPRE_FX_NATIVE=0 python benchmarks/op_counts.py --model resnet50

CUDA weights take the torch code of spre_fx/masks.py; on the CPU the same code runs with the C
kernels off (`SPRE_FX_NATIVE=0`, or `_native.using(None)`, which this script uses whatever the
environment says). A `TorchDispatchMode` sees every aten op eager code dispatches, on the CPU as
on a GPU: each is a kernel launch there, and the ops listed in `SYNC_OPS` (or an index with a
bool mask) make the host wait for the GPU. One step of a prepared model (SpRe 2:4, a
`MaskScheduler` moving every mask after every optimizer step, SGD with momentum and weight
decay, `foreach=True` as on CUDA) is counted in two parts: forward+backward, and the optimizer
step with the scheduler's mask update. Reading `MaskScheduler.stats` after the step is counted
with the step (`track_stats`); `held`: the same step with masks the schedule does not move (what
forward+backward costs without the float-mask rebuilds a moved mask brings). Counts are
deterministic: no timing.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import spre_fx
from spre_fx import _native

aten = torch.ops.aten
# Ops whose result size or value the host must read back from the device before going on.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(), float(), bool() of a tensor
    aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default,
}


def _bool_index(func, args) -> bool:
    """An index (or index_put) with a bool mask: its output size is the mask's count (a sync)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                    aten._index_put_impl_.default):
        return False
    return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])


# Tensor methods that copy to the host without dispatching an aten op on a CPU tensor (on a GPU
# tensor each is a device-to-host copy, a sync); item()/int()/bool() dispatch `_local_scalar_dense`.
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


class _HostReads(TorchFunctionMode):
    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.counter[func] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the block, and those that would sync a CUDA stream
    (`SYNC_OPS`, an index with a bool mask, and the host reads of `HOST_READS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self._reads = _HostReads(self.syncs)

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        if func in SYNC_OPS or _bool_index(func, args):
            self.syncs[func] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())


@dataclass(frozen=True)
class StepCounts:
    """Ops and syncs of one training step, split at `optimizer.step()` (which runs the masks'
    update in its post-hook); `step_ops` and `syncs` say which ops."""

    forward_backward: int
    forward_backward_syncs: int
    step: int
    step_syncs: int
    step_ops: Counter
    syncs: Counter

    @property
    def ratio(self) -> float:
        return self.step / self.forward_backward


def build(model_name: str, nm: tuple[int, int] = (2, 4)) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10)
    return spre_fx.prepare(model, nm=nm)


def count_step(model: nn.Module, x: torch.Tensor, track_stats: bool = False, moving: bool = True,
               warm_steps: int = 1) -> StepCounts:
    """Counts of one step after `warm_steps` uncounted ones (momentum buffers exist, caches built),
    masks moving after every step (`moving`) or held by the schedule. The scheduler is removed
    after, so the same model can be counted again."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
    interval = 1 if moving else 10**9
    sched = spre_fx.MaskScheduler(model, opt, track_stats=track_stats, nm_interval=interval,
                                  spatial_interval=interval)
    y = torch.arange(x.shape[0]) % 10

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    def step() -> None:
        opt.step()
        if track_stats:
            sched.stats["nm_flip_rate"]  # what a logger reads: the one copy to the host

    with _native.using(None):
        for _ in range(warm_steps):
            forward_backward()
            step()
        with OpCounter() as fb:
            forward_backward()
        with OpCounter() as st:
            step()
    sched.remove()
    return StepCounts(fb.total, fb.sync_total, st.total, st.sync_total, st.ops, fb.syncs + st.syncs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--top", type=int, default=0, help="also list the N most frequent ops of the step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.model} SpRe 2:4, masks moving every step, torch mask path (C kernels off), "
          f"batch {args.batch} at {args.size} px")
    model = build(args.model)
    print(f"{'masks':<8} {'track_stats':<12} {'fwd+bwd ops':>11} {'syncs':>6} {'step ops':>9} {'syncs':>6} "
          f"{'step/fwd+bwd':>13}")
    for moving, track in ((False, False), (True, False), (True, True)):
        c = count_step(model, x, track_stats=track, moving=moving)
        print(f"{'moving' if moving else 'held':<8} {track!s:<12} {c.forward_backward:>11} "
              f"{c.forward_backward_syncs:>6} {c.step:>9} {c.step_syncs:>6} {c.ratio:>13.2f}")
        if args.top:
            for func, n in c.step_ops.most_common(args.top):
                print(f"    {n:>6}  {func}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
