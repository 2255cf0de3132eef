"""State Embedding model (SE): a cell's top-expressed genes in, one normalised cell embedding out.

A cell becomes a *cell sentence*: ``[CLS]``, its most expressed genes (padded with sampled
unexpressed genes when too few are expressed) and a ``[DS]`` dataset token. Each gene token is the
gene's L2-normalised embedding projected to ``d_model`` (Linear -> LayerNorm -> SiLU) plus a
soft-binned encoding of its expression. A bidirectional transformer (no positional encoding: the
sentence is a set) reads the sentence; the cell embedding is the normalised ``[CLS]`` output.

Training hides the expression of some sentence genes and asks a small decoder to predict the
expression of a set of target genes (masked sentence genes, lower-ranked expressed genes and
unexpressed genes) from ``[cell embedding, gene embedding, read depth]``; a classifier on the
``[DS]`` output predicts the dataset. Tokenisation (:func:`tokenize`) is plain numpy so data
loaders can run it; training and checkpoints live in :mod:`vcell.train.se`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vcell.data.labels import label_rng
from vcell.data.rows import row_source
from vcell.data.validate import check_unique_genes
from vcell.errors import VcellError
from vcell.nn.checkpoint import LAST, find_checkpoint, load_model
from vcell.nn.config import ModelConfig
from vcell.nn.layers import RMSNorm, TransformerBlock, mlp

log = logging.getLogger(__name__)

# ``sentence_len`` counts every token: [CLS] + genes + [DS]. tiny and small are CPU sizes;
# default follows the STATE preprint (35M parameters with a 13k-gene table), large the scale of
# the released SE-600M (0.7B). Their 2,048 tokens hold 2,046 genes, one fewer than the design's
# [CLS] + 2,047 genes with [DS] beside them; kept so that runs trained with them still resume.
PRESETS: dict[str, dict] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "sentence_len": 256, "n_mask": 128},
    "small": {"d_model": 128, "n_layers": 2, "n_heads": 4, "sentence_len": 256, "n_mask": 256},
    "default": {"d_model": 512, "n_layers": 8, "n_heads": 16, "sentence_len": 2048, "n_mask": 1280},
    "large": {"d_model": 2048, "n_layers": 16, "n_heads": 16, "ffn_mult": 2, "sentence_len": 2048, "n_mask": 1280},
}
TARGET_SUM = 1e4  # counts are scaled to this total before log1p, as in `vcell data preprocess`


@dataclass
class SEConfig(ModelConfig):
    """Sizes of a :class:`StateEmbedding`; saved as JSON next to the weights.

    ``gene_dim`` is the width of the input gene embeddings and ``n_genes`` the vocabulary size;
    ``emb_dim`` (default ``d_model``) the cell embedding size; ``sentence_len`` all tokens of a
    cell sentence ([CLS] + genes + [DS]); ``n_mask`` the expression targets per cell.
    """

    n_genes: int
    gene_dim: int
    n_datasets: int = 1
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0
    emb_dim: int | None = None
    n_bins: int = 10
    sentence_len: int = 512
    n_mask: int = 256
    decoder_hidden: int | None = None
    ds_weight: float = 0.1

    KIND: ClassVar[str] = "SE"
    REQUIRED: ClassVar[tuple[str, ...]] = ("n_genes", "gene_dim")
    PRESETS: ClassVar[dict] = PRESETS

    def __post_init__(self):
        if self.emb_dim is None:
            self.emb_dim = self.d_model
        if self.decoder_hidden is None:
            self.decoder_hidden = self.d_model
        self.check_positive(("n_genes", "gene_dim", "n_datasets", "d_model", "n_layers", "n_heads", "ffn_mult", "emb_dim",
                             "n_bins", "n_mask", "decoder_hidden"))
        if self.sentence_len < 3:
            raise VcellError(f"SE config: sentence_len must be >= 3 ([CLS], a gene, [DS]), got {self.sentence_len}")
        if self.d_model % self.n_heads:
            raise VcellError(f"SE config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        self.check_dropout(self.dropout)

    @property
    def gene_slots(self) -> int:
        """Gene tokens per sentence (``sentence_len`` minus [CLS] and [DS])."""
        return self.sentence_len - 2


def unit_gene_vectors(table) -> torch.Tensor:
    """A gene table as the model keeps it: float32 rows scaled to unit length."""
    table = table if isinstance(table, torch.Tensor) else torch.as_tensor(np.asarray(table))
    return F.normalize(table.float(), dim=-1)


def normalise_expression(rows: np.ndarray, expression: str) -> tuple[np.ndarray, np.ndarray]:
    """``(log1p values comparable across cells, log read depth)`` of a dense block of cells.

    Counts are scaled to 10,000 per cell and log1p'd; log1p input is used as is, its depth being
    the log1p of the summed ``expm1`` values. Returns new arrays, ``rows`` is left unchanged.
    """
    if expression == "counts":
        total = rows.sum(1, keepdims=True, dtype=np.float64)
        values = np.log1p(rows / np.maximum(total, 1e-12) * TARGET_SUM).astype(np.float32)
    elif expression == "log1p":
        values = np.asarray(rows, dtype=np.float32)
        total = np.expm1(values.astype(np.float64)).sum(1, keepdims=True)
    else:
        raise VcellError(f"unknown expression type {expression!r}; use 'counts' or 'log1p'")
    return values, np.log1p(total[:, 0]).astype(np.float32)


def _sample(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws from ``pool``: without replacement when it is large enough."""
    if n <= 0 or pool.size == 0:
        return pool[:0]
    return rng.choice(pool, size=n, replace=pool.size < n)


def tokenize(
    values: np.ndarray,
    gene_ids: np.ndarray,
    n_slots: int,
    n_mask: int,
    rng: np.random.Generator | list[np.random.Generator],
) -> dict[str, np.ndarray]:
    """Cell sentences (gene part) and expression targets of a block of cells.

    Parameters
    ----------
    values
        ``[B, G]`` log1p expression (:func:`normalise_expression`) of the columns in the vocabulary.
    gene_ids
        ``[G]`` vocabulary index of each column.
    n_slots
        Gene tokens per sentence (at most ``G``): the top-expressed genes, highest first (ties in
        vocabulary order, so the columns' order in the file changes nothing), then randomly sampled
        unexpressed genes when fewer are expressed.
    n_mask
        Expression targets per cell (0 for inference): up to half (and at most half of the
        sentence's expressed genes) are expressed sentence genes, whose value is hidden from the
        model (``masked``); the rest come from genes outside the sentence, half of them expressed
        where the cell has such genes. When the sentence holds every gene, the rest are its
        unexpressed (padding) genes, hidden too. Targets repeat only when a cell has too few
        candidates.
    rng
        One generator for the block, or one per cell (results then independent of the blocking).

    Returns
    -------
    ``genes`` ``[B, n_slots]`` vocabulary ids, ``values`` ``[B, n_slots]``, ``masked``
    ``[B, n_slots]`` bool, ``target_genes`` / ``target_values`` ``[B, n_mask]``.
    """
    B, G = values.shape
    if not 1 <= n_slots <= G:
        raise VcellError(f"cell sentence needs 1..{G} gene tokens, got {n_slots}")
    cols = np.empty((B, n_slots), dtype=np.int64)
    masked = np.zeros((B, n_slots), dtype=bool)
    t_cols = np.empty((B, n_mask), dtype=np.int64)
    by_id = np.argsort(gene_ids, kind="stable")  # the columns in vocabulary order: draws and ties do not follow the file's order
    in_top = np.zeros(G, dtype=bool)
    rngs = list(rng) if isinstance(rng, (list, tuple)) else [rng] * B
    for i in range(B):
        v, rng = values[i], rngs[i]
        on = v[by_id] > 0
        expressed = by_id[on]
        top = expressed[np.argsort(-v[expressed], kind="stable")][:n_slots]
        n_pad = n_slots - top.size
        if n_pad:
            top = np.concatenate([top, rng.choice(by_id[~on], size=n_pad, replace=False)])
        cols[i] = top
        if not n_mask:
            continue
        n_expr_in = n_slots - n_pad
        n_in = min(n_mask // 2, n_expr_in // 2)
        hide = rng.choice(n_expr_in, size=n_in, replace=False)
        masked[i, hide] = True
        in_top[top] = True
        outside = by_id[~in_top[by_id]]
        in_top[top] = False
        out_expr = outside[v[outside] > 0]
        out_zero = outside[v[outside] <= 0]
        n_out_expr = min((n_mask - n_in) // 2, out_expr.size)
        n_rest = n_mask - n_in - n_out_expr
        if outside.size:
            rest = _sample(rng, out_zero if out_zero.size else outside, n_rest)
        else:  # every gene is in the sentence: the remaining targets are its padding genes, hidden, then repeats
            extra = rng.permutation(np.arange(n_expr_in, n_slots))[:n_rest]
            if extra.size < n_rest:  # no more expressed genes are hidden than the half above
                again = np.concatenate([hide, extra])
                extra = np.concatenate([extra, _sample(rng, again if again.size else np.arange(n_slots), n_rest - extra.size)])
            masked[i, extra] = True
            rest = top[extra]
        t_cols[i] = np.concatenate([top[hide], _sample(rng, out_expr, n_out_expr), rest])
    rows = np.arange(B)[:, None]
    return {
        "genes": gene_ids[cols],
        "values": values[rows, cols],
        "masked": masked,
        "target_genes": gene_ids[t_cols],
        "target_values": values[rows, t_cols],
    }


class SoftBinning(nn.Module):
    """Expression value -> softmax over ``n_bins`` (small MLP) -> weighted sum of bin embeddings."""

    def __init__(self, n_bins: int, dim: int, hidden: int = 32):
        super().__init__()
        self.to_bins = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, n_bins))
        self.bins = nn.Parameter(torch.randn(n_bins, dim) * 0.02)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """``[...]`` values -> ``[..., dim]`` encodings."""
        weights = torch.softmax(self.to_bins(values.unsqueeze(-1)), dim=-1)
        return weights @ self.bins


class StateEmbedding(nn.Module):
    """The SE network: cell sentences -> cell embeddings, plus the expression decoder for training.

    The gene embedding table (``gene_vectors``, L2-normalised) is a buffer saved with the
    weights, so a checkpoint carries its own vocabulary.
    """

    def __init__(self, config: SEConfig, gene_vectors: torch.Tensor | None = None):
        super().__init__()
        c = self.config = config
        table = torch.zeros(c.n_genes, c.gene_dim) if gene_vectors is None else gene_vectors.float()
        if tuple(table.shape) != (c.n_genes, c.gene_dim):
            raise VcellError(f"SE: gene table is {tuple(table.shape)} but the config says ({c.n_genes}, {c.gene_dim})")
        self.register_buffer("gene_vectors", unit_gene_vectors(table))
        self.gene_proj = nn.Sequential(nn.Linear(c.gene_dim, c.d_model), nn.LayerNorm(c.d_model), nn.SiLU())
        self.binning = SoftBinning(c.n_bins, c.d_model)
        self.cls = nn.Parameter(torch.randn(c.d_model) * 0.02)
        self.ds = nn.Parameter(torch.randn(c.d_model) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(c.d_model) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(c.d_model, c.n_heads, c.ffn_mult, c.dropout) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        self.to_emb = nn.Linear(c.d_model, c.emb_dim)
        self.decoder = mlp(c.emb_dim + c.d_model + 1, c.decoder_hidden, 1, n_layers=3, dropout=c.dropout)
        self.cell_to_gene = nn.Linear(c.emb_dim, c.d_model)
        self.ds_head = nn.Linear(c.d_model, c.n_datasets)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> tuple[StateEmbedding, dict]:
        """``(model in eval mode, config.json content)`` of an SE checkpoint folder or of a run folder (its ``last/``)."""
        return load_model(find_checkpoint(directory, prefer=LAST), "se", lambda values: cls(SEConfig.from_dict(values)))

    def gene_tokens(self, genes: torch.Tensor) -> torch.Tensor:
        """Projected gene embeddings ``[..., d_model]`` of vocabulary ids ``genes``."""
        return self.gene_proj(self.gene_vectors[genes])

    def sentence(self, genes: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Input tokens ``[B, 2 + n_slots, d_model]``: ``[CLS]``, one per gene, ``[DS]``.

        ``masked`` tokens show the gene but hide its expression (the mask vector replaces the
        expression encoding).
        """
        expr = self.binning(values)
        if masked is not None:
            expr = torch.where(masked.unsqueeze(-1), self.mask_token.to(expr.dtype), expr)
        tokens = self.gene_tokens(genes) + expr
        B = genes.shape[0]
        return torch.cat([self.cls.expand(B, 1, -1), tokens, self.ds.expand(B, 1, -1)], dim=1)

    def encode(self, genes: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None = None):
        """Transformer outputs for sentences: ``(cell_embedding [B, emb_dim], ds_output [B, d_model])``."""
        h = self.sentence(genes, values, masked)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return F.normalize(self.to_emb(h[:, 0]), dim=-1), h[:, -1]

    def forward(self, genes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Normalised cell embeddings ``[B, emb_dim]`` of unmasked cell sentences."""
        return self.encode(genes, values)[0]

    def predict_expression(self, cell_emb: torch.Tensor, target_genes: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Predicted log1p expression ``[B, T]`` of ``target_genes`` from the cell embeddings and read depth."""
        T = target_genes.shape[1]
        # unit-norm embeddings have entries ~ 1/sqrt(emb_dim); rescale them to the gene tokens' ~1
        cell = cell_emb.unsqueeze(1).expand(-1, T, -1) * self.config.emb_dim**0.5
        gene = self.gene_tokens(target_genes)
        feats = torch.cat([cell, gene, depth[:, None, None].expand(-1, T, 1) / 10], dim=-1)
        # + a bilinear cell x gene term: expression as a low-rank product, as in PCA
        bilinear = (self.cell_to_gene(cell_emb).unsqueeze(1) * gene).sum(-1)
        return self.decoder(feats).squeeze(-1) + bilinear

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked-expression MSE plus ``ds_weight`` x dataset cross-entropy; returns ``(loss, parts)``."""
        emb, ds_out = self.encode(batch["genes"], batch["values"], batch["masked"])
        pred = self.predict_expression(emb, batch["target_genes"], batch["depth"])
        mse = F.mse_loss(pred, batch["target_values"])
        ds = F.cross_entropy(self.ds_head(ds_out), batch["dataset"])
        return mse + self.config.ds_weight * ds, {"mse": mse.detach(), "ds": ds.detach()}


# ----------------------------------------------------------------------------- embedding cells


def match_genes(var_names, vocab: dict[str, int], where: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(columns, vocabulary ids, missing names)`` of ``var_names``; logs the missing genes.

    Raises when no gene is in the vocabulary.
    """
    names = [str(g) for g in var_names]
    check_unique_genes(names, where)  # two columns would share one token and its gene
    ids = np.array([vocab.get(g, -1) for g in names], dtype=np.int64)
    columns = np.flatnonzero(ids >= 0)
    missing = [g for g, i in zip(names, ids) if i < 0]
    if columns.size == 0:
        raise VcellError(f"{where}: none of its {len(names)} genes is in the gene vocabulary ({len(vocab)} genes; e.g. {names[0]!r})")
    if missing:
        log.warning("%s: %d of %d genes are not in the gene vocabulary and are ignored (e.g. %s)",
                    where, len(missing), len(names), ", ".join(missing[:5]))
    return columns, ids[columns], missing


@torch.no_grad()
def embed_adata(model: StateEmbedding, meta: dict, adata, expression: str, batch_size: int = 64, seed: int = 0,
                where: str = "data", progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """``(cell embeddings [n_cells, emb_dim], genes missing from the vocabulary)`` of an in-memory AnnData.

    Sentences are tokenised without masking; a cell's padding genes are drawn with ``seed`` and its
    obs name, so its embedding depends neither on its row (a subset or a reordered file gives the
    same) nor on ``batch_size`` (to float rounding: a batch's matmuls sum in another order).
    ``progress`` is called with the number of cells embedded after each batch (e.g. to advance a
    progress bar).
    """
    vocab = {g: i for i, g in enumerate(meta["genes"])}
    columns, ids, missing = match_genes(adata.var_names, vocab, where)
    # the sentence length training used (shorter than the config's when its files had fewer genes)
    n_slots = min(int(meta.get("gene_slots", model.config.gene_slots)), len(columns))
    rows = row_source(adata)
    device = next(model.parameters()).device
    out = np.empty((adata.n_obs, model.config.emb_dim), dtype=np.float32)
    names = [str(name) for name in adata.obs_names]
    for start in range(0, adata.n_obs, batch_size):
        idx = np.arange(start, min(start + batch_size, adata.n_obs))
        values, _ = normalise_expression(rows.read(idx), expression)
        tok = tokenize(values[:, columns], ids, n_slots, 0, [label_rng(seed, names[i]) for i in idx])
        emb = model(torch.as_tensor(tok["genes"], device=device), torch.as_tensor(tok["values"], device=device))
        out[idx] = emb.float().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out, missing
