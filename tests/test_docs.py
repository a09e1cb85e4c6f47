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
