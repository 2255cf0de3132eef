"""Shared test fixtures: the real datasets in ../shared/data and a CLI runner."""

from __future__ import annotations

import functools
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
#: Test files started first in a parallel run: the README quick start is the longest single test
#: (~2 min alone); started last, it ran alone at the end of `make test`.
FIRST = ("tests/test_quickstart.py",)


def pytest_collection_modifyitems(config, items):
    """Order the files as `make test` hands them to its workers (``--dist loadfile
    --no-loadscope-reorder``): ``FIRST``, then the others from the most tests to the fewest
    (pytest-xdist's own order). A file's tests keep their order."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(files.items(), key=lambda kv: (kv[0] not in FIRST, -len(kv[1])))
    items[:] = [item for _, group in order for item in group]


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


@functools.cache
def private_mounts() -> bool:
    """Whether ``unshare -m`` may mount in a private namespace here (a small tmpfs, a read-only bind):
    how tests give one real run a small disk, a small /dev/shm or a read-only install (root, Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt && mount --bind / /mnt && mount -o remount,ro,bind /mnt"
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m vcell ARGS`` in a real subprocess and return the completed process."""
    # no timed progress lines (VCELL_PROGRESS_EVERY) on a slow machine unless a test asks for them
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "VCELL_PROGRESS_EVERY": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vcell", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_BATCH = """
import contextlib, io, json, os, sys, traceback
from vcell.cli import main

results = []
for argv, cwd in json.loads(open(sys.argv[1]).read()):
    out, err, code = io.StringIO(), io.StringIO(), 0
    if cwd:
        os.chdir(cwd)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 99
    results.append({"args": argv, "returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_cli_batch(commands: list, cwds: list | None = None, timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """Run several ``vcell`` command lines one after the other in ONE real subprocess, through the
    CLI's entry point (``vcell.cli.main``), each with its own exit status, output and working folder
    (``cwds``): the interpreter and its imports start once, not once per command."""
    import json
    import tempfile

    cwds = cwds or [None] * len(commands)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[[str(a) for a in argv], str(cwd) if cwd else None] for argv, cwd in zip(commands, cwds)], f)
    try:
        proc = subprocess.run([sys.executable, "-c", _BATCH, f.name], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "VCELL_PROGRESS_EVERY": "0"})
    finally:
        os.unlink(f.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [subprocess.CompletedProcess(r["args"], r["returncode"], r["stdout"], r["stderr"])
            for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a CLI run that failed on a user mistake (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def cli_in_process():
    """``vcell.cli.main`` for in-process CLI runs; the logging setup it installs (levels, handlers,
    the say-once filter) is undone afterwards so later tests' ``caplog`` sees vcell's lines."""
    import logging

    from vcell.cli import main

    names = ["", "vcell", "vcell.inferred"]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), list(logging.getLogger(n).filters)) for n in names}
    yield main
    for n, (level, handlers, filters) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.handlers[:], logger.filters[:] = handlers, filters
