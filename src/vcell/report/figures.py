"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot and no ``matplotlib.use``: every figure is a :class:`matplotlib.figure.Figure` attached
to its own ``FigureCanvasAgg``, so nothing here touches matplotlib's global state (the current
backend, the current figure, rcParams) that other code may rely on.

Each ``*_figure`` function returns a Figure; :func:`png_data_uri` turns it into a
``data:image/png;base64,...`` URI for an ``<img>`` tag.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

#: PNG resolution: sharp enough on screen, keeps the report small.
DPI = 100
#: Scatter plots draw at most this many genes (a fixed random subset; r uses every gene).
MAX_SCATTER_POINTS = 20_000
#: Up to this many perturbations the discrimination heatmap writes every cell's rank.
MAX_ANNOTATED = 12
#: Up to this many perturbations the DE-overlap chart has one column per perturbation.
MAX_PERTS_PER_AXIS = 40

_PALETTE = (  # matplotlib's tab10, then tab20's lighter shades: 20 models before a colour repeats
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


def model_colors(models: Sequence[str]) -> dict[str, str]:
    """One stable colour per model (in the bench's model order), shared by every figure."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot), constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI (no metadata that names a web site or a file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two vectors; NaN when either is constant or has fewer than 2 finite pairs."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom > 0 else math.nan


def _fmt_r(r: float) -> str:
    return "r = n/a (constant)" if not np.isfinite(r) else f"r = {r:.2f}"


def _short(label: str, n: int = 28) -> str:
    """A label for matplotlib: shortened to ``n`` characters in the middle (labels sharing a prefix,
    such as combinations of one gene, stay apart), ``$`` escaped (no mathtext)."""
    label = str(label)
    if len(label) > n:
        head = n // 2
        label = label[:head] + "…" + label[len(label) - (n - 1 - head):]
    return label.replace("$", r"\$")


def style():
    """matplotlib's default style for the duration of a ``with`` block (figures are drawn and
    saved inside it), whatever rcParams other code (e.g. scanpy) has set; restored afterwards."""
    import matplotlib.style

    return matplotlib.style.context("default")


# --------------------------------------------------------------------------------------------
# Per-metric bar charts
# --------------------------------------------------------------------------------------------


def metric_bars_figure(
    values: Mapping[str, Mapping[tuple[str, str], float]],
    models: Sequence[str],
    contexts: Sequence[str],
    directions: Mapping[str, str],
    colors: Mapping[str, str],
    ncols: int = 4,
) -> Figure:
    """Small multiples: one panel per metric, contexts on x, one bar per model.

    ``values[metric][(model, context)]`` is the value (missing or NaN: no bar);
    ``directions[metric]`` is a short hint such as ``"higher is better"``.
    """
    metrics = list(values)
    ncols = len(metrics) if len(metrics) <= 5 else max(1, min(ncols, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    width = max(3.4 * ncols, 0.7 * len(contexts) * len(models) * ncols / 2)
    fig = new_figure(min(width, 16.0), 2.7 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    x = np.arange(len(contexts), dtype=np.float64)
    bar_w = 0.8 / max(1, len(models))
    for ax, metric in zip(axes, metrics):
        for j, model in enumerate(models):
            heights = np.array([values[metric].get((model, c), math.nan) for c in contexts], dtype=np.float64)
            ok = np.isfinite(heights)
            ax.bar((x - 0.4 + bar_w * (j + 0.5))[ok], heights[ok], bar_w, color=colors[model], label=_short(model))
            for xi, h in zip(x, heights):
                if not np.isfinite(h) and np.isfinite(list(values[metric].values())).any():  # a missing value is marked, not drawn as a zero bar
                    ax.text(xi - 0.4 + bar_w * (j + 0.5), 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.axhline(0.0, color="#444444", linewidth=0.6)
        ax.set_xlim(-0.5, len(contexts) - 0.5)
        finite = [v for v in values[metric].values() if np.isfinite(v)]
        if not finite:
            ax.set_ylim(0.0, 1.0)
            ax.text(0.5, 0.5, "no mean (NaN: undefined for a model's\nperturbations, or one of them)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="#666666")
        elif all(v == 0 for v in finite):
            ax.set_ylim(-0.05, 1.0)
            said = "all values are 0" if len(finite) == len(values[metric]) else "the values shown are all 0 (the others: n/a)"
            ax.text(0.5, 0.5, said, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="#666666")
        hint = directions.get(metric, "")
        ax.set_title(f"{_short(metric, 40)}\n({hint})" if hint else _short(metric, 40), fontsize=9)
        ax.set_xticks(x, [_short(c, 14) for c in contexts], fontsize=8, rotation=30 if len(contexts) > 3 else 0)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("score" if metric.startswith("vcc_score") else "scaled (0 = baseline, 1 = replicate)"
                      if metric.startswith("vcc2026_") else "mean over perturbations", fontsize=7)
        ax.grid(axis="y", linewidth=0.3, alpha=0.6)
        ax.set_axisbelow(True)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [Rectangle((0, 0), 1, 1, color=colors[m]) for m in models]
    fig.legend(handles, [_short(m, 40) for m in models], loc="outside upper center", ncols=min(len(models), 6), fontsize=9, frameon=False)
    return fig


# --------------------------------------------------------------------------------------------
# Predicted vs real effects
# --------------------------------------------------------------------------------------------


def effect_scatter_figure(
    genes: np.ndarray,
    real_effects: Mapping[str, np.ndarray],
    pred_effects: Mapping[str, Mapping[str, np.ndarray]],
    models: Sequence[str],
    colors: Mapping[str, str],
    context: str,
    seed: int = 0,
) -> tuple[Figure, dict[tuple[str, str], float]]:
    """Columns: perturbations (``real_effects``, in order); rows: models. Each point is a gene.

    Returns the figure and the Pearson r of each (perturbation, model) panel (over all genes,
    also when the drawing is downsampled to :data:`MAX_SCATTER_POINTS`).
    """
    perts = list(real_effects)
    nrows, ncols = len(models), len(perts)
    fig = new_figure(max(3.1 * ncols, 5.0), 3.0 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    genes = np.asarray(genes).astype(str)
    n_genes = genes.size
    shown = np.arange(n_genes)
    if n_genes > MAX_SCATTER_POINTS:
        shown = np.sort(np.random.default_rng(seed).choice(n_genes, MAX_SCATTER_POINTS, replace=False))
    rs: dict[tuple[str, str], float] = {}
    for i, pert in enumerate(perts):
        real = real_effects[pert]
        preds = [pred_effects.get(m, {}).get(pert) for m in models]
        target = np.flatnonzero(genes == pert)
        for j, (model, pred) in enumerate(zip(models, preds)):
            ax = axes[j, i]  # rows: models, columns: perturbations
            if pred is None:
                ax.text(0.5, 0.5, "no prediction", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{_short(model)}\n{_short(pert)}", fontsize=9)
                rs[(pert, model)] = math.nan
                continue
            r = pearson(real, pred)
            rs[(pert, model)] = r
            # each panel square around its own data, so a small real effect is not squashed by a
            # model whose prediction is far off in another panel; the diagonal is y = x
            lo = float(np.nanmin([np.nanmin(real), np.nanmin(pred)]))
            hi = float(np.nanmax([np.nanmax(real), np.nanmax(pred)]))
            pad = 0.06 * (hi - lo) if hi > lo else 0.1
            lim = (lo - pad, hi + pad)
            ax.plot(lim, lim, color="#999999", linestyle="--", linewidth=0.8, zorder=1)
            ax.axhline(0, color="#cccccc", linewidth=0.5, zorder=0)
            ax.axvline(0, color="#cccccc", linewidth=0.5, zorder=0)
            ax.scatter(real[shown], pred[shown], s=5, alpha=0.5, color=colors[model], linewidths=0, rasterized=True, zorder=2)
            if target.size:  # the perturbed gene itself, when measured
                ax.scatter(real[target], pred[target], s=28, color="#d62728", marker="*", zorder=3, label=f"{_short(pert)} (target)")
                ax.legend(fontsize=6, loc="upper left", frameon=False)
            ax.set_xlim(lim)
            ax.set_ylim(lim)
            ax.set_title(f"{_short(model)} · {_short(pert)}\n{_fmt_r(r)}", fontsize=9)
            ax.tick_params(labelsize=7)
            if j == nrows - 1:
                ax.set_xlabel("real effect (Δ mean log1p)", fontsize=8)
            if i == 0:
                ax.set_ylabel("predicted effect (Δ mean log1p)", fontsize=8)
    note = f" (showing {shown.size:,} of {n_genes:,} genes)" if shown.size < n_genes else f" ({n_genes:,} genes)"
    fig.suptitle(f"{_short(context, 60)}: predicted vs real effect per gene{note}", fontsize=11)
    return fig, rs


# --------------------------------------------------------------------------------------------
# Perturbation discrimination
# --------------------------------------------------------------------------------------------


def discrimination_distances(
    real_effect: np.ndarray, pred_effect: np.ndarray, perts: Sequence[str], genes: Sequence[str]
) -> np.ndarray:
    """``[pred perturbation, real perturbation]`` L1 distances between effects, leaving out of
    row ``t`` the genes named like perturbation ``t`` (as ``discrimination_score_l1``)."""
    genes = np.asarray(genes).astype(str)
    real_effect = np.asarray(real_effect, dtype=np.float64)
    pred_effect = np.asarray(pred_effect, dtype=np.float64)
    out = np.empty((len(perts), real_effect.shape[0]))
    for t, pert in enumerate(perts):
        keep = genes != str(pert)
        out[t] = np.abs(real_effect[:, keep] - pred_effect[t, keep]).sum(axis=1)
    return out


def within_row_ranks(distances: np.ndarray) -> np.ndarray:
    """0-based rank of every cell within its row, by ``numpy.argsort`` (the metric's tie rule)."""
    ranks = np.empty(distances.shape, dtype=np.int64)
    for t, row in enumerate(distances):
        ranks[t, np.argsort(row)] = np.arange(row.size)
    return ranks


def discrimination_figure(
    panels: Mapping[str, tuple[np.ndarray, Sequence[str], Sequence[int]]],
    context: str,
    n_total: int,
) -> Figure:
    """One heatmap per model: L1 distance of each predicted effect (rows) to each real effect
    (columns); the diagonal (outlined) is the correct perturbation.

    ``panels[model] = (distances, perturbations, ranks)`` with ``ranks`` the 1-based rank of
    the correct perturbation of each row among all ``n_total`` perturbations.
    """
    models = list(panels)
    n = max(len(p[1]) for p in panels.values())
    side = min(max(3.2, 0.42 * n + 1.6), 9.0)
    ncols = min(len(models), max(1, int(16 // (side + 1.2))))
    nrows = math.ceil(len(models) / ncols)
    fig = new_figure((side + 1.2) * ncols, side * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, model in zip(axes, models):
        dist, perts, ranks = panels[model]
        k = len(perts)
        im = ax.imshow(dist, cmap="viridis_r", interpolation="nearest", aspect="equal")
        cbar = fig.colorbar(im, ax=ax, shrink=0.8)
        cbar.set_label("L1 distance (log1p)", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
        for t in range(k):
            ax.add_patch(Rectangle((t - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.4))
        if k <= MAX_ANNOTATED:
            row_ranks = within_row_ranks(dist) + 1
            norm = im.norm
            for t in range(k):
                for c in range(k):
                    ax.text(c, t, str(row_ranks[t, c]), ha="center", va="center", fontsize=7,
                            fontweight="bold" if t == c else "normal",
                            color="black" if norm(dist[t, c]) < 0.55 else "white")  # fmt: skip
        top1 = int(np.sum(np.asarray(ranks) == 1))
        ax.set_title(f"{_short(model)}\nrank 1 for {top1}/{len(ranks)}{' shown' if len(ranks) < n_total else ''} perturbations", fontsize=9)
        if k <= 60:
            labels = [f"{_short(p, 16)} ({r})" for p, r in zip(perts, ranks)]
            ax.set_yticks(np.arange(k), labels, fontsize=6 if k > 20 else 7)
            ax.set_xticks(np.arange(k), [_short(p, 16) for p in perts], fontsize=6 if k > 20 else 7, rotation=90)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_ylabel("predicted effect of … (rank of the correct one)", fontsize=7)
        ax.set_xlabel("real effect of …", fontsize=7)
    for ax in axes[len(models):]:
        ax.set_visible(False)
    shown = f"{n} of {n_total} perturbations (largest real effects)" if n < n_total else f"{n_total} perturbation{'s' if n_total != 1 else ''}"
    fig.suptitle(f"{_short(context, 60)}: perturbation discrimination, {shown}", fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# DE overlap per perturbation
# --------------------------------------------------------------------------------------------


def overlap_figure(
    per_context: Mapping[str, Mapping[str, Mapping[str, float]]],
    models: Sequence[str],
    colors: Mapping[str, str],
    metric: str = "overlap_at_N",
    subtitles: Mapping[str, str] | None = None,
) -> Figure:
    """One panel per context: ``per_context[context][model][perturbation]`` (nulls absent).

    Up to :data:`MAX_PERTS_PER_AXIS` perturbations: one column per perturbation (sorted by the
    mean over models, best first), a dot per model. More: a strip per model with its median.
    """
    contexts = list(per_context)
    n_perts = {c: len({p for m in per_context[c].values() for p in m}) for c in contexts}
    wide = max(n_perts.values(), default=0) <= MAX_PERTS_PER_AXIS
    width = max(6.0, 0.32 * max(n_perts.values(), default=1) * len(models) ** 0.5 + 2.0) if wide else max(6.0, 1.6 * len(models) + 2)
    fig = new_figure(min(width, 16.0), 3.2 * len(contexts) + 0.5)
    axes = np.atleast_1d(fig.subplots(len(contexts), 1, squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    for ax, context in zip(axes, contexts):
        by_model = per_context[context]
        perts = sorted({p for m in by_model.values() for p in m})
        if wide:
            mean = {p: np.nanmean([by_model.get(m, {}).get(p, np.nan) for m in models] or [np.nan]) for p in perts}
            perts.sort(key=lambda p: (-(mean[p] if np.isfinite(mean[p]) else -np.inf), p))
            x = np.arange(len(perts))
            step = 0.7 / max(1, len(models))
            for j, model in enumerate(models):
                y = np.array([by_model.get(model, {}).get(p, np.nan) for p in perts], dtype=np.float64)
                ax.scatter(x - 0.35 + step * (j + 0.5), y, s=26, color=colors[model], label=_short(model), zorder=3)
            ax.set_xticks(x, [_short(p, 18) for p in perts], rotation=60, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(perts) - 0.4)
            ax.set_xlabel("perturbation (sorted by mean over models)", fontsize=8)
        else:
            for j, model in enumerate(models):
                y = np.array([v for v in by_model.get(model, {}).values() if np.isfinite(v)], dtype=np.float64)
                ax.scatter(j + rng.uniform(-0.25, 0.25, y.size), y, s=8, alpha=0.6, color=colors[model], linewidths=0)
                if y.size:
                    ax.plot([j - 0.32, j + 0.32], [np.median(y)] * 2, color="black", linewidth=1.5)
            ax.set_xticks(np.arange(len(models)), [_short(m, 18) for m in models], fontsize=8)
            ax.set_xlabel(f"model ({len(perts)} perturbations; line = median)", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(f"{metric}\n(fraction of real DE genes)", fontsize=8)
        sub = (subtitles or {}).get(context)
        ax.set_title(f"{_short(context, 60)}\n{sub}" if sub else _short(context, 60), fontsize=10)
        ax.grid(axis="y", linewidth=0.3, alpha=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", labelsize=7)
    handles = [Rectangle((0, 0), 1, 1, color=colors[m]) for m in models]
    fig.legend(handles, [_short(m, 40) for m in models], loc="outside upper center", ncols=min(len(models), 6), fontsize=9, frameon=False)
    return fig
