"""The typed result files: what validate writes reads back equal, and anything else is refused
with the field named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.metrics import (
    BudgetScore,
    C2stScores,
    Coverage,
    LocalC2st,
    MetricsError,
    Misspecification,
    ObservationsInfo,
    PredictiveChecks,
    Recovery,
    ReferenceInfo,
    Sbc,
    ValidationMetrics,
    WidthRatio,
    Widths,
    from_json,
)


def metrics() -> ValidationMetrics:
    levels = [0.1, 0.5, 0.9]
    return ValidationMetrics(
        task="two_moons",
        parameter_names=["a", "b"],
        num_test=10,
        num_posterior_samples=100,
        num_nonfinite_excluded=1,
        observations=ObservationsInfo(num=2, real=False),
        skipped={},
        coverage=Coverage(levels, levels, levels, 0.0, 0.01, levels, 0.02, 0),
        sbc=Sbc({"a": 0.3, "b": 0.7}),
        c2st=C2stScores.of(np.array([0.51, 0.55]), 1000),
        widths=Widths(
            posterior_std=[[1.0, 2.0]],
            std_ratio=WidthRatio([[0.9, 1.1]], {"a": 0.9, "b": 1.1}),
        ),
        predictive=PredictiveChecks([0.4, 0.9], 100, [0, 3]),
        local_c2st=LocalC2st([0.01, 0.02], [0.5, 0.6], [0.1, -0.2], 100, 10, 10),
        misspecification=Misspecification([0.5, 0.01], [0.2, 0.3], [0.4, 0.02], 10, 100),
        recovery=Recovery({"a": 0.1, "b": -2.0}, {"a": 0.7, "b": 0.1}, {"a": 1, "b": 0.3}, 2),
        reference=ReferenceInfo("rejection", [{"seconds": 1.5}, {"seconds": 2}]),
        figures={"coverage": "coverage.png"},
    )


def test_round_trip(tmp_path: Path) -> None:
    written = metrics()
    written.write(tmp_path / "metrics.json")
    assert ValidationMetrics.read(tmp_path / "metrics.json") == written
    score = BudgetScore("two_moons", 1000, C2stScores.of(np.array([0.6, 0.7]), 1000))
    score.write(tmp_path / "c2st.json")
    assert BudgetScore.read(tmp_path / "c2st.json") == score
    assert score.c2st.mean == pytest.approx(0.65) and score.c2st.max == 0.7


def as_json() -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(metrics())))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["coverage"].pop("hpd"), "missing field 'coverage.hpd'"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d.update(num_test=True), "field num_test should be of type int"),
        (lambda d: d.update(num_test=1.5), "field num_test should be of type int"),
        (lambda d: d["coverage"]["tarp"].__setitem__(1, "x"), r"coverage.tarp\[1\] should be"),
        (lambda d: d.update(c2st=[0.5]), "field c2st should be an object"),
        (lambda d: d["sbc"]["pvalues"].pop("b"), "sbc.pvalues keys differ"),
        (
            lambda d: d["coverage"]["hpd"].pop(),
            "coverage: levels, tarp, hpd and predictive differ",
        ),
        (
            lambda d: d["local_c2st"]["pvalue"].pop(),
            "local_c2st: statistic, pvalue and dispersion_correlation differ",
        ),
        (lambda d: d["widths"]["std_ratio"].update(mean=3), "widths.std_ratio.mean should be"),
        (lambda d: d["misspecification"]["surprise"].pop(), "misspecification: typicality, s"),
    ],
)
def test_malformed_files_are_refused_naming_the_field(change: Any, message: str) -> None:
    data = as_json()
    change(data)
    with pytest.raises(MetricsError, match=message):
        from_json(ValidationMetrics, data)


def test_optional_parts_may_be_null_and_not_json_is_named(tmp_path: Path) -> None:
    data = as_json() | {"c2st": None, "widths": None, "predictive": None, "reference": None}
    assert from_json(ValidationMetrics, data).c2st is None
    path = tmp_path / "metrics.json"
    path.write_text('{"task": ')
    with pytest.raises(MetricsError, match=f"{path} is not valid JSON"):
        ValidationMetrics.read(path)


def test_flagged_observations_follow_benjamini_hochberg() -> None:
    tests = Misspecification(None, [0.5, 0.01, 0.03], [0.5, 0.01, 0.03], 100, 10)
    # Sorted 0.01 <= 0.05 / 3 and 0.03 <= 0.05 * 2 / 3, 0.5 > 0.05: the first two.
    assert tests.flagged(0.05) == [1, 2]
    # At 0.02: 0.01 > 0.02 / 3 and 0.03 > 0.02 * 2 / 3: none.
    assert tests.flagged(0.02) == []
    # Ninety of a hundred at the rank tests' floor of 2 / 1001 are all flagged, where a
    # per-observation correction (0.05 / 100) could flag none.
    pvalues = [2 / 1001] * 90 + [0.5] * 10
    many = Misspecification(None, pvalues, pvalues, 1000, 10)
    assert many.flagged(0.05) == list(range(90))
