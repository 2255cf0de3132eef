"""Registry of public single-cell perturbation datasets: loading, merging and looking up entries.

The built-in entries live in the packaged file ``vcell/data/catalogue.toml`` (public files from
scPerturb on Zenodo, Replogle et al. 2022 on figshare+, Kang et al. 2018 as distributed by
pertpy). Users can add or override entries with a TOML file of the same format (argument or
``$VCELL_REGISTRY``); both are read by the same code::

    [datasets.mydata]
    url = "https://example.org/mydata.h5ad"
    filename = "mydata.h5ad"          # default: last part of the URL path
    sha256 = "<64 hex digits>"         # optional; verified after download
    size_bytes = 123456                # optional; verified after download
    title = "My screen"
    perturbation_type = "CRISPRi"      # CRISPRi, CRISPRa, KO, drug, cytokine or other
    pert_col = "gene"
    control = "non-targeting"
    context_col = "cell_line"          # "" means: a single context
    batch_col = "gem_group"            # "" means: no batch column
    expression = "counts"              # counts, log1p or "" (infer from the file)

An entry whose name matches a built-in one replaces only the fields it gives, so
``[datasets.norman2019] sha256 = "..."`` pins a checksum you computed yourself.

No built-in entry carries a checksum: a checksum is only ever written after computing it from the
file itself, and these entries were written without access to the files.

:func:`fetch` downloads a dataset by name; the resumable, verifying download itself and the cache
directory live in :mod:`vcell.data.download` (re-exported here).
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from vcell.data.download import (  # noqa: F401 - re-exported: part of this module's API
    CACHE_ENV,
    DEFAULT_TIMEOUT,
    ProgressCallback,
    cache_dir,
    download,
    sha256_file,
)
from vcell.data.spec import EXPRESSION_TYPES, DataSpec
from vcell.data.staging import fcntl  # noqa: F401 - re-exported: the lock a concurrent fetch holds
from vcell.errors import VcellError, close_matches

REGISTRY_ENV = "VCELL_REGISTRY"
PERTURBATION_TYPES: tuple[str, ...] = ("CRISPRi", "CRISPRa", "KO", "drug", "cytokine", "other")
CHECKSUM_UNKNOWN = "checksum unknown; verified by size only if known"
CATALOGUE = "catalogue.toml"  # the built-in entries, a data file of this package
BUILTIN_SOURCE = "built-in"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COLUMN_KEYS = ("pert_col", "control", "context_col", "batch_col", "expression")
_ENTRY_KEYS = (
    "url", "filename", "sha256", "size_bytes", "title", "citation", "license", "notes",
    "homepage", "perturbation_type", *_COLUMN_KEYS,
)
_CITATION_KEYS = ("authors", "year", "title", "journal", "doi")

_resolve_cache_dir = cache_dir  # several functions here have a parameter of the same name


@dataclass(frozen=True)
class Citation:
    """A reference to the publication behind a dataset."""

    authors: str
    year: int | None = None
    title: str = ""
    journal: str = ""
    doi: str | None = None

    @property
    def short(self) -> str:
        """``"Norman et al. 2019"``-style label."""
        first = self.authors.split(",")[0].strip()
        if "," in self.authors:
            first = f"{first.split()[0] if first else first} et al."
        return f"{first} {self.year}".strip() if self.year else first

    def __str__(self) -> str:
        parts = [self.authors + (f" ({self.year})" if self.year else "")]
        parts += [p for p in (self.title, self.journal) if p]
        text = ". ".join(p.rstrip(".") for p in parts if p) + "."
        return f"{text} doi:{self.doi}" if self.doi else text


@dataclass(frozen=True)
class DatasetInfo:
    """One downloadable dataset and how its ``.obs`` columns are named.

    Parameters
    ----------
    name
        Registry key, e.g. ``"norman2019"``.
    title
        One-line description.
    url
        Direct download URL (http or https).
    filename
        File name in the cache directory.
    perturbation_type
        One of :data:`PERTURBATION_TYPES`.
    columns
        :class:`~vcell.data.spec.DataSpec` keyword arguments: ``pert_col``, ``control``,
        ``context_col``, ``batch_col``, ``expression``.
    citation
        The publication, if known.
    license
        License or where to find it.
    notes
        Caveats about the file (label conventions, size, ...).
    homepage
        Landing page of the record the file comes from.
    size_bytes
        Exact file size if known; verified after download.
    sha256
        Hex SHA-256 of the file if known (only ever computed from the file itself); verified
        after download.
    source
        ``"built-in"`` or the registry file the entry came from.
    """

    name: str
    title: str
    url: str
    filename: str
    perturbation_type: str
    columns: dict[str, str | None] = field(hash=False)
    citation: Citation | None = None
    license: str = ""
    notes: str = ""
    homepage: str = ""
    size_bytes: int | None = None
    sha256: str | None = None
    source: str = BUILTIN_SOURCE

    def spec(self) -> DataSpec:
        """The :class:`~vcell.data.spec.DataSpec` describing this dataset's columns."""
        return DataSpec(**self.columns)

    @property
    def checksum_status(self) -> str:
        """How a download of this dataset is verified, for listings."""
        if self.sha256:
            return f"sha256 {self.sha256[:12]}…"
        return CHECKSUM_UNKNOWN


# --------------------------------------------------------------------------------------------
# Registry loading


def _load_catalogue() -> tuple[DatasetInfo, ...]:
    """The built-in entries from the packaged catalogue, parsed like a user registry file."""
    resource = importlib.resources.files(__package__).joinpath(CATALOGUE)
    label = str(resource)
    try:
        data = tomllib.loads(resource.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise VcellError(f"{label}: invalid TOML ({exc})") from exc
    registry: dict[str, DatasetInfo] = {}
    _merge_entries(registry, data, label, source=BUILTIN_SOURCE)
    return tuple(registry.values())


def builtin_registry() -> dict[str, DatasetInfo]:
    """The built-in datasets (from ``catalogue.toml``), keyed by name."""
    return {d.name: d for d in BUILTIN_DATASETS}


def load_registry(extra: str | os.PathLike | None = None) -> dict[str, DatasetInfo]:
    """Built-in datasets merged with a user TOML registry.

    Parameters
    ----------
    extra
        Path of a TOML registry file. ``None`` uses ``$VCELL_REGISTRY`` if set, else only the
        built-in datasets.

    Returns
    -------
    dict
        ``{name: DatasetInfo}``, built-ins first, then new user entries in file order.

    Raises
    ------
    VcellError
        The file is missing or unreadable, or an entry is invalid (message names file and key).
    """
    registry = builtin_registry()
    from_env = extra is None
    path = (os.environ.get(REGISTRY_ENV) or None) if extra is None else extra
    if path is not None:
        _merge_user_registry(registry, Path(path).expanduser(), from_env)
    _check_unique_filenames(registry)
    return registry


def _merge_user_registry(registry: dict[str, DatasetInfo], path: Path, from_env: bool) -> None:
    where = f" (from ${REGISTRY_ENV})" if from_env else ""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VcellError(f"{path}: registry file not found{where}") from None
    except IsADirectoryError:
        raise VcellError(f"{path}: is a directory, expected a TOML registry file{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VcellError(f"{path}: cannot read registry file ({exc}){where}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise VcellError(f"{path}: invalid TOML ({exc})") from exc

    _merge_entries(registry, data, path, source=str(path))


def _merge_entries(registry: dict[str, DatasetInfo], data: dict, path: Path | str, source: str) -> None:
    """Validate the parsed TOML of a registry file and add (or update) its entries in place."""
    unknown = sorted(set(data) - {"datasets"})
    if unknown:
        raise VcellError(f"{path}: unknown top-level key '{unknown[0]}' (expected only [datasets.NAME] tables)")
    datasets = data.get("datasets", {})
    if not isinstance(datasets, dict):
        raise VcellError(f"{path}: 'datasets' must be a table of [datasets.NAME] entries")
    for name, entry in datasets.items():
        key = f"[datasets.{name}]"
        if not _NAME_RE.match(name):
            raise VcellError(f"{path}: {key}: invalid dataset name (use letters, digits, '_', '-', '.')")
        if not isinstance(entry, dict):
            raise VcellError(f"{path}: {key}: expected a table of fields, got {type(entry).__name__}")
        registry[name] = _parse_entry(path, name, entry, registry.get(name), source)


def _parse_entry(path: Path | str, name: str, entry: dict, base: DatasetInfo | None,
                 source: str) -> DatasetInfo:
    where = f"{path}: [datasets.{name}]"

    def fail(key: str, problem: str):
        raise VcellError(f"{where} {key}: {problem}")

    def text(key: str) -> str:
        value = entry[key]
        if not isinstance(value, str):
            fail(key, f"expected a string, got {type(value).__name__}")
        return value.strip()

    for key in entry:
        if key not in _ENTRY_KEYS:
            close = close_matches(key, _ENTRY_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(_ENTRY_KEYS)})"
            fail(key, "unknown key" + hint)

    changes: dict = {"source": source}
    if "url" in entry:
        changes["url"] = _check_url(text("url"), lambda p: fail("url", p))
    elif base is None:
        fail("url", "missing (required for a new dataset)")
    url = changes.get("url", base.url if base else "")
    if "filename" in entry:
        changes["filename"] = _check_filename(text("filename"), lambda p: fail("filename", p))
    elif base is None or "url" in entry:
        default = urllib.parse.unquote(Path(urllib.parse.urlsplit(url).path).name)
        changes["filename"] = _check_filename(
            default, lambda p: fail("filename", f"missing, and the URL gives no usable file name ({p})"))
    if "sha256" in entry:
        digest = text("sha256").lower()
        if digest and not _SHA256_RE.match(digest):
            fail("sha256", "expected 64 hexadecimal digits")
        changes["sha256"] = digest or None
    if "size_bytes" in entry:
        size = entry["size_bytes"]
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            fail("size_bytes", "expected a positive integer")
        changes["size_bytes"] = size
    for key in ("title", "license", "notes", "homepage"):
        if key in entry:
            changes[key] = text(key)
    if "perturbation_type" in entry:
        canonical = {t.lower(): t for t in PERTURBATION_TYPES}.get(text("perturbation_type").lower())
        if canonical is None:
            fail("perturbation_type", f"expected one of {', '.join(PERTURBATION_TYPES)}")
        changes["perturbation_type"] = canonical
    if "citation" in entry:
        changes["citation"] = _parse_citation(entry["citation"], lambda p: fail("citation", p))

    columns = dict(base.columns) if base else {
        "pert_col": DataSpec.pert_col, "control": DataSpec.control,
        "context_col": DataSpec.context_col, "batch_col": DataSpec.batch_col,
        "expression": DataSpec.expression,
    }
    for key in _COLUMN_KEYS:
        if key in entry:
            value = text(key)
            if not value and key in ("pert_col", "control"):
                fail(key, "must not be empty")
            if key == "expression" and value and value not in EXPRESSION_TYPES:
                fail(key, f"expected one of {', '.join(EXPRESSION_TYPES)} or \"\"")
            columns[key] = value or None
    changes["columns"] = columns

    if base is not None:
        return replace(base, **changes)
    changes.setdefault("title", name)
    changes.setdefault("perturbation_type", "other")
    return DatasetInfo(name=name, **changes)


def _check_url(url: str, fail: Callable[[str], None]) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        fail(f"expected an http:// or https:// URL, got '{url}'")
    return url


def _check_filename(filename: str, fail: Callable[[str], None]) -> str:
    # The name is joined onto the cache directory, so it must not be able to escape it.
    if (not filename or filename in (".", "..") or filename.startswith(".")
            or any(c in filename for c in "/\\\0") or filename.endswith((".part", ".part.json"))):
        fail(f"'{filename}' is not a plain file name")
    return filename


def _parse_citation(value, fail: Callable[[str], None]) -> Citation:
    if isinstance(value, str):
        return Citation(authors=value.strip())
    if not isinstance(value, dict):
        fail("expected a string or a table with authors, year, title, journal, doi")
    for key in value:
        if key not in _CITATION_KEYS:
            fail(f"unknown field '{key}' (allowed: {', '.join(_CITATION_KEYS)})")
    year = value.get("year")
    if year is not None and (isinstance(year, bool) or not isinstance(year, int)):
        fail("year must be an integer")
    fields = {k: value.get(k, "") for k in ("authors", "title", "journal")}
    if not all(isinstance(v, str) for v in fields.values()) or not isinstance(value.get("doi", ""), str):
        fail("authors, title, journal and doi must be strings")
    if not fields["authors"]:
        fail("authors is required")
    return Citation(year=year, doi=value.get("doi") or None, **fields)


def _check_unique_filenames(registry: Mapping[str, DatasetInfo]) -> None:
    seen: dict[str, DatasetInfo] = {}
    for info in registry.values():
        other = seen.setdefault(info.filename, info)
        if other is not info:
            source = info.source if info.source != BUILTIN_SOURCE else other.source
            raise VcellError(
                f"{source}: datasets '{other.name}' and '{info.name}' both use the file name "
                f"'{info.filename}'; give one of them another filename")


#: The built-in entries, read once from the packaged ``catalogue.toml``.
BUILTIN_DATASETS: tuple[DatasetInfo, ...] = _load_catalogue()


# --------------------------------------------------------------------------------------------
# Lookup and listing


def get_dataset(name: str, registry: Mapping[str, DatasetInfo] | None = None) -> DatasetInfo:
    """Look a dataset up by name (case-insensitive fallback).

    Raises
    ------
    VcellError
        Unknown name; the message suggests close names.
    """
    registry = load_registry() if registry is None else registry
    if name in registry:
        return registry[name]
    folded = {n.lower(): n for n in registry}
    if name.lower() in folded:
        return registry[folded[name.lower()]]
    # Not errors.did_you_mean: names are matched case-folded and by substring, and shown unquoted.
    suggestions = difflib.get_close_matches(name.lower(), list(folded), n=3, cutoff=0.5)
    suggestions += [n for n in folded if name.lower() in n and n not in suggestions]
    hint = f"; did you mean {', '.join(folded[s] for s in suggestions[:3])}?" if suggestions else ""
    raise VcellError(f"unknown dataset '{name}'{hint} (known: {len(registry)} datasets; "
                     "list them with `vcell data list`)")


def list_datasets(registry: Mapping[str, DatasetInfo] | None = None,
                  cache_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """One row of strings per dataset, for a table.

    Parameters
    ----------
    registry
        Datasets to list; default :func:`load_registry`.
    cache_dir
        Where to look for downloaded files (default :func:`cache_dir`).

    Returns
    -------
    list of dict
        Keys: ``name``, ``title``, ``perturbation``, ``citation``, ``size``, ``checksum``,
        ``cached``, ``source``, ``url``.
    """
    registry = load_registry() if registry is None else registry
    directory = _resolve_cache_dir(cache_dir)
    rows = []
    for info in registry.values():
        cached = directory / info.filename
        rows.append({
            "name": info.name,
            "title": info.title,
            "perturbation": info.perturbation_type,
            "citation": info.citation.short if info.citation else "",
            "size": _human_size(info.size_bytes) if info.size_bytes else "unknown",
            "checksum": info.checksum_status,
            "cached": "yes" if cached.is_file() else "no",
            "source": info.source,
            "url": info.url,
        })
    return rows


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# --------------------------------------------------------------------------------------------
# Cache and download


def cached_path(name: str | DatasetInfo, cache_dir: str | os.PathLike | None = None,
                registry: Mapping[str, DatasetInfo] | None = None) -> Path:
    """Where :func:`fetch` puts (or has put) a dataset; the file may not exist yet."""
    info = name if isinstance(name, DatasetInfo) else get_dataset(name, registry)
    return _resolve_cache_dir(cache_dir) / info.filename


def fetch(name: str, cache_dir: str | os.PathLike | None = None,
          registry: Mapping[str, DatasetInfo] | str | os.PathLike | None = None,
          force: bool = False, progress: ProgressCallback | None = None,
          timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download a dataset into the cache (resuming a partial download) and return its path.

    The file is written to ``<cache>/<filename>.part`` and renamed onto ``<cache>/<filename>``
    only once complete and verified (size and SHA-256 when the registry knows them), so a file
    under the final name is always whole. An interrupted download is resumed on the next call
    with an HTTP ``Range`` request. A cached file that passes verification is returned without
    touching the network.

    Parameters
    ----------
    name
        Dataset name (see :func:`list_datasets`).
    cache_dir
        Download directory; default :func:`cache_dir`.
    registry
        Registry mapping, or the path of a TOML registry file; default :func:`load_registry`.
    force, progress, timeout
        As in :func:`vcell.data.download.download`.

    Returns
    -------
    Path
        The verified file.

    Raises
    ------
    VcellError
        Unknown dataset, network or HTTP failure, size or checksum mismatch, or a file system
        error; the message names the dataset and the URL or file.
    """
    if registry is None or isinstance(registry, (str, os.PathLike)):
        registry = load_registry(registry)
    info = get_dataset(name, registry)
    return download(info, _resolve_cache_dir(cache_dir), force=force, progress=progress, timeout=timeout)
