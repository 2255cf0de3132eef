"""Shared test fixtures: the real datasets in ../shared/data and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VCELL_SHARED_DATA", REPO.parent / "shared" / "data"))

MCFALINE = "mcfaline2023_norman2019.h5ad"
KANG = "kang2018_ifnb.h5ad"
PAPALEXI = "papalexi2021_thp1.h5ad"


FIXTURES = Path(__file__).resolve().parent / "data"


def shared_path(name: str) -> Path:
    """Path of a real dataset in ../shared/data; skips the test with a clear reason if absent.

    For tests that need the full file (its cell/gene counts, group sizes, ...)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real dataset {name} not found in {SHARED_DATA} (../shared/data beside the repo); "
                    "this test needs the full file, not its small subset in tests/data; skipping")
    return path


def real_data(name: str) -> Path:
    """The real dataset ``name``: the full file in ../shared/data if present, else its small subset
    in tests/data (built locally by tests/data/make_fixtures.py, not committed), else skips the test with a clear reason.

    For tests that hold on any subset of the data (oracle parity, layouts, round trips)."""
    path = SHARED_DATA / name
    if path.exists():
        return path
    small = FIXTURES / (name.removesuffix(".h5ad") + "_small.h5ad")
    if not small.exists():
        pytest.skip(f"real dataset {name} not found in {SHARED_DATA} (../shared/data beside the repo) "
                    f"and its fixture {small} is missing (python tests/data/make_fixtures.py); skipping")
    return small


@pytest.fixture
def mcfaline() -> Path:
    return shared_path(MCFALINE)


@pytest.fixture
def kang() -> Path:
    return shared_path(KANG)


@pytest.fixture
def papalexi() -> Path:
    return shared_path(PAPALEXI)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m vcell ARGS`` in a real subprocess and return the completed process."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vcell", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a CLI run that failed on a user mistake (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]
