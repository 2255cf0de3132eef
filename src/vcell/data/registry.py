"""Registry of public single-cell perturbation datasets, and a resumable, verifying downloader.

The built-in entries point at public files (scPerturb on Zenodo, Replogle et al. 2022 on
figshare+, Kang et al. 2018 as distributed by pertpy). Users can add or override entries with a
TOML file (argument or ``$VCELL_REGISTRY``)::

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
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import json
import os
import re
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from vcell import __version__
from vcell.data.spec import EXPRESSION_TYPES, DataSpec
from vcell.errors import VcellError

try:  # POSIX only; without it concurrent fetches of one file are simply not guarded
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

REGISTRY_ENV = "VCELL_REGISTRY"
CACHE_ENV = "VCELL_CACHE_DIR"
PERTURBATION_TYPES: tuple[str, ...] = ("CRISPRi", "CRISPRa", "KO", "drug", "cytokine", "other")
CHECKSUM_UNKNOWN = "checksum unknown; verified by size only if known"
DEFAULT_TIMEOUT = 60.0

_CHUNK = 1 << 20
_USER_AGENT = f"vcell/{__version__}"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COLUMN_KEYS = ("pert_col", "control", "context_col", "batch_col", "expression")
_ENTRY_KEYS = (
    "url", "filename", "sha256", "size_bytes", "title", "citation", "license", "notes",
    "homepage", "perturbation_type", *_COLUMN_KEYS,
)
_CITATION_KEYS = ("authors", "year", "title", "journal", "doi")

ProgressCallback = Callable[[int, int | None], None]


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
    source: str = "built-in"

    def spec(self) -> DataSpec:
        """The :class:`~vcell.data.spec.DataSpec` describing this dataset's columns."""
        return DataSpec(**self.columns)

    @property
    def checksum_status(self) -> str:
        """How a download of this dataset is verified, for listings."""
        if self.sha256:
            return f"sha256 {self.sha256[:12]}…"
        return CHECKSUM_UNKNOWN


def _columns(pert_col, control, context_col=None, batch_col=None, expression=None) -> dict:
    return {"pert_col": pert_col, "control": control, "context_col": context_col,
            "batch_col": batch_col, "expression": expression}


_SCPERTURB = "https://zenodo.org/records/10044268"
_SCPERTURB_NOTE = (
    "Harmonised by scPerturb v1.4 (Peidli et al. 2024, Nat Methods, "
    "doi:10.1038/s41592-023-02144-y); X holds raw counts."
)
_SCPERTURB_LICENSE = f"not recorded here; see the Zenodo record {_SCPERTURB}"
_REPLOGLE_FIGSHARE = (
    "https://plus.figshare.com/articles/dataset/_Mapping_information-rich_genotype-phenotype_"
    "landscapes_with_genome-scale_Perturb-seq_Replogle_et_al_2022_processed_Perturb-seq_"
    "datasets/20029387"
)
_REPLOGLE = Citation(
    "Replogle JM, Saunders RA, Pogson AN, et al.", 2022,
    "Mapping information-rich genotype-phenotype landscapes with genome-scale Perturb-seq",
    "Cell 185(14):2559-2575", "10.1016/j.cell.2022.05.013",
)


def _scperturb(filename: str) -> str:
    return f"{_SCPERTURB}/files/{filename}?download=1"


BUILTIN_DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="norman2019",
        title="Norman 2019: combinatorial CRISPRa in K562 (single and paired activations)",
        url=_scperturb("NormanWeissman2019_filtered.h5ad"),
        filename="NormanWeissman2019_filtered.h5ad",
        perturbation_type="CRISPRa",
        columns=_columns("perturbation", "control", "cell_line", "gemgroup", "counts"),
        citation=Citation(
            "Norman TM, Horlbeck MA, Replogle JM, et al.", 2019,
            "Exploring genetic interaction manifolds constructed from rich single-cell phenotypes",
            "Science 365(6455):786-793", "10.1126/science.aax4438",
        ),
        license=_SCPERTURB_LICENSE,
        notes=_SCPERTURB_NOTE + " Paired activations are labelled 'A_B' (vcell uses 'A+B'); "
        "about 0.7 GB.",
        homepage=_SCPERTURB,
    ),
    DatasetInfo(
        name="replogle2022_k562_essential",
        title="Replogle 2022: essential-gene CRISPRi Perturb-seq in K562 (scPerturb)",
        url=_scperturb("ReplogleWeissman2022_K562_essential.h5ad"),
        filename="ReplogleWeissman2022_K562_essential.h5ad",
        perturbation_type="CRISPRi",
        columns=_columns("perturbation", "control", "cell_line", "batch", "counts"),
        citation=_REPLOGLE,
        license=_SCPERTURB_LICENSE,
        notes=_SCPERTURB_NOTE + " 'batch' is the original gem_group.",
        homepage=_SCPERTURB,
    ),
    DatasetInfo(
        name="replogle2022_rpe1",
        title="Replogle 2022: essential-gene CRISPRi Perturb-seq in RPE1 (scPerturb)",
        url=_scperturb("ReplogleWeissman2022_rpe1.h5ad"),
        filename="ReplogleWeissman2022_rpe1.h5ad",
        perturbation_type="CRISPRi",
        columns=_columns("perturbation", "control", "cell_line", "batch", "counts"),
        citation=_REPLOGLE,
        license=_SCPERTURB_LICENSE,
        notes=_SCPERTURB_NOTE + " 'batch' is the original gem_group.",
        homepage=_SCPERTURB,
    ),
    DatasetInfo(
        name="replogle2022_k562_essential_raw",
        title="Replogle 2022: K562 essential-gene CRISPRi, authors' raw single-cell h5ad",
        url="https://plus.figshare.com/ndownloader/files/35773219",
        filename="K562_essential_raw_singlecell_01.h5ad",
        perturbation_type="CRISPRi",
        columns=_columns("gene", "non-targeting", None, "gem_group", "counts"),
        citation=_REPLOGLE,
        license=f"not recorded here; see the figshare+ record {_REPLOGLE_FIGSHARE}",
        notes="The authors' file (one cell line, no cell-line column); very large (about 10 GB).",
        homepage=_REPLOGLE_FIGSHARE,
    ),
    DatasetInfo(
        name="replogle2022_rpe1_raw",
        title="Replogle 2022: RPE1 essential-gene CRISPRi, authors' raw single-cell h5ad",
        url="https://plus.figshare.com/ndownloader/files/35775606",
        filename="rpe1_raw_singlecell_01.h5ad",
        perturbation_type="CRISPRi",
        columns=_columns("gene", "non-targeting", None, "gem_group", "counts"),
        citation=_REPLOGLE,
        license=f"not recorded here; see the figshare+ record {_REPLOGLE_FIGSHARE}",
        notes="The authors' file (one cell line, no cell-line column); several GB.",
        homepage=_REPLOGLE_FIGSHARE,
    ),
    DatasetInfo(
        name="srivatsan2020_sciplex3",
        title="Srivatsan 2020 sci-Plex3: 188 compounds in A549, K562 and MCF7",
        url=_scperturb("SrivatsanTrapnell2020_sciplex3.h5ad"),
        filename="SrivatsanTrapnell2020_sciplex3.h5ad",
        perturbation_type="drug",
        columns=_columns("perturbation", "control", "cell_line", None, "counts"),
        citation=Citation(
            "Srivatsan SR, McFaline-Figueroa JL, Ramani V, et al.", 2020,
            "Massively multiplex chemical transcriptomics at single-cell resolution",
            "Science 367(6473):45-51", "10.1126/science.aax6234",
        ),
        license=_SCPERTURB_LICENSE,
        notes=_SCPERTURB_NOTE + " Vehicle cells are 'control'; doses are in 'dose_value' (nM), "
        "so one label pools all doses.",
        homepage=_SCPERTURB,
    ),
    DatasetInfo(
        name="papalexi2021_eccite",
        title="Papalexi 2021 ECCITE-seq: CRISPR knockouts of immune checkpoint regulators in THP-1",
        url=_scperturb("PapalexiSatija2021_eccite_RNA.h5ad"),
        filename="PapalexiSatija2021_eccite_RNA.h5ad",
        perturbation_type="KO",
        columns=_columns("perturbation", "control", None, "hto", "counts"),
        citation=Citation(
            "Papalexi E, Mimitou EP, Butler AW, et al.", 2021,
            "Characterizing the molecular regulation of inhibitory immune checkpoints with "
            "multimodal single-cell screens",
            "Nat Genet 53:322-331", "10.1038/s41588-021-00778-2",
        ),
        license=_SCPERTURB_LICENSE,
        notes=_SCPERTURB_NOTE + " RNA modality only; labels are per guide (e.g. 'CD86g1'), "
        "strip the 'g<n>' suffix to get per-gene groups; 'hto' is the replicate hashtag.",
        homepage=_SCPERTURB,
    ),
    DatasetInfo(
        name="kang2018_ifnb",
        title="Kang 2018: PBMCs from 8 lupus patients, control vs interferon-beta (6 h)",
        url="https://figshare.com/ndownloader/files/34464122",
        filename="kang_2018.h5ad",
        perturbation_type="cytokine",
        columns=_columns("label", "ctrl", "cell_type", "replicate", "counts"),
        citation=Citation(
            "Kang HM, Subramaniam M, Targ S, et al.", 2018,
            "Multiplexed droplet single-cell RNA-sequencing using natural genetic variation",
            "Nat Biotechnol 36:89-94", "10.1038/nbt.4042",
        ),
        license="not recorded here; the file is the one pertpy.data.kang_2018() downloads",
        notes="As distributed by pertpy (about 24.7k cells x 15.7k genes); 'label' is ctrl/stim, "
        "'replicate' the donor. Hold out a cell type to test context generalisation.",
        homepage="https://github.com/scverse/pertpy",
    ),
)


# --------------------------------------------------------------------------------------------
# Registry loading


def builtin_registry() -> dict[str, DatasetInfo]:
    """The built-in datasets, keyed by name."""
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
        registry[name] = _parse_entry(path, name, entry, registry.get(name))


def _parse_entry(path: Path, name: str, entry: dict, base: DatasetInfo | None) -> DatasetInfo:
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
            close = difflib.get_close_matches(key, _ENTRY_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(_ENTRY_KEYS)})"
            fail(key, "unknown key" + hint)

    changes: dict = {"source": str(path)}
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
            source = info.source if info.source != "built-in" else other.source
            raise VcellError(
                f"{source}: datasets '{other.name}' and '{info.name}' both use the file name "
                f"'{info.filename}'; give one of them another filename")


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


_resolve_cache_dir = cache_dir


def cached_path(name: str | DatasetInfo, cache_dir: str | os.PathLike | None = None,
                registry: Mapping[str, DatasetInfo] | None = None) -> Path:
    """Where :func:`fetch` puts (or has put) a dataset; the file may not exist yet."""
    info = name if isinstance(name, DatasetInfo) else get_dataset(name, registry)
    return _resolve_cache_dir(cache_dir) / info.filename


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
    directory = _resolve_cache_dir(cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VcellError(f"{directory}: cannot create cache directory ({exc.strerror or exc})") from exc
    if not directory.is_dir():
        raise VcellError(f"{directory}: cache path exists and is not a directory")
    final = directory / info.filename
    part = directory / f"{info.filename}.part"

    with _lock(directory / f".{info.filename}.lock", info):
        if force:
            _discard(part)
        elif final.is_file() and _is_valid(final, info):
            return final
        _download(info, part, timeout, progress)
        _verify(info, part)
        try:
            os.replace(part, final)
        except OSError as exc:
            raise VcellError(f"{final}: cannot move finished download into place ({exc.strerror or exc})") from exc
        _meta_path(part).unlink(missing_ok=True)
        if info.sha256:
            _write_stamp(final, info.sha256)
    return final


@contextlib.contextmanager
def _lock(path: Path, info: DatasetInfo) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise VcellError(f"{path}: cannot create lock file ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VcellError(f"another vcell process is downloading {info.name} into {path.parent}; "
                             "wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


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


def _is_valid(final: Path, info: DatasetInfo) -> bool:
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


def _fail(info: DatasetInfo, problem: str) -> VcellError:
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


def _download(info: DatasetInfo, part: Path, timeout: float, progress: ProgressCallback | None) -> None:
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


def _stream(info, response, part: Path, mode: str, done: int, total: int | None,
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


def _lost(info: DatasetInfo, part: Path, done: int, total: int | None, why: str) -> VcellError:
    of = f" of {total}" if total is not None else ""
    return _fail(info, f"{why} after {done}{of} bytes; partial download kept at {part}, "
                       "run again to resume")


def _verify(info: DatasetInfo, part: Path) -> None:
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
