"""Build the wheel from the checkout and smoke-test it installed, with torch alone.

    python scripts/check_wheel.py [--keep DIR]

1. copies the checkout's files (tracked and untracked-not-ignored: what a fresh clone plus your
   edits holds) to a temporary directory and builds the wheel there with pip (no network: the
   build backend, setuptools, comes from this interpreter's environment);
2. checks that every file under spre_fx/ and integrations/ is in the wheel (a subpackage missing
   from pyproject.toml's list shows up here, named);
3. makes a venv whose only packages are torch and what torch itself requires (no numpy,
   torchvision, timm or mmdet: linked from this interpreter's site-packages, so nothing is
   downloaded), installs the wheel into it with pip, and runs scripts/wheel_smoke.py with it in
   isolated mode (-I) from a directory outside the checkout.

tests/test_install.py runs the same functions (so `make test` does); this script prints what
each step took.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).resolve().with_name("wheel_smoke.py")
# Directory in the checkout -> the package path it ships under.
SHIPPED = {"spre_fx": "spre_fx", "integrations": "spre_fx/integrations"}
_NEVER_SHIPPED = re.compile(r"(^|/)__pycache__/|\.py[co]$")


def checkout_files(root: Path = ROOT) -> list[str]:
    """The checkout's files, relative to `root`: tracked and untracked-but-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return sorted({f for f in out.decode().split("\0") if f and (root / f).is_file()})


def build_wheel(out: Path, root: Path = ROOT) -> Path:
    """The wheel pip builds from a copy of the checkout's files (the checkout gets no build/)."""
    src = out / "src"
    for rel in checkout_files(root):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, src / rel)
    dist = out / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(dist), str(src)],
                   check=True)
    (wheel,) = dist.glob("spre_fx-*.whl")
    return wheel


def missing_from_wheel(wheel: Path, root: Path = ROOT) -> list[str]:
    """The checkout's files under spre_fx/ and integrations/ that the wheel does not hold."""
    with zipfile.ZipFile(wheel) as z:
        held = set(z.namelist())
    missing = []
    for rel in checkout_files(root):
        top, _, rest = rel.partition("/")
        if top in SHIPPED and rest and not _NEVER_SHIPPED.search(rel):
            if f"{SHIPPED[top]}/{rest}" not in held:
                missing.append(rel)
    return missing


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> list[metadata.Distribution]:
    """torch and every distribution it requires, recursively (extras left out), as installed here."""
    found: dict[str, metadata.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = _canonical(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        found[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return list(found.values())


def torch_only_env(dest: Path) -> Path:
    """A venv at `dest` that sees torch and its own requirements only; returns its python.

    They are linked, top-level entry by entry, into `dest/torch-only`, which a .pth file puts
    on the venv's path: nothing is copied or downloaded.
    """
    site = dest / "torch-only"
    site.mkdir(parents=True)
    for dist in torch_closure():
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if top == "__pycache__" or top.endswith(".pth") or (site / top).exists():
                continue
            (site / top).symlink_to(base / top)
    venv.create(dest / "venv", with_pip=False, symlinks=True)
    python = dest / "venv" / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([str(python), "-I", "-c", query], check=True, capture_output=True,
                             text=True).stdout.strip()
    Path(purelib, "torch_only.pth").write_text(f"{site}\n")
    return python


def install(python: Path, wheel: Path) -> None:
    """pip install the wheel into the environment of `python`, offline and without resolving its
    requirements (30 s on a loaded machine): wheel_smoke.py checks that each is installed."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--disable-pip-version-check", "--no-index", "--no-deps", "--no-compile", str(wheel)],
                   check=True)


def run_smoke(python: Path, workdir: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    """scripts/wheel_smoke.py, run by `python` in isolated mode from `workdir`."""
    script = workdir / SMOKE.name
    shutil.copy2(SMOKE, script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(python), "-I", str(script), str(root)], cwd=workdir, env=env,
                          capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in this (new) directory and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="spre_fx_wheel_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        wheel = build_wheel(work / "build")
        print(f"built {wheel.name} in {time.perf_counter() - t:.1f} s")
        missing = missing_from_wheel(wheel)
        if missing:
            print(f"missing from the wheel: {missing}")
            return 1
        t = time.perf_counter()
        python = torch_only_env(work / "env")
        install(python, wheel)
        print(f"torch-only venv and install in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        (work / "run").mkdir()
        result = run_smoke(python, work / "run")
        print(result.stdout + result.stderr, end="")
        print(f"smoke run in {time.perf_counter() - t:.1f} s")
        return result.returncode
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
