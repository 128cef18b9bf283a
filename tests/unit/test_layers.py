"""The house's layering is held by import-linter's contracts (pyproject.toml): they pass on
the code, and they fail the moment an upward import, an I/O import into the journey grammar
or a cycle is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hilo.settings import PROJECT_ROOT

PACKAGES = ("hilo", "api", "worker", "workflows", "activities")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def house(tmp_path: Path) -> Path:
    """A copy of the code and its contracts, to break on purpose."""
    for package in PACKAGES:
        shutil.copytree(
            PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_code_keeps_every_contract() -> None:
    result = _lint(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("hilo/intake/upward.py", "import api.app\n", "Nothing imports upward"),
        ("hilo/journeys/storage.py", "import hilo.db.store\n", "do no I/O"),
        ("workflows/network.py", "import httpx\n", "do no I/O"),
        ("hilo/db/back.py", "import hilo.intake.dispatcher\n", "Nothing imports upward"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    house: Path, module: str, line: str, broken: str
) -> None:
    (house / module).write_text(line)
    result = _lint(house)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


def test_a_cycle_between_siblings_breaks_a_contract(house: Path) -> None:
    ids = house / "hilo" / "ids.py"
    ids.write_text(ids.read_text() + "\nimport hilo.clock  # noqa\n")
    clock = house / "hilo" / "clock.py"
    clock.write_text(clock.read_text() + "\nimport hilo.ids  # noqa\n")
    result = _lint(house)
    assert result.returncode != 0 and "No cycles are allowed" in result.stdout
