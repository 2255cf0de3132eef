"""vcell runs from a read-only install whose user has no writable home: numba's cache moves to the
temporary directory instead of every kernel failing at import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vcell
from vcell import _numba_cache

from conftest import private_mounts


def test_cache_folder_is_left_alone_where_numba_can_cache(monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert _numba_cache.ensure_cache_folder() is None  # this checkout's package folder is writable
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")
    monkeypatch.setattr(_numba_cache, "_writable", lambda folder: False)
    assert _numba_cache.ensure_cache_folder() is None  # the user's choice stands


def test_nowhere_to_cache_moves_it_to_the_temporary_directory(monkeypatch, tmp_path):
    import numba

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(_numba_cache, "_writable", lambda folder: False)
    monkeypatch.setattr(_numba_cache.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)
    folder = _numba_cache.ensure_cache_folder()
    assert folder is not None and Path(folder).parent == tmp_path
    assert os.environ["NUMBA_CACHE_DIR"] == folder and numba.config.CACHE_DIR == folder



@pytest.mark.skipif(not private_mounts(), reason="needs `unshare -m` and mount rights to make the install read-only for one run")
def test_read_only_install_without_a_home_runs(tmp_path):
    """The package folder and HOME read-only (a bind mount in a private namespace, as in a container
    image run as another user): a command that compiles kernels runs, caching them under TMPDIR."""
    package = Path(vcell.__file__).parent
    home = package / "no-home"  # inside the read-only mount: cannot be created
    data = tmp_path / "sim.h5ad"
    vcell_cli = f"{sys.executable} -m vcell"
    script = (f"mount --bind {package} {package} && mount -o remount,ro,bind {package} && "
              f"export HOME={home} XDG_CACHE_HOME={home} TMPDIR={tmp_path} && "
              f"{vcell_cli} data simulate {data} --n-genes 50 --n-perturbations 3 --n-combinations 0 && {vcell_cli} data check {data}")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    cached = list(tmp_path.glob("vcell-numba-*/**/*.nbi"))
    assert cached, "nothing cached under TMPDIR"


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX user ids")
def test_a_cache_folder_others_can_write_is_not_used(monkeypatch, tmp_path):
    """numba loads what it finds in its cache folder: a ``vcell-numba-UID`` that another user made
    (or left writable to all) is not taken; a fresh private folder is."""
    monkeypatch.setattr(_numba_cache.tempfile, "tempdir", str(tmp_path))
    mine = _numba_cache._private_folder()
    assert mine == str(tmp_path / f"vcell-numba-{os.getuid()}") and (os.stat(mine).st_mode & 0o777) == 0o700
    os.chmod(mine, 0o777)  # as if someone else had made it for us
    other = _numba_cache._private_folder()
    assert other != mine and Path(other).parent == tmp_path and (os.stat(other).st_mode & 0o777) == 0o700
