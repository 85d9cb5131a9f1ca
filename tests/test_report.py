"""Tests of the HTML report on a fake experiment folder shaped like the stages' outputs."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from markupsafe import escape

from pipeline import diagnostics
from pipeline.metrics import Misspecification, ValidationMetrics, from_json
from pipeline.provenance import file_digest
from pipeline.report import ResultsError, Thresholds, build_report, write_report
from pipeline.report.build import Check, evaluate_checks, load_results, verdict
from pipeline.report.index import build_index, experiment_summary, write_summary
from pipeline.report.results import PNG_SIGNATURE, read_training_curve

XSS = "<script>alert(1)</script>"
THRESHOLDS = Thresholds(c2st_max=0.6, coverage_max_deviation=0.1)
CONFIG = {"experiment": "tiny", "tasks": ["two_moons", "sn_cosmology"], "note": XSS}

# metrics.csv as Lightning's CSVLogger writes it: val and train rows alternate, empty cells "".
METRICS_CSV = """epoch,step,train_loss,val_loss
0,9,,1.50
0,9,1.80,
1,19,,1.20
1,19,1.40,
2,29,,1.10
2,29,1.15,
"""

# (task, c2st max or None, tarp max deviation, hpd max deviation, expected summary cells); the
# predictive coverage deviation is PREDICTIVE unless a test says otherwise.
PREDICTIVE = 0.02
TASKS = {
    "two_moons": (0.55, 0.05, 0.08, ["PASS", "PASS", "PASS", "PASS", "PASS"]),
    "sn_cosmology": (
        None,
        0.2,
        0.03,
        ["n/a — no reference posterior", "FAIL", "PASS", "PASS", "FAIL"],
    ),
}


def posterior_json(task: str, digest: str = "abc123") -> dict[str, Any]:
    return {
        "task": task,
        "parameter_names": ["theta_0", "theta_1"],
        "flow": "NSF",
        "embedding": "MLP",
        "num_train": 900,
        "num_val": 100,
        "num_nonfinite_excluded": 0,
        "epochs": 3,
        "best_val_loss": 1.1,
        "train_seconds": 12.5,
        "seed": 7,
        "world_size": 1,
        "batch_size": 128,
        "ensemble": 1,
        "provenance": {
            "config_digest": digest,
            "code_revision": "deadbeef",
            "versions": {"python": "3.11.9", "torch": "2.13.0"},
            "hostname": "laptop",
            "created": "2025-01-01T00:00:00+00:00",
        },
    }


def validation_json(
    task: str, c2st: float | None, tarp: float, hpd: float, predictive: float = PREDICTIVE
) -> dict[str, Any]:
    figures = {
        "coverage": "coverage.png",
        "sbc": "sbc.png",
        "corner": "corner.png",
        "predictive": "predictive.png",
    }
    if c2st is not None:
        figures["c2st"] = "c2st.png"
    return {
        "task": task,
        "parameter_names": ["theta_0", "theta_1"],
        "num_test": 50,
        "num_posterior_samples": 1000,
        "num_nonfinite_excluded": 0,
        "observations": {"num": 2, "real": False, "mock_of": None},
        "skipped": {},
        "coverage": {
            "levels": [0.1, 0.5, 0.9],
            "tarp": [0.1, 0.5, 0.9],
            "hpd": [0.1, 0.5, 0.9],
            "tarp_max_deviation": tarp,
            "hpd_max_deviation": hpd,
            "predictive": [0.1, 0.5, 0.9],
            "predictive_max_deviation": predictive,
            "predictive_num_excluded": 0,
        },
        "predictive": {"pvalues": [0.4, 0.01], "num_draws": 100, "num_nonfinite_excluded": [0, 0]},
        "local_c2st": {
            "statistic": [0.001, 0.03],
            "pvalue": [0.6, 0.0099],
            "dispersion_correlation": [0.1, -0.9],
            "num_null": 100,
            "num_calibration": 50,
            "num_draws": 50,
        },
        "sbc": {"pvalues": {"theta_0": 0.4, "theta_1": 0.002}},
        "misspecification": {
            "typicality": [0.5, 0.2],
            "surprise": [0.3, 0.9],
            "pvalue": [0.6, 0.4],
            "num_simulations": 1000,
            "num_draws": 1000,
        },
        "recovery": {
            "bias": {"theta_0": 0.1, "theta_1": -0.2},
            "coverage_68": {"theta_0": 0.5, "theta_1": 1.0},
            "coverage_95": {"theta_0": 1.0, "theta_1": 1.0},
            "num_observations": 2,
        },
        "c2st": None
        if c2st is None
        else {"per_observation": [0.5, c2st], "mean": (0.5 + c2st) / 2, "max": c2st},
        "widths": None,
        "reference": None,
        "figures": figures,
    }


def write_task(
    root: Path, task: str, png: bytes, c2st: float | None, tarp: float, hpd: float
) -> None:
    model, validation = root / task / "model", root / task / "validation"
    model.mkdir(parents=True)
    validation.mkdir(parents=True)
    (model / "posterior.json").write_text(json.dumps(posterior_json(task)))
    (model / "metrics.csv").write_text(METRICS_CSV)
    (model / "posterior.pt").write_bytes(f"the weights of {task}".encode())
    metrics = validation_json(task, c2st, tarp, hpd)
    metrics["model_digest"] = file_digest(model / "posterior.pt")
    (validation / "metrics.json").write_text(json.dumps(metrics))
    for name in metrics["figures"].values():
        (validation / name).write_bytes(png)


def write_experiment(root: Path, png: bytes) -> Path:
    for task, (c2st, tarp, hpd, _) in TASKS.items():
        write_task(root, task, png, c2st, tarp, hpd)
    return root


@pytest.fixture
def experiment(tmp_path: Path, png: bytes) -> Path:
    return write_experiment(tmp_path / "results" / "tiny", png)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, png: bytes) -> str:
    """The page of the unmodified experiment, built once for the tests that only read it."""
    return build(write_experiment(tmp_path_factory.mktemp("results") / "tiny", png))


def build(
    experiment: Path,
    tasks: list[str] | None = None,
    config: dict | None = None,
    thresholds: Thresholds = THRESHOLDS,
) -> str:
    return build_report(
        experiment,
        list(TASKS) if tasks is None else tasks,
        config=CONFIG if config is None else config,
        thresholds=thresholds,
        title="Tiny experiment",
    )


class PageParser(HTMLParser):
    """Collects image sources and the text of each summary-table row."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.summary_rows: list[list[str]] = []
        self._in_summary = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        elif tag == "table" and attributes.get("id") == "summary-table":
            self._in_summary = True
        elif self._in_summary and tag == "tr":
            self.summary_rows.append([])
        elif self._in_summary and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_summary = False
        elif tag == "td" and self._cell is not None:
            self.summary_rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def test_page_is_self_contained(page: str) -> None:
    assert 'src="http' not in page
    assert "<link" not in page
    assert "<script" not in page
    assert "url(" not in page
    images = parse(page).images
    # Per task: training curve, corner, coverage, SBC, predictive; and C2ST where a reference is.
    assert len(images) == 5 + 6
    for src in images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_SIGNATURE)


def test_sections_in_order(page: str) -> None:
    marks = ["<h1>", 'id="summary"', 'id="task-two_moons"', 'id="task-sn_cosmology"']
    positions = [page.index(mark) for mark in [*marks, 'id="provenance"']]
    assert positions == sorted(positions)
    assert "tiny" in page and "abc123" in page and "deadbeef" in page and "laptop" in page


def test_summary_shows_pass_and_fail(page: str) -> None:
    rows = [row for row in parse(page).summary_rows if row]
    assert [row[0] for row in rows] == list(TASKS)
    for row, (_, _, _, expected) in zip(rows, TASKS.values(), strict=True):
        assert row[1] == "1000"  # num_train + num_val + excluded: the training budget
        statuses = [cell.split(" (")[0] for cell in [*row[2:6], row[7]]]
        assert statuses == expected
        assert row[6] == "all 2"  # both observations consistent with the simulations


@pytest.mark.parametrize(
    ("c2st", "tarp", "hpd", "predictive", "expected"),
    [
        (0.6, 0.1, 0.1, 0.1, ["PASS", "PASS", "PASS", "PASS"]),  # on the threshold passes
        (0.61, 0.1, 0.1, 0.0, ["FAIL", "PASS", "PASS", "PASS"]),
        (0.5, 0.11, 0.0, 0.0, ["PASS", "FAIL", "PASS", "PASS"]),
        (0.5, 0.0, 0.25, 0.0, ["PASS", "PASS", "FAIL", "PASS"]),
        (0.5, 0.0, 0.0, 0.3, ["PASS", "PASS", "PASS", "FAIL"]),
        (math.nan, 0.0, 0.0, 0.0, ["FAIL", "PASS", "PASS", "PASS"]),
        (None, 0.0, 0.0, 0.0, ["n/a — no reference posterior", "PASS", "PASS", "PASS"]),
    ],
)
def test_checks_against_thresholds(
    c2st: float | None, tarp: float, hpd: float, predictive: float, expected: list[str]
) -> None:
    validation = from_json(ValidationMetrics, validation_json("t", c2st, tarp, hpd, predictive))
    checks = evaluate_checks(validation, THRESHOLDS)
    assert [check.status for check in checks] == expected
    assert verdict(checks) == ("FAIL" if "FAIL" in expected else "PASS")


def test_failing_c2st_shows_in_summary(tmp_path: Path, png: bytes) -> None:
    write_task(tmp_path, "two_moons", png, 0.9, 0.0, 0.0)
    [row] = [row for row in parse(build(tmp_path, ["two_moons"])).summary_rows if row]
    assert row[2] == "FAIL (0.9)"
    assert row[7] == "FAIL"


def test_a_value_just_over_its_threshold_never_reads_as_the_threshold(
    tmp_path: Path, png: bytes
) -> None:
    # Four significant digits showed a C2ST of 0.60005 failing 0.6 as "FAIL (0.6)".
    write_task(tmp_path, "two_moons", png, 0.60005, 0.1000001, 0.0)
    [row] = [row for row in parse(build(tmp_path, ["two_moons"])).summary_rows if row]
    assert row[2] == "FAIL (0.60005)" and row[3] == "FAIL (0.1000001)"


def test_coverage_over_test_simulations_left_out_passes_only_with_them_against_it(
    tmp_path: Path, png: bytes
) -> None:
    """Two of 52 test simulations could not be sampled (NLE chains not converged): each moves
    a curve by at most 1/52, so HPD's 0.08 may be 0.08 + 2/52 = 0.118 > 0.1 and fails, where
    TARP's 0.05 + 0.038 and the predictive's 0.02 + 0.038 still pass."""
    experiment = tmp_path / "results" / "nle"
    write_task(experiment, "two_moons", png, 0.55, 0.05, 0.08)
    path = experiment / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps(metrics | {"num_left_out": 2}))
    page = build(experiment, ["two_moons"])
    [row] = [row for row in parse(page).summary_rows if row]
    assert row[3:6] == [
        "PASS (0.05 + 0.03846 left out)",
        "FAIL (0.08 + 0.03846 left out)",
        "PASS (0.02 + 0.03846 left out)",
    ]
    assert row[7] == "FAIL"
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "2 of 52 test simulations could not be sampled" in text
    summary = write_summary_of(experiment, tasks=["two_moons"])
    checks = summary["tasks"][0]["checks"]
    assert [c["status"] for c in checks[1:]] == ["PASS", "FAIL", "PASS"]
    assert checks[2]["left_out"] == pytest.approx(2 / 52)
    assert summary["verdict"] == "FAIL"
    index = build_index(tmp_path / "results")
    assert "HPD FAIL (0.08 + 0.03846 left out; limit 0.1)" in " ".join(
        re.sub(r"<[^>]+>", " ", index).split()
    )
    # A summary written before the share was recorded still lists (the index crashed on it),
    # and so does one whose threshold is not a number.
    for check in summary["tasks"][0]["checks"]:
        del check["left_out"]
    summary["tasks"][0]["checks"][0]["threshold"] = None
    (experiment / "summary.json").write_text(json.dumps(summary))
    assert "HPD FAIL (0.08; limit 0.1)" in " ".join(
        re.sub(r"<[^>]+>", " ", build_index(tmp_path / "results")).split()
    )
    # The predictive curve also leaves out pairs whose replicates the simulator failed.
    metrics["coverage"]["predictive_num_excluded"] = 3
    path.write_text(json.dumps(metrics | {"num_left_out": 2}))
    [row] = [row for row in parse(build(experiment, ["two_moons"])).summary_rows if row]
    assert row[5] == "FAIL (0.02 + 0.09615 left out)"  # 0.02 + (2 + 3) / 52 > 0.1
    metrics["coverage"]["predictive_num_excluded"] = 0
    # Metrics written before the count was recorded read as none left out.
    path.write_text(json.dumps(metrics))
    [row] = [row for row in parse(build(experiment, ["two_moons"])).summary_rows if row]
    assert row[4] == "PASS (0.08)"


@pytest.mark.parametrize(("c2st", "expected"), [(0.55, "FLAGGED"), (0.9, "FAIL")])
def test_an_observation_unlike_the_simulations_never_shows_a_bare_pass(
    tmp_path: Path, png: bytes, c2st: float, expected: str
) -> None:
    """Observation 1's combined p-value 0.001 passes Benjamini-Hochberg at 0.05 (0.001 <=
    0.05 / 2): it is flagged in the summary, the task's section and summary.json; a failing
    check still FAILs."""
    write_task(tmp_path, "two_moons", png, c2st, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["misspecification"] |= {"typicality": [0.5, 0.0005], "pvalue": [0.6, 0.001]}
    path.write_text(json.dumps(metrics))
    page = build(tmp_path, ["two_moons"])
    [row] = [row for row in parse(page).summary_rows if row]
    assert row[6] == "not: observation 1 (p = 0.001)"
    assert row[7] == expected
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "1 0.5 0.9 0.6 consistent with the simulations" not in text
    assert "1 0.0005 0.9 0.001 not consistent with the simulations" in text
    summary = write_summary_of(tmp_path, tasks=["two_moons"])
    assert summary["verdict"] == expected
    assert summary["tasks"][0]["flagged_observations"] == [1]
    # The index names the task's verdict and the observation, not only its checks' PASS.
    results = tmp_path / "results"
    shutil.copytree(tmp_path, results / "flagged", ignore=shutil.ignore_patterns("results"))
    index = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert f"two_moons {expected} (observation 1 not consistent with the simulations)" in index
    # At level 0.001 (0.001 > 0.001 / 2) nothing is flagged: the level is the report's option.
    # Nor can anything be: the smallest p-value of 1000 test simulations, 2 / 1001, is above
    # 0.001 k / 2 for k = 1, 2, and the page says so rather than "all 2" consistent.
    quiet = build(tmp_path, ["two_moons"], thresholds=Thresholds(0.6, 0.1, 0.001))
    cell = [row for row in parse(quiet).summary_rows if row][0][6]
    assert cell == "none flagged; 1000 test simulations cannot flag any of 2"
    quiet_text = " ".join(re.sub(r"<[^>]+>", " ", quiet).split())
    assert "Raise simulate.num_test_simulations to at least 3999" in quiet_text
    # The summary and the index say it too: their PASS does not speak for the observations.
    summary = experiment_summary(
        tmp_path,
        load_results(tmp_path, ["two_moons"]),
        config=CONFIG,
        thresholds=Thresholds(0.6, 0.1, 0.001),
        title="Tiny experiment",
    )
    assert summary["tasks"][0]["misspecification_power"]["simulations"] == 3999
    write_summary(summary, results / "flagged" / "summary.json")
    index = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert (
        "(misspecification none flagged; 1000 test simulations cannot flag any of 2: this "
        "verdict does not say the observations are like the simulations; 3999 test simulations "
        "would test each alone)" in index
    )
    # At 0.05, two observations need 2 / (N + 1) <= 0.025: N = 79 can flag one alone, 78 not.
    tests = Misspecification([0.5] * 2, [0.5, 0.5], [0.5, 0.5], num_simulations=78, num_draws=10)
    assert tests.fewest_flaggable(0.05) == 2 and tests.simulations_to_flag_one(0.05) == 79
    assert replace(tests, num_simulations=79).fewest_flaggable(0.05) == 1
    # Without the data test the p-value is the estimator's two-sided one alone, whose floor is
    # 2 / (N + 1) as well: the same power, which an observation as extreme as it gets shows.
    alone = replace(tests, typicality=None)
    assert alone.fewest_flaggable(0.05) == 2 and alone.simulations_to_flag_one(0.05) == 79
    # One observation as extreme as it gets, the other typical.
    extreme = diagnostics.surprise_pvalues(np.array([np.inf, 39.5]), np.arange(1.0, 79.0))
    assert replace(alone, surprise=extreme.tolist(), pvalue=extreme.tolist()).flagged(0.05) == []
    at_79 = diagnostics.surprise_pvalues(np.array([np.inf, 39.5]), np.arange(1.0, 80.0))
    flaggable = replace(alone, surprise=at_79.tolist(), pvalue=at_79.tolist(), num_simulations=79)
    assert flaggable.fewest_flaggable(0.05) == 1 and flaggable.flagged(0.05) == [0]
    metrics["misspecification"] |= {"typicality": None, "num_simulations": 30}
    path.write_text(json.dumps(metrics))
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert "The data test did not run" in text and "The combined p-value is twice" not in text
    assert "1 — 0.9 0.001 not consistent with the simulations" in text


def test_misspecification_not_tested_reads_as_such_not_as_a_pass(
    tmp_path: Path, png: bytes
) -> None:
    """A validation that skipped the tests (rounds: the test simulations come from a region
    chosen at the observation) shows "not tested" in the summary and the reason, no table."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["misspecification"] = None
    metrics["skipped"] = {"misspecification": "the region was chosen at the observation"}
    path.write_text(json.dumps(metrics))
    page = build(tmp_path, ["two_moons"])
    [row] = [row for row in parse(page).summary_rows if row]
    assert row[6:8] == ["not tested", "PASS"]
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "misspecification : the region was chosen at the observation" in text
    assert "Is each observation one the simulations explain?" not in text
    assert (
        write_summary_of(tmp_path, tasks=["two_moons"])["tasks"][0]["flagged_observations"] == []
    )


def test_user_text_is_escaped(tmp_path: Path, png: bytes) -> None:
    # The "/" in the name nests the folder; the report just joins the name to the path.
    write_task(tmp_path, XSS, png, 0.55, 0.0, 0.0)
    page = build(tmp_path, [XSS], config={"title": XSS, XSS: [XSS]})
    assert XSS not in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize(
    ("relative", "stage"),
    [
        ("two_moons", "pipeline train"),
        ("two_moons/model/posterior.json", "pipeline train"),
        ("two_moons/model/metrics.csv", "pipeline train"),
        ("two_moons/validation/metrics.json", "pipeline validate"),
        ("two_moons/validation/corner.png", "pipeline validate"),
        ("two_moons/validation/c2st.png", "pipeline validate"),
    ],
)
def test_missing_input_names_path_and_stage(experiment: Path, relative: str, stage: str) -> None:
    path = experiment / relative
    if path.is_dir():
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        build(experiment)
    assert str(path) in str(error.value)
    assert f"`{stage}` for task two_moons" in str(error.value)


def test_malformed_json_names_file(experiment: Path) -> None:
    path = experiment / "sn_cosmology" / "validation" / "metrics.json"
    path.write_text('{"task": "sn_cosmology", ')
    with pytest.raises(ResultsError, match="not valid JSON") as error:
        build(experiment)
    assert str(path) in str(error.value)


def test_missing_field_names_file_and_field(experiment: Path) -> None:
    path = experiment / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["coverage"]["hpd_max_deviation"]
    path.write_text(json.dumps(metrics))
    with pytest.raises(ResultsError, match="missing field 'coverage.hpd_max_deviation'") as error:
        build(experiment)
    assert str(path) in str(error.value)


def test_results_of_another_task_are_refused(experiment: Path) -> None:
    path = experiment / "two_moons" / "model" / "posterior.json"
    path.write_text(json.dumps(posterior_json("gaussian_linear")))
    with pytest.raises(ResultsError, match="gaussian_linear"):
        build(experiment)


def test_figure_outside_validation_folder_is_refused(experiment: Path) -> None:
    path = experiment / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["figures"]["corner"] = "../model/posterior.json"
    path.write_text(json.dumps(metrics))
    with pytest.raises(ResultsError, match="leaves"):
        build(experiment)


def test_training_curve_reads_lightning_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    curve = read_training_curve(path, "run `pipeline train`")
    assert curve.epoch_train == [0, 1, 2] and curve.train_loss == [1.8, 1.4, 1.15]
    assert curve.epoch_val == [0, 1, 2] and curve.val_loss == [1.5, 1.2, 1.1]


def test_training_curve_without_val_loss_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n0,9,1.8\n")
    with pytest.raises(ResultsError, match="val_loss"):
        read_training_curve(path, "run `pipeline train`")


def test_nonfinite_count_is_prominent(experiment: Path) -> None:
    path = experiment / "two_moons" / "model" / "posterior.json"
    posterior = json.loads(path.read_text())
    posterior["num_nonfinite_excluded"] = 17
    path.write_text(json.dumps(posterior))
    page = build(experiment)
    assert 'class="warning">⚠ 17 simulation(s) returned NaN or inf' in page


def test_code_revision_disagreement_is_noted(experiment: Path, page: str) -> None:
    assert "tasks disagree on code revision" not in page
    path = experiment / "sn_cosmology" / "model" / "posterior.json"
    document = posterior_json("sn_cosmology", digest="fff999")
    document["provenance"]["code_revision"] = "0ther"
    path.write_text(json.dumps(document))
    page = build(experiment)
    assert "tasks disagree on code revision" in page and "0ther" in page
    assert "Model digest (sn_cosmology)" in page and "fff999" in page


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="c2st_max"):
        Thresholds(c2st_max=math.nan, coverage_max_deviation=0.1)
    with pytest.raises(ValueError, match="coverage_max_deviation"):
        Thresholds(c2st_max=0.6, coverage_max_deviation=-0.1)


def test_check_of_missing_reference_is_not_applicable() -> None:
    check = Check("C2ST", None, 0.6)
    assert check.passed is None and verdict([check]) == "PASS"


def test_write_report_replaces_whole_file(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")
    write_report("<p>new</p>", out)
    assert out.read_text() == "<p>new</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_failed_write_keeps_old_report(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_report("<p>half</p>\udc80", out)  # a lone surrogate fails mid-write
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_failed_build_keeps_old_report(experiment: Path) -> None:
    out = experiment / "report.html"
    out.write_text("old")
    (experiment / "two_moons" / "validation" / "sbc.png").unlink()
    with pytest.raises(FileNotFoundError):
        write_report(build(experiment), out)
    assert out.read_text() == "old"


def write_summary_of(
    experiment: Path, title: str = "Tiny experiment", tasks: list[str] | None = None
) -> dict[str, Any]:
    summary = experiment_summary(
        experiment,
        load_results(experiment, list(TASKS) if tasks is None else tasks),
        config=CONFIG,
        thresholds=THRESHOLDS,
        title=title,
    )
    write_summary(summary, experiment / "summary.json")
    return summary


def test_summary_holds_every_verdict(experiment: Path) -> None:
    summary = write_summary_of(experiment)
    assert json.loads((experiment / "summary.json").read_text()) == summary
    by_task = {row["name"]: row for row in summary["tasks"]}
    assert sorted(by_task) == sorted(TASKS)
    for task, (c2st, tarp, hpd, cells) in TASKS.items():
        row = by_task[task]
        assert [check["status"] for check in row["checks"]] + [row["verdict"]] == cells
        assert [check["value"] for check in row["checks"]] == [c2st, tarp, hpd, PREDICTIVE]
    assert summary["verdict"] == "FAIL"  # sn_cosmology fails TARP


def test_index_lists_every_experiment_escaped_and_survives_a_corrupt_one(
    tmp_path: Path, png: bytes
) -> None:
    results = tmp_path / "results"
    first = write_experiment(results / "first", png)
    write_summary_of(first, title="<script>alert(1)</script>")
    (first / "report.html").write_text("<html></html>")
    second = write_experiment(results / "second", png)
    write_summary_of(second)
    (results / "broken").mkdir()
    (results / "broken" / "summary.json").write_text("{not json")
    html = build_index(results)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert html.count('<tr class="experiment">') == 3
    assert '<a href="first/report.html">first</a>' in html
    assert '<a href="second/report.html">' not in html  # no report page to link to
    assert "unreadable summary.json" in html
    assert "FAIL" in html and "PASS" in html


def test_the_index_marks_a_verdict_whose_results_changed_since_as_stale(
    tmp_path: Path, png: bytes
) -> None:
    """A later run that replaced or removed results and failed before its report left the old
    verdict listed as if it held: the index says which result changed. The summary records
    the files it rests on, so a failure elsewhere (a budget tried and dropped) leaves it."""
    results = tmp_path / "results"
    experiment = write_experiment(results / "tiny", png)
    observations = experiment / "two_moons" / "observations.h5"
    observations.write_text("an observation")
    summary = write_summary_of(experiment)
    assert "two_moons/observations.h5" in summary["results"]
    assert "STALE" not in build_index(results)
    (experiment / "logs").mkdir()
    (experiment / "logs" / "sample.log").write_text("a rerun's log is no result")
    (experiment / "two_moons" / "budget-300").mkdir()  # a failed job's leftovers elsewhere
    (experiment / "two_moons" / "budget-300" / "train.log").write_text("failed")
    # Shards and checkpoints are stood for by the merged file and the model: not recorded.
    (experiment / "two_moons" / "sims.h5.shards").mkdir()
    (experiment / "two_moons" / "sims.h5.shards" / "chunk.h5").write_text("a shard")
    assert "STALE" not in build_index(results)
    stamp = observations.stat()
    observations.write_text("another observation")
    text = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert "STALE (was FAIL)" in text
    assert "Results changed after this verdict (two_moons/observations.h5 changed)" in text
    observations.write_text("an observation")  # put back, time and all: the verdict holds
    os.utime(observations, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert "STALE" not in build_index(results)
    # A copy without the files' times (cp -r, a download) holds the same results.
    copy = tmp_path / "copied"
    shutil.copytree(results, copy, copy_function=shutil.copy)
    assert (copy / "tiny/two_moons/observations.h5").stat().st_mtime_ns != stamp.st_mtime_ns
    assert "STALE" not in build_index(copy)
    (experiment / "sn_cosmology" / "validation" / "metrics.json").unlink()
    text = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert "(sn_cosmology/validation/metrics.json removed)" in text
    # A summary written before the files were recorded: judged by files written after it.
    del summary["results"]
    write_summary(summary, experiment / "summary.json")
    assert "STALE" not in build_index(results)
    os.utime(experiment / "summary.json", (stamp.st_mtime - 100, stamp.st_mtime - 100))
    text = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert "STALE (was FAIL)" in text and re.search(r"\(two_moons/\S+ written\)", text)


@pytest.mark.parametrize(
    ("inside_68", "num", "flagged"), [(0.29, 100, True), (0.66, 100, False), (0.64, 1000, False)]
)
def test_mocks_whose_truths_the_posteriors_miss_flag_the_task(
    tmp_path: Path, png: bytes, inside_68: float, num: int, flagged: bool
) -> None:
    """Mocks of another forward model: truths inside the 68 % intervals 29 times in 100 are far
    below the 0.58-0.78 the coverage checks' tolerance allows (p 3e-8 with the Bonferroni
    factor of 4), flagged; 66 in 100, and 640 in 1000 (a small miscalibration the test set's
    checks allow too), are not. Synthetic observations of the task itself are not tested so
    (their calibration is the test set's checks)."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.05, 0.08)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["observations"]["mock_of"] = "two_moons_offset"
    recovery = {"theta_0": inside_68, "theta_1": 0.68}
    metrics["recovery"] |= {"coverage_68": recovery, "num_observations": num}
    metrics["recovery"]["coverage_95"] = {"theta_0": 0.95, "theta_1": 0.95}
    path.write_text(json.dumps(metrics))
    summary = write_summary_of(tmp_path, tasks=["two_moons"])
    assert summary["verdict"] == ("FLAGGED" if flagged else "PASS")
    assert summary["tasks"][0]["truths_missed"] is flagged
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert (
        "the posteriors of data from two_moons_offset are not to be trusted" in text
    ) is flagged
    metrics["observations"]["mock_of"] = None
    path.write_text(json.dumps(metrics))
    assert write_summary_of(tmp_path, tasks=["two_moons"])["verdict"] == "PASS"


def test_the_index_says_a_run_started_after_the_verdict_has_not_finished(
    tmp_path: Path, png: bytes
) -> None:
    """A run killed outright (a time limit, the OOM killer) runs no hook: the mark it set when
    it started stays, and the index says the verdict may be of older results."""
    from pipeline.report.index import RUN_MARKER, mark_run

    results = tmp_path / "results"
    experiment = write_experiment(results / "tiny", png)
    mark_run(experiment, True)  # a run whose report wrote the summary after it started
    write_summary_of(experiment)
    assert "UNFINISHED" not in build_index(results)
    stamp = (experiment / "summary.json").stat().st_mtime
    mark_run(experiment, True)  # a later run, killed
    os.utime(experiment / RUN_MARKER, (stamp + 10, stamp + 10))
    text = " ".join(re.sub(r"<[^>]+>", " ", build_index(results)).split())
    assert "RUN UNFINISHED (was FAIL)" in text
    assert "has not finished: it is still going, or was killed" in text
    mark_run(experiment, False)
    assert "UNFINISHED" not in build_index(results)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"verdict": 3}, "'verdict' missing or of the wrong type"),
        ({"tasks": [1]}, "tasks[0].'name' missing"),
        ({"tasks": [{"name": "t", "verdict": "PASS", "checks": [{"name": "c"}]}]}, "'status'"),
        ({"tasks": [{"name": "t", "verdict": "PASS", "checks": "x"}]}, "'checks' missing"),
    ],
)
def test_index_names_experiments_by_folder_and_lists_malformed_summaries(
    tmp_path: Path, png: bytes, change: dict, message: str
) -> None:
    results = tmp_path / "results"
    hostile = write_experiment(results / "hostile", png)
    write_summary_of(hostile)
    summary = json.loads((hostile / "summary.json").read_text())
    summary["experiment"] = "javascript:alert(1)//"
    (hostile / "summary.json").write_text(json.dumps(summary))
    (hostile / "report.html").write_text("<html></html>")
    malformed = write_experiment(results / "malformed", png)
    write_summary_of(malformed)
    summary = json.loads((malformed / "summary.json").read_text()) | change
    (malformed / "summary.json").write_text(json.dumps(summary))
    html = build_index(results)
    assert "javascript:" not in html
    assert '<a href="hostile/report.html">hostile</a>' in html
    assert html.count('<tr class="experiment">') == 2
    assert "unreadable summary.json" in html and str(escape(message)) in html


def test_stage_run_times_come_from_snakemake_benchmarks(experiment: Path, png: bytes) -> None:
    for stage, job, seconds in [
        ("train", "two_moons", 104.2),
        ("simulate", "two_moons-train", 1.5),
        ("rounds", "two_moons/round-10-train", 7.25),  # a round's jobs sit a folder deeper
        ("rounds", "two_moons/round-2-train", 3.75),
    ]:
        (experiment / "benchmarks" / stage / job).parent.mkdir(parents=True, exist_ok=True)
        (experiment / "benchmarks" / stage / f"{job}.tsv").write_text(
            f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t70.1\n"
        )
    (experiment / "benchmarks" / "train" / "broken.tsv").write_text("s\n")
    page = build(experiment)
    times = page[page.index('id="stage-times"') :]
    order = ["two_moons-train", "round-2-train", "round-10-train", "104.2 s (0:01:44)"]
    assert [times.index(text) for text in order] == sorted(times.index(t) for t in order)
    assert '<td>two_moons/round-2-train</td><td class="num">3.8 s (0:00:04)</td>' in times
    assert "broken" not in times
    assert "Hardware (training)" in page


def write_budget(task_dir: Path, n: int, values: list[Any], **changes: Any) -> None:
    """Writes budget-N/c2st.json and, but at the main model's 1000 simulations, the budget's
    model trained on N; ``changes`` replace the score's top-level fields."""
    numbers = all(isinstance(v, float) for v in values)
    mean, top = (sum(values) / len(values), max(values)) if numbers else (0.5, 0.5)
    folder = task_dir / f"budget-{n}"
    model = task_dir / "model"
    if n != 1000:
        model = folder / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "posterior.pt").write_bytes(f"the weights of budget {n}".encode())
        spec = posterior_json(task_dir.name) | {"num_train": n - n // 10, "num_val": n // 10}
        (model / "posterior.json").write_text(json.dumps(spec))
    data = {
        "task": task_dir.name,
        "budget": n,
        "c2st": {"per_observation": values, "mean": mean, "max": top},
        "model_digest": file_digest(model / "posterior.pt"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c2st.json").write_text(json.dumps({**data, **changes}))


def test_budget_study_section(experiment: Path) -> None:
    scores = {100: [0.9, 0.8], 1000: [0.62, 0.58], 10000: [0.53, 0.51]}
    for budget, values in scores.items():
        write_budget(experiment / "two_moons", budget, values)
    page = build_report(
        experiment,
        ["two_moons"],
        config=CONFIG,
        thresholds=THRESHOLDS,
        title="t",
        budgets=[10000, 100, 1000],
    )
    rows = [row for row in parse(page).summary_rows if row]
    assert rows[0][1] == "1000 (budget study: 100 · 1000 · 10000)"
    section = page[page.index("<h3>C2ST against budget</h3>") :]
    # Ascending budgets with their means (0.85, 0.6, 0.52), then the figure.
    positions = [section.index(text) for text in ("0.85", "0.6<", "0.52", "against the simul")]
    assert positions == sorted(positions)
    # training, corner, coverage, SBC, predictive, C2ST per observation, C2ST against budget.
    assert len(parse(page).images) == 7


def test_budget_study_without_budgets_has_no_section(page: str) -> None:
    assert "C2ST against budget" not in page


def test_budget_study_missing_or_wrong_file(experiment: Path) -> None:
    settings = {"config": CONFIG, "thresholds": THRESHOLDS, "title": "t"}
    with pytest.raises(FileNotFoundError, match=r"budget-500/c2st.json: run the budget study"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)
    write_budget(experiment / "two_moons", 500, [0.6, 0.7], budget=5000)
    with pytest.raises(ResultsError, match=r"task 'two_moons' at budget 5000, not .* at 500"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)
    write_budget(experiment / "two_moons", 500, [0.6, "x"])
    with pytest.raises(ResultsError, match=r"c2st.per_observation\[1\] should be of type float"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)
    # Samples of another model (an untrained one) scored as budget N.
    write_budget(experiment / "two_moons", 500, [0.6, 0.7], model_digest="0123abcd")
    with pytest.raises(ResultsError, match=r"other weights .* than .*budget-500/model/posterior"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)
    write_budget(experiment / "two_moons", 500, [0.6, 0.7])
    build_report(experiment, ["two_moons"], budgets=[500], **settings)
    # The main model's samples (1000 simulations) under the label of budget 500.
    main = file_digest(experiment / "two_moons" / "model" / "posterior.pt")
    write_budget(experiment / "two_moons", 500, [0.6, 0.7], model_digest=main)
    with pytest.raises(ResultsError, match=r"trained on 1000 simulations, as budget 500"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)
    # A budget that reuses the main model now, beside a model of its own left from before.
    write_budget(experiment / "two_moons", 1000, [0.6, 0.7])
    (experiment / "two_moons" / "budget-1000" / "model").mkdir()
    (experiment / "two_moons" / "budget-1000" / "model" / "posterior.pt").write_bytes(b"old")
    build_report(experiment, ["two_moons"], budgets=[1000], **settings)
    write_budget(experiment / "two_moons", 500, [0.6, 0.7], model_digest=None)
    with pytest.raises(ResultsError, match=r"does not record which model drew the samples"):
        build_report(experiment, ["two_moons"], budgets=[500], **settings)


def test_predictive_and_local_c2st_sections(page: str) -> None:
    predictive = page[page.index("<h3>Posterior predictive check</h3>") :]
    local = predictive[predictive.index("<h3>Local C2ST") :]
    predictive = predictive[: predictive.index("<h3>Local C2ST")]
    # The fixture's p-values 0.4 and 0.01: only the second is flagged.
    assert '<td class="num">0.4</td>' in predictive
    assert '<td class="num fail">0.01</td>' in predictive
    assert "Observations against their posterior predictive" in predictive
    # Local C2ST: observation 1 is rejected (p 0.0099) and read as over-confident (-0.9);
    # observation 0 (p 0.6) gets no reading.
    local = local[: local.index("</table>")]
    assert '<td class="num fail">0.0099</td>' in local
    assert "-0.9 (over-confident)" in local
    assert "0.1 (" not in local


def test_local_c2st_at_its_smallest_p_value_rejects(tmp_path: Path, png: bytes) -> None:
    """With 19 null fits (the least allowed) the smallest p-value is 1/20 = 0.05: a test at
    level 0.05 rejects there, so the page marks it and reads its direction."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["local_c2st"] |= {"pvalue": [0.05, 0.1], "num_null": 19}
    path.write_text(json.dumps(metrics))
    page = build(tmp_path, ["two_moons"])
    local = page[page.index("<h3>Local C2ST") :]
    local = local[: local.index("</table>")]
    assert '<td class="num fail">0.05</td>' in local and "0.1 (under-confident)" in local
    assert '<td class="num">0.1</td>' in local and "-0.9 (" not in local


def test_c2st_says_how_many_samples_its_classifiers_learnt_from(
    tmp_path: Path, png: bytes
) -> None:
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["c2st"]["samples"] = 300
    path.write_text(json.dumps(metrics))
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert "Each observation's classifier learns from 300 samples of each posterior" in text


def test_reference_convergence_is_shown(tmp_path: Path, png: bytes) -> None:
    write_task(tmp_path, "slcp", png, 0.55, 0.0, 0.0)
    path = tmp_path / "slcp" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["reference"] = {
        "method": "MCMC (emcee)",
        "diagnostics": [
            {"rhat_max": 1.002, "ess_bulk_min": 8100.0, "seconds": 4.0},
            {"rhat_max": 1.004, "ess_bulk_min": 7800.0, "seconds": 6.5},
        ],
    }
    path.write_text(json.dumps(metrics))
    page = build(tmp_path, ["slcp"])
    assert "Reference posterior: MCMC (emcee)" in page
    text = " ".join(page.split())
    assert "R-hat 1.004 (at most 1.01), bulk ESS 7800" in text
    assert "at most 6.5 s per observation" in text


@pytest.mark.parametrize(
    ("over_prior", "said"),
    [
        ({"theta_0": 0.98, "theta_1": 1.01}, "The posteriors are nearly the prior in every"),
        ({"theta_0": 0.3, "theta_1": 0.95}, "x says little about theta_1"),
        ({"theta_0": 0.3, "theta_1": 0.5}, None),
    ],
)
def test_posteriors_as_wide_as_the_prior_are_pointed_out(
    tmp_path: Path, png: bytes, over_prior: dict, said: str | None
) -> None:
    """A posterior that is the prior passes every calibration check (an archive whose x rows
    were shuffled against theta): the page says it learnt nothing from x."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    ratio = {"per_observation": [list(over_prior.values())], "mean": over_prior}
    metrics["widths"] = {"posterior_std": [[0.3, 0.2]], "over_prior": ratio}
    path.write_text(json.dumps(metrics))
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert "σ / σ prior" in text
    for phrase in ("The posteriors are nearly the prior in every", "x says little about"):
        assert (phrase in text) is (said is not None and said.startswith(phrase))


@pytest.mark.parametrize("fisher", [False, True])
def test_posterior_widths_table(tmp_path: Path, png: bytes, fisher: bool) -> None:
    """The widths table shows the std ratio, and the Cramer-Rao columns only where the task has
    a Fisher matrix; metrics without widths (no reference, no Fisher matrix) show no table."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    per_parameter = {"per_observation": [[1.2, 0.9]], "mean": {"theta_0": 1.234, "theta_1": 0.9}}
    metrics["widths"] = {"posterior_std": [[0.3, 0.2]], "std_ratio": per_parameter}
    if fisher:
        bound = {"per_observation": [[1.1, 0.8]], "mean": {"theta_0": 1.111, "theta_1": 0.876}}
        metrics["widths"] |= {"std_over_cramer_rao": bound, "reference_over_cramer_rao": bound}
    path.write_text(json.dumps(metrics))
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert "Posterior widths" in text
    # Three significant digits, one column per comparison the task supports.
    rows = (
        "theta_0 1.23 1.11 1.11 theta_1 0.9 0.876 0.876" if fisher else "theta_0 1.23 theta_1 0.9"
    )
    assert rows in text
    assert ("Cramér–Rao" in text) == fisher
    metrics["widths"] = None
    path.write_text(json.dumps(metrics))
    assert "Posterior widths" not in build(tmp_path, ["two_moons"])


def test_skipped_checks_and_real_observations_are_said_so(tmp_path: Path, png: bytes) -> None:
    """A task without simulator, at real observations: no predictive check, no C2ST, each with
    its reason in the checks, the summary and the page; the verdict rests on the rest."""
    write_task(tmp_path, "archive", png, None, 0.02, 0.03)
    path = tmp_path / "archive" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["coverage"] |= {"predictive": None, "predictive_max_deviation": None}
    metrics["predictive"] = None
    del metrics["figures"]["predictive"]
    metrics["observations"] = {"num": 2, "real": True}
    metrics["skipped"] = {
        "predictive": "the task has no simulator (imported simulations)",
        "c2st": "real observations have no reference posterior",
    }
    path.write_text(json.dumps(metrics))
    validation = from_json(ValidationMetrics, metrics)
    checks = {c.name: c.status for c in evaluate_checks(validation, THRESHOLDS)}
    assert checks == {
        "C2ST": "n/a — real observations have no reference posterior",
        "TARP": "PASS",
        "HPD": "PASS",
        "Predictive": "n/a — no simulator",
    }
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["archive"])).split())
    assert "Real observations (2)" in text
    assert "Checks skipped: predictive : the task has no simulator (imported simulations)" in text
    assert "Posterior predictive check n/a — the task has no simulator" in text


def test_each_observations_posterior_is_tabulated_with_units_truth_or_none(
    tmp_path: Path, png: bytes
) -> None:
    """The estimates a researcher cites: median and intervals per observation and parameter,
    in the task's units; the truth column only where the observations have one; files written
    before the estimates were recorded build a page without the table."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.02, 0.03)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    values = [[[0.1, 0.2, 0.3, 0.4, 0.5], [60.0, 65.5, 67.25, 69.0, 74.0]]] * 2
    estimates = {"observation_index": [0, 1], "units": ["", "km / (Mpc s)"], "values": values}
    path.write_text(json.dumps(metrics | {"estimates": estimates | {"truth": [[0.3, 68.0]] * 2}}))
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert "Posterior at the observations" in text
    header = "Observation Parameter Median 68 % interval 95 % interval Truth"
    assert header in text
    assert "1 theta_1 [km / (Mpc s)] 67.25 65.5 to 69 60 to 74 68" in text
    assert "0 theta_0 0.3 0.2 to 0.4 0.1 to 0.5 0.3" in text
    # The corner plot is of one observation: which one, and where the others are.
    assert "Posterior samples at observation 0 of 2; the table above and estimates.csv" in text
    path.write_text(json.dumps(metrics | {"estimates": estimates}))  # real observations
    text = " ".join(re.sub(r"<[^>]+>", " ", build(tmp_path, ["two_moons"])).split())
    assert header.removesuffix(" Truth") + " 0 theta_0" in text
    wrong = estimates | {"units": [""]}
    path.write_text(json.dumps(metrics | {"estimates": wrong}))
    with pytest.raises(ResultsError, match="estimates: one set of quantiles per parameter's unit"):
        build(tmp_path, ["two_moons"])
    path.write_text(json.dumps(metrics | {"estimates": wrong | {"values": [values[0][:1]] * 2}}))
    with pytest.raises(ResultsError, match="estimates.units: one unit per parameter"):
        build(tmp_path, ["two_moons"])
    path.write_text(json.dumps(metrics))
    assert "Posterior at the observations" not in build(tmp_path, ["two_moons"])


def test_a_users_task_is_checked_against_its_spec(tmp_path: Path, png: bytes) -> None:
    write_task(tmp_path, "mine", png, None, 0.02, 0.03)
    for name in ("model/posterior.json", "validation/metrics.json"):
        path = tmp_path / "mine" / name
        path.write_text(path.read_text().replace('"task": "mine"', '"task": "my/file.py:Mine"'))
    with pytest.raises(ResultsError, match=r"holds results of task 'my/file.py:Mine', not 'mine'"):
        load_results(tmp_path, ["mine"])
    (result,) = load_results(tmp_path, ["mine"], specs=["my/file.py:Mine"])
    assert result.name == "mine"


def test_a_model_description_of_other_weights_is_refused(tmp_path: Path, png: bytes) -> None:
    """posterior.json copied from another model beside the validated posterior.pt: the page
    would show that model's data and training beside these weights' diagnostics."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    weights = tmp_path / "two_moons" / "model" / "posterior.pt"
    spec = tmp_path / "two_moons" / "model" / "posterior.json"
    weights.write_bytes(b"the weights validated")
    metrics = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics.write_text(
        json.dumps(json.loads(metrics.read_text()) | {"model_digest": file_digest(weights)})
    )
    spec.write_text(
        json.dumps(json.loads(spec.read_text()) | {"weights_digest": file_digest(weights)})
    )
    load_results(tmp_path, ["two_moons"])
    spec.write_text(json.dumps(json.loads(spec.read_text()) | {"weights_digest": "0" * 64}))
    with pytest.raises(ResultsError, match=r"posterior.json was saved with other weights"):
        load_results(tmp_path, ["two_moons"])


def test_a_validation_at_observations_replaced_since_is_refused(
    tmp_path: Path, png: bytes
) -> None:
    """observations.h5 replaced by hand after validate, then the report by hand: the page would
    show estimates and truths of observations no longer there."""
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    observations = tmp_path / "two_moons" / "observations.h5"
    observations.write_bytes(b"the observations validated")
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["observations"]["digest"] = file_digest(observations)
    path.write_text(json.dumps(metrics))
    load_results(tmp_path, ["two_moons"])
    observations.write_bytes(b"observations drawn again with another seed")
    with pytest.raises(ResultsError, match=r"was made at other observations .* validate this"):
        load_results(tmp_path, ["two_moons"])
    # A rounds task is validated at the observation its rounds aim at.
    (tmp_path / "two_moons" / "rounds").mkdir()
    (tmp_path / "two_moons" / "rounds" / "observation.h5").write_bytes(
        b"the observations validated"
    )
    load_results(tmp_path, ["two_moons"])


def test_a_validation_of_other_weights_than_the_models_is_refused(
    tmp_path: Path, png: bytes
) -> None:
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    weights = tmp_path / "two_moons" / "model" / "posterior.pt"
    weights.write_bytes(b"the weights validated")
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "model_digest": file_digest(weights)}))
    (result,) = load_results(tmp_path, ["two_moons"])
    weights.write_bytes(b"weights retrained after validation")
    with pytest.raises(ResultsError, match=r"validates other weights .* rerun sample and valid"):
        load_results(tmp_path, ["two_moons"])
    # A validation that does not say which weights it validated could be any model's.
    path.write_text(json.dumps({k: v for k, v in metrics.items() if k != "model_digest"}))
    with pytest.raises(ResultsError, match=r"does not record which weights it validates"):
        load_results(tmp_path, ["two_moons"])


def test_a_posterior_trained_with_the_calibration_penalty_says_so(
    tmp_path: Path, png: bytes, page: str
) -> None:
    assert "penalty on over-confidence" not in page
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "model" / "posterior.json"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "train_config": {"calibration": 3.0}}))
    html = build(tmp_path, ["two_moons"])
    assert "trained with a penalty on over-confidence (calibration 3.0)" in html
    assert "(with the penalty)" in html


def test_many_flagged_observations_are_counted_not_listed(tmp_path: Path, png: bytes) -> None:
    write_task(tmp_path, "two_moons", png, 0.55, 0.0, 0.0)
    path = tmp_path / "two_moons" / "validation" / "metrics.json"
    metrics = json.loads(path.read_text())
    pvalues = [0.002] * 8 + [0.9, 0.8]
    metrics["misspecification"] |= {"typicality": pvalues, "surprise": pvalues, "pvalue": pvalues}
    path.write_text(json.dumps(metrics))
    [row] = [row for row in parse(build(tmp_path, ["two_moons"])).summary_rows if row]
    assert row[6] == "not: 8 of 10 (observations 0, 1, 2, 3, 4, …)"


def test_a_report_that_fails_leaves_no_verdict_of_earlier_results(experiment: Path) -> None:
    """The index reads every experiment's summary.json: a report rerun on results that no
    longer hold together (a model replaced, its validation not rerun) must not leave the old
    PASS for it to show."""
    from pipeline.options import ReportOptions
    from pipeline.report.stage import report_experiment

    page, summary = experiment / "report.html", experiment / "summary.json"
    report_experiment(
        experiment, list(TASKS), ReportOptions(), page, config=CONFIG, summary=summary
    )
    assert json.loads(summary.read_text())["tasks"] and page.exists()
    (experiment / "two_moons" / "model" / "posterior.pt").write_bytes(b"retrained")
    with pytest.raises(ResultsError, match="validates other weights"):
        report_experiment(
            experiment,
            list(TASKS),
            ReportOptions(),
            page,
            config=CONFIG,
            summary=summary,
            overwrite=True,
        )
    assert not summary.exists() and not page.exists()


def test_a_report_replaces_its_page_and_summary_only_with_overwrite(experiment: Path) -> None:
    from pipeline.options import ReportOptions
    from pipeline.report.stage import report_experiment

    page, summary = experiment / "report.html", experiment / "summary.json"
    report_experiment(
        experiment, list(TASKS), ReportOptions(), page, config=CONFIG, summary=summary
    )
    before = page.read_bytes(), summary.read_bytes()
    for out, verdicts in ((page, summary), (page, None), (experiment / "other.html", summary)):
        with pytest.raises(FileExistsError, match=r"exists; pass --overwrite to replace it"):
            report_experiment(
                experiment, list(TASKS), ReportOptions(), out, config=CONFIG, summary=verdicts
            )
        assert (page.read_bytes(), summary.read_bytes()) == before
    options = ReportOptions(title="Rerun")
    report_experiment(
        experiment, list(TASKS), options, page, config=CONFIG, summary=summary, overwrite=True
    )
    assert b"Rerun" in page.read_bytes() and summary.exists()


def test_a_report_never_removes_a_file_that_is_not_a_report(experiment: Path) -> None:
    """A mistyped --summary naming an observations file: the report removed it before any check
    (to leave no stale verdict). Only a page or a summary is replaced; anything else is kept."""
    from pipeline.options import ReportOptions
    from pipeline.report.stage import report_experiment

    precious = experiment / "observations.h5"
    precious.write_bytes(b"\x89HDF\r\n\x1a\n the user's observations")
    for page, summary in (
        (experiment / "report.html", precious),
        (precious, experiment / "summary.json"),
    ):
        with pytest.raises(ValueError, match=r"observations.h5 is not a (summary|report page)"):
            report_experiment(
                experiment, ["two_moonz"], ReportOptions(), page, config=CONFIG, summary=summary
            )
        assert precious.read_bytes().startswith(b"\x89HDF")


def test_the_index_refuses_a_results_path_that_is_no_folder_and_keeps_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from pipeline.cli import main

    precious = tmp_path / "observations.h5"
    precious.write_bytes(b"\x89HDF observations")
    assert main(["index", "--results", str(tmp_path / "nowhere"), "--out", "i.html"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["index", "--results", str(tmp_path), "--out", str(precious)]) == 2
    assert "observations.h5 is not a results index page" in capsys.readouterr().err
    assert precious.read_bytes().startswith(b"\x89HDF")
    index = tmp_path / "i.html"
    assert main(["index", "--results", str(tmp_path), "--out", str(index)]) == 0
    written = index.read_bytes()
    assert main(["index", "--results", str(tmp_path), "--out", str(index)]) == 2
    assert "i.html exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert index.read_bytes() == written
    assert main(["index", "--results", str(tmp_path), "--out", str(index), "--overwrite"]) == 0
