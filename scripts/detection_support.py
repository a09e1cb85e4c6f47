"""What `prepare` gives each model of the detection zoo: counts of spre / nm / dense layers and the
reasons `spre_fx.report` prints, as the markdown of docs/support.md's detection section.

    .venv/bin/python scripts/detection_support.py > /tmp/detection_support.md

Builds every case of tests/test_detection_zoo.py (random weights) and prepares it; nothing trains.
Reasons that name a layer are grouped with the names replaced by <...>.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spre_fx  # noqa: E402
from tests.test_detection_zoo import MMDET_CASES, MMDET_CONFIGS, TV_CASES  # noqa: E402


def _generic(reason: str) -> str:
    reason = re.sub(r"'[^']*'", "'<...>'", reason)
    return re.sub(r"\(\d+\)", "(<C>)", reason)


def main() -> None:
    torch.set_num_threads(1)
    cases = TV_CASES + (MMDET_CASES if MMDET_CONFIGS is not None else [])
    print("| model | spre | nm | dense | reasons (count) |")
    print("|---|---|---|---|---|")
    for case in cases:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = spre_fx.report(case.prepare(case.build()))
        reasons = Counter(f"{lr.treatment}: {_generic(lr.reason)}" for lr in rep.layers)
        cell = "<br>".join(f"{n}× {r}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        counts = " | ".join(str(rep.count(t)) for t in ("spre", "nm", "dense"))
        print(f"| {case.id} | {counts} | {cell} |", flush=True)


if __name__ == "__main__":
    main()
