"""The data layer: reading, validating, preprocessing, splitting and fetching perturbation datasets.

It depends only on :mod:`vcell.errors`, :mod:`vcell._version` and third-party libraries.

The public names below are re-exported lazily (PEP 562): ``import vcell.data`` imports none of
the submodules, so the command line starts fast and torch is imported only with the cell-set
loaders (:mod:`vcell.data.cellsets`). ``from vcell.data import load_dataset`` imports the one
submodule that defines it. (``validate`` is not re-exported: ``vcell.data.validate`` is the module
of :func:`~vcell.data.validate.validate`, :func:`check` and :func:`infer_expression_type`.)
"""

from __future__ import annotations

from vcell._lazy import lazy_exports

# submodule -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    ".spec": ("DataSpec", "EXPRESSION_TYPES", "SINGLE_CONTEXT", "COMBO_SEP", "CONTROL_STRATEGIES", "DEFAULT_SET_SIZE",
              "split_combo"),
    ".io": ("read_h5ad", "read_h5ad_mapped", "write_h5ad", "atomic_path", "atomic_files", "atomic_paths",
           "check_output_path", "check_output_dir", "check_writable", "clean_leftovers", "human_size"),
    ".dataset": ("PerturbationData", "CellIndex", "load_dataset", "from_anndata", "obsm_matrix",
                "missing_obsm_error"),
    ".validate": ("check", "check_expression", "infer_expression_type", "scan_matrix", "CheckReport",
                 "ExpressionInfo", "MatrixStats", "Problem"),
    ".normalize": ("normalize_log1p",),
    ".gene_selection": ("select_hvg", "subset_genes"),
    ".knockdown": ("knockdown_qc",),
    ".preprocess": ("preprocess_file",),
    ".splits": ("Split", "ROLES", "apply_split", "holdout_config", "holdout_perturbations", "check_no_leak"),
    ".split_files": ("SplitConfig", "read_split_toml"),
    ".perturbation_lists": ("parse_perturbations", "read_label_file"),
    ".rows": ("row_source", "H5Rows", "MemoryRows"),
    ".aggregate": ("group_sums", "group_means", "cell_mean"),
    ".simulate": ("simulate_perturbseq",),
    ".cellsets": ("CellSet", "CellSetSampler", "CellSetDataset", "collate_cell_sets"),  # torch
    ".registry": ("DatasetInfo", "Citation", "list_datasets", "load_registry", "get_dataset",
                 "fetch", "cached_path"),
    ".download": ("cache_dir", "sha256_file"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
