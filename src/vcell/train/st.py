"""Training the State Transition model with Lightning.

:class:`STModule` knows the model, its loss and optimiser; :class:`CellSetDataModule` knows the
cell-set batches of each epoch; the Lightning ``Trainer`` runs the loops. Checkpoints are
pickle-free directories (:mod:`vcell.train.checkpoint`) written by
:class:`~vcell.train.checkpoint.RunCheckpoints`:
``last/`` every N steps and ``best/`` on a new lowest ``val_loss``. A resumed run continues
exactly where the checkpoint left off (weights, optimiser, step, epoch, position in the epoch
and the torch RNG), so it ends with the same weights as an uninterrupted run.

Distributed training is Lightning's DDP (``devices`` x ``num_nodes`` processes, gloo on CPU,
nccl on GPU). ``batch_size`` is the global number of cell sets per step: every rank takes its
contiguous share of the same global batch, and DDP averages the per-rank mean losses' gradients
(a short last batch weighs its padded copies 0: :func:`~vcell.train.batches.rank_share`), so W
processes match one process on the same global batch up to float reduction order. Only
rank 0 writes checkpoints and logs; on resume every rank reads the same checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from vcell._heap import keep_freed_heap
from vcell.data.cellsets import CellSetDataset, CellSetSampler, collate_cell_sets
from vcell.data.dataset import PerturbationData, obsm_matrix
from vcell.data.rows import row_source
from vcell.data.splits import Split
from vcell.data.trained import pert_vocabulary, trained_batches, trained_labels
from vcell.errors import VcellError
from vcell.features.perturbations import PertFeatures, warn_untrained_validation
from vcell.nn.checkpoint import read_config
from vcell.nn.transition import StateTransition, STConfig
from vcell.train.batches import EpochBatches, WeightedSets, rank_seed
from vcell.train.checkpoint import ResumableModule
from vcell.train.display import status
from vcell.train.options import STTrainOptions, check_run_options
from vcell.train.runs import check_resume, run_dir, st_fingerprint
from vcell.train.seeding import seeded
from vcell.train.trainer import fit_module

log = logging.getLogger(__name__)


class STModule(ResumableModule, L.LightningModule):
    """A :class:`StateTransition` with its energy-distance loss and Adam optimiser.

    Parameters
    ----------
    config
        Model sizes.
    perturbations
        Perturbation label of each code in a batch's ``pert`` (``CellIndex.perts``).
    pert_vocab
        The training targets (the one-hot columns when the features have them).
    control
        Control label (all-zero perturbation vector).
    lr
        Adam learning rate.
    meta
        Extra entries for ``config.json`` (gene list, data columns, seed).
    features
        The perturbation features (:class:`~vcell.features.perturbations.PertFeatures`; default:
        one-hot over ``pert_vocab``): a label's vector is its ``pert`` input (``config.pert_dim`` long).
    """

    def __init__(self, config: STConfig, perturbations, pert_vocab, control: str, lr: float = 1e-4, meta: dict | None = None,
                 features: PertFeatures | None = None):
        super().__init__()
        features = PertFeatures.onehot(pert_vocab) if features is None else features
        if features.dim != config.pert_dim:
            raise VcellError(f"ST config: pert_dim is {config.pert_dim} but the perturbation features have {features.dim} dimensions")
        table_rows = 0 if features.is_onehot else len(features.names)
        if config.pert_table_rows != table_rows:
            raise VcellError(f"ST config: pert_table_rows is {config.pert_table_rows} but the perturbation feature table has {table_rows} rows")
        if config.onehot_dropout > 0 and not (features.sources[0] == "onehot" and len(features.sources) > 1):
            raise VcellError(f"ST config: onehot_dropout {config.onehot_dropout} needs pert_features 'onehot,FILE' "
                             f"(a one-hot part and a table), not {', '.join(features.sources)!r}")
        self.config, self.lr = config, float(lr)
        self.perturbations, self.pert_vocab, self.control = [str(p) for p in perturbations], list(pert_vocab), control
        self.features = features
        self.meta = dict(meta or {})
        self.model = StateTransition(config)
        self.model.set_trained_batches(self.meta.get("trained_batches"))
        if table_rows:
            self.model.pert_table.copy_(features.vectors)
        # code -> perturbation vector; not a parameter. Labels whose targets have no vector get a
        # zero row that is never looked up (build_module checks that no training cell has one).
        table, self.encodable = features.encode_known(self.perturbations, control)
        self.register_buffer("pert_table", table, persistent=False)
        if config.onehot_dropout > 0:
            # a label whose table part is zero (its target lacks a vector) keeps its one-hot part: dropped, it
            # would be the control's all-zero vector, and the model would learn that perturbation as no change
            readable = table[:, features.widths[0]:].abs().sum(dim=1) > 0
            unreadable = [p for p, ok, e in zip(self.perturbations, readable.tolist(), self.encodable) if e and not ok and p != control]
            if unreadable:
                log.warning("onehot_dropout: %d training label(s) have no vector in the table (%s%s): their one-hot part is "
                            "always kept", len(unreadable), ", ".join(unreadable[:5]), ", ..." if len(unreadable) > 5 else "")
            self.register_buffer("_droppable", readable, persistent=False)
        self._val_sums: torch.Tensor | None = None
        #: (row source, [per context: rows [sets, S]]) of training controls, set by train_st for control_relative
        self.drift_probe: tuple | None = None

    def refresh_control_drift(self) -> None:
        """Measure ``model.control_drift`` (``control_relative``): the mean change the model, in eval
        mode, makes under the control label to ``drift_probe``'s control sets, contexts weighted
        equally. Called before every checkpoint save, so the stored value always matches the weights."""
        if self.drift_probe is None:
            return
        rows, sets = self.drift_probe
        model, was_training = self.model, self.model.training
        dtype = next(model.parameters()).dtype
        model.eval()
        drifts = []
        with torch.no_grad():
            for ctx in sets:
                total = 0.0
                for one in ctx:  # a set at a time: with every gene, sets of a context are ~10 MB each
                    x = torch.from_numpy(rows.read(one)).to(self.device, dtype)[None]
                    pert = torch.zeros(1, self.config.pert_dim, device=self.device, dtype=dtype)
                    total = total + (model(x, pert).float() - x.float()).mean(dim=(0, 1))
                drifts.append(total / len(ctx))
        model.train(was_training)
        model.control_drift.copy_(torch.stack(drifts).mean(dim=0))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.drift_probe is not None:
            self.refresh_control_drift()
            checkpoint["state_dict"]["model.control_drift"] = self.model.control_drift.detach().clone()

    def checkpoint_meta(self) -> dict:
        """The content of ``config.json`` (without step, epoch and version)."""
        return {
            **self.meta,
            "model": self.config.to_dict(),
            "perturbations": self.perturbations,
            "pert_vocab": self.pert_vocab,
            "pert_features": self.features.to_meta(),
            "control": self.control,
            "lr": self.lr,
        }

    def forward(self, batch: dict) -> torch.Tensor:
        feats = self.pert_table[batch["pert"]]
        p = self.config.onehot_dropout
        if self.training and p > 0 and self.features.sources[0] == "onehot" and len(self.features.sources) > 1:
            width = self.features.widths[0]
            keep = (torch.rand(feats.shape[0], 1, device=feats.device) >= p) | ~self._droppable[batch["pert"]][:, None]
            feats = torch.cat([feats[:, :width] * keep, feats[:, width:]], dim=1)
        cell_batch = batch["batch"] if self.config.n_batches else None
        return self.model(batch["basal"], feats, batch=cell_batch, mask=batch["mask"])

    def _losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss in the model's output space, gene-decoder loss or ``None``)."""
        pred = self(batch)
        model = self.model
        # the energy distance's pairwise distances need fp32 even under bf16/fp16 autocast
        with torch.autocast(device_type=pred.device.type, enabled=False):
            main = model.loss(pred.float(), batch["target"].float(), batch["mask"], weights=batch.get("weight"))
        if model.gene_decoder is None:
            return main, None
        emb = pred.detach() if self.config.detach_gene_decoder else pred
        genes = model.decode_genes(emb, batch["basal"], batch["basal_genes"])
        with torch.autocast(device_type=pred.device.type, enabled=False):
            return main, model.loss(genes.float(), batch["target_genes"].float(), batch["mask"], weights=batch.get("weight"))

    def _total(self, main: torch.Tensor, genes: torch.Tensor | None) -> torch.Tensor:
        """The training objective from :meth:`_losses`' two parts."""
        return main if genes is None else main + self.config.gene_loss_weight * genes

    def _loss(self, batch: dict) -> torch.Tensor:
        return self._total(*self._losses(batch))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        main, genes = self._losses(batch)
        n = batch["basal"].shape[0]
        loss = self._total(main, genes)
        if genes is not None:
            self.log("train_embed_loss", main, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
            self.log("train_gene_loss", genes, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=n, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Lightning zeroes gradients between the next forward pass and its backward pass, so
        # this step's gradients (one model's worth of memory) would sit beside the next step's
        # activations, at the peak. Backward writes fresh gradients either way: same numbers.
        # (vcell never accumulates gradients over batches.)
        self.zero_grad(set_to_none=True)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, device=self.device)  # sum of set losses, number of sets

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = batch["basal"].shape[0]
        self._val_sums += torch.stack([self._loss(batch).detach() * n, torch.tensor(float(n), device=self.device)])

    def on_validation_epoch_end(self) -> None:
        # Summed over ranks by hand: Lightning's sync_dist mean averages the per-rank set counts as
        # integers, which is wrong when ranks score different numbers of sets.
        total, n = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        self.log("val_loss", total / n, sync_dist=False)

    def configure_optimizers(self):
        # fused: one kernel per parameter group instead of ~10 elementwise passes per tensor;
        # fp16's gradient scaler needs the unfused one (Lightning unscales before clipping)
        fused = self._trainer is None or self._trainer.precision != "16-mixed"
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, fused=fused)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # The call Lightning makes in fp32 (vcell clips by norm), made here for every precision:
        # Lightning's mixed-precision plugin refuses to clip next to a fused optimiser, and with
        # fp16 the gradients are already unscaled by now (the unfused Adam above).
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def on_fit_start(self) -> None:
        # every rank starts from the same seed; give ranks > 0 their own dropout stream (rank 0
        # keeps the single-process one)
        if self.trainer.world_size > 1 and self.global_rank > 0:
            torch.manual_seed(rank_seed(int(self.meta.get("seed", 0)), self.global_rank))


class CellSetDataModule(L.LightningDataModule):
    """Train/val cell-set batches of a :class:`PerturbationData` under a :class:`Split`.

    ``embed_key``: the sets hold the cells' ``.obsm[embed_key]`` embeddings, plus their genes
    (``X``) for the gene decoder. ``control_sets``: the training sets include control-label sets
    (:class:`~vcell.data.cellsets.CellSetSampler`; for ``STConfig.control_relative``).

    The train plan of epoch ``e`` depends only on ``(seed, e)``; one train loader serves every
    epoch, its batches tagged with their epoch (:class:`~vcell.train.batches.EpochBatches`), so
    its worker processes persist and draw each epoch's plan where they read it.
    """

    def __init__(
        self,
        data: PerturbationData,
        split: Split,
        batch_size: int = STTrainOptions.batch_size,
        set_size: int = STTrainOptions.set_size,
        seed: int = 0,
        control_strategy: str = STTrainOptions.control_strategy,
        num_workers: int = 0,
        embed_key: str | None = None,
        control_sets: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise VcellError(f"batch size must be >= 1, got {batch_size}")
        self.data, self.split = data, split
        self.batch_size, self.set_size, self.seed = batch_size, set_size, seed
        self.control_strategy, self.num_workers = control_strategy, num_workers
        self.prefetch_factor: int | None = None  # batches per worker fetched ahead; None: torch's default
        genes = row_source(data.adata, data.path)
        rows, gene_rows = (genes, None) if embed_key is None else (row_source(data.adata, data.path, f"obsm/{embed_key}"), genes)
        idx = data.index
        train = CellSetSampler(idx, split, "train", set_size, control_strategy, True, seed, control_sets=control_sets)
        self.train_set = CellSetDataset(train, rows, gene_rows=gene_rows)
        if len(self.train_set) == 0:
            raise VcellError("the split has no training cells")
        val = CellSetDataset(CellSetSampler(idx, split, "val", set_size, control_strategy, False, seed), rows, gene_rows=gene_rows)
        self.val_set = val if len(val) else None

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch."""
        return math.ceil(len(self.train_set) / self.batch_size)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        # a private generator: creating loader iterators must not consume the global torch RNG
        return DataLoader(
            dataset,
            collate_fn=collate_cell_sets,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            **kwargs,
        )

    def sample_batch(self, world: int = 1) -> dict:
        """A training batch of one of ``world`` processes, as the train loader's workers build it
        (read in this process)."""
        n = min(len(self.train_set), max(1, self.batch_size // world))
        return collate_cell_sets(self.train_set.__getitems__(list(range(n))))

    def _rank(self) -> tuple[int, int]:
        """``(global rank, world size)`` of this process."""
        if self.trainer is None:
            return 0, 1
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.batch_size % world:
            raise VcellError(f"batch size {self.batch_size} is not divisible by the {world} processes (devices x nodes)")
        return rank, world

    def _position(self) -> tuple[int, int]:
        # Every epoch has the same number of steps, so the global step alone says which plan and
        # batch come next; Lightning's own epoch counter can run one ahead after a resume from a
        # checkpoint written on an epoch's last batch.
        step = self.trainer.global_step if self.trainer is not None else 0
        return divmod(step, self.batches_per_epoch)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        self.train_set.set_epoch(self._position()[0])  # drawn once here, before any worker forks with a copy
        batches = EpochBatches(len(self.train_set), self.batch_size, rank=rank, world_size=world, position=self._position)
        return self._loader(WeightedSets(self.train_set), batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        rank, world = self._rank()
        data, batch_size = self.val_set, self.batch_size
        if world > 1 and len(data) >= world:
            # disjoint shares; ranks may run different numbers of batches (no per-batch collectives)
            data, batch_size = Subset(data, range(rank, len(data), world)), batch_size // world
        return self._loader(data, batch_size=batch_size, shuffle=False)


def build_module(
    data: PerturbationData,
    config: STConfig | dict,
    lr: float = 1e-4,
    seed: int = 0,
    embed_key: str | None = None,
    split: Split | None = None,
    pert_features=None,
) -> STModule:
    """An :class:`STModule` for ``data``; ``input_dim`` and ``pert_dim`` default to the data's sizes.

    ``embed_key``: the model works on the cells' ``.obsm[embed_key]`` embeddings and decodes genes
    (``gene_dim`` = the data's genes, no output ReLU unless the config says otherwise).
    ``split``: the training targets are those of labels with training or validation cells (all
    labels when ``None``). ``pert_features``: ``"onehot"`` (default), a gene table file or
    ``"onehot,FILE"`` (:class:`~vcell.features.perturbations.PertFeatures`); every training or
    validation label must have a vector.
    """
    spec, index = data.spec, data.index
    labels = trained_labels(data, split)
    vocab = pert_vocabulary(labels, spec.control)
    if not vocab:
        raise VcellError("the data has no perturbations besides the control" if split is None else
                         "the split has no training cells")
    features = PertFeatures.build(pert_features, vocab)
    features.check([p for p in labels if p != spec.control], what="training perturbation")
    values = config.to_dict() if isinstance(config, STConfig) else dict(config)
    width = int(data.adata.n_vars) if embed_key is None else obsm_matrix(data.adata, embed_key, data.path).shape[1]
    values.setdefault("input_dim", width)
    values.setdefault("pert_dim", features.dim)
    values["pert_table_rows"] = 0 if features.is_onehot else len(features.names)
    if embed_key is not None:
        values["gene_dim"] = int(data.adata.n_vars)
        values.setdefault("relu_output", False)  # embeddings are signed
    cfg = STConfig.from_dict(values)
    if cfg.n_batches:  # each set's batch code indexes the embedding: codes past it failed as an IndexError mid-training
        if spec.batch_col is None:
            raise VcellError(f"ST config: n_batches is {cfg.n_batches} but the data has no batch column (--batch-col, "
                             "batch_col=): every cell set would be batch 0")
        if cfg.n_batches < len(index.batches):
            raise VcellError(f"ST config: n_batches is {cfg.n_batches} but the batch column {spec.batch_col!r} has "
                             f"{len(index.batches)} batches: set n_batches to at least {len(index.batches)}")
    if cfg.input_dim != width:
        what = "genes" if embed_key is None else f"embedding dimensions in .obsm[{embed_key!r}]"
        raise VcellError(f"ST config: input_dim is {cfg.input_dim} but the data has {width} {what}")
    trained = [p for p in trained_labels(data, split, ("train",)) if p != spec.control]  # `--perturbations all`
    warn_untrained_validation(features, labels, trained, spec.control)
    meta = {
        "genes": [str(g) for g in data.adata.var_names],
        "columns": {"pert_col": spec.pert_col, "control": spec.control, "context_col": spec.context_col, "batch_col": spec.batch_col},
        "seed": int(seed),
        "embed_key": embed_key,
        "trained_perturbations": trained, "trained_batches": trained_batches(data, split, cfg.control_relative) if cfg.n_batches else None,
    }
    return STModule(cfg, index.perts, vocab, spec.control, lr=lr, meta=meta, features=features)


def fit(
    module: STModule,
    datamodule: CellSetDataModule,
    out_dir: str | os.PathLike,
    options: STTrainOptions | None = None,
    resume_dir: str | os.PathLike | None = None,
    **option_values,
) -> L.Trainer:
    """Train ``module`` to ``options.max_steps`` steps, checkpointing under ``out_dir``; resume from ``resume_dir``.

    ``options`` (or keyword ``option_values``, on top of ``options``) are
    :class:`~vcell.train.options.STTrainOptions`; ``datamodule.batch_size`` is the global batch.
    """
    options = STTrainOptions.from_values(option_values, options)
    check_run_options(options.accelerator, options.devices, options.num_nodes, options.strategy, options.precision,
                      datamodule.batch_size)
    module.meta.update(precision=options.precision, devices=options.devices, num_nodes=options.num_nodes)
    with seeded(options.seed):
        keep_freed_heap()
        # the train loader does resume mid-epoch (CellSetDataModule skips the batches already seen)
        return fit_module(module, datamodule, out_dir, options, "st", resume_dir, validate=datamodule.val_set is not None)


def train_st(
    data: PerturbationData,
    split: Split,
    out_dir: str | os.PathLike,
    config: STConfig | dict,
    options: STTrainOptions | None = None,
    resume: bool = False,
    embed_key: str | None = None,
    overwrite: bool = False,
    pert_features=None,
    **option_values,
) -> Path:
    """Train a State Transition model; returns ``out_dir`` (``last/``, ``best/``, ``logs/``).

    Parameters
    ----------
    data, split
        The dataset and which of its cells train, validate and are held out.
    out_dir
        Run folder.
    config
        :class:`STConfig` or its field values (e.g. from :meth:`STConfig.preset_values`); the data
        sizes are filled in.
    options
        :class:`~vcell.train.options.STTrainOptions`; keyword ``option_values`` (``max_steps=...``)
        go on top.
    resume
        Continue from ``out_dir/last`` (model, optimiser, step, epoch, RNG), so a run interrupted at
        any checkpoint ends with the same weights as an uninterrupted one. The run must train on
        what the checkpoint was trained on (data file, split, columns, perturbation features,
        ``embed_key``): any difference is refused, named.
    embed_key
        Train in the cell-embedding space ``.obsm[embed_key]`` (e.g. ``vcell embed``'s SE
        embeddings) with a gene decoder back to ``X``'s genes (see :class:`STConfig`).
    overwrite
        Replace a trained run already in ``out_dir`` (without it, and without ``resume``, that is
        refused; see :func:`~vcell.train.runs.run_dir`).
    pert_features
        Where perturbation vectors come from: ``"onehot"`` (default: one column per training
        target), a gene table file (the model then predicts any target in it) or ``"onehot,FILE"``
        (:mod:`vcell.features.perturbations`). The table is stored in the checkpoint.

    Notes
    -----
    With DDP this function runs in every process (Lightning re-runs the command line for ranks
    > 0), so call it from a script or the CLI, not from a notebook or a test runner.
    """
    options = STTrainOptions.from_values(option_values, options)
    out_dir = Path(out_dir)
    with run_dir(out_dir, resume, overwrite) as start, seeded(options.seed):
        module = build_module(data, config, lr=options.lr, seed=options.seed, embed_key=embed_key, split=split,
                              pert_features=pert_features)
        module.meta["fingerprint"] = st_fingerprint(data, split, embed_key)
        module.meta.update(batch_size=int(options.batch_size), set_size=int(options.set_size),
                           control_strategy=options.control_strategy, precision=options.precision)
        if module.config.n_batches and options.control_strategy != "batch":
            raise VcellError(f"ST config: n_batches is {module.config.n_batches} but control_strategy is "
                             f"{options.control_strategy!r}: cell sets carry their batch only with control_strategy 'batch'")
        if start is not None:
            check_resume(start, read_config(start), module.checkpoint_meta())
        with status("building the cell sets"):
            dm = CellSetDataModule(data, split, options.batch_size, options.set_size, options.seed, options.control_strategy,
                                   options.num_workers, embed_key, control_sets=module.config.control_relative)
        if module.config.control_relative:
            module.drift_probe = (dm.train_set.rows, dm.train_set.sampler.drift_probe())
        fit(module, dm, out_dir, options, start)
    return out_dir
