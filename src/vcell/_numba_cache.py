"""Where numba keeps vcell's compiled kernels when it cannot keep them where it would.

Every kernel is compiled with ``cache=True``. numba caches beside the source (the package's
``__pycache__``) or in the user's cache folder, and when neither is writable it refuses to define
the kernel at all, so every command died at import with a numba traceback: a read-only install (a
container image, a shared cluster install) run by a user whose home is not writable. vcell then
points numba at a per-user folder in the temporary directory instead.
"""

from __future__ import annotations

import os
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


def ensure_cache_folder() -> str | None:
    """Set ``NUMBA_CACHE_DIR`` to a folder under the temporary directory when numba has nowhere to
    cache (not set, package and user cache folder not writable); returns that folder, else ``None``."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    package = os.path.dirname(os.path.abspath(__file__))
    if _writable(os.path.join(package, "__pycache__")) or _writable(user_cache_folder()):
        return None
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    folder = os.path.join(tempfile.gettempdir(), f"vcell-numba-{uid}")
    os.environ["NUMBA_CACHE_DIR"] = folder
    if "numba" in sys.modules:  # numba read its settings when it was imported
        sys.modules["numba"].config.CACHE_DIR = folder
    return folder
