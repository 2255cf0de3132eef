"""The State Transition model behind the :class:`~vcell.predictors.base.Predictor` interface.

``STPredictor.fit(data, split)`` trains with :func:`vcell.train.st.train_st` and loads the
checkpoint for inference (``best/`` when the split had validation cells, else ``last/``);
:meth:`STPredictor.from_checkpoint` loads a trained checkpoint directory directly.
``predict`` builds cell sets of real control cells of the target context (one perturbation
per set, never mixing contexts), runs the model in eval mode and returns the predicted cells
with the real controls appended, as ``vcell eval run`` expects.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from vcell._heap import keep_freed_heap
from vcell.data.cellsets import collate_cell_sets
from vcell.data.dataset import PerturbationData, missing_obsm_error, obsm_matrix
from vcell.data.io import atomic_path
from vcell.data.rows import MemoryRows
from vcell.data.spec import DataSpec, split_combo
from vcell.data.splits import Split
from vcell.errors import VcellError, preview
from vcell.features.perturbations import PertFeatures, untrained
from vcell.nn.checkpoint import BEST, LAST, find_checkpoint
from vcell.nn.precision import autocast, half_dtype
from vcell.nn.transition import StateTransition, STConfig
from vcell.predictors.base import Predictor, control_draws
from vcell.predictors.fitted_state import ANCHOR, load_fitted, save_fitted
from vcell.train.display import task
from vcell.train.options import STTrainOptions, on_cpu

log = logging.getLogger(__name__)


class STPredictor(Predictor):
    """State Transition model as a predictor.

    Parameters
    ----------
    seed
        Training seed (default: that of ``options``, else 0); :func:`~vcell.predictors.predict.predict_context`
        takes its own seed for the control cells it draws.
    preset
        ``small``, ``default`` or ``large`` (:data:`vcell.nn.transition.PRESETS`).
    config
        Overrides of :class:`STConfig` fields (e.g. ``{"width": 32, "n_layers": 1}``).
    out_dir
        Where checkpoints go; ``None``: a temporary directory kept as long as the predictor.
    checkpoint
        ``"best"`` (falls back to ``last`` when there is no ``best/``) or ``"last"``.
    resume
        Continue training from ``out_dir/last``.
    embed_key
        Train in the cell-embedding space ``.obsm[embed_key]`` with a gene decoder (predictions
        are genes either way); ``None``: gene space.
    pert_features
        ``"onehot"`` (default), a gene table file or ``"onehot,FILE"``
        (:mod:`vcell.features.perturbations`): with a table the model predicts any target in it.
    effect_anchor
        ``None`` (default) or a shift baseline's name (``"kernel_ridge"``, ``"linear"``,
        ``"pert_mean"``): fitted beside ST on the same data, split, ``pert_features`` and seed, it
        sets each predicted perturbation's mean; ST's cells keep their own spread around it
        (each perturbation's cells are moved by the anchor's shift minus ST's mean shift from the
        controls, then clipped at 0). An ensemble of ST's cell-level prediction with a
        pseudobulk learner's mean effect, stored in the run's checkpoints (``anchor.safetensors``,
        :mod:`vcell.predictors.fitted_state`): a checkpoint loaded later predicts with it too.
    options
        :class:`~vcell.train.options.STTrainOptions` (steps, batch, set size, lr, precision,
        devices, ...); keyword ``option_values`` go on top. ``set_size`` is also the largest
        cell set at prediction time, ``batch_size`` the sets per forward pass, ``precision`` and
        ``accelerator`` apply to prediction too.
    """

    name = "st"

    def __init__(
        self,
        seed: int | None = None,
        preset: str = "small",
        config: Mapping | None = None,
        out_dir: str | os.PathLike | None = None,
        checkpoint: str = BEST,
        resume: bool = False,
        embed_key: str | None = None,
        pert_features=None,
        effect_anchor: str | None = None,
        options: STTrainOptions | None = None,
        **option_values,
    ):
        if checkpoint not in (BEST, LAST):
            raise VcellError(f"st: checkpoint must be 'best' or 'last', got {checkpoint!r}")
        try:
            given = {} if seed is None else {"seed": int(seed) if isinstance(seed, numbers.Integral) else seed}
            self.options = STTrainOptions.from_values({**given, **option_values}, options)
            # attention mixes a set's cells, so a checkpoint predicts with the set size it was trained with unless told
            self._set_size_given = options is not None or "set_size" in option_values
        except VcellError as exc:  # named as the baselines name their options (a bench --model-config entry, make_model)
            raise VcellError(f"st: {exc}") from None
        self.seed, self.preset, self.config_overrides = self.options.seed, preset, dict(config or {})
        misplaced = sorted(set(self.config_overrides) & set(self.option_names()))
        if misplaced:
            raise VcellError(f"st: config holds training option(s) {', '.join(misplaced)}, not model sizes: give them beside "
                             f"config (a bench --model-config entry: {{model: st, {misplaced[0]}: ..., config: {{...}}}})")
        STConfig.preset_values(preset, self.config_overrides)  # fail early on bad names or values
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint, self.resume, self.train_embed_key = checkpoint, resume, embed_key
        if pert_features is not None:
            from vcell.features.perturbations import check_sources

            check_sources(pert_features, "st", read=False)  # a bad value or a missing file, before any data is read (as the baselines)
        self.pert_features = pert_features
        self.features: PertFeatures | None = None
        self.effect_anchor, self.anchor = effect_anchor, None
        if effect_anchor is not None:
            from vcell.predictors.baselines import make_baseline

            self._anchor_model = lambda: make_baseline(effect_anchor, seed=self.seed, **self._anchor_options())
            model = self._anchor_model()  # an unknown name or a model without options is refused now
            if not hasattr(model, "predict_shift"):
                raise VcellError(f"st: effect_anchor {effect_anchor!r} predicts no mean shift; use kernel_ridge, linear or pert_mean")
        self.model: StateTransition | None = None
        self._half_model: tuple | None = None  # ((device, dtype), copy) for mixed-precision prediction
        self.model_config: STConfig | None = None
        self.meta: dict | None = None
        self.spec: DataSpec | None = None
        self.checkpoint_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def precision(self) -> str:
        """Numeric precision of prediction (and training): ``options.precision``."""
        return self.options.precision

    @precision.setter
    def precision(self, value: str) -> None:
        self.options = STTrainOptions.from_values({"precision": value}, self.options)

    @classmethod
    def option_names(cls) -> list[str]:
        """Every keyword the constructor takes (``make_model("st", ...)`` checks against these)."""
        return ["preset", "config", "out_dir", "checkpoint", "resume", "embed_key", "pert_features", "effect_anchor",
                *STTrainOptions.names()]

    def predicts_unseen_targets(self) -> bool:
        """Only with a gene table among its ``pert_features`` (one-hot alone knows the trained targets)."""
        return self.reads_gene_table()

    def check_fit(self, data: PerturbationData, split: Split, predicted: Sequence[str]) -> None:
        """As :meth:`Predictor.check_fit`, and the cell embeddings ``embed_key`` names must be in the data."""
        super().check_fit(data, split, predicted)
        key = self.train_embed_key
        if key is not None and key not in data.adata.obsm:
            raise missing_obsm_error(data.path, key, data.adata.obsm.keys())

    def _anchor_options(self) -> dict:
        """Options of the effect anchor: the same perturbation features where it takes them."""
        if self.effect_anchor in ("linear", "kernel_ridge") and self.pert_features is not None:
            return {"pert_features": self.pert_features}
        return {}

    # ------------------------------------------------------------------ training / loading

    def fit(self, data: PerturbationData, split: Split) -> STPredictor:
        """Train on ``data`` under ``split`` (:func:`vcell.train.st.train_st`), then load the chosen checkpoint."""
        if data.spec.expression == "counts":
            raise VcellError("st: the data holds raw counts; the ST model trains on log1p expression (run `vcell data preprocess` first)")
        out = self.out_dir
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vcell-st-")
            out = Path(self._tmp.name)
        values = STConfig.preset_values(self.preset, self.config_overrides)
        from vcell.train.st import train_st  # Lightning: imported when training, not to predict

        train_st(data, split, out, values, self.options, resume=self.resume, embed_key=self.train_embed_key,
                 pert_features=self.pert_features)
        anchor = self._anchor_model().fit(data, split) if self.effect_anchor is not None else None
        for folder in (out / BEST, out / LAST):  # every checkpoint of the run predicts with the anchor
            if anchor is not None and folder.is_dir():
                with atomic_path(folder / ANCHOR) as tmp:
                    save_fitted(anchor, tmp)
        return self.load(find_checkpoint(out, self.checkpoint))

    def load(self, directory: str | os.PathLike) -> STPredictor:
        """Load a checkpoint folder (or a run folder's ``best/``/``last/``) for inference."""
        directory = find_checkpoint(directory, self.checkpoint)
        model, meta = StateTransition.from_checkpoint(directory)
        config = model.config
        for key in ("genes", "pert_vocab", "control"):
            if key not in meta:
                raise VcellError(f"{directory}: config.json has no {key!r}; not an ST checkpoint written by vcell train")
        cols = meta.get("columns", {})
        self.spec = DataSpec(
            pert_col=cols.get("pert_col", "target_gene"),
            control=meta["control"],
            context_col=cols.get("context_col", "cell_type"),
            batch_col=cols.get("batch_col"),
            expression="log1p",
        )
        self.model, self.model_config, self.meta = model.eval(), config, meta
        if "pert_features" in meta and config.pert_table_rows:
            self.features = PertFeatures.from_meta(meta["pert_features"], model.pert_table)
        else:  # one-hot over the training targets (also every checkpoint written before feature tables)
            self.features = PertFeatures.onehot(meta["pert_vocab"])
        self._half_model = None
        if not self._set_size_given and isinstance(meta.get("set_size"), int) and meta["set_size"] >= 1:
            self.options = STTrainOptions.from_values({"set_size": meta["set_size"]}, self.options)
        self.checkpoint_dir = Path(directory)
        self.anchor = load_fitted(directory / ANCHOR) if (directory / ANCHOR).is_file() else None
        self.effect_anchor = self.anchor.name if self.anchor is not None else None
        return self

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, seed: int = 0, checkpoint: str = BEST, **option_values) -> STPredictor:
        """A predictor ready to predict from a checkpoint folder or a ``vcell train st`` run folder.

        ``option_values`` are prediction-time :class:`~vcell.train.options.STTrainOptions`
        (``set_size``, ``batch_size``, ``precision``, ``accelerator``); ``set_size`` defaults to the
        one the model was trained with (attention mixes a set's cells, so it changes the numbers).
        """
        return cls(seed=seed, checkpoint=checkpoint, **option_values).load(directory)

    # ------------------------------------------------------------------ inference

    @property
    def genes(self) -> list[str]:
        """The model's genes, in the order it predicts them."""
        self._require_fitted()
        return list(self.meta["genes"])

    @property
    def pert_vocab(self) -> list[str]:
        """The targets the model was trained on (its one-hot columns when it has them)."""
        self._require_fitted()
        return list(self.meta["pert_vocab"])

    @property
    def known_targets(self) -> list[str]:
        """Every target the model can encode: its training targets, or every target of its feature table."""
        self._require_fitted()
        return list(self.features.names)

    def _require_fitted(self) -> None:
        if self.model is None or self.meta is None:
            raise VcellError(f"{self.name}: predict() called before fit()")

    def align_genes(self, controls: ad.AnnData) -> ad.AnnData:
        """``controls`` with the model's genes in the model's order; a different gene set is an error."""
        genes = self.genes
        have = [str(g) for g in controls.var_names]
        if have == genes:
            return controls
        have_set, want_set = set(have), set(genes)
        if have_set != want_set or len(have) != len(genes):
            missing = [g for g in genes if g not in have_set]
            extra = [g for g in have if g not in want_set]
            parts = []
            if missing:
                parts.append(f"{len(missing)} model gene(s) missing ({preview(missing)})")
            if extra:
                parts.append(f"{len(extra)} gene(s) the model does not know ({preview(extra)})")
            if not parts:
                parts.append("duplicate gene names")
            raise VcellError(
                f"the data's genes differ from the model's {len(genes)} genes"
                f"{f' ({self.checkpoint_dir})' if self.checkpoint_dir else ''}: {'; '.join(parts)}; "
                "preprocess the data with the model's gene list"
            )
        return controls[:, genes].copy()

    def check_perturbations(self, perturbations: Sequence[str]) -> None:
        """Every target of every perturbation must have a vector in the model's perturbation features
        (with one-hot features alone, a vector that training cells taught: a validation-only
        target's column never learned)."""
        self._require_fitted()
        control = self.meta["control"]
        self.features.check([str(p) for p in perturbations], control, what="unknown perturbation")
        if self.features.is_onehot and "trained_perturbations" in self.meta:
            if found := untrained(perturbations, self.meta["trained_perturbations"], control):
                raise VcellError(f"perturbation {found[0]!r} has a one-hot column but no training cell (a validation "
                                 "perturbation): the column never learned; a one-hot model predicts the targets it was trained "
                                 "on; train with --pert-features FILE (pert_features=FILE) for others")

    def _device(self) -> torch.device:
        return torch.device("cpu") if on_cpu(self.options.accelerator) or not torch.cuda.is_available() else torch.device("cuda")

    def predict_cells(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str = "",
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Predicted cells ``{perturbation: [n, genes]}`` from ``controls`` (aligned, one context).

        Cell sets of at most ``options.set_size`` control cells (a loaded checkpoint's default: the
        set size it was trained with; attention mixes a set's cells, so the numbers depend on it),
        ``batch_size`` sets (default ``options.batch_size``) per forward pass (the numbers do not
        depend on it).
        A ``control_relative`` model (:class:`~vcell.nn.transition.STConfig`) runs each set twice, with
        the perturbation and with the control label, and shifts the first output by minus the mean
        change the second made to the set, less the model's ``control_drift`` (that change on its
        training contexts' controls).
        """
        self._require_fitted()
        self.check_perturbations(perturbations)
        if controls.n_obs == 0:
            raise VcellError("no control cells to predict from")
        # rows are made dense set by set: the controls stay as stored (CSR), never one dense copy of all
        genes = MemoryRows(controls.X)
        key = self.embed_key
        basal = genes if key is None else MemoryRows(self.control_embeddings(controls))
        feats = self.features.encode([str(p) for p in perturbations], self.meta["control"])
        if self.model_config.n_batches:
            log.warning("st: the model has a batch embedding; the control cells' batches are not read: every predicted cell "
                        "gets the mean of the %d batch vectors training used", len(self.model.batch_rows))
        # one job per set: (perturbation index, control rows); a set never mixes perturbations
        jobs: list[tuple[int, np.ndarray]] = []
        set_size = self.options.set_size
        for i, rows in enumerate(control_draws(controls.n_obs, perturbations, cells_per_perturbation, seed)):
            n = len(rows)
            for chunk in np.array_split(rows, max(1, math.ceil(n / set_size))):
                if len(chunk):
                    jobs.append((i, chunk))
        device = self._device()
        if device.type == "cpu":
            keep_freed_heap()
        model = self._inference_model(device)
        relative = self.model_config.control_relative
        bs = batch_size or max(1, self.options.batch_size)
        # Batch sets of similar size together so little of each batch is padding; the results
        # go back to job order (padding never changes a real cell's output: keys are masked).
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
        # each set's cells go straight to their rows of their perturbation's output (no second copy)
        labels = [str(p) for p in perturbations]
        width = controls.n_vars
        sizes: dict[str, int] = dict.fromkeys(labels, 0)
        offsets = []
        for i, rows in jobs:
            offsets.append(sizes[labels[i]])
            sizes[labels[i]] += len(rows)
        cells = {p: np.empty((n, width), np.float32) for p, n in sizes.items()}
        where = f" {context}" if context else ""
        with torch.no_grad(), autocast(device, self.options.precision), task(f"predicting{where}", len(jobs), "sets") as line:
            for start in range(0, len(order), bs):
                part = order[start:start + bs]
                batch = collate_cell_sets([self._set_item(jobs[j], basal, genes if key is not None else None) for j in part])
                x, mask = batch["basal"].to(device), batch["mask"].to(device)
                pert = feats[batch["pert"]].to(device)
                pred = model(x, pert, mask=mask)
                if relative:  # minus the set's mean change under the control label beyond the trained contexts'
                    drift = model(x, torch.zeros_like(pert), mask=mask).float() - x
                    w = mask[..., None].to(drift.dtype)
                    drift = (drift * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)
                    pred = pred.float() - (drift - model.control_drift.float())
                if key is not None:
                    pred = model.decode_genes(pred, x, batch["basal_genes"].to(device))
                pred = pred.float().cpu().numpy()
                for k, j in enumerate(part):
                    i, rows = jobs[j]
                    np.clip(pred[k, :len(rows)], 0, None, out=cells[labels[i]][offsets[j]:offsets[j] + len(rows)])
                line.advance(len(part))
        return self._anchored(cells, controls, perturbations, context)

    def _anchored(self, cells: dict[str, np.ndarray], controls: ad.AnnData, perturbations, context: str):
        """``cells`` with each perturbation's mean moved to the effect anchor's (see ``effect_anchor``)."""
        if self.anchor is None:
            return cells
        shifts = self.anchor.predict_shift(controls, [str(p) for p in perturbations], context)
        basal = np.asarray(controls.X.mean(axis=0, dtype=np.float64)).ravel()
        for i, p in enumerate(map(str, perturbations)):
            if len(cells[p]) and p != self.meta["control"]:
                move = basal + shifts[i] - cells[p].mean(axis=0, dtype=np.float64)
                cells[p] = np.clip(cells[p] + move.astype(np.float32)[None, :], 0, None)
        return cells

    def source_controls(
        self,
        n_controls: int,
        perturbations: Sequence[str],
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> list[np.ndarray] | None:
        """The control rows :meth:`predict_cells` starts each predicted cell from (:func:`~vcell.predictors.base.control_draws`)."""
        return control_draws(n_controls, [str(p) for p in perturbations], cells_per_perturbation, seed)

    @staticmethod
    def _set_item(job: tuple[int, np.ndarray], basal: MemoryRows, genes: MemoryRows | None) -> dict:
        """One prediction cell set in the training sets' layout (:func:`~vcell.data.cellsets.collate_cell_sets` pads it)."""
        pert, rows = job
        item = {"basal": torch.from_numpy(basal.read(rows)), "mask": torch.ones(len(rows), dtype=torch.bool), "pert": torch.tensor(pert)}
        if genes is not None:
            item["basal_genes"] = torch.from_numpy(genes.read(rows))
        return item

    def _inference_model(self, device: torch.device) -> torch.nn.Module:
        """The model on ``device``; for mixed precision a copy whose Linear layers are already bf16/fp16.

        Autocast casts every Linear weight to that dtype in every call; converting them once
        gives the same numbers (norms and embeddings stay fp32, as autocast uses them) and keeps
        the casts out of every prediction call.
        """
        model = self.model.to(device).eval()
        dtype = half_dtype(self.options.precision)
        if dtype is None:
            return model
        cached = self._half_model
        if cached is None or cached[0] != (device, dtype):
            half = copy.deepcopy(model)
            for layer in half.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.to(dtype)
            self._half_model = ((device, dtype), half)
        return self._half_model[1]

    @property
    def embed_key(self) -> str | None:
        """The ``.obsm`` key of the cell embeddings the model works in (``None``: gene space)."""
        self._require_fitted()
        return self.meta.get("embed_key")

    def control_embeddings(self, controls: ad.AnnData) -> np.ndarray:
        """The control cells' ``.obsm[embed_key]`` as float32, checked against the model's width."""
        return obsm_matrix(controls, self.embed_key, "the control cells", width=self.model_config.input_dim)

    def prepare_controls(self, controls: ad.AnnData) -> ad.AnnData:
        """The controls with the model's genes in the model's order (:meth:`align_genes`)."""
        self._require_fitted()
        return self.align_genes(controls)

    def trained_perturbations(self) -> list[str]:
        """The perturbation labels the model was trained on: those with training cells (control excluded).

        A checkpoint written before they were recorded gives the data's labels whose targets all have
        a training vector (held-out labels of a one-hot model have none)."""
        self._require_fitted()
        if "trained_perturbations" in self.meta:
            return [str(p) for p in self.meta["trained_perturbations"]]
        vocab = set(self.meta.get("pert_vocab", []))
        return [str(p) for p in self.meta.get("perturbations", [])
                if str(p) != self.meta["control"] and all(t in vocab for t in split_combo(str(p)))]
