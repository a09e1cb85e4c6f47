"""torch.compile of a prepared model (training, masks scheduled) and of a converted one (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

import spre_fx

from .nets import TinyNet, tiny_input

# Seen on torch 2.11.0: Inductor cannot lower the mask code's bool -> uint8 views ("torch.bool is
# not supported by torch.iinfo"); 2.12.1, 2.13.0 and 2.14.1 pass.
pytestmark = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12),
    reason=f"torch.compile of prepared models needs torch >= 2.12 (found {torch.__version__}): Inductor "
    "in 2.11 cannot lower a bool tensor viewed as uint8",
)


def _train(model, opt, x, steps):
    for _ in range(steps):
        out, aux = model(x)
        opt.zero_grad()
        (out.square().mean() + aux.square().mean()).backward()
        opt.step()


def test_compiled_training_matches_eager_and_converts():
    torch.manual_seed(0)
    x = tiny_input()
    eager = spre_fx.prepare(TinyNet())
    eager.drop.p = 0.0  # no dropout randomness: compiled and eager see the same computation
    compiled_model = copy.deepcopy(eager)
    runs = []
    for model, wrap in ((eager, lambda m: m), (compiled_model, torch.compile)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = spre_fx.MaskScheduler(model, opt)
        _train(wrap(model), opt, x, steps=3)
        runs.append((model, sched))
    (e, e_sched), (c, c_sched) = runs
    assert e_sched.step == c_sched.step == 3
    for (k, a), b in zip(e.state_dict().items(), c.state_dict().values()):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    c.eval()
    deployed = spre_fx.convert(c)
    fast = torch.compile(deployed)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), deployed(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast(x), c(x), rtol=1e-5, atol=1e-6)


def test_compiled_training_without_scheduler_follows_weights_like_eager():
    """Without a MaskScheduler the modules move their masks inside forward; compiled, that runs
    the torch mask code (no C kernel while tracing) and gives the masks eager gets."""
    torch.manual_seed(0)
    x = tiny_input()
    eager = spre_fx.prepare(TinyNet())
    eager.drop.p = 0.0
    compiled_model = copy.deepcopy(eager)
    for model, wrap in ((eager, lambda m: m), (compiled_model, torch.compile)):
        _train(wrap(model), torch.optim.SGD(model.parameters(), lr=0.05), x, steps=3)
    for (k, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), k
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
