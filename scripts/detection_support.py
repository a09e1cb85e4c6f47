"""What `prepare` gives each model of the detection zoo: counts of spre / nm / dense layers and the
reasons `spre_fx.report` prints, as the markdown of docs/support.md's detection section.

    .venv/bin/python scripts/detection_support.py > /tmp/detection_support.md
    .venv/bin/python scripts/detection_support.py --cases 'tv-*'    # a subset (fnmatch on ids)

Builds every case of tests/test_detection_zoo.py (random weights) and prepares it; nothing trains.
Reasons that name a layer are grouped with the names replaced by <...>. Only the table goes to
stdout: progress, and whatever the builds print or log (mmengine, warnings, C code), go to
stderr.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import IO

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spre_fx  # noqa: E402
from tests.test_detection_zoo import MMDET_CASES, MMDET_CONFIGS, TV_CASES  # noqa: E402


def _generic(reason: str) -> str:
    reason = re.sub(r"'[^']*'", "'<...>'", reason)
    return re.sub(r"\(\d+\)", "(<C>)", reason)


@contextmanager
def stdout_to_stderr() -> Iterator[IO[str]]:
    """Send stdout to stderr inside the block: `sys.stdout` and file descriptor 1 (so prints,
    logging handlers that hold the stdout object, and C code alike); yield a text file on the
    original stdout, for the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    table = os.fdopen(os.dup(saved), "w")
    try:
        with redirect_stdout(sys.stderr):
            yield table
    finally:
        table.close()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None, cases: list | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["*"], help="fnmatch patterns on the case ids")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if cases is None:
        cases = TV_CASES + (MMDET_CASES if MMDET_CONFIGS is not None else [])
    cases = [c for c in cases if any(fnmatch.fnmatch(c.id, p) for p in args.cases)]
    with stdout_to_stderr() as table:
        print("| model | spre | nm | dense | reasons (count) |", file=table)
        print("|---|---|---|---|---|", file=table, flush=True)
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.id}", file=sys.stderr, flush=True)
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rep = spre_fx.report(case.prepare(case.build()))
            reasons = Counter(f"{lr.treatment}: {_generic(lr.reason)}" for lr in rep.layers)
            ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
            cell = "<br>".join(f"{n}× {r}" for r, n in ranked)
            counts = " | ".join(str(rep.count(t)) for t in ("spre", "nm", "dense"))
            print(f"| {case.id} | {counts} | {cell} |", file=table, flush=True)


if __name__ == "__main__":
    main()
