"""Render an HTML file to a PNG with headless Chromium (for checking a report by eye or in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vcell.data.io import atomic_path
from vcell.errors import VcellError

__all__ = ["find_chromium", "screenshot"]

_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    """Path of a Chromium executable (``/usr/bin/chromium`` or ``chromium`` on PATH), or None."""
    for name in _CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    width: int = 1400,
    height: int = 2400,
    timeout: float = 120.0,
) -> Path:
    """Render ``html_path`` with headless Chromium into a ``width`` x ``height`` PNG.

    The top ``height`` pixels of the page are captured. Chromium runs without network, GPU,
    sandbox or first-run extras, with a fresh throw-away profile. Raises :class:`VcellError`
    (one line) when Chromium is not installed or fails; the PNG is written atomically.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path)
    if not html_path.is_file():
        raise VcellError(f"{html_path}: file not found")
    if int(width) <= 0 or int(height) <= 0:
        raise VcellError(f"screenshot size must be positive, got {width}x{height}")
    exe = find_chromium()
    if exe is None:
        raise VcellError("chromium not found (looked for /usr/bin/chromium and chromium on PATH); install it, e.g. apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="vcell-chromium-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={Path(tmp) / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={int(width)},{int(height)}",
            html_path.as_uri(),
        ]
        env = {**os.environ, "HOME": tmp}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise VcellError(f"chromium did not finish rendering {html_path} within {timeout:g} s") from None
        except OSError as exc:
            raise VcellError(f"could not start chromium ({exe}): {exc}") from exc
        if not shot.is_file() or shot.stat().st_size == 0:
            tail = " ".join((proc.stderr or "").strip().splitlines()[-3:])
            raise VcellError(f"chromium (exit {proc.returncode}) wrote no screenshot of {html_path}: {tail or 'no message'}")
        with atomic_path(png_path) as out:
            shutil.copyfile(shot, out)
    return png_path
