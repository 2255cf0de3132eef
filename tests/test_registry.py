"""Dataset registry and downloader, against a real HTTP server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import pytest

from vcell.data import registry as reg
from vcell.data.spec import DataSpec
from vcell.errors import VcellError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
SOURCE = SHARED_DATA / "mcfaline2023_norman2019.h5ad"
DROP_AT = 300_000


# --------------------------------------------------------------------------------------------
# A small HTTP server with byte-range support and scriptable failures


class QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients that time out or hang up on purpose are expected here


class FileServer:
    """Serves in-memory files; records every request; can drop, stall or ignore ``Range``."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (content, etag)
        self.requests: list[dict[str, str]] = []
        self.drop_after: list[int] = []  # per-request byte limits, consumed in order
        self.ignore_range = False
        self.stall = 0.0
        self.httpd = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, **dict(self.headers)})
                if server.stall:
                    time.sleep(server.stall)
                entry = server.files.get(urllib.parse.urlsplit(self.path).path)
                if entry is None:
                    self.send_error(404, "Not Found")
                    return
                data, etag = entry
                start, end, status = 0, len(data) - 1, 200
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                if match and not server.ignore_range and (if_range is None or if_range == etag):
                    start = int(match[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    end = min(int(match[2]), end) if match[2] else end
                    status = 206
                body = data[start:end + 1]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", etag)
                if not server.ignore_range:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if server.drop_after:
                    # Announce the full length, send less, and close: a dropped connection.
                    body = body[:server.drop_after.pop(0)]
                    self.close_connection = True
                self.wfile.write(body)

        return Handler


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    monkeypatch.delenv(reg.REGISTRY_ENV, raising=False)
    monkeypatch.delenv(reg.CACHE_ENV, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route test traffic via a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def source() -> bytes:
    if not SOURCE.is_file():
        pytest.skip(f"../shared/data not found: {SOURCE} is missing (real-data download tests "
                    "need the shared data folder beside the repository)")
    return SOURCE.read_bytes()


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def write_registry(path: Path, entries: dict[str, dict]) -> Path:
    lines = []
    for name, fields in entries.items():
        lines.append(f"[datasets.{name}]")
        for key, value in fields.items():
            lines.append(f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def setup(tmp_path, server, source):
    """Serve the real file; return ``make(**fields) -> registry`` and the cache directory."""
    server.files["/norman.h5ad"] = (source, '"v1"')
    cache = tmp_path / "cache"

    def make(**fields):
        entry = {"url": f"{server.base}/norman.h5ad", "filename": "norman.h5ad",
                 "pert_col": "perturbation", "control": "control", "context_col": "cell_type",
                 "perturbation_type": "CRISPRi", **fields}
        return reg.load_registry(write_registry(tmp_path / "registry.toml", {"local": entry}))

    return make, cache


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.endswith((".part", ".part.json")))


# --------------------------------------------------------------------------------------------
# Downloads


def test_fetch_downloads_identical_file_readable_by_anndata(setup, server, source):
    make, cache = setup
    expected = hashlib.sha256(source).hexdigest()
    calls = []
    path = reg.fetch("local", cache_dir=cache, registry=make(sha256=expected),
                     progress=lambda done, total: calls.append((done, total)))
    assert path == cache / "norman.h5ad"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected
    assert reg.sha256_file(path) == expected
    adata = ad.read_h5ad(path)
    assert adata.n_obs > 0 and "perturbation" in adata.obs
    assert calls[0] == (0, len(source)) and calls[-1] == (len(source), len(source))
    assert leftovers(cache) == []


def test_second_fetch_uses_cache_without_network(setup, server, source):
    make, cache = setup
    registry = make(sha256=hashlib.sha256(source).hexdigest())
    first = reg.fetch("local", cache_dir=cache, registry=registry)
    assert len(server.requests) == 1
    assert reg.fetch("local", cache_dir=cache, registry=registry) == first
    assert reg.fetch("local", cache_dir=cache, registry=make()) == first  # no checksum pinned
    assert len(server.requests) == 1
    assert reg.list_datasets(registry, cache_dir=cache)[-1]["cached"] == "yes"


def test_force_downloads_again(setup, server, source):
    make, cache = setup
    reg.fetch("local", cache_dir=cache, registry=make())
    reg.fetch("local", cache_dir=cache, registry=make(), force=True)
    assert len(server.requests) == 2
    assert (cache / "norman.h5ad").read_bytes() == source


def test_checksum_mismatch_leaves_nothing(setup, server, source):
    make, cache = setup
    wrong = "0" * 64
    with pytest.raises(VcellError) as err:
        reg.fetch("local", cache_dir=cache, registry=make(sha256=wrong))
    message = str(err.value)
    assert "local" in message and f"expected sha256 {wrong}" in message
    assert f"got {hashlib.sha256(source).hexdigest()}" in message
    assert "\n" not in message
    assert not (cache / "norman.h5ad").exists()
    assert leftovers(cache) == []


def test_size_mismatch_is_an_error(setup, server, source):
    make, cache = setup
    with pytest.raises(VcellError, match=f"server reports {len(source)} bytes"):
        reg.fetch("local", cache_dir=cache, registry=make(size_bytes=len(source) + 1))
    assert not (cache / "norman.h5ad").exists() and leftovers(cache) == []


def test_resume_after_dropped_connection(setup, server, source):
    make, cache = setup
    registry = make(sha256=hashlib.sha256(source).hexdigest())
    server.drop_after = [DROP_AT]
    with pytest.raises(VcellError, match="run again to resume") as err:
        reg.fetch("local", cache_dir=cache, registry=registry)
    assert f"after {DROP_AT} of {len(source)} bytes" in str(err.value)
    part = cache / "norman.h5ad.part"
    assert part.stat().st_size == DROP_AT
    assert not (cache / "norman.h5ad").exists()

    calls = []
    path = reg.fetch("local", cache_dir=cache, registry=registry,
                     progress=lambda done, total: calls.append((done, total)))
    assert server.requests[1]["Range"] == f"bytes={DROP_AT}-"
    assert server.requests[1]["If-Range"] == '"v1"'
    assert calls[0] == (DROP_AT, len(source))
    assert path.read_bytes() == source
    assert leftovers(cache) == []


def test_server_ignoring_range_restarts_from_zero(setup, server, source):
    make, cache = setup
    server.drop_after = [DROP_AT]
    with pytest.raises(VcellError):
        reg.fetch("local", cache_dir=cache, registry=make())
    server.ignore_range = True
    path = reg.fetch("local", cache_dir=cache, registry=make())
    assert server.requests[1]["Range"] == f"bytes={DROP_AT}-"
    assert path.read_bytes() == source
    assert leftovers(cache) == []


def test_complete_part_is_finished_after_416(setup, server, source):
    make, cache = setup
    server.drop_after = [DROP_AT]
    with pytest.raises(VcellError):
        reg.fetch("local", cache_dir=cache, registry=make())
    with open(cache / "norman.h5ad.part", "ab") as fh:  # as if killed just before the rename
        fh.write(source[DROP_AT:])
    path = reg.fetch("local", cache_dir=cache, registry=make())
    assert server.requests[-1]["Range"] == f"bytes={len(source)}-"
    assert len(server.requests) == 2
    assert path.read_bytes() == source


def test_oversized_part_is_discarded(setup, server, source):
    make, cache = setup
    server.drop_after = [DROP_AT]
    with pytest.raises(VcellError):
        reg.fetch("local", cache_dir=cache, registry=make())
    with open(cache / "norman.h5ad.part", "ab") as fh:
        fh.write(b"x" * len(source))
    path = reg.fetch("local", cache_dir=cache, registry=make())
    assert [r.get("Range") for r in server.requests[1:]] == [f"bytes={len(source) + DROP_AT}-", None]
    assert path.read_bytes() == source


def test_file_changed_on_server_restarts_download(setup, server, source):
    make, cache = setup
    server.drop_after = [DROP_AT]
    with pytest.raises(VcellError):
        reg.fetch("local", cache_dir=cache, registry=make())
    changed = source[::-1]
    server.files["/norman.h5ad"] = (changed, '"v2"')
    path = reg.fetch("local", cache_dir=cache, registry=make())
    assert path.read_bytes() == changed  # not the old prefix spliced onto the new file


def test_http_404_is_one_line_error(tmp_path, server):
    url = f"{server.base}/missing.h5ad"
    registry = reg.load_registry(write_registry(tmp_path / "r.toml", {"missing": {"url": url}}))
    with pytest.raises(VcellError) as err:
        reg.fetch("missing", cache_dir=tmp_path / "cache", registry=registry)
    assert str(err.value) == f"could not download missing from {url}: HTTP 404 Not Found"
    assert list((tmp_path / "cache").glob("missing.h5ad*")) == []


def test_timeout_is_reported(tmp_path, server):
    server.files["/slow.h5ad"] = (b"data", '"s"')
    server.stall = 1.0
    registry = reg.load_registry(
        write_registry(tmp_path / "r.toml", {"slow": {"url": f"{server.base}/slow.h5ad"}}))
    with pytest.raises(VcellError, match=r"could not download slow from .*: timed out after 0.2 s"):
        reg.fetch("slow", cache_dir=tmp_path / "cache", registry=registry, timeout=0.2)


def test_connection_refused_is_reported(tmp_path, server):
    url = f"{server.base}/x.h5ad"
    server.httpd.shutdown()
    server.httpd.server_close()
    registry = reg.load_registry(write_registry(tmp_path / "r.toml", {"gone": {"url": url}}))
    with pytest.raises(VcellError, match=f"could not download gone from {re.escape(url)}: "):
        reg.fetch("gone", cache_dir=tmp_path / "cache", registry=registry, timeout=2)


@pytest.mark.skipif(reg.fcntl is None, reason="file locks need fcntl (POSIX)")
def test_concurrent_fetch_of_same_file_is_refused(tmp_path, server):
    server.files["/a.h5ad"] = (b"abc", '"a"')
    registry = reg.load_registry(
        write_registry(tmp_path / "r.toml", {"a": {"url": f"{server.base}/a.h5ad"}}))
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / ".a.h5ad.lock", "w") as fh:
        reg.fcntl.flock(fh, reg.fcntl.LOCK_EX)
        with pytest.raises(VcellError, match="another vcell process is downloading a"):
            reg.fetch("a", cache_dir=cache, registry=registry)
    assert reg.fetch("a", cache_dir=cache, registry=registry).read_bytes() == b"abc"


# --------------------------------------------------------------------------------------------
# Registry


def test_unknown_name_suggests_close_names():
    with pytest.raises(VcellError, match="unknown dataset 'normann2019'; did you mean norman2019"):
        reg.fetch("normann2019", registry=reg.builtin_registry())
    with pytest.raises(VcellError, match="replogle2022_k562_essential"):
        reg.get_dataset("replogle", reg.builtin_registry())
    assert reg.get_dataset("Norman2019", reg.builtin_registry()).name == "norman2019"


@pytest.mark.parametrize("text, key", [
    ("[datasets.x\nurl = 1", "invalid TOML"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nsha = "a"', "[datasets.x] sha: unknown key (did you mean 'sha256'?)"),
    ('[datasets.x]\nfilename = "x.h5ad"', "[datasets.x] url: missing"),
    ('[datasets.x]\nurl = "ftp://h/x.h5ad"', "[datasets.x] url: expected an http"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nsha256 = "abc"', "[datasets.x] sha256: expected 64"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nfilename = "../x.h5ad"', "[datasets.x] filename:"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nsize_bytes = "9"', "[datasets.x] size_bytes:"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nexpression = "raw"', "[datasets.x] expression:"),
    ('[datasets.x]\nurl = "https://h/x.h5ad"\nperturbation_type = "RNAi"', "[datasets.x] perturbation_type:"),
    ('[datasets.x]\nurl = "https://h/"', "[datasets.x] filename: missing"),
    ('[datasets."a b"]\nurl = "https://h/x.h5ad"', '[datasets.a b]: invalid dataset name'),
    ('[other]\nx = 1', "unknown top-level key 'other'"),
    ('[datasets.x]\nurl = "https://h/kang_2018.h5ad"', "both use the file name 'kang_2018.h5ad'"),
])
def test_bad_user_registry_names_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(VcellError) as err:
        reg.load_registry(path)
    assert str(err.value).startswith(f"{path}: ") and key in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_registry_file_from_env(tmp_path, monkeypatch):
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv(reg.REGISTRY_ENV, str(missing))
    with pytest.raises(VcellError, match=f"{re.escape(str(missing))}: registry file not found .from .VCELL_REGISTRY"):
        reg.load_registry()


def test_user_registry_from_env_adds_and_overrides(tmp_path, monkeypatch):
    digest = "ab" * 32
    path = write_registry(tmp_path / "r.toml", {
        "norman2019": {"sha256": digest.upper()},
        "mine": {"url": "https://example.org/files/my%20data.h5ad", "context_col": "",
                 "pert_col": "gene", "control": "NT", "expression": "log1p"},
    })
    monkeypatch.setenv(reg.REGISTRY_ENV, str(path))
    registry = reg.load_registry()
    norman = registry["norman2019"]
    assert norman.sha256 == digest and norman.url == reg.builtin_registry()["norman2019"].url
    assert norman.source == str(path) and norman.citation.doi == "10.1126/science.aax4438"
    mine = registry["mine"]
    assert mine.filename == "my data.h5ad" and mine.perturbation_type == "other"
    assert mine.spec() == DataSpec(pert_col="gene", control="NT", context_col=None, expression="log1p")
    assert list(registry)[-1] == "mine"
    rows = {r["name"]: r for r in reg.list_datasets(registry, cache_dir=tmp_path)}
    assert rows["norman2019"]["checksum"].startswith("sha256 abababab")
    assert rows["mine"]["checksum"] == reg.CHECKSUM_UNKNOWN


def test_builtin_entries_are_complete():
    builtins = reg.BUILTIN_DATASETS
    assert 6 <= len(builtins) <= 10
    assert len({d.name for d in builtins}) == len({d.filename for d in builtins}) == len(builtins)
    for d in builtins:
        assert re.fullmatch(r"[a-z0-9_]+", d.name)
        assert d.url.startswith("https://") and d.title and d.homepage.startswith("https://")
        assert d.filename == Path(d.filename).name and not d.filename.endswith(".part")
        assert d.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", d.sha256)
        assert d.size_bytes is None or d.size_bytes > 0
        assert d.perturbation_type in reg.PERTURBATION_TYPES
        assert set(d.columns) == {"pert_col", "control", "context_col", "batch_col", "expression"}
        spec = d.spec()
        assert spec.pert_col and spec.control and spec.expression in (None, "counts", "log1p")
        assert d.citation and d.citation.year and d.citation.doi.startswith("10.")
        assert d.license
    for row in reg.list_datasets(reg.builtin_registry()):
        assert row["checksum"] == reg.CHECKSUM_UNKNOWN  # no built-in checksum was ever computed
        assert set(row) >= {"name", "title", "perturbation", "citation", "size", "checksum", "cached"}


def test_cache_dir_precedence(tmp_path, monkeypatch):
    assert reg.cache_dir().name.lower() == "vcell"
    monkeypatch.setenv(reg.CACHE_ENV, str(tmp_path / "env"))
    assert reg.cache_dir() == tmp_path / "env"
    assert reg.cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert reg.cached_path("kang2018_ifnb", registry=reg.builtin_registry()) == tmp_path / "env" / "kang_2018.h5ad"


def test_fetch_uses_env_cache_dir(tmp_path, monkeypatch, server):
    server.files["/b.h5ad"] = (b"hello", '"b"')
    monkeypatch.setenv(reg.CACHE_ENV, str(tmp_path / "envcache"))
    path = write_registry(tmp_path / "r.toml", {"b": {"url": f"{server.base}/b.h5ad"}})
    assert reg.fetch("b", registry=path) == tmp_path / "envcache" / "b.h5ad"


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert reg.sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    with pytest.raises(VcellError, match="f2.bin"):
        reg.sha256_file(tmp_path / "f2.bin")


def test_cli_list_and_fetch_against_local_server(tmp_path, server, source):
    from conftest import run_cli

    server.files["/norman.h5ad"] = (source, '"v1"')
    registry = write_registry(
        tmp_path / "registry.toml",
        {"local": {"url": f"{server.base}/norman.h5ad", "filename": "norman.h5ad", "pert_col": "perturbation",
                   "control": "control", "context_col": "cell_type", "perturbation_type": "CRISPRi",
                   "sha256": hashlib.sha256(source).hexdigest()}},
    )
    env = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
    listing = run_cli("data", "list", "--registry", registry, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "local" in listing.stdout and "norman2019" in listing.stdout and "pinned" in listing.stdout
    cache = tmp_path / "cache"
    got = run_cli("data", "fetch", "local", "--registry", registry, "--cache-dir", cache, env=env)
    assert got.returncode == 0, got.stderr
    assert (cache / "norman.h5ad").read_bytes() == source
    assert leftovers(cache) == []
    unknown = run_cli("data", "fetch", "normann2019", "--cache-dir", cache, env=env)
    assert unknown.returncode == 2 and "norman2019" in unknown.stderr and "Traceback" not in unknown.stderr
