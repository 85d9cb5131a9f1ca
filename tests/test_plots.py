"""Every plot returns a Figure with the expected axes and labels, and saves to PNG headless."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from pipeline.diagnostics import DEFAULT_LEVELS
from pipeline.plots import (
    plot_c2st,
    plot_corner,
    plot_coverage,
    plot_sbc_ranks,
    plot_training_curves,
    with_units,
)


def assert_saves(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=50)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def legend_labels(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def test_plot_coverage(tmp_path: Path) -> None:
    coverages = {"TARP": DEFAULT_LEVELS, "HPD": DEFAULT_LEVELS**1.5}
    fig = plot_coverage(DEFAULT_LEVELS, coverages, band=0.1, title="gaussian")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "credibility level"
    assert ax.get_ylabel() == "expected coverage"
    assert ax.get_title() == "gaussian"
    assert {"TARP", "HPD", "calibrated", "±0.1"} <= set(legend_labels(fig))
    assert_saves(fig, tmp_path / "coverage.png")


def test_plot_coverage_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"'TARP' has shape \(3,\).*\(19,\)"):
        plot_coverage(DEFAULT_LEVELS, {"TARP": np.zeros(3)})


@pytest.mark.parametrize("dim", [1, 5])
def test_plot_sbc_ranks(tmp_path: Path, dim: int) -> None:
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 101, size=(200, dim))
    names = [f"p{d}" for d in range(dim)]
    fig = plot_sbc_ranks(ranks, num_samples=100, parameter_names=names)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == dim  # unused grid cells are removed
    assert [ax.get_title() for ax in fig.axes] == names
    assert all(ax.get_xlabel() == "rank" for ax in fig.axes)
    assert "99% band of uniform ranks" in legend_labels(fig)
    assert_saves(fig, tmp_path / "sbc.png")


def test_plot_sbc_ranks_rejects_wrong_names() -> None:
    with pytest.raises(ValueError, match=r"2 parameter names for ranks of 3 parameters"):
        plot_sbc_ranks(np.zeros((50, 3), dtype=int), 10, ["a", "b"])


@pytest.mark.parametrize("dim", [1, 3, 10])
def test_plot_corner(tmp_path: Path, dim: int) -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(2000, dim))
    reference = rng.normal(0.2, 1.1, size=(2000, dim))
    names = [rf"$\theta_{d}$" for d in range(dim)]
    fig = plot_corner(samples, names, reference=reference, theta_true=np.zeros(dim))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == dim * (dim + 1) // 2  # upper triangle removed
    assert [ax.get_xlabel() for ax in fig.axes[-dim:]] == names  # bottom row
    assert {"posterior", "reference", "true value"} == set(legend_labels(fig))
    assert_saves(fig, tmp_path / "corner.png")


def test_a_parameter_name_matplotlib_cannot_typeset_is_shown_as_written(tmp_path: Path) -> None:
    # "x_{$a}$ ^" raised inside matplotlib and failed the validate stage; "$\\theta$" stays
    # mathematics, as its author asked.
    samples = np.random.default_rng(0).normal(size=(200, 2))
    fig = plot_corner(samples, ["x_{$a}$ ^", r"$\theta$"])
    assert_saves(fig, tmp_path / "corner.png")
    assert [ax.get_xlabel() for ax in fig.axes[-2:]] == [r"x_{\$a}\$ ^", r"$\theta$"]


def test_the_corner_plots_axes_name_each_parameters_unit(tmp_path: Path) -> None:
    samples = np.random.default_rng(0).normal(size=(200, 2))
    labels = with_units(["Omega_m", "H0"], ["", "km / (Mpc s)"])
    fig = plot_corner(samples, labels)
    assert_saves(fig, tmp_path / "corner.png")
    assert [ax.get_xlabel() for ax in fig.axes[-2:]] == ["Omega_m", "H0 [km / (Mpc s)]"]
    with pytest.raises(ValueError):
        with_units(["Omega_m", "H0"], [""])


def test_plot_corner_limits_dims_and_works_without_extras() -> None:
    samples = np.random.default_rng(0).normal(size=(500, 12))
    fig = plot_corner(samples, [f"p{d}" for d in range(12)], max_dims=4)
    assert len(fig.axes) == 10
    assert fig.get_suptitle() == "first 4 of 12 parameters"
    assert legend_labels(fig) == ["posterior"]


def test_plot_corner_rejects_bad_input() -> None:
    samples = np.zeros((100, 2))
    with pytest.raises(ValueError, match=r"1 parameter names for samples of dim 2"):
        plot_corner(samples, ["a"])
    with pytest.raises(ValueError, match=r"reference must have shape \(M', 2\)"):
        plot_corner(samples, ["a", "b"], reference=np.zeros((100, 3)))
    with pytest.raises(ValueError, match=r"theta_true must have shape \(2,\)"):
        plot_corner(samples, ["a", "b"], theta_true=np.zeros(3))


def test_plot_training_curves(tmp_path: Path) -> None:
    epoch_train = np.linspace(0, 20, 200)
    epoch_val = np.arange(1, 21)
    fig = plot_training_curves(epoch_train, 3 / (1 + epoch_train), epoch_val, 3 / epoch_val + 0.1)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "epoch"
    assert ax.get_ylabel() == "negative log-likelihood"
    assert {"train", "validation", "best validation"} == set(legend_labels(fig))
    assert_saves(fig, tmp_path / "training.png")


def test_plot_training_curves_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"validation epochs have shape \(3,\).*\(4,\)"):
        plot_training_curves(np.arange(3), np.zeros(3), np.arange(3), np.zeros(4))


def test_plot_c2st(tmp_path: Path) -> None:
    fig = plot_c2st(np.array([0.51, 0.55, 0.62, 0.49, 0.5]), threshold=0.6)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "observation"
    assert ax.get_ylabel() == "C2ST accuracy"
    assert {"C2ST", "chance (0.5)", "threshold (0.6)"} == set(legend_labels(fig))
    assert_saves(fig, tmp_path / "c2st.png")
