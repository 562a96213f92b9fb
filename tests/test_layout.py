"""The house rules for the package's shape: small modules, small classes, a tidy root."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300


def test_no_module_over_600_lines() -> None:
    too_long = {
        str(path.relative_to(ROOT)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := path.read_text().count("\n")) > MAX_MODULE_LINES
    }
    assert too_long == {}


def test_no_class_over_300_lines() -> None:
    too_long: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long[f"{path.relative_to(ROOT)}:{node.name}"] = size
    assert too_long == {}


def test_every_folder_of_the_package_is_a_package() -> None:
    folders = [p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert folders
    assert [str(f) for f in folders if not (f / "__init__.py").is_file()] == []


def test_nothing_stray_is_tracked_at_the_root() -> None:
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:  # not a git checkout (an unpacked archive): nothing to check
        return
    top = {line.split("/", 1)[0] for line in listed.stdout.splitlines()}
    expected = {
        ".ci",
        ".gitignore",
        "CHANGELOG.md",
        "README.md",
        "bench",
        "data",
        "dev",
        "docs",
        "jobs",
        "pipeline",
        "pyproject.toml",
        "scripts",
        "tests",
    }
    assert top - expected == set()
