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


def worker_threads(workers: int, cores: int, env: dict[str, str]) -> int | None:
    """Torch threads for each of `workers` pytest-xdist workers: the cores shared out among them,
    or None (torch's own choice) outside xdist or where OMP_NUM_THREADS already says."""
    if not workers or env.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // workers)


def pytest_configure(config) -> None:
    """Under `pytest -n N`, each worker takes its share of the cores as torch threads, and so do
    the scripts the tests start (OMP_NUM_THREADS). With torch's default, every core, in each of
    `-n 2`'s workers, four OpenMP threads spin on two cores: measured here at load ~5 (another
    suite's two workers beside), tests/test_convert.py took 99 s with two threads and 11.6 s
    with one, tests/test_verify.py 37 s and 6.4 s. Tests of the threaded kernels set their own
    thread counts (tests/test_native.py)."""
    workerinput = getattr(config, "workerinput", None)  # set in xdist's workers only
    if workerinput is None:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = worker_threads(int(workerinput["workercount"]), cores, dict(os.environ))
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
