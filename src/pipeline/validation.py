"""The validate stage: coverage on held-out simulations, C2ST against reference posteriors.

Reads the sample files written by ``pipeline sample`` (test set and observations) and the
observation file written by ``pipeline observe``; writes ``metrics.json`` and PNG figures. Pure
arrays in, numbers out: no model is loaded here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline import diagnostics, plots
from pipeline.observations import read_reference
from pipeline.sampling import read_samples

log = logging.getLogger(__name__)


def validate(
    test_samples: Path,
    observation_samples: Path,
    observations: Path,
    out: Path,
    *,
    seed: int,
    c2st_max_samples: int | None,
    c2st_folds: int = 5,
) -> dict[str, Any]:
    """Computes every diagnostic, writes ``out/metrics.json`` and figures; returns the metrics."""
    test = read_samples(test_samples)
    if "theta" not in test:
        raise ValueError(
            f"{test_samples} has no true 'theta': sample the held-out simulation file (an HDF5 "
            "file with 'theta' and 'x'), not bare observations"
        )
    attrs = test["attrs"]
    names = list(attrs["parameter_names"])
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "task": attrs["task"],
        "parameter_names": names,
        "num_test": int(len(test["theta"])),
        "num_posterior_samples": int(test["samples"].shape[1]),
        "num_nonfinite_excluded": int(attrs.get("num_nonfinite_excluded", 0)),
        "figures": {},
    }
    metrics["coverage"] = _coverage(test, attrs, seed, out, metrics["figures"])
    metrics["sbc"] = _sbc(test, names, out, metrics["figures"])
    metrics["c2st"] = _c2st_and_corner(
        observation_samples,
        observations,
        names,
        out,
        metrics["figures"],
        seed=seed,
        max_samples=c2st_max_samples,
        folds=c2st_folds,
    )
    _write_json(out / "metrics.json", metrics)
    log.info(
        "TARP max deviation %.3f, HPD max deviation %.3f, C2ST %s",
        metrics["coverage"]["tarp_max_deviation"],
        metrics["coverage"]["hpd_max_deviation"],
        "n/a" if metrics["c2st"] is None else f"mean {metrics['c2st']['mean']:.3f}",
    )
    return metrics


def _coverage(
    test: dict, attrs: dict, seed: int, out: Path, figures: dict[str, str]
) -> dict[str, Any]:
    levels = diagnostics.DEFAULT_LEVELS
    low, high = attrs.get("low"), attrs.get("high")
    tarp = diagnostics.tarp_coverage(
        test["samples"],
        test["theta"],
        levels,
        low=None if low is None else np.asarray(low),
        high=None if high is None else np.asarray(high),
        rng=np.random.default_rng(seed),
    )
    hpd = diagnostics.hpd_coverage(test["log_prob"], test["log_prob_true"], levels)
    figure = plots.plot_coverage(levels, {"TARP": tarp, "HPD": hpd}, title=str(attrs["task"]))
    figures["coverage"] = _save(figure, out / "coverage.png")
    return {
        "levels": levels.tolist(),
        "tarp": tarp.tolist(),
        "hpd": hpd.tolist(),
        "tarp_max_deviation": diagnostics.max_coverage_deviation(levels, tarp),
        "hpd_max_deviation": diagnostics.max_coverage_deviation(levels, hpd),
    }


def _sbc(test: dict, names: list[str], out: Path, figures: dict[str, str]) -> dict[str, Any]:
    ranks = diagnostics.sbc_ranks(test["samples"], test["theta"])
    num_samples = test["samples"].shape[1]
    pvalues = diagnostics.sbc_uniformity_pvalues(ranks, num_samples)
    figures["sbc"] = _save(plots.plot_sbc_ranks(ranks, num_samples, names), out / "sbc.png")
    return {"pvalues": {name: float(p) for name, p in zip(names, pvalues, strict=True)}}


def _c2st_and_corner(
    observation_samples: Path,
    observations: Path,
    names: list[str],
    out: Path,
    figures: dict[str, str],
    *,
    seed: int,
    max_samples: int | None,
    folds: int,
) -> dict[str, Any] | None:
    posterior = read_samples(observation_samples)["samples"]
    theta, _, reference = read_reference(observations)
    if len(posterior) != len(theta):
        raise ValueError(
            f"{observation_samples} has samples for {len(posterior)} observations but "
            f"{observations} holds {len(theta)}; resample the observations"
        )
    corner = plots.plot_corner(
        posterior[0],
        names,
        reference=None if reference is None else reference[0],
        theta_true=theta[0],
    )
    figures["corner"] = _save(corner, out / "corner.png")
    if reference is None:
        return None
    values = diagnostics.c2st_batched(
        reference, posterior, seed=seed, num_folds=folds, max_samples=max_samples
    )
    figures["c2st"] = _save(plots.plot_c2st(values), out / "c2st.png")
    return _c2st_summary(values)


def _c2st_summary(values: np.ndarray) -> dict[str, Any]:
    return {
        "per_observation": values.tolist(),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def score_budget(
    observation_samples: Path,
    observations: Path,
    out: Path,
    *,
    budget: int,
    seed: int,
    max_samples: int | None,
    folds: int = 5,
) -> dict[str, Any]:
    """C2ST of one budget's posterior at the observations; writes and returns ``out`` (JSON).

    The budget study's score: the same observations, reference and classifier settings as
    :func:`validate`, so a budget's value is comparable with the main model's.
    """
    samples = read_samples(observation_samples)
    theta, _, reference = read_reference(observations)
    task = str(samples["attrs"]["task"])
    if reference is None:
        raise ValueError(
            f"{observations} holds no reference posterior (task {task!r} has none), so there "
            "is no C2ST to compute; leave this task out of simulate.budgets"
        )
    if len(samples["samples"]) != len(theta):
        raise ValueError(
            f"{observation_samples} has samples for {len(samples['samples'])} observations but "
            f"{observations} holds {len(theta)}; resample the observations"
        )
    values = diagnostics.c2st_batched(
        reference, samples["samples"], seed=seed, num_folds=folds, max_samples=max_samples
    )
    result = {"task": task, "budget": budget, "c2st": _c2st_summary(values)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _write_json(Path(out), result)
    log.info("budget %d: C2ST mean %.3f, max %.3f", budget, values.mean(), values.max())
    return result


def _save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path.name


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
