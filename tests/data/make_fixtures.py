"""Build the small real-data test fixtures in tests/data from the full datasets in ../shared/data.

The fixtures are built here, never committed (the repository tracks no data files). On a machine
that has run this script once but lacks ``../shared/data``, the real-data tests that matter most
run on these fixtures instead: small, deterministic subsets of the same
files, with the same obs / var / uns / layers layout, the same value types (McFaline log1p
float64, Papalexi and Kang raw integer counts in float32) and the same group labels, so the
tests read them exactly as they read the full files. ``conftest.real_data(name)`` returns the full
file when ../shared/data has it, else the fixture, else skips the test.

Rebuild (needs ../shared/data, or VCELL_SHARED_DATA pointing at it)::

    .venv/bin/python tests/data/make_fixtures.py

Fixtures and the tests that fall back to them
---------------------------------------------
mcfaline2023_norman2019_small.h5ad (2,710 cells x all 500 genes, log1p float64 CSR, ~640 KB)
    mcfaline23: every A172 and U87MG cell (850 + 865, so test_de's A172 parity and the U87MG
    eval scenario, which has no significant gene, see exactly the full file's cells of their
    line); T98G: all 100 controls + 35 cells of each of the 9 knockdowns (above knockdown_qc's
    min_cells=30). norman19 (k562): all 100 controls + 30 cells of 16 perturbations (5 singles,
    3 doubles of two of them, and the 8 others with the most FDR < 0.05 genes in the full file).
    Every control cell of the full file is kept.
    Used by: eval_cases.mcfaline / eval_cases.norman (test_metrics: parity with cell-eval),
    test_de (pdex parity on McFaline A172 and Norman K562), test_baselines (every baseline on the
    held-out line, linear on Norman doubles), test_bench (``vcell bench`` end to end, its
    predictions scored by cell-eval), test_report (report of a bench dir), test_preprocess
    (log1p input and knockdown QC), test_genes (data gene embeddings of the real controls).
papalexi2021_thp1_small.h5ad (2,213 cells x all 290 genes, raw counts float32 CSR, ~340 KB)
    all 25 targets and non-targeting in all 3 replicates: 100 non-targeting cells per replicate,
    up to 70 cells per replicate of the 9 targets the DE/eval tests use, 6 of each other target;
    obs, obsm["grna_counts"] and uns["grna_names"] as in the full file.
    Used by: eval_cases.papalexi (test_metrics), test_de (pdex and cell-eval real_de.csv parity
    on raw counts), test_preprocess (normalisation, HVG, gene subsets, knockdown QC on counts),
    test_prep (submission prep parity with cell-eval prep), test_validate (bad inputs through the
    CLI, dense vs sparse check reports).
kang2018_ifnb_small.h5ad (440 cells x 600 genes, raw counts float32 CSR, ~270 KB)
    the 300 genes with the most counts in the full file plus 300 other genes with >= 20 counts;
    CD14 / CD16 monocytes 60 cells per stimulation, every pDC and Eryth cell (Eryth has
    stimulated cells only, as in the full file), 10 per stimulation of every other cell type.
    No layers["lognorm"] (half the file; only full-file tests read it).
    Used by: eval_cases.kang (test_metrics), test_preprocess (normalisation, HVG selection,
    preprocess_file, Eryth without controls), test_cli (``vcell data preprocess`` on counts),
    test_validate (a context without controls).

Tests whose expectations are numbers of the full files (cell and gene counts, group sizes,
download offsets, training on 1,500 Kang genes) keep using ``conftest.shared_path`` and skip
with a reason when ../shared/data is absent. The output is deterministic (fixed seed; a rebuild
from the same full files is byte-identical).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("VCELL_SHARED_DATA", HERE.parents[1].parent / "shared" / "data"))
SEED = 0

MCFALINE = "mcfaline2023_norman2019.h5ad"
PAPALEXI = "papalexi2021_thp1.h5ad"
KANG = "kang2018_ifnb.h5ad"


def fixture_name(name: str) -> str:
    """File name of the fixture of the full dataset ``name`` (``x.h5ad`` -> ``x_small.h5ad``)."""
    return name.removesuffix(".h5ad") + "_small.h5ad"


def _pick(mask: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Row positions of ``mask``: all of them when n is None or larger, else n drawn at random."""
    rows = np.flatnonzero(mask)
    if n is None or rows.size <= n:
        return rows
    return np.sort(rng.choice(rows, n, replace=False))


def _subset(adata: ad.AnnData, rows: list[np.ndarray], genes: np.ndarray | None = None) -> ad.AnnData:
    rows = np.sort(np.concatenate(rows))
    assert np.unique(rows).size == rows.size
    sub = adata[rows] if genes is None else adata[rows][:, np.sort(genes)]
    sub = sub.copy()
    for col in sub.obs.columns:  # drop categories no cell has any more
        if hasattr(sub.obs[col], "cat"):
            sub.obs[col] = sub.obs[col].cat.remove_unused_categories()
    return sub


def mcfaline(adata: ad.AnnData, rng: np.random.Generator) -> ad.AnnData:
    obs = adata.obs
    pert = obs["perturbation"].astype(str).to_numpy()
    ctx = obs["cell_type"].astype(str).to_numpy()
    dataset = obs["dataset"].astype(str).to_numpy()
    rows = []
    for line in ("A172", "T98G", "U87MG"):
        here = (dataset == "mcfaline23") & (ctx == line)
        for p in sorted(set(pert[here])):
            # A172 and U87MG whole: test_de's pdex parity on A172 and the U87MG eval scenario (no
            # significant gene in U87MG) see exactly the full file's cells of their line
            whole = p == "control" or line in ("A172", "U87MG")
            # T98G: 35 per knockdown, above knockdown_qc's default min_cells=30
            rows.append(_pick(here & (pert == p), None if whole else 35, rng))
    norman = [
        "KLF1", "MAP2K6", "MAPK1", "TGFBR2", "SGK1",  # singles
        "KLF1+MAP2K6", "KLF1+TGFBR2", "MAPK1+TGFBR2",  # doubles of two of them
        # the other perturbations with the most FDR < 0.05 genes in the full file
        "BPGM+SAMD1", "CBL+CNN1", "CEBPE+RUNX1T1", "CNN1+MAPK1", "FOXL2+HOXB9", "PTPN12+PTPN9",
        "SAMD1+PTPN12", "SET+KLF1",
    ]
    here = dataset == "norman19"
    for p in ["control", *norman]:
        assert (here & (pert == p)).any(), p
        rows.append(_pick(here & (pert == p), None if p == "control" else 30, rng))
    return _subset(adata, rows)


PAPALEXI_MAIN = ["IFNGR1", "IRF1", "JAK2", "STAT1", "SMAD4", "MYC", "CUL3", "SPI1", "BRD4"]


def papalexi(adata: ad.AnnData, rng: np.random.Generator) -> ad.AnnData:
    obs = adata.obs
    target = obs["target"].astype(str).to_numpy()
    rep = obs["bio_rep"].astype(str).to_numpy()
    rows = []
    for t in sorted(set(target)):
        n = 100 if t == "non-targeting" else 70 if t in PAPALEXI_MAIN else 6
        for r in sorted(set(rep)):
            rows.append(_pick((target == t) & (rep == r), n, rng))
    return _subset(adata, rows)


N_TOP, N_OTHER = 300, 300


def kang(adata: ad.AnnData, rng: np.random.Generator) -> ad.AnnData:
    obs = adata.obs
    cell_type = obs["seurat_annotations"].astype(str).to_numpy()
    stim = obs["stim"].astype(str).to_numpy()
    rows = []
    for c in sorted(set(cell_type)):
        n = 60 if c in ("CD14 Mono", "CD16 Mono") else None if c in ("pDC", "Eryth") else 10
        for s in ("CTRL", "STIM"):
            if ((cell_type == c) & (stim == s)).any():
                rows.append(_pick((cell_type == c) & (stim == s), n, rng))
    totals = np.asarray(adata.X.sum(axis=0)).ravel()
    order = np.argsort(-totals, kind="stable")
    top = order[:N_TOP]
    rest = order[N_TOP:][totals[order[N_TOP:]] >= 20]  # expressed genes outside the top ones
    genes = np.concatenate([top, rng.choice(rest, N_OTHER, replace=False)])
    small = _subset(adata, rows, genes)
    del small.layers["lognorm"]  # half the file; no test that falls back to the fixture reads it
    return small


def _integer_valued(data: np.ndarray) -> bool:
    return data.dtype.kind in "iu" or (data.dtype.kind == "f" and bool(np.all(data == np.round(data))))


def write_small(adata: ad.AnnData, out: Path) -> None:
    """Write ``adata`` as .h5ad, compressed harder than write_h5ad does (same AnnData on reading).

    h5py's newest file format (smaller metadata); gzip level 9; the byte-shuffle filter on arrays
    of whole numbers (counts, indices), where it helps, and not on log1p floats, where it breaks
    up the repeated 8-byte values gzip would otherwise match."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.h5ad"
        adata.write_h5ad(plain, compression="gzip", compression_opts=9)
        with h5py.File(plain, "r") as src, h5py.File(out, "w", libver="latest") as dst:

            def copy(group_src: h5py.Group, group_dst: h5py.Group) -> None:
                group_dst.attrs.update(group_src.attrs)
                for key, obj in group_src.items():
                    if isinstance(obj, h5py.Group):
                        copy(obj, group_dst.create_group(key))
                    elif obj.shape and obj.dtype.kind in "iuf" and obj.nbytes >= 4096:
                        data = obj[()]
                        new = group_dst.create_dataset(key, data=data, chunks=True, compression="gzip",
                                                       compression_opts=9, shuffle=_integer_valued(data))
                        new.attrs.update(obj.attrs)
                    else:
                        group_src.copy(obj, group_dst, key)

            copy(src, dst)


BUILDERS = {MCFALINE: mcfaline, PAPALEXI: papalexi, KANG: kang}


def main() -> int:
    if not SHARED.is_dir():
        print(f"error: {SHARED} not found: the fixtures are built from the full datasets in ../shared/data", file=sys.stderr)
        return 2
    for name, build in BUILDERS.items():
        full = ad.read_h5ad(SHARED / name)
        small = build(full, np.random.default_rng(SEED))
        for key in ("X", *small.layers.keys()):
            m = small.X if key == "X" else small.layers[key]
            assert sp.issparse(m) and m.format == "csr", (name, key)
        out = HERE / fixture_name(name)
        write_small(small, out)
        back = ad.read_h5ad(out)  # the file reads back as the same AnnData
        assert (back.X != small.X).nnz == 0 and back.X.dtype == small.X.dtype, name
        assert back.obs.equals(small.obs) and back.var.equals(small.var), name
        assert list(back.obsm) == list(small.obsm) and list(back.uns) == list(small.uns), name
        print(f"{out.name}: {small.n_obs} cells x {small.n_vars} genes, {out.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
