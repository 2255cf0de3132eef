"""Protein embeddings of genes with a local ESM2 model (Hugging Face ``transformers``).

How a FASTA becomes a gene table:

- **Header -> gene symbol.** ``--header-regex`` (one capture group) wins. Otherwise the first
  rule that matches: UniProt ``GN=SYMBOL``, then Ensembl ``gene_symbol:SYMBOL``, then the first
  word of the header. Every record with the same symbol is an isoform of that gene; identical
  isoform sequences of one gene count once.
- **Residues.** Letters of the ESM alphabet (``ACDEFGHIKLMNPQRSTVWY`` and ``XBUZO``), any case;
  one trailing ``*`` (stop) is dropped. Anything else is an error naming the line.
- **Isoform vector.** The mean of the model's last hidden state over residue tokens only (no
  CLS/EOS, no padding). Proteins longer than the model's window (``max_position_embeddings - 2``
  residues, 1,022 for ESM2) are cut into near-equal chunks, each embedded with its own CLS/EOS;
  the isoform vector is the residue-weighted mean of its chunks, i.e. the mean over all residues.
- **Gene vector.** The plain mean of the gene's isoform vectors.
- **Batches.** Chunks sorted by length, packed so that (sequences x longest length incl. CLS/EOS)
  stays within ``max_tokens`` (a batch holds at least one chunk).
- **Resuming.** Finished chunk vectors are appended as safetensors shards to ``OUT.partial/``,
  keyed by the chunk's SHA-1; a rerun with the same model skips them. The final table is written
  atomically and the shard folder removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from vcell.errors import VcellError
from vcell.features.genes import GeneEmbeddings

log = logging.getLogger(__name__)

DEFAULT_RULES = (("GN=", re.compile(r"\bGN=(\S+)")), ("gene_symbol:", re.compile(r"\bgene_symbol:(\S+)")))
RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWYXBUZO")
FLUSH_CHUNKS = 256
FLUSH_SECONDS = 60.0


@dataclass
class Isoform:
    """One FASTA record: its gene symbol, sequence and header line number."""

    gene: str
    sequence: str
    line: int


def header_pattern(header_regex: str | None) -> re.Pattern | None:
    """Compile ``--header-regex``; it must have exactly one capture group (the gene symbol)."""
    if header_regex is None:
        return None
    try:
        pattern = re.compile(header_regex)
    except re.error as exc:
        raise VcellError(f"--header-regex {header_regex!r} is not a valid regular expression ({exc})") from None
    if pattern.groups != 1:
        raise VcellError(f"--header-regex {header_regex!r} must have exactly one capture group (the gene symbol), has {pattern.groups}")
    return pattern


def gene_symbol(header: str, pattern: re.Pattern | None = None) -> str | None:
    """The gene symbol of a FASTA header (without '>') under ``pattern`` or the default rules."""
    if pattern is not None:
        match = pattern.search(header)
        symbol = (match.group(1) or "").strip() if match else ""
        return symbol or None
    for _, rule in DEFAULT_RULES:
        match = rule.search(header)
        if match:
            return match.group(1)
    words = header.split()
    return words[0] if words else None


def read_fasta(path: str | os.PathLike, header_regex: str | None = None) -> list[Isoform]:
    """Parse a protein FASTA into isoforms; one-line :class:`VcellError` on any malformed record."""
    path = Path(path)
    if not path.is_file():
        raise VcellError(f"{path}: FASTA file not found" if not path.exists() else f"{path}: is not a file; expected a FASTA file")
    pattern = header_pattern(header_regex)
    rule = f"--header-regex {header_regex!r}" if header_regex else "the default rule (GN=, gene_symbol:, first word)"
    records: list[Isoform] = []
    parts: list[str] = []

    def close() -> None:
        if records:
            seq = "".join(parts)
            if seq.endswith("*"):
                seq = seq[:-1]
            if not seq:
                raise VcellError(f"{path}: line {records[-1].line}: record of gene {records[-1].gene!r} has no sequence")
            if "*" in seq:
                raise VcellError(
                    f"{path}: line {records[-1].line}: record of gene {records[-1].gene!r} has a stop '*' inside its "
                    "sequence; only one trailing '*' is allowed"
                )
            records[-1].sequence = seq

    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise VcellError(f"{path}: unreadable FASTA file ({exc.strerror})") from None
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line or line.startswith(";"):
                    continue
                if line.startswith(">"):
                    close()
                    parts = []
                    symbol = gene_symbol(line[1:], pattern)
                    if symbol is None:
                        raise VcellError(f"{path}: line {number}: header {line[:80]!r} has no gene symbol under {rule}")
                    records.append(Isoform(gene=symbol, sequence="", line=number))
                    continue
                if not records:
                    raise VcellError(f"{path}: line {number}: sequence before the first '>' header; is this a FASTA file?")
                residues = "".join(line.split()).upper()
                char = next((c for c in residues if c not in RESIDUES and c != "*"), None)
                if char is not None:
                    raise VcellError(
                        f"{path}: line {number}: invalid residue {char!r} in the sequence of gene {records[-1].gene!r}; "
                        "expected amino-acid letters (ACDEFGHIKLMNPQRSTVWY or XBUZO)"
                    )
                parts.append(residues)
        except UnicodeDecodeError:
            raise VcellError(f"{path}: not a text FASTA file (undecodable bytes)") from None
        close()
    if not records:
        raise VcellError(f"{path}: empty FASTA file (no '>' records)")
    return records


def chunk(sequence: str, max_len: int) -> list[str]:
    """Cut ``sequence`` into the fewest near-equal pieces of at most ``max_len`` residues."""
    n = -(-len(sequence) // max_len)
    bounds = [round(i * len(sequence) / n) for i in range(n + 1)]
    return [sequence[a:b] for a, b in zip(bounds, bounds[1:])]


def plan_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first, each within ``max_tokens``
    padded tokens (length + 2 for CLS/EOS); a batch holds at least one item."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] + 2 if current else lengths[i] + 2  # longest first: the first sets the width
        if current and (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def sequence_key(sequence: str) -> str:
    """Content key of a chunk: its SHA-1 (identical chunks are embedded once)."""
    return hashlib.sha1(sequence.encode()).hexdigest()


def partial_dir(out: str | os.PathLike) -> Path:
    """Folder of the resumable shards for output ``out``: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class ShardStore:
    """Chunk vectors already computed for one output, as safetensors shards in ``OUT.partial/``.

    ``meta.json`` records the model fingerprint; shards from another model or window size are
    discarded rather than mixed in.
    """

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = folder
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # compare as read back from JSON
        self.pending_keys: list[str] = []
        self.pending: list[torch.Tensor] = []
        meta_path = folder / "meta.json"
        if folder.is_dir():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != fingerprint:
                log.warning("%s: partial results from another model or setting; starting over", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.exists():
            meta_path.write_text(json.dumps(fingerprint, sort_keys=True))
        self.done = self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        done: dict[str, torch.Tensor] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
                    vectors = f.get_tensor("vectors")
            except Exception:  # a shard cut short by a crash: its chunks are simply recomputed
                log.warning("%s: unreadable shard, ignored", shard)
                continue
            done.update(zip(keys, vectors))
        return done

    def add(self, keys: list[str], vectors: torch.Tensor) -> None:
        """Record finished chunk vectors (written by :meth:`flush`)."""
        self.pending_keys += keys
        self.pending.append(vectors.detach().to("cpu", torch.float32))
        self.done.update(zip(keys, self.pending[-1]))

    def flush(self) -> None:
        """Append the pending vectors as one new shard, atomically."""
        from vcell.data.io import atomic_path
        from vcell.data.tensors import write_safetensors

        if not self.pending_keys:
            return
        index = len(list(self.folder.glob("shard-*.safetensors")))
        while (self.folder / f"shard-{index:06d}.safetensors").exists():
            index += 1
        with atomic_path(self.folder / f"shard-{index:06d}.safetensors") as tmp:
            write_safetensors({"vectors": torch.cat(self.pending)}, tmp, metadata={"keys": json.dumps(self.pending_keys)})
        self.pending_keys, self.pending = [], []


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise VcellError("protein embeddings need Hugging Face transformers: pip install 'vcell[esm]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_esm(esm_model_dir: str | os.PathLike, device: str = "cpu"):
    """Load an ESM model and tokenizer from a local directory (never the hub): ``(model, tokenizer, name)``."""
    path = Path(esm_model_dir)
    if not path.is_dir():
        raise VcellError(f"{path}: ESM model directory not found")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise VcellError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise VcellError(f"{config_path}: unreadable model config (not a JSON object)") from None
    if model_type != "esm":
        raise VcellError(f"{path}: model_type is {model_type!r} in config.json, not an ESM model ('esm')")
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise VcellError(f"--device {device!r}: not a torch device (use cpu, cuda or cuda:N)") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise VcellError(f"--device {device!r}: CUDA is not available on this machine")
    transformers = _import_transformers()
    try:
        tokenizer = transformers.EsmTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # missing or broken vocab.txt
        raise VcellError(f"{path}: cannot load the ESM tokenizer ({type(exc).__name__}); the folder needs vocab.txt") from None
    try:
        model = transformers.EsmModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    except Exception as exc:  # missing weights, shape mismatches
        raise VcellError(f"{path}: cannot load the ESM weights ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    model.to(torch_device).eval()
    return model, tokenizer, path.resolve().name


def _fingerprint(esm_model_dir: Path, name: str, max_len: int) -> dict:
    config = (esm_model_dir / "config.json").read_bytes()
    weights = sorted((p.name, p.stat().st_size) for p in esm_model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"model": name, "config_sha1": hashlib.sha1(config).hexdigest(), "weights": weights, "max_residues": max_len}


@torch.no_grad()
def embed_chunks(model, tokenizer, chunks: list[str]) -> torch.Tensor:
    """Mean residue embedding of each chunk ([len(chunks), hidden]), special tokens and padding excluded."""
    device = next(model.parameters()).device
    enc = tokenizer(chunks, padding=True, return_tensors="pt")
    lengths = torch.tensor([len(c) for c in chunks])
    if not torch.equal(enc["attention_mask"].sum(1), lengths + 2):
        raise VcellError("the ESM tokenizer does not give one token per residue plus CLS/EOS; is vocab.txt the ESM alphabet?")
    hidden = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).last_hidden_state
    pos = torch.arange(hidden.shape[1], device=device)
    residues = ((pos >= 1) & (pos <= lengths.to(device)[:, None])).to(hidden.dtype)
    return (hidden * residues[..., None]).sum(1) / lengths.to(device, hidden.dtype)[:, None]


@contextmanager
def _progress(enabled: bool, total: int, description: str) -> Iterator:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def embed_fasta(
    fasta,
    esm_model_dir,
    out,
    header_regex: str | None = None,
    max_tokens: int = 4096,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> GeneEmbeddings:
    """Embed every protein of ``fasta`` with the ESM model in ``esm_model_dir``; write and return the gene table.

    ``out`` gets a ``.safetensors`` table (written atomically; shards in ``OUT.partial/`` make
    an interrupted run resumable). ``source`` is the model folder's name; ``info`` records the
    model, window, isoform counts and chunked proteins. See the module docs for the rules.
    """
    if Path(out).suffix.lower() != ".safetensors":
        raise VcellError(f"{out}: gene tables are written as .safetensors; name the output *.safetensors")
    if max_tokens < 3:
        raise VcellError(f"--max-tokens must be at least 3, got {max_tokens}")
    torch.manual_seed(seed)  # inference draws no random numbers; seeded for uniformity
    isoforms = read_fasta(fasta, header_regex)
    model, tokenizer, name = load_esm(esm_model_dir, device)
    max_len = int(model.config.max_position_embeddings) - 2
    if max_len < 1:
        raise VcellError(f"{esm_model_dir}: max_position_embeddings {model.config.max_position_embeddings} leaves no room for residues")

    genes: dict[str, list[str]] = {}
    for iso in isoforms:
        seqs = genes.setdefault(iso.gene, [])
        if iso.sequence not in seqs:
            seqs.append(iso.sequence)
    pieces = {seq: chunk(seq, max_len) for seqs in genes.values() for seq in seqs}
    unique = {sequence_key(c): c for cs in pieces.values() for c in cs}

    store = ShardStore(partial_dir(out), _fingerprint(Path(esm_model_dir), name, max_len))
    todo = [k for k in unique if k not in store.done]
    if len(todo) < len(unique):
        log.info("resuming: %d of %d protein chunks already embedded in %s", len(unique) - len(todo), len(unique), store.folder)
    batches = plan_batches([len(unique[k]) for k in todo], max_tokens)
    last_flush = time.monotonic()
    try:
        with _progress(progress, sum(len(unique[k]) for k in todo), f"embedding proteins ({name})") as advance:
            for batch in batches:
                keys = [todo[i] for i in batch]
                store.add(keys, embed_chunks(model, tokenizer, [unique[k] for k in keys]))
                advance(sum(len(unique[k]) for k in keys))
                if len(store.pending_keys) >= FLUSH_CHUNKS or time.monotonic() - last_flush > FLUSH_SECONDS:
                    store.flush()
                    last_flush = time.monotonic()
    finally:
        store.flush()  # keep finished work on errors and Ctrl-C

    def isoform_vector(seq: str) -> torch.Tensor:
        parts = pieces[seq]
        stacked = torch.stack([store.done[sequence_key(c)] for c in parts])
        weights = torch.tensor([len(c) for c in parts], dtype=torch.float32)
        return (stacked * weights[:, None]).sum(0) / weights.sum()

    vectors = torch.stack([torch.stack([isoform_vector(s) for s in seqs]).mean(0) for seqs in genes.values()])
    counts = [len(seqs) for seqs in genes.values()]
    info = {
        "model": name,
        "max_residues": max_len,
        "records": len(isoforms),
        "isoforms": sum(counts),
        "isoforms_per_gene_mean": sum(counts) / len(counts),
        "isoforms_per_gene_max": max(counts),
        "proteins_chunked": sum(len(p) > 1 for p in pieces.values()),
        "header_rule": header_regex or "default",
    }
    result = GeneEmbeddings(names=list(genes), vectors=vectors, source=name, info=info)
    result.save(out)
    shutil.rmtree(store.folder, ignore_errors=True)
    return result
