"""gpu_check.md and gpu_check.json: a header, the parts' status table, each part's section, and
the checks table (what prints last)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from .common import table, verdict


def markdown(result: dict, parts: dict[str, ModuleType]) -> tuple[str, str]:
    """(full report, summary): the summary is what prints last. `parts` maps a part's name to its
    module, whose `report(rec, dry)` gives its section and its checks."""
    p, dry = result["parts"], result["dry_run"]
    env = p.get("env", {})
    head = [
        f"# gpu_check {'(dry run, CPU)' if dry else ''}",
        "",
        f"{result['started']}; {env.get('gpu', 'no GPU')} (capability {env.get('capability', '-')}); torch "
        f"{env.get('torch', torch.__version__)}, CUDA {env.get('cuda')}, cuSPARSELt {env.get('cusparselt')}, "
        f"triton {env.get('triton')}; `{result['command']}`; {result['wall_s']:.0f} s of a "
        f"{result['budget_s']:.0f} s budget",
        "",
    ]
    status = table(
        ["part", "status", "s", "note"],
        [
            [
                k,
                v.get("status"),
                v.get("seconds"),
                "; ".join(
                    [v.get("reason", "")] + [f"skipped {a}: {b}" for a, b in v.get("skipped", {}).items()]
                ).strip("; ")[:300],
            ]
            for k, v in p.items()
        ],
    )
    full, summary = [*head, "## Parts", *status, ""], [*head, *status, ""]
    checks = []
    for name, rec in p.items():
        lines, rows = parts[name].report(rec, dry)
        full += lines
        checks += [[*row[:3], verdict(dry, row[3])] for row in rows]
    checks_table = ["## Checks", *table(["check", "measured", "goal", "met"], checks)]
    return "\n".join([*full, *checks_table]) + "\n", "\n".join([*summary, *checks_table]) + "\n"


def write(result: dict, out: Path, start: float, parts: dict[str, ModuleType]) -> str:
    """Rewrite the JSON and the markdown; returns the summary. The JSON is written first, and a
    table that fails to render is replaced by its traceback: the numbers are never lost."""
    result["wall_s"] = time.monotonic() - start
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        full, summary = markdown(result, parts)
    except Exception:
        full = summary = f"markdown failed (the numbers are in gpu_check.json):\n{traceback.format_exc()}"
    (out / "gpu_check.md").write_text(full)
    return summary
