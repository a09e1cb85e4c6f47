"""Part `pytest`: the `gpu`-marked tests (`pytest -m gpu`): summary line, log in pytest_gpu.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .common import ROOT, Context

NAME, CAP, NEED = "pytest", 60, 15


def run(ctx: Context, rec: dict) -> None:
    files = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    rec["command"] = " ".join(["python3", *cmd[1:]])
    timeout = max(1.0, ctx.deadline.left())
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        log, rec["returncode"] = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec["returncode"] = None
        rec["timeout_s"] = round(timeout)
    (ctx.out / "pytest_gpu.log").write_text(log)
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|skipped|error|deselected)\b", ln)]
    rec["summary"] = lines[-1].strip("= ") if lines else f"no summary (timed out after {timeout:.0f} s)"
    rec["counts"] = {
        k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", rec["summary"])
    }
    print(f"  pytest -m gpu: {rec['summary']}", flush=True)


def passed(counts: dict) -> bool:
    """Some tests ran and passed, none failed (all skipped on a GPU machine is a failure)."""
    return counts.get("passed", 0) > 0 and not any(counts.get(k) for k in ("failed", "error", "errors"))


def report(rec: dict, dry: bool) -> tuple[list[str], list[list]]:
    if "summary" not in rec:
        return [], []
    return [], [["pytest -m gpu", rec["summary"], "all pass", None if dry else passed(rec["counts"])]]
