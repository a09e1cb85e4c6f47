"""tests/tolerance.py and the hypothesis profiles of tests/conftest.py: the test suite's own rules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from tests.conftest import hypothesis_profile
from tests.tolerance import assert_within, sum_bound


def _sums(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `n` products whose float32 sums nearly cancel: each row is a random vector and
    its negation, shuffled, plus one small term, so |sum| ≪ Σ|terms|."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randn(64, n // 2, generator=g, dtype=torch.float64)
    nearly = -half * (1 + 1e-6 * torch.randn(half.shape, generator=g, dtype=torch.float64))
    terms = torch.cat([half, nearly], 1)
    return terms[:, torch.randperm(terms.shape[1], generator=g)], terms.abs().sum(1)


def test_the_bound_passes_a_cancelling_sum_that_a_relative_tolerance_fails():
    terms, magnitude = _sums(512)
    exact = terms.sum(1)
    got = terms.float().sum(1)
    relative = (got.double() - exact).abs().max() / exact.abs().max()
    assert relative > 1e-5  # the old rule, rtol 1e-5 of max|expected|, fails this correct sum
    assert_within(got, exact, magnitude, torch.float32, terms=512)


def test_the_bound_fails_a_sum_missing_one_term():
    terms, magnitude = _sums(512)
    exact = terms.sum(1)
    missing = terms[:, 1:].float().sum(1)  # one product of 512 left out
    with pytest.raises(AssertionError, match="beyond the rounding bound"):
        assert_within(missing, exact, magnitude, torch.float32, terms=512)


def test_the_bound_refuses_sums_too_long_for_a_first_order_bound():
    assert sum_bound(torch.float32, 1000) < 2.5e-4
    with pytest.raises(ValueError, match="terms"):
        sum_bound(torch.float16, 100)


@pytest.mark.parametrize("env, profile", [
    ({}, "dev"), ({"CI": "true"}, "ci"), ({"CI": "1"}, "ci"), ({"CI": "false"}, "dev"), ({"CI": ""}, "dev"),
    ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"), ({"HYPOTHESIS_PROFILE": "ci"}, "ci"),
])
def test_ci_runs_the_derandomised_profile(env, profile):
    assert hypothesis_profile(env) == profile


def test_the_ci_profile_is_reproducible_and_checks_as_much():
    ci, dev = settings.get_profile("ci"), settings.get_profile("dev")
    assert ci.derandomize and ci.database is None and ci.print_blob and ci.deadline is None
    assert not dev.derandomize and dev.max_examples == ci.max_examples
