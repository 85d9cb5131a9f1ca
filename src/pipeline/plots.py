"""Figures of the validation report: coverage, SBC ranks, corner plots, training, C2ST.

Every function returns a :class:`matplotlib.figure.Figure`; the caller saves it. Figures are
built without :mod:`matplotlib.pyplot`, so they render headless whatever the backend, and
nothing accumulates in pyplot's global list of open figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.mathtext import MathTextParser
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter
from scipy import stats
from scipy.ndimage import gaussian_filter

from pipeline.diagnostics.coverage import sbc_histogram

__all__ = [
    "plot_c2st",
    "plot_c2st_budget",
    "plot_corner",
    "plot_coverage",
    "plot_predictive",
    "plot_sbc_ranks",
    "plot_training_curves",
]

SAMPLES_COLOR = "C0"
REFERENCE_COLOR = "C1"
TRUTH_COLOR = "k"
# Mass enclosed by the 1 and 2 sigma contours of a 2-D Gaussian, the corner-plot convention.
CONTOUR_MASSES = (1 - np.exp(-0.5), 1 - np.exp(-2.0))


def plot_coverage(
    levels: np.ndarray,
    coverages: dict[str, np.ndarray],
    *,
    band: float | None = None,
    title: str = "",
) -> Figure:
    """Expected coverage against credibility level, with the diagonal of perfect calibration.

    Arguments:
        levels: Credibility levels, shape ``(L,)``.
        coverages: Expected coverage per method (e.g. ``"TARP"``, ``"HPD"``), each shape ``(L,)``.
        band: If given, shades ``levels +- band``, the pass threshold.
        title: Axes title.
    """
    levels = np.asarray(levels, dtype=float)
    for name, coverage in coverages.items():
        if np.shape(coverage) != levels.shape:
            raise ValueError(
                f"coverage {name!r} has shape {np.shape(coverage)} but levels has shape "
                f"{levels.shape}"
            )

    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    if band is not None:
        ax.fill_between(
            levels, levels - band, levels + band, color="grey", alpha=0.2, label=f"±{band:g}"
        )
    for name, coverage in coverages.items():
        ax.plot(levels, coverage, marker="o", markersize=3, label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=title)
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    # HPD and predictive curves are one-sided; TARP's is S-shaped, its sides swapping at 0.5
    # (pipeline.diagnostics.tarp_coverage), so the corners speak for the one-sided curves only.
    style = {"fontsize": "small", "alpha": 0.6}
    ax.text(0.97, 0.03, "over-confident (HPD, predictive)", ha="right", va="bottom", **style)
    ax.text(0.03, 0.97, "under-confident (HPD, predictive)", ha="left", va="top", **style)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.92), fontsize="small")
    return fig


def plain(text: str) -> str:
    """A parameter's name as a label: as written where matplotlib can typeset it (``$\\theta$``
    for a user who asked for mathematics), its ``$`` shown literally where it cannot
    (``x_{$a}$ ^`` failed the stage that drew it)."""
    if "$" not in text:
        return text
    try:
        MathTextParser("path").parse(text)
    except ValueError:
        return text.replace("$", r"\$")
    return text


def with_units(names: Sequence[str], units: Sequence[str]) -> list[str]:
    """Axis labels: each parameter's name with its unit in brackets (none if dimensionless)."""
    return [f"{name} [{unit}]" if unit else name for name, unit in zip(names, units, strict=True)]


def _grid_shape(num_panels: int) -> tuple[int, int]:
    cols = min(num_panels, 4)
    return -(-num_panels // cols), cols


def plot_sbc_ranks(
    ranks: np.ndarray,
    num_samples: int,
    parameter_names: list[str],
    *,
    num_bins: int | None = None,
) -> Figure:
    """Histogram of SBC ranks per parameter, with the 99% band of uniform ranks.

    The band holds, bin by bin, 99% of the counts a calibrated posterior would give
    (binomial quantiles 0.005 and 0.995); about 1 bin in 100 outside it is expected.

    Arguments:
        ranks: SBC ranks, shape ``(n, D)``, from :func:`~pipeline.diagnostics.sbc_ranks`.
        num_samples: Number of posterior samples ``M`` the ranks were computed from.
        parameter_names: One name per parameter, length ``D``.
        num_bins: See :func:`~pipeline.diagnostics.sbc_histogram`.
    """
    counts, probs = sbc_histogram(ranks, num_samples, num_bins)
    num_bins, dim = counts.shape
    if len(parameter_names) != dim:
        raise ValueError(
            f"got {len(parameter_names)} parameter names for ranks of {dim} parameters"
        )
    num_pairs = int(counts[:, 0].sum())
    # Bins are plotted on the rank axis: bin b holds ranks [edges[b], edges[b + 1]).
    edges = np.concatenate([[0], np.cumsum(probs)]) * (num_samples + 1)
    low = stats.binom.ppf(0.005, num_pairs, probs)
    high = stats.binom.ppf(0.995, num_pairs, probs)

    rows, cols = _grid_shape(dim)
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[dim:]:
        fig.delaxes(ax)
    band_low, band_high = np.append(low, low[-1]), np.append(high, high[-1])
    for d, ax in enumerate(axes[:dim]):
        ax.stairs(counts[:, d], edges, fill=True, color=SAMPLES_COLOR, alpha=0.6)
        # Drawn over the bars, so bins below the band's lower edge stay visible.
        ax.fill_between(
            edges, band_low, band_high, step="post", color="grey", alpha=0.35, linewidth=0
        )
        ax.set_xlim(0, num_samples + 1)
        ax.set_title(plain(parameter_names[d]))
        ax.set_xlabel("rank")
        ax.set_ylabel("count")
    fig.legend(
        handles=[Patch(color="grey", alpha=0.3, label="99% band of uniform ranks")],
        loc="outside lower center",
        fontsize="small",
    )
    return fig


def _bounds(*arrays: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    # Quantiles rather than extremes, so a few outlying samples do not squash the panels.
    stacked = np.concatenate([a for a in arrays if a is not None])
    low, high = np.quantile(stacked, [0.005, 0.995], axis=0)
    pad = 0.05 * np.where(high > low, high - low, 1.0)
    return low - pad, high + pad


def _mass_levels(hist: np.ndarray) -> np.ndarray | None:
    """Density thresholds whose superlevel sets hold CONTOUR_MASSES, increasing."""
    flat = np.sort(hist.ravel())[::-1]
    cumulative = np.cumsum(flat)
    if cumulative[-1] <= 0:
        return None
    cumulative /= cumulative[-1]
    thresholds = flat[np.searchsorted(cumulative, CONTOUR_MASSES)]
    thresholds = np.unique(thresholds[thresholds > 0])
    return thresholds if len(thresholds) > 0 else None


def _contours(
    ax: Axes, x: np.ndarray, y: np.ndarray, extent: tuple[float, ...], color: str, filled: bool
) -> None:
    bins = 30
    hist, xedges, yedges = np.histogram2d(
        x, y, bins=bins, range=[extent[:2], extent[2:]], density=True
    )
    # Light smoothing: contours of a raw histogram of a few thousand samples are jagged.
    hist = gaussian_filter(hist, sigma=1.0)
    levels = _mass_levels(hist)
    centers_x = 0.5 * (xedges[1:] + xedges[:-1])
    centers_y = 0.5 * (yedges[1:] + yedges[:-1])
    if filled:
        ax.pcolormesh(xedges, yedges, hist.T, cmap="Blues", shading="flat", rasterized=True)
    if levels is not None:
        ax.contour(centers_x, centers_y, hist.T, levels=levels, colors=color, linewidths=1.0)


def plot_corner(
    samples: np.ndarray,
    parameter_names: list[str],
    *,
    reference: np.ndarray | None = None,
    theta_true: np.ndarray | None = None,
    max_dims: int = 10,
) -> Figure:
    """Corner plot of posterior samples: 1-D marginals on the diagonal, 2-D pairs below.

    Contours enclose 39% and 86% of the mass (1 and 2 sigma of a 2-D Gaussian). Only the
    first ``max_dims`` parameters are shown; the title says so when some are left out.

    Arguments:
        samples: Posterior samples, shape ``(M, D)``.
        parameter_names: One name per parameter, length ``D``.
        reference: Reference posterior samples, shape ``(M', D)``, drawn in another colour.
        theta_true: True parameters, shape ``(D,)``, drawn as lines and markers.
        max_dims: Most parameters to show; the figure has ``k (k + 1) / 2`` axes for
            ``k = min(D, max_dims)``.
    """
    samples = np.asarray(samples, dtype=float)
    _check_corner(samples, parameter_names, reference, theta_true, max_dims)
    dim = samples.shape[1]
    k = min(dim, max_dims)
    samples = samples[:, :k]
    reference = None if reference is None else np.asarray(reference, dtype=float)[:, :k]
    theta_true = None if theta_true is None else np.asarray(theta_true, dtype=float)[:k]
    extra = None if theta_true is None else theta_true[None]
    low, high = _bounds(samples, reference, extra)

    size = max(3.0, 1.6 * k)
    fig = Figure(figsize=(size, size), layout="constrained")
    axes = fig.subplots(k, k, squeeze=False)
    for i in range(k):
        for j in range(k):
            if j > i:
                fig.delaxes(axes[i, j])
                continue
            if i == j:
                _plot_marginal(axes[i, i], i, samples, reference, theta_true, low, high)
            else:
                _plot_pair(axes[i, j], i, j, samples, reference, theta_true, low, high)
            _label_corner_axes(axes[i, j], i, j, k, parameter_names)
    _corner_legend(fig, reference, theta_true)
    if k < dim:
        fig.suptitle(f"first {k} of {dim} parameters")
    return fig


def _check_corner(
    samples: np.ndarray,
    parameter_names: list[str],
    reference: np.ndarray | None,
    theta_true: np.ndarray | None,
    max_dims: int,
) -> None:
    """Raises unless the arguments of :func:`plot_corner` fit ``samples`` ``(M, D)``."""
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f"samples must have shape (M, D) with M >= 2, got {samples.shape}")
    dim = samples.shape[1]
    if len(parameter_names) != dim:
        raise ValueError(f"got {len(parameter_names)} parameter names for samples of dim {dim}")
    if reference is not None and (np.ndim(reference) != 2 or np.shape(reference)[1] != dim):
        raise ValueError(f"reference must have shape (M', {dim}), got {np.shape(reference)}")
    if theta_true is not None and np.shape(theta_true) != (dim,):
        raise ValueError(f"theta_true must have shape ({dim},), got {np.shape(theta_true)}")
    if max_dims < 1:
        raise ValueError(f"max_dims must be >= 1, got {max_dims}")


def _plot_marginal(
    ax: Axes,
    i: int,
    samples: np.ndarray,
    reference: np.ndarray | None,
    theta_true: np.ndarray | None,
    low: np.ndarray,
    high: np.ndarray,
) -> None:
    """Histograms of parameter ``i`` on the diagonal of the corner plot.

    ``samples`` ``(M, k)``, ``reference`` ``(M', k)``, ``theta_true`` ``(k,)`` and the axis
    limits ``low`` and ``high`` ``(k,)`` hold the ``k`` parameters shown.
    """
    bins = np.linspace(low[i], high[i], 41)
    ax.hist(
        samples[:, i],
        bins=bins,
        density=True,
        histtype="stepfilled",
        color=SAMPLES_COLOR,
        alpha=0.5,
    )
    if reference is not None:
        ax.hist(
            reference[:, i],
            bins=bins,
            density=True,
            histtype="step",
            color=REFERENCE_COLOR,
            linewidth=1.2,
        )
    if theta_true is not None:
        ax.axvline(theta_true[i], color=TRUTH_COLOR, linewidth=1.0)
    ax.set_yticks([])
    ax.set_xlim(low[i], high[i])


def _plot_pair(
    ax: Axes,
    i: int,
    j: int,
    samples: np.ndarray,
    reference: np.ndarray | None,
    theta_true: np.ndarray | None,
    low: np.ndarray,
    high: np.ndarray,
) -> None:
    """Contours of parameter ``i`` (vertical) against ``j``, below the diagonal; the arrays
    as in :func:`_plot_marginal`."""
    extent = (low[j], high[j], low[i], high[i])
    _contours(ax, samples[:, j], samples[:, i], extent, SAMPLES_COLOR, True)
    if reference is not None:
        _contours(ax, reference[:, j], reference[:, i], extent, REFERENCE_COLOR, False)
    if theta_true is not None:
        ax.axvline(theta_true[j], color=TRUTH_COLOR, linewidth=0.8)
        ax.axhline(theta_true[i], color=TRUTH_COLOR, linewidth=0.8)
        ax.plot(theta_true[j], theta_true[i], "s", color=TRUTH_COLOR, markersize=3)
    ax.set_xlim(low[j], high[j])
    ax.set_ylim(low[i], high[i])


def _label_corner_axes(ax: Axes, i: int, j: int, k: int, parameter_names: list[str]) -> None:
    """Names and ticks of the panel in row ``i``, column ``j`` of ``k``: tick labels on the
    outer edges only."""
    if i != j:
        if j == 0:
            ax.set_ylabel(plain(parameter_names[i]))
        else:
            ax.tick_params(labelleft=False)
    # Three ticks per axis keep a 10 x 10 grid legible.
    ax.xaxis.set_major_locator(MaxNLocator(3))
    if i != j:
        ax.yaxis.set_major_locator(MaxNLocator(3))
    if i == k - 1:
        ax.set_xlabel(plain(parameter_names[j]))
        ax.tick_params(axis="x", labelrotation=45, labelsize="small")
    else:
        ax.tick_params(labelbottom=False)
    ax.tick_params(axis="y", labelsize="small")


def _corner_legend(
    fig: Figure, reference: np.ndarray | None, theta_true: np.ndarray | None
) -> None:
    """The legend: posterior, and the reference and true value where drawn."""
    handles = [Patch(color=SAMPLES_COLOR, alpha=0.5, label="posterior")]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOR, label="reference"))
    if theta_true is not None:
        handles.append(Line2D([], [], color=TRUTH_COLOR, marker="s", label="true value"))
    fig.legend(handles=handles, loc="upper right", frameon=False)


def plot_training_curves(
    epoch_train: np.ndarray,
    train_loss: np.ndarray,
    epoch_val: np.ndarray,
    val_loss: np.ndarray,
) -> Figure:
    """Negative log-likelihood of the training and validation sets against epoch.

    Arguments:
        epoch_train: Epochs (may be fractional, e.g. per step) of the training losses, ``(T,)``.
        train_loss: Training losses, shape ``(T,)``.
        epoch_val: Epochs of the validation losses, shape ``(V,)``.
        val_loss: Validation losses, shape ``(V,)``.
    """
    for name, epochs, loss in (
        ("train", epoch_train, train_loss),
        ("validation", epoch_val, val_loss),
    ):
        if np.shape(epochs) != np.shape(loss) or np.ndim(loss) != 1:
            raise ValueError(
                f"{name} epochs have shape {np.shape(epochs)} but {name} losses have shape "
                f"{np.shape(loss)}: both need the same shape (T,)"
            )

    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(epoch_train, train_loss, label="train", alpha=0.8)
    ax.plot(epoch_val, val_loss, label="validation", marker="o", markersize=3)
    if len(val_loss) > 0:
        best = int(np.nanargmin(val_loss))
        ax.axvline(epoch_val[best], color="grey", linestyle=":", label="best validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative log-likelihood")
    ax.legend(fontsize="small")
    return fig


def plot_c2st(values: np.ndarray, *, threshold: float | None = None) -> Figure:
    """C2ST accuracy per observation, against chance (0.5) and an optional pass threshold.

    Arguments:
        values: C2ST accuracy per observation, shape ``(n,)``.
        threshold: If given, drawn as the pass line (e.g. 0.6).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"values must have shape (n,), got {values.shape}")

    fig = Figure(figsize=(max(4.0, 0.4 * len(values) + 2.0), 3.5), layout="constrained")
    ax = fig.subplots()
    index = np.arange(len(values))
    ax.plot(index, values, "o", color=SAMPLES_COLOR, label="C2ST")
    ax.axhline(0.5, color="grey", linestyle="--", label="chance (0.5)")
    if threshold is not None:
        ax.axhline(threshold, color="C3", linestyle=":", label=f"threshold ({threshold:g})")
    finite = values[np.isfinite(values)]
    bottom = min(0.4, finite.min() - 0.02) if len(finite) else 0.4
    ax.set_ylim(bottom, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("observation")
    ax.set_ylabel("C2ST accuracy")
    ax.legend(fontsize="small")
    return fig


def plot_c2st_budget(
    budgets: np.ndarray, values: np.ndarray, *, threshold: float | None = None
) -> Figure:
    """C2ST accuracy against the simulation budget: each observation and their mean.

    Arguments:
        budgets: Training simulations of each model, shape ``(K,)``, ascending.
        values: C2ST accuracy per budget and observation, shape ``(K, n)``.
        threshold: If given, drawn as the pass line (e.g. 0.6).
    """
    budgets = np.asarray(budgets, dtype=float)
    values = np.asarray(values, dtype=float)
    if budgets.ndim != 1 or values.ndim != 2 or len(values) != len(budgets):
        raise ValueError(
            f"budgets must have shape (K,) and values (K, n), got {budgets.shape} and "
            f"{values.shape}"
        )
    fig = Figure(figsize=(5.0, 3.5), layout="constrained")
    ax = fig.subplots()
    for column in values.T:
        ax.plot(budgets, column, ".", color=SAMPLES_COLOR, alpha=0.5)
    ax.plot(
        budgets, values.mean(axis=1), "o-", color=SAMPLES_COLOR, label="mean over observations"
    )
    ax.axhline(0.5, color="grey", linestyle="--", label="chance (0.5)")
    if threshold is not None:
        ax.axhline(threshold, color="C3", linestyle=":", label=f"threshold ({threshold:g})")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    finite = values[np.isfinite(values)]
    ax.set_ylim(min(0.45, finite.min() - 0.02) if len(finite) else 0.45, 1.02)
    ax.set_xlabel("training simulations")
    ax.set_ylabel("C2ST accuracy")
    ax.legend(fontsize="small")
    return fig


def plot_predictive(
    x_obs: np.ndarray,
    intervals: np.ndarray,
    pvalues: list[float] | np.ndarray,
    feature_label: str = "feature of x",
) -> Figure:
    """Each observation against its posterior predictive distribution, feature by feature.

    Arguments:
        x_obs: Observations (or their summaries), flattened, shape ``(n, F)``.
        intervals: Predictive quantiles 5, 25, 50, 75 and 95 %, shape ``(n, 5, F)``.
        pvalues: Posterior predictive p-value of each observation, shape ``(n,)``.
        feature_label: What the ``F`` features are (the x axis's label).
    """
    x_obs, intervals = np.asarray(x_obs, dtype=float), np.asarray(intervals, dtype=float)
    n, features = x_obs.shape
    if intervals.shape != (n, 5, features) or len(pvalues) != n:
        raise ValueError(
            f"x_obs {x_obs.shape}, intervals {intervals.shape} and {len(pvalues)} p-values "
            "do not match (n, F), (n, 5, F), (n,)"
        )
    fig = Figure(figsize=(min(3.2 * n, 16.0), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharey=False, squeeze=False)[0])
    index = np.arange(features)
    for j, ax in enumerate(axes):
        low, q25, median, q75, high = intervals[j]
        ax.vlines(index, low, high, color=SAMPLES_COLOR, alpha=0.35, linewidth=6)
        ax.vlines(index, q25, q75, color=SAMPLES_COLOR, alpha=0.8, linewidth=6)
        ax.plot(index, median, "_", color="w", markersize=6)
        ax.plot(index, x_obs[j], "o", color=TRUTH_COLOR, markersize=3)
        ax.set_xlim(-0.7, features - 0.3)
        ax.set_title(f"observation {j}: p = {pvalues[j]:.2f}", fontsize="small")
        ax.set_xlabel(feature_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"value ({feature_label})")
    handles = [
        Patch(color=SAMPLES_COLOR, alpha=0.35, label="predictive 90 %"),
        Patch(color=SAMPLES_COLOR, alpha=0.8, label="predictive 50 %"),
        Line2D([], [], color=TRUTH_COLOR, marker="o", linestyle="", label="observed"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    return fig


def plot_skipped(title: str, reason: str) -> Figure:
    """A figure that says a check was not run and why: the file a workflow expects, never a
    blank image that could be mistaken for a result."""
    figure = Figure(figsize=(6.4, 1.6), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(0.5, 0.65, f"{title}: not computed", ha="center", va="center", weight="bold")
    axes.text(0.5, 0.3, reason, ha="center", va="center", wrap=True, fontsize="small")
    return figure


def plot_search(
    options: dict[str, list[Any]],
    loss: np.ndarray,
    coverage_deviation: np.ndarray,
    chosen: int,
    *,
    log_scale: Sequence[str] = (),
) -> Figure:
    """A hyperparameter search: each trial's held-out loss against each searched option,
    coloured by how far its HPD coverage lies from the diagonal, the chosen trial ringed.

    Arguments:
        options: Each searched option's value in every completed trial, ``n`` values each;
            numbers are placed on an axis (log scale for names in ``log_scale``), other values
            (flows, widths) as categories.
        loss: Held-out loss of each trial, shape ``(n,)``.
        coverage_deviation: Largest distance of HPD coverage from the diagonal, shape ``(n,)``.
        chosen: Index of the chosen trial among the ``n``.
    """
    loss = np.asarray(loss, dtype=float)
    coverage_deviation = np.asarray(coverage_deviation, dtype=float)
    if not options or loss.ndim != 1 or loss.shape != coverage_deviation.shape:
        raise ValueError(
            f"need at least one option and loss and coverage_deviation of one shape (n,), got "
            f"{len(options)} options and shapes {loss.shape} and {coverage_deviation.shape}"
        )
    if any(len(values) != len(loss) for values in options.values()):
        raise ValueError(f"every option needs {len(loss)} values, one per trial")
    fig = Figure(figsize=(3.2 * len(options) + 1.0, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(options), sharey=True, squeeze=False)[0])
    high = max(float(coverage_deviation.max()), 0.1)
    for ax, (name, values) in zip(axes, options.items(), strict=True):
        position = _axis_positions(ax, values, log=name in log_scale)
        points = ax.scatter(
            position, loss, c=coverage_deviation, cmap="viridis", vmin=0, vmax=high, s=25
        )
        ax.scatter(
            position[chosen], loss[chosen], s=140, facecolors="none", edgecolors="C3", lw=1.5
        )
        ax.set_xlabel(name)
    axes[0].set_ylabel("held-out loss (−log q)")
    fig.colorbar(points, ax=list(axes), label="HPD coverage, largest deviation")
    return fig


def _axis_positions(ax: Axes, values: list[Any], *, log: bool) -> np.ndarray:
    """Where each value sits on ``ax``: numbers as themselves, other values as categories."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short decade collide
        return np.asarray(values, dtype=float)
    labels = sorted({str(v) for v in values})
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    return np.array([labels.index(str(v)) for v in values], dtype=float)
