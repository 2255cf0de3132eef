"""Where numba keeps vcell's compiled kernels when it cannot keep them where it would.

Every kernel is compiled with ``cache=True``. numba caches beside the source (the package's
``__pycache__``) or in the user's cache folder, and when neither is writable it refuses to define
the kernel at all, so every command died at import with a numba traceback: a read-only install (a
container image, a shared cluster install) run by a user whose home is not writable. vcell then
points numba at a per-user folder in the temporary directory instead.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile


def _writable(folder: str) -> bool:
    """Whether files can be made in ``folder`` (created if missing), as numba tests its cache folders."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def user_cache_folder() -> str:
    """numba's per-user cache folder on this platform."""
    if sys.platform == "darwin":
        return os.path.expanduser("~/Library/Caches/numba")
    if sys.platform.startswith("win"):
        return os.path.join(os.environ.get("LOCALAPPDATA", os.path.expanduser("~")), "numba", "Cache")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba")


def _fresh() -> str | None:
    try:
        return tempfile.mkdtemp(prefix="vcell-numba-")
    except OSError:  # no writable temporary folder either: numba says so when it needs one
        return None


def _private_folder() -> str | None:
    """``$TMPDIR/vcell-numba-UID``, made private to this user; a fresh folder when that name is
    taken by something else (numba loads what it finds there: another user's files must not be)."""
    if not hasattr(os, "getuid"):  # not POSIX: no shared temporary folder to guard
        return _fresh()
    folder = os.path.join(tempfile.gettempdir(), f"vcell-numba-{os.getuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return _fresh()
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return _fresh()
    return folder


def ensure_cache_folder() -> str | None:
    """Set ``NUMBA_CACHE_DIR`` to a folder under the temporary directory when numba has nowhere to
    cache (not set, package and user cache folder not writable); returns that folder, else ``None``."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    package = os.path.dirname(os.path.abspath(__file__))
    if _writable(os.path.join(package, "__pycache__")) or _writable(user_cache_folder()):
        return None
    folder = _private_folder()
    if folder is None:
        return None
    os.environ["NUMBA_CACHE_DIR"] = folder
    if "numba" in sys.modules:  # numba read its settings when it was imported
        sys.modules["numba"].config.CACHE_DIR = folder
    return folder
