"""Fixtures shared by several test modules, and the hypothesis profile of the run.

Hypothesis profiles (the `CI` environment variable, or HYPOTHESIS_PROFILE, picks one):
  ci   derandomised: every run tries the same examples (a CI failure is reproducible, and a
       green commit stays green); no example database; the failing example's blob printed.
  dev  the default elsewhere: new random examples every run, failures kept in .hypothesis/ and
       retried first, so local runs explore what CI's fixed examples do not.
Both keep each test's `max_examples` and strategies: the ci profile checks exactly as much as dev
does in one run, it only stops drawing new examples.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# too_slow: drawing examples is slow on a loaded machine, which says nothing about the code under test
settings.register_profile(
    "ci", derandomize=True, database=None, print_blob=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# hypothesis itself derandomises its default settings where it detects CI: "dev" says it is random
settings.register_profile("dev", derandomize=False, deadline=None, print_blob=True)


def hypothesis_profile(env: dict[str, str]) -> str:
    """HYPOTHESIS_PROFILE if set, else "ci" where CI is set to anything but false/0, else "dev"."""
    if env.get("HYPOTHESIS_PROFILE"):
        return env["HYPOTHESIS_PROFILE"]
    return "ci" if env.get("CI", "").strip().lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(hypothesis_profile(dict(os.environ)))


def pytest_report_header(config) -> str:
    return f"hypothesis profile: {settings.get_current_profile_name()}"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a loaded machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
