"""State Transition model (ST): maps a set of control cells plus a perturbation to a set of perturbed cells.

Per cell: ``h = basal_encoder(basal) + pert_encoder(pert) [+ batch_embedding(batch)]``; the set
goes through a bidirectional transformer with no positional encoding (the set is unordered),
and ``output = decoder(norm(transformer(h)) + basal_encoder(basal))``, ReLU'd when predicting
non-negative expression. Trained with the energy distance between the predicted and an observed
perturbed set of the same (context, perturbation). Training, data and checkpoints live elsewhere.

In a cell-embedding space (e.g. SE embeddings, ``gene_dim`` > 0) a gene decoder (MLP with
LayerNorm/GELU) maps the predicted embeddings back to log1p genes; its own energy-distance loss
against the observed cells' genes is added with weight ``gene_loss_weight``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vcell.errors import VcellError
from vcell.nn.checkpoint import load_model
from vcell.nn.config import ModelConfig
from vcell.nn.layers import RMSNorm, TransformerBlock, energy_distance, mlp, norm_mlp

PRESETS: dict[str, dict[str, int]] = {
    "small": {"width": 672, "n_layers": 4, "n_heads": 8},
    "default": {"width": 768, "n_layers": 8, "n_heads": 12},
    "large": {"width": 1488, "n_layers": 6, "n_heads": 12},
}


@dataclass
class STConfig(ModelConfig):
    """Sizes of a :class:`StateTransition`; saved as JSON/YAML next to the weights via :meth:`to_dict`.

    ``pert_dim`` is the length of a perturbation vector: the vocabulary size for one-hot /
    multi-hot vectors (:func:`pert_features`), or the dimension of a provided perturbation
    feature (e.g. a gene embedding). ``output_dim`` defaults to ``input_dim``. ``n_batches`` = 0
    means no batch embedding. ``predict_residual`` (when input and output spaces are the same):
    the decoder predicts the change from each basal cell, and starts at zero, so an untrained
    model returns its control cells and training learns the perturbation effect. ``dropout``
    applies in the basal and perturbation encoders; the Llama-style backbone has none (as in
    arc-state's configs).

    Embedding space: ``gene_dim`` > 0 adds a gene decoder ``output_dim -> gene_hidden... ->
    gene_dim`` (ReLU'd: log1p genes), trained with weight ``gene_loss_weight`` on its own energy
    distance; ``detach_gene_decoder`` (default) stops that loss from reaching the transition
    model, which then learns only in the embedding space (benchmarks/README.md compares both).
    ``gene_residual``: genes are predicted as ``basal genes + dec(predicted) - dec(basal
    embedding)``, so a predicted embedding equal to its basal cell gives back that cell's genes
    exactly (decoder bias cancels; the control cells of an evaluation stay comparable).

    ``pert_table_rows`` > 0: the model carries the gene table its perturbation vectors come from
    (a ``pert_table_rows`` x ``pert_dim`` buffer, saved with the weights; the row names live in the
    checkpoint's ``config.json``, see :class:`~vcell.features.perturbations.PertFeatures`), so it
    can encode any target of the table; 0: one-hot over the training targets, rebuilt from
    ``pert_vocab``. ``onehot_dropout`` (features ``onehot,FILE`` only): in training, each cell
    set's one-hot part is zeroed with this probability, so the model also learns to read a seen
    target from its table vector alone, which is all an unseen target has (a target the table has
    no vector for keeps its one-hot part: without it, it would read as the control).

    ``control_relative``: training also maps each training context's control cells to other
    control cells of it under the control label (a zero perturbation vector), and prediction reads
    the model relative to that: each predicted cell set is shifted by minus the mean change the
    model makes to the same set under the control label. What the model does to a context's cells
    regardless of the perturbation (its drift on a context it never trained on) cancels; its
    cell-level spread is kept. Needs ``predict_residual`` in one space (``output_dim ==
    input_dim``); prediction costs two forward passes. The shift is taken relative to
    ``control_drift``, the mean change the model makes under the control label to control cells
    of its training contexts (measured at every checkpoint save, stored with the weights): in a
    trained context the two cancel and the model's own effect is kept, including the part all
    perturbations share, which the control-label sets alone do not teach it to remove.
    """

    input_dim: int
    pert_dim: int
    output_dim: int | None = None
    n_batches: int = 0
    width: int = 768
    n_layers: int = 8
    n_heads: int = 12
    ffn_mult: int = 4
    encoder_layers: int = 4
    dropout: float = 0.1
    relu_output: bool = True
    predict_residual: bool = True
    gene_dim: int = 0
    gene_hidden: list[int] = field(default_factory=lambda: [1024, 1024, 512])
    gene_loss_weight: float = 1.0
    gene_residual: bool = True
    detach_gene_decoder: bool = True
    pert_table_rows: int = 0
    onehot_dropout: float = 0.0
    control_relative: bool = False

    KIND: ClassVar[str] = "ST"
    REQUIRED: ClassVar[tuple[str, ...]] = ("input_dim", "pert_dim")
    PRESETS: ClassVar[dict] = PRESETS

    def __post_init__(self):
        if self.output_dim is None:
            self.output_dim = self.input_dim
        self.check_positive(("input_dim", "pert_dim", "output_dim", "width", "n_layers", "n_heads", "ffn_mult", "encoder_layers"))
        if self.n_batches < 0:
            raise VcellError(f"ST config: n_batches must be >= 0, got {self.n_batches}")
        if self.width % self.n_heads:
            raise VcellError(f"ST config: width {self.width} is not divisible by n_heads {self.n_heads}")
        self.check_dropout(self.dropout)
        self.gene_hidden = [int(h) for h in self.gene_hidden]
        if self.gene_dim < 0 or any(h < 1 for h in self.gene_hidden):
            raise VcellError(f"ST config: gene_dim must be >= 0 and gene_hidden positive, got {self.gene_dim}, {self.gene_hidden}")
        self.check_dropout(self.onehot_dropout)
        if self.pert_table_rows < 0:
            raise VcellError(f"ST config: pert_table_rows must be >= 0, got {self.pert_table_rows}")
        if self.gene_loss_weight < 0:
            raise VcellError(f"ST config: gene_loss_weight must be >= 0, got {self.gene_loss_weight}")
        if self.control_relative and not (self.predict_residual and self.output_dim == self.input_dim):
            raise VcellError("ST config: control_relative needs predict_residual and output_dim equal to input_dim "
                             f"(got predict_residual {self.predict_residual}, {self.input_dim} -> {self.output_dim})")


class StateTransition(nn.Module):
    """The ST network. ``forward(basal, pert, batch=None, mask=None) -> [B, S, output_dim]``."""

    def __init__(self, config: STConfig):
        super().__init__()
        c = self.config = config
        self.basal_encoder = mlp(c.input_dim, c.width, c.width, c.encoder_layers, c.dropout)
        self.pert_encoder = mlp(c.pert_dim, c.width, c.width, c.encoder_layers, c.dropout)
        self.batch_embedding = nn.Embedding(c.n_batches, c.width) if c.n_batches else None
        if c.n_batches:  # the rows whose mean a cell without a batch gets: set_trained_batches narrows them
            self.register_buffer("batch_rows", torch.arange(c.n_batches), persistent=False)
        # Llama-style backbone: no dropout inside it (the encoders carry the model's dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c.width, c.n_heads, c.ffn_mult, 0.0) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.width)
        self.decoder = nn.Linear(c.width, c.output_dim)
        if self.residual:
            nn.init.zeros_(self.decoder.weight)
            nn.init.zeros_(self.decoder.bias)
        self.gene_decoder = norm_mlp(c.output_dim, c.gene_hidden, c.gene_dim, c.dropout) if c.gene_dim else None
        if c.control_relative:  # not trained: measured on training controls at each checkpoint save
            self.register_buffer("control_drift", torch.zeros(c.output_dim))
        if c.pert_table_rows:  # not trained: stored so the checkpoint can encode any target of its table
            self.register_buffer("pert_table", torch.zeros(c.pert_table_rows, c.pert_dim))

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> tuple[StateTransition, dict]:
        """``(model in eval mode, config.json content)`` of an ST checkpoint folder (:mod:`vcell.nn.checkpoint`)."""
        model, meta = load_model(directory, "st", lambda values: cls(STConfig.from_dict(values)))
        model.set_trained_batches(meta.get("trained_batches"))
        return model, meta

    def set_trained_batches(self, codes: list[int] | None) -> None:
        """Restrict the batch vectors averaged for a cell without a batch to the rows of ``codes``,
        the batches training saw (``None`` or empty: every row). The other rows keep their random
        initial values, which would otherwise move every such prediction."""
        if self.batch_embedding is None or not codes:
            return
        rows = torch.as_tensor(sorted({int(c) for c in codes}), dtype=torch.long)
        if int(rows.min()) < 0 or int(rows.max()) >= self.config.n_batches:
            raise VcellError(f"trained batch codes {rows.tolist()} do not fit the model's {self.config.n_batches} batch rows")
        self.batch_rows = rows.to(self.batch_embedding.weight.device)

    def forward(
        self,
        basal: torch.Tensor,
        pert: torch.Tensor,
        batch: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted perturbed cells for a batch of sets.

        Parameters
        ----------
        basal
            ``[B, S, input_dim]`` control cells.
        pert
            ``[B, S, pert_dim]`` per cell, or ``[B, pert_dim]`` for the whole set.
        batch
            Optional batch indices, ``[B]`` per set or ``[B, S]`` per cell (needs ``n_batches`` > 0).
            Without them a model with a batch embedding adds the mean of its trained batches' vectors
            (a cell of no batch in particular), not nothing: every cell it trained on had one.
        mask
            Optional ``[B, S]`` bool, ``True`` = real cell. Padded cells never influence real
            ones; their outputs are meaningless.
        """
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: lets attention use its fused unmasked kernel
        basal_state = self.basal_encoder(basal)
        if pert.dim() == 2 and not (self.training and self.config.dropout > 0):
            # one vector per set: encode it once per set, not once per cell (same numbers
            # without dropout; in training each cell draws its own dropout mask)
            pert_state = self.pert_encoder(pert)[:, None, :]
        else:
            if pert.dim() == 2:
                pert = pert[:, None, :].expand(-1, basal.shape[1], -1)
            pert_state = self.pert_encoder(pert)
        h = basal_state + pert_state
        if batch is not None:
            if self.batch_embedding is None:
                raise VcellError("batch indices were given but the ST config has n_batches = 0")
            h = h + self.batch_embedding(batch if batch.dim() == 2 else batch[:, None])
        elif self.batch_embedding is not None:
            h = h + self.batch_embedding.weight[self.batch_rows].mean(dim=0)
        for block in self.blocks:
            h = block(h, mask)
        out = self.decoder(self.norm(h) + basal_state)
        if self.residual:
            out = out + basal
        return torch.relu(out) if self.config.relu_output else out

    def decode_genes(
        self,
        emb: torch.Tensor,
        basal: torch.Tensor | None = None,
        basal_genes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log1p genes ``[..., gene_dim]`` of predicted embeddings ``emb`` (needs ``gene_dim`` > 0).

        With ``gene_residual`` the basal cells' embeddings ``basal`` and genes ``basal_genes``
        (same leading shape as ``emb``) are required: ``relu(basal_genes + dec(emb) - dec(basal))``.
        """
        if self.gene_decoder is None:
            raise VcellError("this ST model has no gene decoder (gene_dim = 0): it predicts genes directly")
        out = self.gene_decoder(emb)
        if self.config.gene_residual:
            if basal is None or basal_genes is None:
                raise VcellError("gene_residual decoding needs the basal cells' embeddings and genes")
            out = basal_genes + out - self.gene_decoder(basal)
        return torch.relu(out)

    @property
    def residual(self) -> bool:
        """Whether the decoder's output is added to the basal cells (same input and output space)."""
        return self.config.predict_residual and self.config.input_dim == self.config.output_dim

    def loss(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the batch of the energy distance between predicted and observed sets (with
        ``weights`` [B], their weighted sum).

        ``target_mask`` defaults to ``mask`` when both sets have the same size. Uses the full
        energy distance (twice geomloss ``SamplesLoss("energy")``), see
        :func:`~vcell.nn.layers.energy_distance`.
        """
        if target_mask is None and mask is not None and target.shape[1] == pred.shape[1]:
            target_mask = mask
        distances = energy_distance(pred, target, mask, target_mask)
        return distances.mean() if weights is None else (distances * weights.to(distances)).sum()
