"""What the validate stage concludes (``validation/metrics.json``) and the budget study scores
(``budget-N/c2st.json``): one typed definition that the stages write and the report reads back.

Reading checks every field against its type here, so a file that lacks a field, holds the wrong
type or curves of different lengths is refused with the file and the field named, before any
page is built on it. Unknown fields are refused too: they mean a file of another version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline import atomic

T = TypeVar("T")


class MetricsError(ValueError):
    """A result file exists but does not hold what its definition says."""


@dataclass(frozen=True)
class C2stScores:
    """C2ST accuracy at each observation (0.5: indistinguishable from the reference), and the
    samples per set each classifier was fitted on (None in files written before it was kept):
    with fewer, a classifier tells fewer differences apart."""

    per_observation: list[float]
    mean: float
    max: float
    samples: int | None = None

    @classmethod
    def of(cls, values: np.ndarray, samples: int) -> C2stScores:
        """The scores of ``values``, shape ``(n_obs,)``, each fitted on ``samples`` per set."""
        return cls(values.tolist(), float(values.mean()), float(values.max()), samples)


@dataclass(frozen=True)
class Coverage:
    """Coverage curves on the test set at ``levels``, and each curve's largest distance from
    the diagonal; ``predictive`` (data space) is None where the task has no simulator."""

    levels: list[float]
    tarp: list[float]
    hpd: list[float]
    tarp_max_deviation: float
    hpd_max_deviation: float
    predictive: list[float] | None
    predictive_max_deviation: float | None
    predictive_num_excluded: int

    def __post_init__(self) -> None:
        curves = [self.levels, self.tarp, self.hpd]
        if self.predictive is not None:
            curves.append(self.predictive)
        if len({len(curve) for curve in curves}) != 1:
            raise MetricsError("levels, tarp, hpd and predictive differ in length")


@dataclass(frozen=True)
class Sbc:
    """Uniformity p-value of each parameter's SBC ranks, by parameter name."""

    pvalues: dict[str, float]


@dataclass(frozen=True)
class PredictiveChecks:
    """Posterior predictive p-value at each observation, from ``num_draws`` simulated draws of
    which ``num_nonfinite_excluded[i]`` were NaN or inf at observation ``i``."""

    pvalues: list[float]
    num_draws: int
    num_nonfinite_excluded: list[int]


@dataclass(frozen=True)
class LocalC2st:
    """Local C2ST at each observation, calibrated on ``num_calibration`` test pairs."""

    statistic: list[float]
    pvalue: list[float]
    dispersion_correlation: list[float]
    num_null: int
    num_calibration: int
    num_draws: int

    def __post_init__(self) -> None:
        if not len(self.statistic) == len(self.pvalue) == len(self.dispersion_correlation):
            raise MetricsError("statistic, pvalue and dispersion_correlation differ in length")


@dataclass(frozen=True)
class Misspecification:
    """Whether each observation looks like the test simulations (see
    :mod:`pipeline.diagnostics.misspecification`): a data-space p-value (``typicality``, None
    where there are too few simulations for the summaries' covariance) and an estimator-space
    one (``surprise``), each per observation; ``pvalue`` combines them (Bonferroni: twice the
    smaller, at most 1), so that its false-positive rate stays at most the level."""

    typicality: list[float] | None
    surprise: list[float]
    pvalue: list[float]
    num_simulations: int
    num_draws: int

    def __post_init__(self) -> None:
        lengths = {len(self.surprise), len(self.pvalue)}
        if self.typicality is not None:
            lengths.add(len(self.typicality))
        if len(lengths) != 1:
            raise MetricsError("typicality, surprise and pvalue differ in length")

    def flagged(self, level: float) -> list[int]:
        """Observations not consistent with the simulations: the Benjamini-Hochberg procedure at
        ``level`` over the combined p-values, ascending indices.

        When every observation is like the simulations, none is flagged with probability at
        least ``1 - level`` (the p-values share one test set, a positive dependence the
        procedure tolerates); when many are not, each needs only a p-value below ``level``
        times their share, which the tests' resolution of ``1 / (N + 1)`` reaches where a
        per-observation correction (``level / n``) would not.
        """
        order = sorted(range(len(self.pvalue)), key=self.pvalue.__getitem__)
        passing = [
            k for k, i in enumerate(order, 1) if self.pvalue[i] <= level * k / len(self.pvalue)
        ]
        return sorted(order[: max(passing)]) if passing else []

    @property
    def num_tests(self) -> int:
        """The tests each p-value combines: both, or the estimator's alone where the data test
        had too few simulations (``typicality`` None)."""
        return 1 if self.typicality is None else 2

    def fewest_flaggable(self, level: float) -> int:
        """The fewest observations the procedure at ``level`` can flag together: the combined
        p-value is at least ``2 / (N + 1)`` (``N`` test simulations; the estimator test's
        two-sided p-value alone is, and so is twice the smaller of both), and
        Benjamini-Hochberg flags ``k`` of ``n`` observations only at p-values up to
        ``level k / n``. Above 1, an observation unlike the simulations cannot be flagged
        alone, and none flagged says little.
        """
        floor = 2 / (self.num_simulations + 1)
        return max(1, math.ceil(floor * len(self.pvalue) / level - 1e-9))

    def simulations_to_flag_one(self, level: float) -> int:
        """Test simulations with which one observation among these can be flagged alone."""
        return math.ceil(2 * len(self.pvalue) / level - 1)


@dataclass(frozen=True)
class WidthRatio:
    """A ratio of standard deviations: ``per_observation`` (n_obs, D), ``mean`` over the
    observations by parameter name."""

    per_observation: list[list[float]]
    mean: dict[str, float]


@dataclass(frozen=True)
class Widths:
    """Posterior standard deviations (n_obs, D) against the reference's, the Cramer-Rao
    bound's and the prior's, where each exists. ``over_prior`` near 1: the posterior is as wide
    as the prior, so the estimator learnt (almost) nothing of that parameter from ``x``."""

    posterior_std: list[list[float]]
    reference_std: list[list[float]] | None = None
    std_ratio: WidthRatio | None = None
    cramer_rao_std: list[list[float]] | None = None
    std_over_cramer_rao: WidthRatio | None = None
    reference_over_cramer_rao: WidthRatio | None = None
    over_prior: WidthRatio | None = None


@dataclass(frozen=True)
class ObservationsInfo:
    """How many observations were validated, whether they are real data (no truth), the other
    forward model that made them where they are mocks (``mock_of``), and the SHA-256 of their
    file (None in files written before it was kept)."""

    num: int
    real: bool
    mock_of: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Mcmc:
    """How an NLE posterior's MCMC fared (:mod:`pipeline.ensemble`): the worst split R-hat and
    bulk ESS, and the mean acceptance, over the test simulations kept, those left out because
    their chains did not converge, and each observation's R-hat and ESS."""

    test_rhat_max: float
    test_ess_min: float
    test_acceptance_mean: float
    num_unconverged_excluded: int
    observation_rhat: list[float]
    observation_ess: list[float]


@dataclass(frozen=True)
class Recovery:
    """How the posteriors recover the true parameters at the observations, per parameter name:
    ``bias``, the mean of (posterior mean - truth) / posterior std (0 when unbiased), and the
    fractions of truths inside the central 68 % and 95 % marginal intervals (0.68 and 0.95 when
    calibrated). Few observations make these noisy; mock experiments use many."""

    bias: dict[str, float]
    coverage_68: dict[str, float]
    coverage_95: dict[str, float]
    num_observations: int


# The quantiles :class:`Estimates` gives: the central 95 % and 68 % intervals and the median.
ESTIMATE_QUANTILES = (0.025, 0.16, 0.5, 0.84, 0.975)


@dataclass(frozen=True)
class Estimates:
    """What each observation's posterior says of each parameter, in the task's units: the
    quantiles :data:`ESTIMATE_QUANTILES` of its samples (the median and the central 68 % and
    95 % intervals).

    ``values[k][d]`` holds the five quantiles of parameter ``d`` at row ``k`` of the
    observation samples, which is observation ``observation_index[k]`` of the observations
    file; ``units[d]`` is an astropy unit string (``""``: dimensionless); ``truth[k][d]`` is
    the parameter that made a synthetic observation (None for real data).
    """

    observation_index: list[int]
    units: list[str]
    values: list[list[list[float]]]
    truth: list[list[float]] | None = None

    def __post_init__(self) -> None:
        rows = len(self.observation_index)
        if len(self.values) != rows or (self.truth is not None and len(self.truth) != rows):
            raise MetricsError("one row of values (and of truth) per observation")
        if any(len(v) != len(self.units) for v in self.values):
            raise MetricsError("one set of quantiles per parameter's unit")
        if any(len(q) != len(ESTIMATE_QUANTILES) for v in self.values for q in v):
            raise MetricsError(f"{len(ESTIMATE_QUANTILES)} quantiles per parameter")


@dataclass(frozen=True)
class ReferenceInfo:
    """How the reference posterior samples were drawn: the method, and one dict of
    convergence figures per observation (e.g. ``rhat_max``, ``ess_bulk_min``, ``seconds``)."""

    method: str
    diagnostics: list[dict[str, Any]]


@dataclass(frozen=True)
class ValidationMetrics:
    """Everything ``pipeline validate`` concludes about one task.

    ``skipped`` names each diagnostic that could not run (``c2st``, ``predictive``) with the
    reason; the matching field is then None. ``figures`` maps figure keys to PNG file names
    in the same folder.
    """

    task: str
    parameter_names: list[str]
    num_test: int
    num_posterior_samples: int
    num_nonfinite_excluded: int
    observations: ObservationsInfo
    skipped: dict[str, str]
    coverage: Coverage
    sbc: Sbc
    c2st: C2stScores | None
    widths: Widths | None
    predictive: PredictiveChecks | None
    local_c2st: LocalC2st
    misspecification: Misspecification | None
    recovery: Recovery | None
    reference: ReferenceInfo | None
    figures: dict[str, str]
    mcmc: Mcmc | None = None
    # The digest of the weights (posterior.pt) whose samples were validated.
    model_digest: str | None = None
    # Test simulations the sample stage could not sample (a round's region, NLE chains that did
    # not converge), beside the ``num_test`` the coverage curves are over.
    num_left_out: int = 0
    # The posterior at each observation (None in files written before it was recorded).
    estimates: Estimates | None = None

    def __post_init__(self) -> None:
        if set(self.sbc.pvalues) != set(self.parameter_names):
            raise MetricsError("sbc.pvalues keys differ from parameter_names")
        if self.estimates is not None and len(self.estimates.units) != len(self.parameter_names):
            raise MetricsError("estimates.units: one unit per parameter of parameter_names")

    def write(self, path: Path) -> None:
        """Writes the metrics as JSON, atomically."""
        atomic.write_json(Path(path), dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> ValidationMetrics:
        """Reads and checks ``path``; raises :class:`MetricsError` naming it and the field."""
        return read(cls, path)


@dataclass(frozen=True)
class BudgetScore:
    """C2ST at the observations of the model trained on the first ``budget`` simulations."""

    task: str
    budget: int
    c2st: C2stScores
    # The digest of the weights (posterior.pt) whose samples were scored.
    model_digest: str | None = None

    def write(self, path: Path) -> None:
        """Writes the score as JSON, atomically."""
        atomic.write_json(Path(path), dataclasses.asdict(self), indent=2)

    @classmethod
    def read(cls, path: Path) -> BudgetScore:
        """Reads and checks ``path``; raises :class:`MetricsError` naming it and the field."""
        return read(cls, path)


def read(kind: type[T], path: Path) -> T:
    """Parses ``path`` (JSON) as ``kind``, a dataclass of this module."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path} is not valid JSON ({error})") from error
    try:
        return from_json(kind, data)
    except MetricsError as error:
        raise MetricsError(f"{path}: {error}") from None


def from_json(kind: type[T], data: Any, field: str = "") -> T:
    """``data`` (parsed JSON) as ``kind``: a dataclass, ``X | None``, ``list[X]``,
    ``dict[str, X]``, ``int``, ``float``, ``str``, ``bool`` or ``Any``, checked recursively.

    Raises:
        MetricsError: A field is missing, unknown or of the wrong type (named by its path,
            e.g. ``coverage.tarp[3]``), or a dataclass's own check fails.
    """
    where = field or "the file"
    if kind is Any:
        return data
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is types.UnionType:
        if data is None and type(None) in args:
            return None  # type: ignore[return-value]
        (inner,) = [arg for arg in args if arg is not type(None)]
        return from_json(inner, data, field)
    if dataclasses.is_dataclass(kind):
        return _dataclass_from_json(kind, data, field)
    if origin is list:
        if not isinstance(data, list):
            raise MetricsError(f"field {where} should be a list")
        return [from_json(args[0], item, f"{field}[{i}]") for i, item in enumerate(data)]  # type: ignore[return-value]
    if origin is dict:
        if not isinstance(data, dict):
            raise MetricsError(f"field {where} should be an object")
        return {key: from_json(args[1], value, f"{field}.{key}") for key, value in data.items()}  # type: ignore[return-value]
    # JSON true/false load as bool, a subclass of int, yet are never a valid count or value.
    accepted = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}[kind]
    if not isinstance(data, accepted) or (isinstance(data, bool) and kind is not bool):
        raise MetricsError(f"field {where} should be of type {kind.__name__}")
    return kind(data)  # type: ignore[call-arg]


def _dataclass_from_json(kind: type[T], data: Any, field: str) -> T:
    if not isinstance(data, dict):
        raise MetricsError(f"field {field or 'the file'} should be an object")
    prefix = f"{field}." if field else ""
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MetricsError(
            f"unknown field {prefix + unknown[0]!r} (a file of another version of the pipeline?)"
        )
    values = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = from_json(hints[name], data[name], prefix + name)
        elif spec.default is dataclasses.MISSING:
            raise MetricsError(f"missing field {prefix + name!r}")
    try:
        return kind(**values)
    except MetricsError as error:
        raise MetricsError(f"{field}: {error}" if field else str(error)) from None
