"""Helpers for the tests that spawn gloo process groups on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist


def rendezvous(tmp_path: Path) -> str:
    """A `file://` init_method in the test's own temporary directory.

    No port is picked and released before the workers bind it (a race between xdist workers:
    another test could take the port in between); the file is private to the test.
    """
    path = Path(tmp_path) / "rendezvous"
    if path.exists():
        raise FileExistsError(f"{path} exists: a file rendezvous needs a new (or empty) file")
    return path.resolve().as_uri()


def end_worker() -> None:
    """Destroy the process group and leave the spawned worker without interpreter finalization.

    After a collective returns, a gloo worker thread may still hold the collective's tensors; when
    it drops them it takes the GIL to release their Python objects. If that happens while the
    interpreter is finalizing, the thread is unwound through a noexcept destructor and the
    process aborts ("terminate called without an active exception", SIGABRT, seen here once in
    10-20 runs; gdb: ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit).
    The worker has written its results by now, so it exits without finalizing.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
