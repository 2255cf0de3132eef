"""The State Transition model behind the :class:`~vcell.models.base.Predictor` interface.

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
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from vcell.data.dataset import PerturbationData, obsm_matrix
from vcell.data.spec import DataSpec, split_combo
from vcell.data.splits import Split
from vcell.errors import VcellError
from vcell.heap import keep_freed_heap
from vcell.models.base import Predictor, assemble_prediction
from vcell.models.precision import autocast, check_precision, half_dtype
from vcell.models.transition import STConfig, pert_features

log = logging.getLogger(__name__)

_MAX_LISTED = 5


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


class STPredictor(Predictor):
    """State Transition model as a predictor.

    Parameters
    ----------
    seed
        Training seed (and default prediction seed).
    preset
        ``small``, ``default`` or ``large`` (:data:`vcell.models.transition.PRESETS`).
    config
        Overrides of :class:`STConfig` fields (e.g. ``{"width": 32, "n_layers": 1}``).
    max_steps, batch_size, set_size, lr
        Training settings; ``set_size`` is also the largest cell set used at prediction time.
    out_dir
        Where checkpoints go; ``None``: a temporary directory kept as long as the predictor.
    checkpoint
        ``"best"`` (falls back to ``last`` when there is no ``best/``) or ``"last"``.
    accelerator
        Lightning accelerator for training (``auto``, ``cpu``, ``gpu``).
    embed_key
        Train in the cell-embedding space ``.obsm[embed_key]`` with a gene decoder (predictions
        are genes either way); ``None``: gene space.
    precision
        ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (GPU only), for training and prediction
        (:mod:`vcell.models.precision`).
    """

    name = "st"

    def __init__(
        self,
        seed: int = 0,
        preset: str = "small",
        config: Mapping | None = None,
        max_steps: int = 300,
        batch_size: int = 8,
        set_size: int = 64,
        lr: float = 1e-4,
        out_dir: str | os.PathLike | None = None,
        checkpoint: str = "best",
        accelerator: str = "auto",
        num_workers: int = 0,
        resume: bool = False,
        embed_key: str | None = None,
        precision: str = "32",
    ):
        if set_size < 1:
            raise VcellError(f"set size must be >= 1, got {set_size}")
        if checkpoint not in ("best", "last"):
            raise VcellError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        self.seed, self.preset, self.config_overrides = int(seed), preset, dict(config or {})
        STConfig.preset_values(preset, self.config_overrides)  # fail early on bad names or values
        self.max_steps, self.batch_size, self.set_size, self.lr = int(max_steps), int(batch_size), int(set_size), float(lr)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint, self.accelerator, self.num_workers, self.resume = checkpoint, accelerator, num_workers, resume
        self.train_embed_key = embed_key
        self.precision = precision
        check_precision(precision, on_cpu=self._device().type == "cpu")
        self.model = None
        self._half_model: tuple | None = None  # ((device, dtype), copy) for mixed-precision prediction
        self.model_config: STConfig | None = None
        self.meta: dict | None = None
        self.spec: DataSpec | None = None
        self.checkpoint_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    # ------------------------------------------------------------------ training / loading

    def fit(self, data: PerturbationData, split: Split) -> STPredictor:
        from vcell.train.checkpoint import BEST, LAST
        from vcell.train.st import train_st

        if data.spec.expression == "counts":
            raise VcellError("st: the data holds raw counts; the ST model trains on log1p expression (run `vcell data preprocess` first)")
        out = self.out_dir
        if out is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="vcell-st-")
            out = Path(self._tmp.name)
        values = STConfig.preset_values(self.preset, self.config_overrides)
        train_st(
            data, split, out, values, max_steps=self.max_steps, batch_size=self.batch_size, set_size=self.set_size,
            seed=self.seed, resume=self.resume, num_workers=self.num_workers, lr=self.lr, accelerator=self.accelerator,
            embed_key=self.train_embed_key, precision=self.precision,
        )
        chosen = out / BEST if self.checkpoint == "best" and (out / BEST).is_dir() else out / LAST
        self.load(chosen)
        return self

    def load(self, directory: str | os.PathLike) -> STPredictor:
        """Load a checkpoint directory (``weights.safetensors`` + ``config.json``) for inference."""
        from vcell.train.checkpoint import load_checkpoint

        model, config, meta, _ = load_checkpoint(directory)
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
        self._half_model = None
        self.checkpoint_dir = Path(directory)
        return self

    @classmethod
    def from_checkpoint(
        cls, directory: str | os.PathLike, set_size: int = 64, seed: int = 0, precision: str = "32"
    ) -> STPredictor:
        """A predictor ready to predict from a trained checkpoint directory."""
        return cls(seed=seed, set_size=set_size, precision=precision).load(directory)

    # ------------------------------------------------------------------ inference

    @property
    def genes(self) -> list[str]:
        self._require_fitted()
        return list(self.meta["genes"])

    @property
    def pert_vocab(self) -> list[str]:
        self._require_fitted()
        return list(self.meta["pert_vocab"])

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
                parts.append(f"{len(missing)} model gene(s) missing ({_listing(missing)})")
            if extra:
                parts.append(f"{len(extra)} gene(s) the model does not know ({_listing(extra)})")
            if not parts:
                parts.append("duplicate gene names")
            raise VcellError(
                f"the data's genes differ from the model's {len(genes)} genes: {'; '.join(parts)}; "
                "preprocess the data with the model's gene list"
            )
        return controls[:, genes].copy()

    def check_perturbations(self, perturbations: Sequence[str]) -> None:
        """Every target of every perturbation must be in the model's vocabulary."""
        self._require_fitted()
        vocab = set(self.pert_vocab)
        control = self.meta["control"]
        for p in perturbations:
            if str(p) == control:
                continue
            unknown = [t for t in split_combo(str(p)) if t not in vocab]
            if unknown or not split_combo(str(p)):
                raise VcellError(
                    f"unknown perturbation {str(p)!r}: target(s) {_listing(unknown or [p])} not among the "
                    f"model's {len(vocab)} trained perturbation targets"
                )

    def _device(self) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() and self.accelerator != "cpu" else torch.device("cpu")

    def predict_cells(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Predicted cells ``{perturbation: [n, genes]}`` from ``controls`` (already aligned, one context)."""
        self._require_fitted()
        self.check_perturbations(perturbations)
        if controls.n_obs == 0:
            raise VcellError("no control cells to predict from")
        genes = np.asarray(controls.X.toarray() if sp.issparse(controls.X) else controls.X, dtype=np.float32)
        key = self.embed_key
        basal = genes if key is None else self.control_embeddings(controls)
        feats = pert_features([str(p) for p in perturbations], self.pert_vocab, control=self.meta["control"])
        if self.model_config.n_batches:
            log.warning("st: the model has a batch embedding; predicting without batch information")
        rng = np.random.default_rng(seed)
        # one job per set: (perturbation index, control rows); a set never mixes perturbations
        jobs: list[tuple[int, np.ndarray]] = []
        for i, p in enumerate(perturbations):
            n = int(cells_per_perturbation[p] if isinstance(cells_per_perturbation, Mapping) else cells_per_perturbation)
            if n < 0:
                raise VcellError(f"cells per perturbation must be >= 0, got {n} for {p!r}")
            rows = rng.choice(controls.n_obs, size=n, replace=n > controls.n_obs)
            for chunk in np.array_split(rows, max(1, math.ceil(n / self.set_size))):
                if len(chunk):
                    jobs.append((i, chunk))
        device = self._device()
        if device.type == "cpu":
            keep_freed_heap()
        model = self._inference_model(device)
        bs = batch_size or max(1, self.batch_size)
        # Batch sets of similar size together so little of each batch is padding; the results
        # go back to job order (padding never changes a real cell's output: keys are masked).
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
        preds: list[np.ndarray | None] = [None] * len(jobs)
        with torch.no_grad(), autocast(device, self.precision):
            for start in range(0, len(order), bs):
                part = order[start:start + bs]
                size = max(len(jobs[j][1]) for j in part)
                x = np.zeros((len(part), size, basal.shape[1]), np.float32)
                mask = np.zeros((len(part), size), bool)
                for k, j in enumerate(part):
                    rows = jobs[j][1]
                    x[k, :len(rows)] = basal[rows]
                    mask[k, :len(rows)] = True
                pert = feats[[jobs[j][0] for j in part]].to(device)
                x_t = torch.from_numpy(x).to(device)
                pred = model(x_t, pert, mask=torch.from_numpy(mask).to(device))
                if key is not None:
                    g = np.zeros((len(part), size, genes.shape[1]), np.float32)
                    for k, j in enumerate(part):
                        g[k, :len(jobs[j][1])] = genes[jobs[j][1]]
                    pred = model.decode_genes(pred, x_t, torch.from_numpy(g).to(device))
                pred = pred.float().cpu().numpy()
                for k, j in enumerate(part):
                    preds[j] = np.clip(pred[k, :len(jobs[j][1])], 0, None)
        out: dict[str, list[np.ndarray]] = {str(p): [] for p in perturbations}
        for (i, _), block in zip(jobs, preds):
            out[str(perturbations[i])].append(block)
        width = genes.shape[1]
        return {p: (np.vstack(blocks) if blocks else np.zeros((0, width), np.float32)) for p, blocks in out.items()}

    def _inference_model(self, device: torch.device) -> torch.nn.Module:
        """The model on ``device``; for mixed precision a copy whose Linear layers are already bf16/fp16.

        Autocast casts every Linear weight to that dtype in every call; converting them once
        gives the same numbers (norms and embeddings stay fp32, as autocast uses them) and keeps
        the casts out of every prediction call.
        """
        model = self.model.to(device).eval()
        dtype = half_dtype(self.precision)
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

    def predict(
        self,
        controls: ad.AnnData,
        perturbations: Sequence[str],
        context: str,
        cells_per_perturbation: int | Mapping[str, int] = 100,
        seed: int = 0,
    ) -> ad.AnnData:
        """Predicted cells of each perturbation in ``context`` (from its real controls), controls appended."""
        self._require_fitted()
        perturbations = [str(p) for p in perturbations]
        self.check_perturbations(perturbations)
        if controls.n_obs == 0:
            raise VcellError(f"context {context!r} has no control cells to predict from")
        controls = self.align_genes(controls)
        cells = self.predict_cells(controls, perturbations, cells_per_perturbation, seed)
        return assemble_prediction(self.spec, controls, perturbations, context, None, cells_per_perturbation, seed, cells=cells)

    def predict_shift(self, controls: ad.AnnData, perturbations: Sequence[str], context: str) -> np.ndarray:
        """Mean predicted cell minus mean control cell, per perturbation."""
        controls = self.align_genes(controls)
        n = max(controls.n_obs, 1)
        cells = self.predict_cells(controls, perturbations, n, self.seed)
        X = controls.X.toarray() if sp.issparse(controls.X) else np.asarray(controls.X)
        base = np.asarray(X, dtype=np.float32).mean(axis=0)
        return np.stack([cells[str(p)].mean(axis=0) - base for p in perturbations]) if perturbations else np.zeros((0, len(base)), np.float32)
