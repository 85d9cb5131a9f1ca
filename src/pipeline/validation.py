"""The validate stage: coverage on held-out simulations, C2ST against reference posteriors.

Reads the sample files written by ``pipeline sample`` (test set and observations) and the
observation file written by ``pipeline observe``; writes ``metrics.json`` and PNG figures. Pure
arrays in, numbers out: no model is loaded here.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline import atomic, diagnostics, metrics, plots
from pipeline.diagnostics.local_c2st import MIN_PAIRS
from pipeline.metrics import (
    BudgetScore,
    C2stScores,
    Coverage,
    Estimates,
    LocalC2st,
    Mcmc,
    Misspecification,
    ObservationsInfo,
    PredictiveChecks,
    Recovery,
    ReferenceInfo,
    Sbc,
    ValidationMetrics,
    WidthRatio,
    Widths,
)
from pipeline.observations import read_mock_of, read_reference, read_reference_info
from pipeline.predictive_draws import min_predictive_draws
from pipeline.progress import Progress
from pipeline.provenance import file_digest
from pipeline.sampling import read_samples, recorded_attrs, same_definition, task_definition
from pipeline.simulation import check_own_randomness, global_random_state, simulator_errors
from pipeline.tasks import Task, TaskError, get_task

log = logging.getLogger(__name__)

# Prior draws whose spread the posterior widths are measured against: the standard deviation's
# relative error is about 1/sqrt(2 * PRIOR_DRAWS), 0.2 %.
PRIOR_DRAWS = 100_000


def validate(
    test_samples: Path,
    observation_samples: Path,
    observations: Path,
    out: Path,
    *,
    seed: int,
    c2st_max_samples: int | None,
    c2st_folds: int = 5,
    local_c2st_null: int = 100,
    predictive_draws: int = 100,
    predictive_replicates: int = 10,
) -> ValidationMetrics:
    """Computes every diagnostic, writes ``out/metrics.json`` and figures; returns the metrics.

    Posterior predictive checks simulate ``predictive_draws`` posterior draws per ``x`` with the
    task's simulator (seeded by ``seed``), and data-space coverage compares them with
    ``predictive_replicates`` fresh simulations from each test pair's true ``theta``; local C2ST
    refits its classifier ``local_c2st_null`` times under the null.
    """
    test = _read_test_samples(test_samples)
    names = list(test["attrs"]["parameter_names"])
    out.mkdir(parents=True, exist_ok=True)
    # The figures are written as they are made, the metrics last: a run that fails midway must
    # not leave new figures beside the metrics of an earlier run, which the report would show.
    (out / "metrics.json").unlink(missing_ok=True)
    (out / ESTIMATES_CSV).unlink(missing_ok=True)
    spec = str(test["attrs"]["task"])
    try:
        task = get_task(spec)
    except TaskError as error:
        raise TaskError(
            f"{test_samples} records task {spec!r}, which does not resolve here: {error}. A task "
            "recorded by a relative path resolves from the folder the workflow ran in: run "
            "validate there"
        ) from None
    theta_obs, x_obs, reference = read_reference(observations)
    observed = read_samples(observation_samples)
    check_lineage(test, test_samples, observed, observation_samples, x_obs, observations)
    mock_of = read_mock_of(observations)
    figures: dict[str, str] = {}
    coverage, sbc = _test_set_diagnostics(
        task, test, seed, predictive_draws, predictive_replicates, out, figures
    )
    labels = plots.with_units(names, task.parameter_units)
    c2st = _c2st_and_corner(
        observation_samples, observations, labels, out, figures, seed, c2st_max_samples, c2st_folds
    )
    checks = _predictive_checks(task, observed, x_obs, predictive_draws, seed, out, figures)
    not_tested = _misspecification_skipped(test)
    result = ValidationMetrics(
        task=str(test["attrs"]["task"]),
        model_digest=str(test["attrs"]["model_digest"]),
        parameter_names=names,
        num_test=int(len(test["theta"])),
        num_posterior_samples=int(test["samples"].shape[1]),
        num_nonfinite_excluded=int(test["attrs"].get("num_nonfinite_excluded", 0)),
        num_left_out=sum(int(test["attrs"].get(name, 0)) for name, _ in LEFT_OUT.values()),
        observations=ObservationsInfo(
            len(x_obs), theta_obs is None, mock_of, file_digest(Path(observations))
        ),
        skipped=_skipped(task, theta_obs, reference, mock_of) | _left_out(test) | not_tested,
        coverage=coverage,
        sbc=sbc,
        c2st=c2st,
        widths=_widths(task, observed["samples"], reference, theta_obs),
        predictive=checks,
        local_c2st=_local_c2st(task, test, observed["samples"], x_obs, local_c2st_null, seed),
        misspecification=None if not_tested else misspecification_tests(task, test, observed),
        recovery=_recovery(names, observed, theta_obs),
        reference=_reference_info(observations),
        figures=figures,
        mcmc=_mcmc(test, observed),
        estimates=(estimates := _estimates(task, observed, theta_obs, observations)),
    )
    write_estimates_csv(estimates, names, out / ESTIMATES_CSV)
    result.write(out / "metrics.json")
    _log_headline(result)
    return result


def _log_headline(result: ValidationMetrics) -> None:
    """The figures a reader of the log wants first."""
    c2st = "n/a" if result.c2st is None else f"mean {result.c2st.mean:.3f}"
    tests = result.misspecification
    flagged = "not tested" if tests is None else tests.flagged(0.05) or "none"
    log.info(
        "TARP max deviation %.3f, HPD max deviation %.3f, C2ST %s, observations not consistent "
        "with the simulations (Benjamini-Hochberg at 0.05): %s",
        *(result.coverage.tarp_max_deviation, result.coverage.hpd_max_deviation, c2st),
        flagged,
    )


def _test_set_diagnostics(
    task: Task,
    test: dict[str, Any],
    seed: int,
    predictive_draws: int,
    predictive_replicates: int,
    out: Path,
    figures: dict[str, str],
) -> tuple[Coverage, Sbc]:
    """Coverage (TARP, HPD and, with a simulator, data space) and SBC on the test set."""
    with _step("coverage (TARP, HPD, predictive) on the test set"):
        predictive = None
        if task.has_simulator:
            predictive = _predictive_coverage(
                task, test, predictive_draws, predictive_replicates, seed
            )
        coverage = _coverage(test, test["attrs"], seed, out, figures, predictive)
    with _step("SBC ranks"):
        sbc = _sbc(test, list(test["attrs"]["parameter_names"]), out, figures)
    return coverage, sbc


def _reference_info(observations: Path) -> ReferenceInfo | None:
    """How the observation file's reference samples were drawn (None without any)."""
    info = read_reference_info(observations)
    return None if info is None else metrics.from_json(ReferenceInfo, info, "reference")


def _predictive_checks(
    task: Task,
    observed: dict[str, Any],
    x_obs: np.ndarray,
    draws: int,
    seed: int,
    out: Path,
    figures: dict[str, str],
) -> PredictiveChecks | None:
    """Predictive p-values at the observations (None, and a figure saying why, without a
    simulator: the workflow expects the file, the report reads only figures listed in metrics)."""
    if not task.has_simulator:
        reason = _skipped(task, None, None)["predictive"]
        _save(plots.plot_skipped("Posterior predictive check", reason), out / "predictive.png")
        return None
    with _step("posterior predictive checks at the observations"):
        return _predictive_at_observations(
            task, observed["samples"], x_obs, draws, seed, out, figures
        )


def _read_test_samples(path: Path) -> dict[str, Any]:
    """The test set's samples file, which must hold the true ``theta`` and the ``x``."""
    test = read_samples(path)
    check_not_combined(test, path)
    if test["attrs"].get("sampled", "simulations") != "simulations":
        raise ValueError(
            f"{path} holds samples at observations, not at held-out simulations: coverage "
            "would be scored on the observations (perhaps mocks of another model) and each "
            "would be ranked among a set holding itself. Give the test set's samples "
            "(samples/test.h5) as --test-samples"
        )
    if "theta" not in test:
        raise ValueError(
            f"{path} has no true 'theta': sample the held-out simulation file (an HDF5 "
            "file with 'theta' and 'x'), not bare observations"
        )
    if "x" not in test:
        raise ValueError(
            f"{path} has no 'x' (written by an older `pipeline sample`); rerun the sample stage"
        )
    if len(test["theta"]) < MIN_PAIRS:
        raise ValueError(
            f"{path} holds {len(test['theta'])} test simulations with samples, and the "
            f"diagnostics need at least {MIN_PAIRS} (local C2ST calibrates a classifier on "
            "them; the misspecification tests rank among them): simulate more test "
            "simulations (simulate.num_test_simulations) and sample them again"
        )
    return test


# Test simulations the sample stage could not sample: the attribute that counts them, and why.
LEFT_OUT = {
    "region": (
        "num_outside_region_excluded",
        "their posterior has too little mass in the last round's region to be sampled by "
        "rejection",
    ),
    "mcmc": (
        "num_unconverged_excluded",
        "their MCMC chains did not converge (R-hat or ESS) within the sample stage's budget",
    ),
}


def _left_out(test: dict) -> dict[str, str]:
    """The test simulations that coverage leaves out, by cause (a round's region, NLE chains
    that did not converge), as skipped checks."""
    skipped = {}
    for check, (attribute, why) in LEFT_OUT.items():
        count = int(test["attrs"].get(attribute, 0))
        if count:
            total = count + len(test["theta"])
            skipped[check] = f"{count} of {total} test simulations left out of coverage: {why}"
    return skipped


def _misspecification_skipped(test: dict) -> dict[str, str]:
    """The misspecification tests, skipped when the test simulations come from a round's region:
    the region was cut around the observation's posterior, so the observation is not one more
    draw like them and the tests' rank p-values lose their calibration (on bernoulli_glm that
    posterior fills the region, the test simulations' posteriors are parts of it, and the
    observation reads as broader than any of theirs)."""
    if "truncation" not in test["attrs"]:
        return {}
    return {
        "misspecification": "the test simulations come from the last round's region, which was "
        "chosen at the observation, so the observation is not exchangeable with them and the "
        "tests' p-values would not be calibrated; test the observation with an amortized "
        "posterior (a run without rounds)"
    }


def _mcmc(test: dict, observed: dict) -> Mcmc | None:
    """The chains' diagnostics of an NLE posterior's samples; None for other estimators."""
    if "mcmc_rhat" not in test or "mcmc_rhat" not in observed:
        return None
    return Mcmc(
        test_rhat_max=float(np.max(test["mcmc_rhat"])),
        test_ess_min=float(np.min(test["mcmc_ess"])),
        test_acceptance_mean=float(np.mean(test["mcmc_acceptance"])),
        num_unconverged_excluded=int(test["attrs"].get("num_unconverged_excluded", 0)),
        observation_rhat=[float(v) for v in observed["mcmc_rhat"]],
        observation_ess=[float(v) for v in observed["mcmc_ess"]],
    )


def _skipped(
    task: Task,
    theta_obs: np.ndarray | None,
    reference: np.ndarray | None,
    mock_of: str | None = None,
) -> dict:
    """The diagnostics that cannot run for this task and observations, with the reason."""
    skipped: dict[str, str] = {}
    if not task.has_simulator:
        skipped["predictive"] = (
            "the task has no simulator (imported simulations), so no posterior predictive "
            "draws can be simulated: predictive coverage and predictive checks skipped"
        )
    if reference is None:
        skipped["c2st"] = (
            "real observations have no reference posterior"
            if theta_obs is None
            else f"mock observations of another model ({mock_of}) have no reference posterior"
            if mock_of is not None
            else "the observations were drawn without reference samples "
            "(observations.num_reference_samples: 0)"
            if task.has_reference
            else "the task has no reference posterior"
        )
    return skipped


def check_lineage(
    test: dict,
    test_path: Path,
    observed: dict,
    observed_path: Path,
    x_obs: np.ndarray,
    observations: Path,
) -> None:
    """Refuses sample files of different tasks or models, or observation samples not drawn at
    the observation file's ``x`` (:func:`check_drawn_at`): validating them would compare
    posteriors with the wrong truths, or one model's calibration with another's observations.
    """
    tasks = {test_path: test["attrs"].get("task"), observed_path: observed["attrs"].get("task")}
    if len(set(tasks.values())) > 1:
        named = "; ".join(f"{path}: {task!r}" for path, task in tasks.items())
        raise ValueError(
            f"these files are of different tasks ({named}); resample with the model of this task"
        )
    models = {
        path: samples["attrs"].get("model_digest")
        for path, samples in ((test_path, test), (observed_path, observed))
    }
    if None in models.values():
        raise ValueError(
            f"{' and '.join(str(p) for p, d in models.items() if d is None)} do not record the "
            "model that drew them (written by an older `pipeline sample`); rerun the sample stage"
        )
    if len(set(models.values())) > 1:
        named = "; ".join(f"{path}: {digest}" for path, digest in models.items())
        raise ValueError(
            f"these samples were drawn by different models (weights' digests: {named}); sample "
            "the test set and the observations with the same model"
        )
    check_drawn_at(observed, observed_path, x_obs, observations)


def check_drawn_at(
    observed: dict, observed_path: Path, x_obs: np.ndarray, observations: Path
) -> None:
    """Refuses observation samples of another task than ``observations``', or not drawn at
    each of its observations in order: ``x_obs`` is its ``x`` (n_obs, ...), and the samples
    file records the ``x`` it was drawn at and which observations those were
    (``observation_index``)."""
    check_not_combined(observed, observed_path)
    task = observed["attrs"].get("task")
    recorded = recorded_attrs(observations)
    made_for = recorded.get("task", task)
    # A user's task is its definition, whatever path named it (as the sample stage judges).
    ours = observed["attrs"].get("task_digest")
    same = same_definition(ours, recorded)
    if same is False:
        raise ValueError(
            f"{observed_path} holds samples of a definition of task {task!r} (digest {ours}) "
            f"other than that of {observations}' observations ({task_definition(recorded)}); "
            "sample with the model of that definition"
        )
    if same is None and made_for != task:
        raise ValueError(
            f"{observed_path} holds samples of task {task!r}, but {observations} holds "
            f"observations of task {made_for!r}; sample with the model of that task"
        )
    if "x" not in observed:
        raise ValueError(
            f"{observed_path} does not record the x it was drawn at (written by an older "
            "`pipeline sample`); rerun the sample stage"
        )
    index = np.asarray(observed["attrs"].get("observation_index", range(len(observed["x"]))))
    if index.max(initial=-1) >= len(x_obs) or not np.array_equal(
        observed["x"], np.asarray(x_obs, dtype=np.float32)[index]
    ):
        raise ValueError(
            f"{observed_path} was drawn at other observations than those of {observations} "
            "(its x differ); sample the posterior at this observation file again"
        )
    missing = sorted(set(range(len(x_obs))) - set(index.tolist()))
    if missing:
        raise ValueError(
            f"{observed_path} has no samples at observations {missing} of {observations} (the "
            "sample stage leaves out observations whose x is NaN or inf): the diagnostics pair "
            f"each observation with its samples, so remove those rows from {observations} or "
            "mend them, then sample again"
        )


def check_not_combined(samples: dict, path: Path) -> None:
    """Refuses one posterior drawn from several independent observations (``sample --iid``):
    the diagnostics pair each observation (or test simulation) with its own posterior, and no
    reference or test set describes a combined one."""
    combined = samples["attrs"].get("iid")
    if combined:
        raise ValueError(
            f"{path} holds one posterior from {combined} independent observations (pipeline "
            "sample --iid), but validation scores one posterior per observation; sample the "
            "observations and the test set without --iid to validate the model, then combine"
        )


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Logs the start of one diagnostic and, when it ends, the time it took."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)


def _coverage(
    test: dict,
    attrs: dict,
    seed: int,
    out: Path,
    figures: dict[str, str],
    predictive: dict[str, Any] | None,
) -> Coverage:
    """TARP, HPD and (``predictive``, None when skipped) data-space coverage, and the figure."""
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
    curves = {"TARP": tarp, "HPD": hpd}
    if predictive is not None:
        curves["predictive (data space)"] = predictive["coverage"]
    figure = plots.plot_coverage(levels, curves, title=str(attrs["task"]))
    figures["coverage"] = _save(figure, out / "coverage.png")
    return Coverage(
        levels=levels.tolist(),
        tarp=tarp.tolist(),
        hpd=hpd.tolist(),
        tarp_max_deviation=diagnostics.max_coverage_deviation(levels, tarp),
        hpd_max_deviation=diagnostics.max_coverage_deviation(levels, hpd),
        predictive=None if predictive is None else predictive["coverage"].tolist(),
        predictive_max_deviation=None
        if predictive is None
        else diagnostics.max_coverage_deviation(levels, predictive["coverage"]),
        predictive_num_excluded=0 if predictive is None else predictive["num_excluded"],
    )


def _simulate_draws(
    task: Task, samples: np.ndarray, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Summaries of simulations of the first ``draws`` posterior samples of each x: (n, M, D) to
    (n, S, F), ``F`` the task's :attr:`~pipeline.tasks.Task.summary_size`."""
    chosen = samples[:, :draws].astype(np.float64)
    n, s, dim = chosen.shape
    return _simulate_summaries(task, chosen.reshape(n * s, dim), rng).reshape(n, s, -1)


def _simulate_summaries(task: Task, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Summaries of one simulation per row of ``theta``: (n, D) to (n, F).

    Simulated 1000 rows at a time: 10^5 predictive maps of 128^2 pixels would take 13 GB.
    """
    blocks = []
    for i in range(0, len(theta), 1000):
        before = global_random_state()
        # A copy: a simulator may convert its parameters in place, and these are the samples'.
        rows = theta[i : i + 1000].copy()
        with simulator_errors(task, len(rows), "simulating posterior predictive draws"):
            x = task.simulate(rows, rng)
        check_own_randomness(task, before)
        blocks.append(task.summary(x))
    return np.concatenate(blocks) if blocks else np.empty((0, task.summary_size))


def _predictive_coverage(
    task: Task, test: dict, draws: int, replicates: int, seed: int
) -> dict[str, Any]:
    """Coverage in data space on the test set (see :func:`diagnostics.predictive_coverage`).

    The predictive draws simulate ``draws`` of each pair's posterior samples; each of
    ``replicates`` fresh simulations from the pair's true ``theta`` is compared with them, and
    the curve is the mean over replicates. Every replicate is exchangeable with the draws under
    the exact posterior, so the mean stays on the diagonal; it only averages out the replicates'
    noise. One replicate per pair left the curve of gaussian_mixture's exact posterior 0.02-0.055
    from the diagonal depending on the seed (1000 pairs); ten, 0.012-0.019. Pairs where the
    simulator returned NaN or inf (a replicate or any draw) are left out and counted.
    """
    if test["samples"].shape[1] < draws:
        raise ValueError(
            f"validate.predictive_draws={draws} exceeds the {test['samples'].shape[1]} posterior "
            "samples per test simulation; lower it or raise sample.num_test_samples"
        )
    if replicates < 1:
        raise ValueError(f"validate.predictive_replicates must be at least 1, got {replicates}")
    rng = np.random.default_rng([seed, 1])
    theta = test["theta"].astype(np.float64)
    x_pred = _simulate_draws(task, test["samples"], draws, rng)
    x_rep = np.stack([_simulate_summaries(task, theta, rng) for _ in range(replicates)])
    finite = np.isfinite(x_rep).all(axis=(0, 2)) & np.isfinite(x_pred).all(axis=(1, 2))
    if not finite.any():
        raise ValueError(f"task {task.name}: every predictive simulation holds NaN or inf")
    levels = diagnostics.DEFAULT_LEVELS
    curves = [diagnostics.predictive_coverage(x[finite], x_pred[finite], levels) for x in x_rep]
    return {"coverage": np.mean(curves, axis=0), "num_excluded": int((~finite).sum())}


def _predictive_at_observations(
    task: Task,
    samples: np.ndarray,
    x_obs: np.ndarray,
    draws: int,
    seed: int,
    out: Path,
    figures: dict[str, str],
) -> PredictiveChecks:
    """Posterior predictive p-value of each observation, and the predictive bands figure."""
    if samples.shape[1] < draws:
        raise ValueError(
            f"validate.predictive_draws={draws} exceeds the {samples.shape[1]} posterior "
            "samples per observation; lower it or raise sample.num_observation_samples"
        )
    # A stream per observation, keyed on its data: its p-value does not depend on which other
    # observations are validated with it, or in which order.
    x_pred = np.concatenate(
        [
            _simulate_draws(task, samples[i : i + 1], draws, _observation_stream(seed, x))
            for i, x in enumerate(x_obs)
        ]
    )
    x_obs = task.summary(x_obs)
    pvalues, excluded = [], []
    for observed, predicted in zip(x_obs, x_pred, strict=True):
        finite = np.isfinite(predicted).all(axis=1)
        excluded.append(int((~finite).sum()))
        pvalues.append(
            float(diagnostics.predictive_pvalues(observed[None], predicted[finite][None])[0])
        )
    quantiles = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    finite_draws = np.where(np.isfinite(x_pred), x_pred, np.nan)
    intervals = np.nanquantile(finite_draws, quantiles, axis=1).transpose(1, 0, 2)
    figure = plots.plot_predictive(x_obs, intervals, pvalues, task.summary_label)
    figures["predictive"] = _save(figure, out / "predictive.png")
    return PredictiveChecks(pvalues=pvalues, num_draws=draws, num_nonfinite_excluded=excluded)


def _observation_stream(seed: int, x: np.ndarray) -> np.random.Generator:
    """The random stream of the predictive draws at one observation ``x`` (its float64 bytes)."""
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).digest()
    return np.random.default_rng([seed, 2, *np.frombuffer(digest[:16], dtype=np.uint32)])


def _local_c2st(
    task: Task, test: dict, samples: np.ndarray, x_obs: np.ndarray, num_null: int, seed: int
) -> LocalC2st:
    """Local C2ST at each observation, calibrated on the test set (one draw per pair).

    The classifier sees the task's summaries of x (x itself, flattened, except for maps).

    The observations' draws are thinned to as many as there are test pairs: the statistic's
    noise falls as 1/sqrt(M), and its cost is the null's refits, not the evaluation.
    """
    draws = min(samples.shape[1], len(test["theta"]))
    with _step(f"local C2ST ({num_null} null fits)"):
        result = diagnostics.local_c2st(
            test["theta"],
            task.summary(test["x"]),
            test["samples"][:, 0],
            samples[:, :draws],
            task.summary(x_obs),
            num_null=num_null,
            seed=seed,
            progress=Progress(num_null, "null fits", log).update,
        )
    return LocalC2st(
        statistic=result.statistic.tolist(),
        pvalue=result.pvalue.tolist(),
        dispersion_correlation=result.dispersion_correlation.tolist(),
        num_null=num_null,
        num_calibration=len(test["theta"]),
        num_draws=draws,
    )


def _recovery(names: list[str], observed: dict, theta_obs: np.ndarray | None) -> Recovery | None:
    """Bias and marginal coverage of the true parameters at the observations (None for real
    data, which has no truth)."""
    if theta_obs is None:
        return None
    index = np.asarray(observed["attrs"].get("observation_index", range(len(observed["x"]))))
    bias, inside_68, inside_95 = diagnostics.marginal_recovery(
        observed["samples"].astype(np.float64), theta_obs[index].astype(np.float64)
    )

    def named(values: np.ndarray) -> dict[str, float]:
        return dict(zip(names, values.tolist(), strict=True))

    return Recovery(named(bias), named(inside_68), named(inside_95), len(index))


# The estimates as a table beside metrics.json, for a paper's table or another program.
ESTIMATES_CSV = "estimates.csv"


def _estimates(
    task: Task, observed: dict, theta_obs: np.ndarray | None, observations: Path | None = None
) -> Estimates:
    """Each observation's posterior median and central 68 % and 95 % intervals, per parameter
    (quantiles over its finite draws), with the task's units and the truth where known. An
    observation selected from a file of several (the one rounds aim at) keeps its number
    there."""
    index = np.asarray(observed["attrs"].get("observation_index", range(len(observed["x"]))))
    samples = observed["samples"].astype(np.float64)  # (n_obs, M, D)
    samples = np.where(np.isfinite(samples), samples, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a parameter with no finite draw
        values = np.nanquantile(samples, metrics.ESTIMATE_QUANTILES, axis=1)  # (5, n_obs, D)
    truth = None if theta_obs is None else theta_obs[index].astype(np.float64).tolist()
    selected = recorded_attrs(observations).get("selected_index") if observations else None
    if selected is not None and len(index) == 1:
        index = np.array([int(selected)])
    return Estimates(
        observation_index=index.tolist(),
        units=list(task.parameter_units),
        values=values.transpose(1, 2, 0).tolist(),
        truth=truth,
    )


def write_estimates_csv(estimates: Estimates, names: list[str], path: Path) -> None:
    """``estimates`` as CSV: one row per observation and parameter, with the unit, the five
    quantiles and the truth (empty for real data)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    columns = ["q" + format(q, "g") for q in metrics.ESTIMATE_QUANTILES]
    writer.writerow(["observation", "parameter", "unit", *columns, "truth"])
    for k, observation in enumerate(estimates.observation_index):
        for d, name in enumerate(names):
            truth = "" if estimates.truth is None else repr(estimates.truth[k][d])
            quantiles = [repr(value) for value in estimates.values[k][d]]
            writer.writerow([observation, name, estimates.units[d], *quantiles, truth])
    atomic.write_text(path, text.getvalue())


def misspecification_tests(task: Task, test: dict, observed: dict) -> Misspecification:
    """Is each observation one the simulator could have produced? Its summaries' typicality
    among the test simulations', and the estimator's sharpness there against its sharpness at
    the test simulations (:mod:`pipeline.diagnostics.misspecification`).

    Both sides use as many posterior draws per ``x``; test pairs whose draws have a non-finite
    log-density are left out of the estimator-space reference, and an observation's such draws
    make it as surprising as it gets.
    """
    with _step("misspecification tests at the observations"):
        draws = min(test["samples"].shape[1], observed["samples"].shape[1])
        sims = diagnostics.posterior_sharpness(test["log_prob"], draws)
        sims = sims[np.isfinite(sims)]
        # A density that is not finite at an observation's own draws: as surprising as it gets.
        score = diagnostics.posterior_sharpness(observed["log_prob"], draws)
        surprise = diagnostics.surprise_pvalues(np.nan_to_num(score, nan=np.inf), sims)
        typicality = None
        x_sims = task.summary(test["x"])
        if len(x_sims) >= min_predictive_draws(x_sims.shape[1]):
            typicality = diagnostics.typicality_pvalues(task.summary(observed["x"]), x_sims)
        smaller = surprise if typicality is None else np.minimum(surprise, typicality)
    return Misspecification(
        typicality=None if typicality is None else typicality.tolist(),
        surprise=surprise.tolist(),
        pvalue=np.minimum(1.0, (1 if typicality is None else 2) * smaller).tolist(),
        num_simulations=len(sims),
        num_draws=draws,
    )


def _sbc(test: dict, names: list[str], out: Path, figures: dict[str, str]) -> Sbc:
    ranks = diagnostics.sbc_ranks(test["samples"], test["theta"])
    num_samples = test["samples"].shape[1]
    pvalues = diagnostics.sbc_uniformity_pvalues(ranks, num_samples)
    figures["sbc"] = _save(plots.plot_sbc_ranks(ranks, num_samples, names), out / "sbc.png")
    return Sbc(pvalues={name: float(p) for name, p in zip(names, pvalues, strict=True)})


def _c2st_and_corner(
    observation_samples: Path,
    observations: Path,
    labels: list[str],
    out: Path,
    figures: dict[str, str],
    seed: int,
    max_samples: int | None,
    folds: int,
) -> C2stScores | None:
    """C2ST at each observation (None without a reference), and the first one's corner plot
    (axes named by ``labels``)."""
    with _step("C2ST against the reference posteriors"):
        posterior = read_samples(observation_samples)["samples"]
        theta, x, reference = read_reference(observations)
        if len(posterior) != len(x):
            raise ValueError(
                f"{observation_samples} has samples for {len(posterior)} observations but "
                f"{observations} holds {len(x)}; resample the observations"
            )
        corner = plots.plot_corner(
            posterior[0],
            labels,
            reference=None if reference is None else reference[0],
            theta_true=None if theta is None else theta[0],
        )
        figures["corner"] = _save(corner, out / "corner.png")
        if reference is None:
            return None
        values = diagnostics.c2st_batched(
            reference, posterior, seed=seed, num_folds=folds, max_samples=max_samples
        )
        figures["c2st"] = _save(plots.plot_c2st(values), out / "c2st.png")
        size = diagnostics.c2st_sample_size(
            reference.shape[1], posterior.shape[1], folds, max_samples
        )
        return C2stScores.of(values, size)


def _widths(
    task: Task, samples: np.ndarray, reference: np.ndarray | None, theta: np.ndarray
) -> Widths | None:
    """How wide the posterior is at each observation, against the exact one, the Fisher bound
    and the prior.

    ``std_ratio`` (per parameter, mean over the observations) is the estimator's standard
    deviation over the reference's: above 1 under-confident, below 1 over-confident. Tasks with
    a :meth:`fisher_information` also get both standard deviations over the Cramer-Rao bound
    ``sqrt(diag(F^-1))`` at the true parameters: the spread an unbiased estimator cannot beat
    from the likelihood alone (a posterior can, where the prior's edges cut it). Tasks with a
    prior get the estimator's over the prior's (:data:`PRIOR_DRAWS` draws): near 1 in every
    parameter, the posterior is the prior, calibrated and uninformative (an archive whose x
    rows do not match their theta rows, or an estimator that learnt nothing).

    Shapes: ``samples`` (n, M, D), ``reference`` (n, R, D) or None, ``theta`` (n, D) or None
    (real observations: no Cramer-Rao bound at an unknown truth).
    """
    fisher = getattr(task, "fisher_information", None) if theta is not None else None
    prior = task.prior
    if reference is None and fisher is None and prior is None:
        return None
    names = list(task.parameter_names)
    std = samples.std(axis=1)

    def per_parameter(ratio: np.ndarray) -> WidthRatio:
        return WidthRatio(
            ratio.tolist(), dict(zip(names, ratio.mean(axis=0).tolist(), strict=True))
        )

    widths: dict[str, Any] = {"posterior_std": std.tolist()}
    if reference is not None:
        reference_std = reference.std(axis=1)
        constant = ~(np.ptp(reference, axis=1) > 0)  # std of equal floats may not be 0
        if constant.any():
            observation, parameter = np.argwhere(constant)[0]
            raise ValueError(
                f"the reference samples of observation {observation} do not vary in "
                f"{names[parameter]}: no width to compare with; recompute the observations"
            )
        widths["reference_std"] = reference_std.tolist()
        widths["std_ratio"] = per_parameter(std / reference_std)
    if fisher is not None:
        bound = np.sqrt(np.diagonal(np.linalg.inv(fisher(theta)), axis1=1, axis2=2))
        widths["cramer_rao_std"] = bound.tolist()
        widths["std_over_cramer_rao"] = per_parameter(std / bound)
        if reference is not None:
            widths["reference_over_cramer_rao"] = per_parameter(reference.std(axis=1) / bound)
    if prior is not None:
        prior_std = prior.sample(PRIOR_DRAWS, np.random.default_rng(0)).std(axis=0)
        if np.all(prior_std > 0):  # a parameter the prior fixes has no spread to compare with
            widths["over_prior"] = per_parameter(std / prior_std)
    return Widths(**widths)


def score_budget(
    observation_samples: Path,
    observations: Path,
    out: Path,
    *,
    budget: int,
    seed: int,
    max_samples: int | None,
    folds: int = 5,
) -> BudgetScore:
    """C2ST of one budget's posterior at the observations; writes and returns ``out`` (JSON).

    The budget study's score: the same observations, reference and classifier settings as
    :func:`validate`, so a budget's value is comparable with the main model's.
    """
    samples = read_samples(observation_samples)
    check_not_combined(samples, observation_samples)
    theta, x_obs, reference = read_reference(observations)
    check_drawn_at(samples, observation_samples, x_obs, observations)
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
    size = diagnostics.c2st_sample_size(
        reference.shape[1], samples["samples"].shape[1], folds, max_samples
    )
    digest = samples["attrs"].get("model_digest")
    result = BudgetScore(
        task=task,
        budget=budget,
        c2st=C2stScores.of(values, size),
        model_digest=None if digest is None else str(digest),
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    result.write(Path(out))
    log.info("budget %d: C2ST mean %.3f, max %.3f", budget, values.mean(), values.max())
    return result


def _save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path.name
