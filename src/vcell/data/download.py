"""Resumable, verifying downloads into the dataset cache.

:func:`download` writes ``<cache>/<filename>.part`` (with its HTTP validators in
``<filename>.part.json``) and renames it onto ``<cache>/<filename>`` only once it is complete and
verified, so a file under the final name is always whole. An interrupted download is resumed
with an HTTP ``Range`` request. A verified SHA-256 is recorded in ``.<filename>.sha256`` (with
the file's size and mtime) so later calls need not hash multi-GB files again, and a lock file
``.<filename>.lock`` keeps two processes from downloading the same file at once.

Which datasets exist and where they come from is :mod:`vcell.data.registry`'s business; this
module only needs each dataset's name, URL, file name and optional size and checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vcell._version import __version__
from vcell.data.staging import held_exclusively
from vcell.errors import VcellError

CACHE_ENV = "VCELL_CACHE_DIR"
DEFAULT_TIMEOUT = 60.0

_CHUNK = 1 << 20
_USER_AGENT = f"vcell/{__version__}"

ProgressCallback = Callable[[int, int | None], None]


class DatasetFile(Protocol):
    """What :func:`download` needs to know about a dataset.

    A :class:`~vcell.data.registry.DatasetInfo` is one.

    Attributes
    ----------
    name
        Dataset name, for messages.
    url
        Direct http(s) download URL.
    filename
        Plain file name inside the cache directory.
    size_bytes, sha256
        Exact size and hex SHA-256, verified after download; ``None`` when unknown.
    """

    name: str
    url: str
    filename: str
    size_bytes: int | None
    sha256: str | None


# --------------------------------------------------------------------------------------------
# Cache and checksums


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Directory where datasets are downloaded.

    ``path`` if given, else ``$VCELL_CACHE_DIR``, else the platform's user cache directory for
    ``vcell`` (e.g. ``~/.cache/vcell`` on Linux). The directory is not created.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vcell"))


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(chunk_size):
                digest.update(chunk)
    except OSError as exc:
        raise VcellError(f"{path}: cannot read file to compute its checksum ({exc.strerror or exc})") from exc
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Download


def download(info: DatasetFile, directory: Path, *, force: bool = False,
             progress: ProgressCallback | None = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download one dataset file into ``directory`` (resuming a partial download).

    Parameters
    ----------
    info
        The dataset: name, URL, file name, and the size and SHA-256 to verify when known.
    directory
        The cache directory; created if missing.
    force
        Download again even if a valid file is cached (the old file stays until the new one is
        complete).
    progress
        Called as ``progress(bytes_done, total_bytes_or_None)`` as data arrives.
    timeout
        Seconds to wait for the server on connect and on each read.

    Returns
    -------
    Path
        ``directory / info.filename``, complete and verified. A cached file that passes
        verification is returned without touching the network.

    Raises
    ------
    VcellError
        Network or HTTP failure, size or checksum mismatch, a file system error, or another
        process downloading the same file; the message names the dataset and the URL or file.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VcellError(f"{directory}: cannot create cache directory ({exc.strerror or exc})") from exc
    if not directory.is_dir():
        raise VcellError(f"{directory}: cache path exists and is not a directory")
    final = directory / info.filename
    part = directory / f"{info.filename}.part"

    with held_exclusively(directory / f".{info.filename}.lock",
                          f"another vcell process is downloading {info.name} into {directory}; wait for it to finish"):
        if force:
            _discard(part)
        elif final.is_file() and _is_valid(final, info):
            return final
        _download_part(info, part, timeout, progress)
        _verify(info, part)
        try:
            os.replace(part, final)
        except OSError as exc:
            raise VcellError(f"{final}: cannot move finished download into place ({exc.strerror or exc})") from exc
        _meta_path(part).unlink(missing_ok=True)
        if info.sha256:
            _write_stamp(final, info.sha256)
    return final


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _read_meta(part: Path) -> dict | None:
    try:
        meta = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(part: Path, meta: dict) -> None:
    try:
        _meta_path(part).write_text(json.dumps(meta), encoding="utf-8")
    except OSError as exc:
        raise VcellError(f"{_meta_path(part)}: cannot write ({exc.strerror or exc})") from exc


def _stamp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.sha256")


def _write_stamp(final: Path, digest: str) -> None:
    # Records that this exact file (size, mtime) was hashed, so later fetches skip re-hashing
    # multi-GB files; any change to the file invalidates the stamp.
    st = final.stat()
    with contextlib.suppress(OSError):
        _stamp_path(final).write_text(
            json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}),
            encoding="utf-8")


def _is_valid(final: Path, info: DatasetFile) -> bool:
    st = final.stat()
    if info.size_bytes is not None and st.st_size != info.size_bytes:
        return False
    if not info.sha256:
        return st.st_size > 0
    try:
        stamp = json.loads(_stamp_path(final).read_text(encoding="utf-8"))
        if stamp == {"sha256": info.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(final) != info.sha256:
        return False
    _write_stamp(final, info.sha256)
    return True


def _fail(info: DatasetFile, problem: str) -> VcellError:
    return VcellError(f"could not download {info.name} from {info.url}: {problem}")


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``(start, total)`` from ``bytes 10-99/100`` or ``bytes */100``; None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _download_part(info: DatasetFile, part: Path, timeout: float, progress: ProgressCallback | None) -> None:
    # A few attempts: a stale or mismatched .part is discarded and the download restarted.
    for _attempt in range(3):
        meta = _read_meta(part)
        offset = part.stat().st_size if part.is_file() else 0
        if offset and (meta is None or meta.get("url") != info.url):
            # We cannot tell where these bytes came from, so they cannot be resumed safely.
            _discard(part)
            offset, meta = 0, None
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            etag = meta.get("etag")
            validator = etag if etag and not etag.startswith("W/") else meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator
        try:
            response = urllib.request.urlopen(urllib.request.Request(info.url, headers=headers),
                                              timeout=timeout)
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                if exc.code == 416 and offset:
                    total = _content_range(exc.headers.get("Content-Range"))[1] or meta.get("total")
                    if total == offset:
                        return  # the .part already holds the whole file
                    _discard(part)
                    continue
                raise _fail(info, f"HTTP {exc.code} {exc.reason}".strip()) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            raise _fail(info, _reason(exc, timeout)) from None

        with response:
            status = response.status
            if offset and status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset or (total and meta.get("total") and total != meta["total"]):
                    _discard(part)  # the server sent another range, or the file changed
                    continue
                mode = "ab"
                if total and not meta.get("total"):
                    _write_meta(part, {**meta, "total": total})
            elif status == 200:
                # A full response: the server ignored Range, or If-Range found the file changed.
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                _write_meta(part, {"url": info.url, "total": total,
                                   "etag": response.headers.get("ETag"),
                                   "last_modified": response.headers.get("Last-Modified")})
            else:
                raise _fail(info, f"unexpected HTTP status {status}")
            if info.size_bytes is not None and total is not None and total != info.size_bytes:
                _discard(part)
                raise _fail(info, f"server reports {total} bytes but the registry expects "
                                  f"{info.size_bytes}")
            _stream(info, response, part, mode, offset, total, timeout, progress)
            return
    _discard(part)
    raise _fail(info, "the server kept sending inconsistent partial responses; "
                      "the partial download was deleted, try again")


def _stream(info: DatasetFile, response, part: Path, mode: str, done: int, total: int | None,
            timeout: float, progress: ProgressCallback | None) -> None:
    try:
        fh = open(part, mode)
    except OSError as exc:
        raise VcellError(f"{part}: cannot write download ({exc.strerror or exc})") from exc
    with fh:
        if progress:
            progress(done, total)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                fh.flush()
                raise _lost(info, part, done, total, _reason(exc, timeout)) from None
            if not chunk:
                break
            try:
                fh.write(chunk)
            except OSError as exc:
                raise VcellError(f"{part}: cannot write download ({exc.strerror or exc}); "
                                 "free space and run again to resume") from exc
            done += len(chunk)
            if progress:
                progress(done, total)
        try:
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            raise VcellError(f"{part}: cannot write download ({exc.strerror or exc})") from exc
    if total is not None and done < total:
        raise _lost(info, part, done, total, "connection closed early")


def _lost(info: DatasetFile, part: Path, done: int, total: int | None, why: str) -> VcellError:
    of = f" of {total}" if total is not None else ""
    return _fail(info, f"{why} after {done}{of} bytes; partial download kept at {part}, "
                       "run again to resume")


def _verify(info: DatasetFile, part: Path) -> None:
    size = part.stat().st_size
    if size == 0:
        _discard(part)
        raise _fail(info, "the server sent an empty file")
    if info.size_bytes is not None and size != info.size_bytes:
        _discard(part)
        raise _fail(info, f"got {size} bytes but the registry expects {info.size_bytes}; "
                          "the download was deleted")
    if info.sha256:
        got = sha256_file(part)
        if got != info.sha256:
            _discard(part)
            raise VcellError(f"checksum mismatch for {info.name} from {info.url}: expected sha256 "
                             f"{info.sha256}, got {got}; the download was deleted")
