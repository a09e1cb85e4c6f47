"""DDP on CPU (gloo, 2 processes): masks agree on every rank after every step; SyncBN conversion."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import spre_fx

from ._dist import end_worker, rendezvous
from .nets import Block


def _worker(rank: int, world: int, init_method: str, steps: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights; DDP also broadcasts rank 0's
    model = spre_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8), Block(8)))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    sched = spre_fx.MaskScheduler(ddp, opt)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    agree = []
    for _ in range(steps):
        x = torch.randn(4, 3, 10, 10, generator=g)
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
        bufs = [b for n, b in model.named_buffers() if n.endswith("_mask")]
        flat = torch.cat([b.flatten().to(torch.uint8) for b in bufs])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        agree.append(all(torch.equal(gathered[0], t) for t in gathered))
    torch.save({"agree": agree, "step": sched.step}, os.path.join(result_dir, f"rank{rank}.pt"))
    end_worker()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_masks_identical_on_every_rank(tmp_path):
    world, steps = 2, 4
    mp.start_processes(_worker, args=(world, rendezvous(tmp_path), steps, str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["step"] == steps
        assert res["agree"] == [True] * steps


def test_convert_sync_batchnorm_after_prepare_keeps_branches():
    torch.manual_seed(0)
    p = spre_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8)))
    x = torch.randn(2, 3, 8, 8)
    p.eval()
    ref = p(x)
    s = spre_fx.convert_sync_batchnorm(p)
    assert isinstance(s[1].bn1, nn.SyncBatchNorm) and isinstance(s[1].bn1.rep, nn.SyncBatchNorm)
    assert "bn1.rep.weight" in dict(s[1].named_parameters())
    torch.testing.assert_close(s(x), ref, rtol=0, atol=0)
    spre_fx.verify(s, spre_fx.convert(s), x)
    q = spre_fx.prepare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(8))).eval()
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(q)
    with pytest.raises(TypeError, match="spre_fx.convert_sync_batchnorm"):
        torch_sync(x)
