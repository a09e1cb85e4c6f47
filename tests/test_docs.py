"""The docs hold together: every cited section of docs/method.md exists, every relative link and
anchor in the Markdown pages resolves, and (once the code's citations are replaced) nothing cites
the file outside the repository that the method used to be described in."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
PAGES = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "integrations").rglob("*.md")])
_SKIP_DIRS = {"out", "build", "dist", "node_modules", "__pycache__"}
_TEXT = {".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".yaml", ".yml", ".c"}

# "method.md §3", "method.md §2-§3", "method.md §1-2": every number in the citation.
_CITATION = re.compile(r"method\.md\)?\s*§(\d+)(?:\s*[-–]\s*§?(\d+))?")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _repo_text_files() -> list[Path]:
    """The project's text files; hidden folders (.git, .venv), outputs and caches are not entered."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in _SKIP_DIRS or d.endswith(".egg-info"))]
        files += [Path(folder, n) for n in names if Path(n).suffix in _TEXT or n == "Makefile"]
    return files


def _prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: Counter = Counter()
    anchors = set()
    for line in _prose_lines(path):
        m = _HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def _method_sections() -> set[int]:
    numbers = set()
    for line in _prose_lines(METHOD):
        m = _HEADING.match(line)
        if m and (s := re.match(r"§(\d+)\b", m.group(2))):
            numbers.add(int(s.group(1)))
    return numbers


def test_method_sections_are_numbered_in_order():
    sections = _method_sections()
    assert sections, "docs/method.md has no '## §n' headings"
    assert sections == set(range(1, max(sections) + 1)), sorted(sections)
    assert {1, 2, 3, 4, 5} <= sections  # the topics the code cites: masks, S, branch, collapse, recipe


def test_every_cited_method_section_exists():
    sections = _method_sections()
    missing = []
    for path in _repo_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in _CITATION.finditer(line):
                low, high = int(m.group(1)), int(m.group(2) or m.group(1))
                missing += [f"{path.relative_to(ROOT)}:{number}: §{n}"
                            for n in range(low, high + 1) if n not in sections]
    assert not missing, "cited sections missing from docs/method.md:\n" + "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for line in _prose_lines(page):
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("page, needs", [("docs/lightning.md", ("lightning", "torchvision")),
                                         ("docs/transformers.md", ("transformers", "accelerate"))])
def test_integration_guide_snippet_runs(page, needs, tmp_path, monkeypatch):
    """The guide's first Python block runs as printed: a real two-step fit, its deployment verified."""
    for module in needs:
        pytest.importorskip(module, reason=f"{page} needs {module}: pip install -e .[dev]")
    monkeypatch.chdir(tmp_path)  # what the snippet writes (checkpoints, spre_deploy/) stays here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace = {"__name__": "__snippet__"}
    exec(compile(_python_blocks(ROOT / page)[0], page, "exec"), namespace)
    deployment = namespace["spre"].deployment
    assert deployment.verification.output_error <= 1e-5
    assert not any(deployment.verification.nm_violations.values())
    assert sorted(os.listdir(next(tmp_path.rglob("spre_deploy")))) == [
        "deployed.pt", "spre_report.json", "spre_report.txt"]


def test_nothing_cites_the_out_of_tree_method_file():
    old = "SPRE" + ".md"  # spelt in two parts so that this file does not cite it
    citing = sorted(
        f"{p.relative_to(ROOT)}:{i}"
        for p in _repo_text_files()
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if old in line
    )
    assert not citing, f"{len(citing)} lines still cite {old} (use docs/method.md §n):\n" + "\n".join(citing)


# Code blocks the docs mark as tested run as they are written, each in a fresh namespace and an
# empty working directory (~15 s on one core: two ResNet-18s, a RepVGG-A0).
TESTED = "<!-- tested: tests/test_docs.py runs this block -->"


def _tested_blocks() -> list:
    blocks = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() != TESTED:
                continue
            assert lines[i + 1].strip() == "```python", f"{page.name}:{i + 2}: not a python fence"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip().startswith("```"))
            code = "\n".join(lines[i + 2:end])
            blocks.append(pytest.param(page, i + 3, code, id=f"{page.relative_to(ROOT)}:{i + 3}"))
    return blocks


def test_the_docs_mark_their_snippets_as_tested():
    pages = {b.values[0].name for b in _tested_blocks()}
    assert {"deploy.md", "training.md"} <= pages, pages


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("page", "line", "code"), _tested_blocks())
def test_tested_snippets_run(page: Path, line: int, code: str, tmp_path, monkeypatch):
    for package in ("torchvision", "timm"):
        if re.search(rf"^import .*\b{package}\b|^from {package}\b", code, re.M):
            pytest.importorskip(package, reason=f"the snippet imports {package}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__snippet__"})


_SYNCBN_ON_CPU = """
import sys, torch, torch.distributed as dist
from torch import nn
import spre_fx
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
x = torch.randn(2, 8, 4, 4)
plain = spre_fx.prepare(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)))
for model in (nn.SyncBatchNorm(8), spre_fx.convert_sync_batchnorm(plain)):
    try:
        model(x)
        print("ran")
    except ValueError as error:
        print("refused:", error)
model.eval()
model(x)
print("eval ran")
dist.destroy_process_group()
"""


def test_training_md_syncbn_on_cpu_is_refused_by_torch(tmp_path):
    """docs/training.md: torch refuses SyncBatchNorm (and so spre_fx's synchronised SpRe norm) in
    training on CPU once a process group exists, even with one process; eval mode runs. In a
    subprocess: a gloo group may abort its process at exit (docs/training.md)."""
    import subprocess
    import sys

    pytest.importorskip("torch.distributed")
    done = subprocess.run([sys.executable, "-c", _SYNCBN_ON_CPU, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = done.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["refused", "refused", "eval ran"], (
        done.stdout + done.stderr)
    assert all("SyncBatchNorm expected input tensor to be on GPU" in ln for ln in lines[:2])


class _NoisyCase:
    """A detection-zoo case whose build prints and logs to stdout, from Python and from C."""

    id = "noisy"

    @staticmethod
    def build():
        import logging
        import os

        from torch import nn

        print("noise from print")
        logger, handler = logging.getLogger("noisy"), logging.StreamHandler(__import__("sys").stdout)
        logger.addHandler(handler)
        logger.warning("noise from a logging handler on stdout")
        logger.removeHandler(handler)
        os.write(1, b"noise from file descriptor 1\n")
        return nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))

    @staticmethod
    def prepare(model):
        import spre_fx

        return spre_fx.prepare(model)


def test_detection_support_writes_only_the_table_to_stdout(capfd):
    pytest.importorskip("torchvision", reason="the script imports the detection zoo")
    import importlib.util

    path = ROOT / "scripts" / "detection_support.py"
    spec = importlib.util.spec_from_file_location("detection_support", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capfd.readouterr()
    script.main([], cases=[_NoisyCase()])
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[:2] == ["| model | spre | nm | dense | reasons (count) |", "|---|---|---|---|---|"]
    assert len(lines) == 3 and lines[2].startswith("| noisy | 1 | 0 | 1 |"), out  # stem dense, SpRe
    for noise in ("[1/1] noisy", "noise from print", "logging handler", "file descriptor 1"):
        assert noise in err, err
