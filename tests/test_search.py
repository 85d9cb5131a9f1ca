"""Hyperparameter search (pipeline.search): the space's checks, reproducible proposals, the choice
that guards calibration, and the trials' lineage, by hand and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import cli, simulation
from pipeline.options import OptionsError, SearchOptions
from pipeline.parallel import SerialComm
from pipeline.provenance import config_digest
from pipeline.search.records import SearchError, TrialRecord, history_of, read_trial
from pipeline.search.select import check_base, choose, read_choice, read_trials
from pipeline.search.space import SearchSpace
from pipeline.search.trial import propose, search_identity
from pipeline.tasks import get_task
from pipeline.training import TrainConfig

SPACE = {
    "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "transforms": {"low": 1, "high": 4},
    "flow_hidden": {"choices": [[16], [32, 32]]},
    "flow": {"choices": ["nsf", "maf"]},
}


def record(trial: int, loss: float | None, deviation: float | None = 0.05, se: float = 0.01):
    """A finished trial as the selection reads it (``loss`` None: it failed)."""
    params = {"learning_rate": 1e-3, "transforms": 2, "flow_hidden": "[16]", "flow": "nsf"}
    return TrialRecord(
        trial=trial,
        params=params,
        options=params,
        loss=loss,
        loss_se=None if loss is None else se,
        coverage_max_deviation=None if loss is None else deviation,
        held_out_digest=None if loss is None else "rows",
        path=Path(f"trial-{trial}/score.json"),
        document={},
    )


def test_a_space_round_trips_and_decodes_lists():
    space = SearchSpace.from_dict(SPACE)
    assert SearchSpace.from_dict(space.as_dict()) == space
    assert space.names == ("learning_rate", "transforms", "flow_hidden", "flow")
    params = {"learning_rate": 1e-3, "transforms": 3, "flow_hidden": "[32, 32]", "flow": "maf"}
    assert space.options(params) == {
        "learning_rate": 1e-3,
        "transforms": 3,
        "flow_hidden": [32, 32],
        "flow": "maf",
    }
    assert space.dimensions[0].describe() == "0.0001 to 0.01 (log scale)"
    assert space.dimensions[2].describe() == "[16], [32, 32]"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "expected a mapping of training options to ranges"),
        ({"learning_rat": {"low": 1, "high": 2}}, "not a training option (did you mean"),
        ({"seed": {"low": 0, "high": 9}}, "seed cannot be searched: every trial starts"),
        ({"val_fraction": {"low": 0.1, "high": 0.2}}, "scored on the same held-out"),
        ({"ensemble": {"choices": [1, 4]}}, "the loss favours the largest ensemble"),
        ({"learning_rate": 0.01}, "expected {low: ..., high: ...} or {choices: [...]}"),
        ({"learning_rate": {"low": 1e-3}}, "give either choices, or low and high"),
        ({"learning_rate": {"low": 1e-3, "high": 1e-2, "step": 1}}, "got keys"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-3}}, "low must be below high"),
        ({"learning_rate": {"low": -1.0, "high": 1e-3}}, "learning_rate must be above 0"),
        ({"weight_decay": {"low": 0.0, "high": 0.1, "log": True}}, "a log scale needs low"),
        ({"transforms": {"low": 1.5, "high": 4}}, "transforms must be an integer"),
        ({"flow": {"low": 1, "high": 2}}, "flow is not a number; give it as choices"),
        ({"flow": {"choices": []}}, "expected a non-empty list"),
        ({"flow": {"choices": ["nsf", "nsf"]}}, "a value is listed twice"),
        ({"flow": {"choices": ["nsf", "glow"]}}, "flow must be one of"),
        ({"flow_hidden": {"choices": [[16], [0]]}}, "every item of flow_hidden must be at least"),
    ],
)
def test_a_bad_space_is_refused_naming_the_option(space, message):
    with pytest.raises(OptionsError, match="search.space") as error:
        SearchSpace.from_dict(space, "search.space")
    assert message in str(error.value)


def test_proposals_depend_on_seed_trial_and_history_only():
    space = SearchSpace.from_dict(SPACE)
    history = [record(i, loss=1.0 - 0.1 * i) for i in range(4)]
    first = propose(space, history, seed=0, trial=4, startup=2)
    assert propose(space, history, seed=0, trial=4, startup=2) == first
    # Another trial, seed or history gives another proposal.
    assert propose(space, history, seed=0, trial=5, startup=2) != first
    assert propose(space, history, seed=1, trial=4, startup=2) != first
    assert propose(space, history[:2], seed=0, trial=4, startup=2) != first


@pytest.mark.parametrize(
    ("space", "base", "message"),
    [
        (
            {"method": {"choices": ["npe", "fmpe"]}, "transforms": {"low": 2, "high": 5}},
            {},
            "transforms cannot be searched where method may be fmpe",
        ),
        ({"flow": {"choices": ["nsf", "maf"]}}, {"method": "fmpe"}, "flow cannot be searched"),
        (
            {"method": {"choices": ["npe", "fmpe"]}, "time_features": {"low": 4, "high": 32}},
            {},
            "time_features cannot be searched where method may be npe",
        ),
        ({"time_features": {"low": 4, "high": 32}}, {}, "where method may be npe, which has none"),
        (
            {"method": {"choices": ["npe", "fmpe"]}},
            {"flow": "maf"},
            "search.space.method: method fmpe has no flow",
        ),
        ({"method": {"choices": ["npe", "nle"]}}, {}, "method nle cannot be searched"),
        ({"learning_rate": {"low": 1e-4, "high": 1e-2}}, {"method": "nle"}, "nle cannot be"),
        # Each value is valid alone; together a trial would propose what training refuses.
        (
            {"flow": {"choices": ["nsf", "mdn"]}, "transforms": {"low": 1, "high": 4}},
            {},
            r'could propose \{"flow": "mdn", "transforms": 1\}, which is refused \(.*flow mdn',
        ),
        (
            {
                "embedding": {"choices": ["mlp", "cnn"]},
                "embedding_hidden": {"choices": [[16], []]},
            },
            {},
            r'"embedding": "cnn", "embedding_hidden": \[\]\}, which is refused',
        ),
    ],
)
def test_a_space_is_checked_against_the_tasks_own_options(space, base, message):
    """Values valid on their own, but not with the task's other options: refused before any
    trial, not inside one."""
    with pytest.raises(OptionsError, match=message):
        SearchSpace.from_dict(space).check_against(TrainConfig.from_dict(base))


def test_a_trial_is_proposed_from_exactly_the_earlier_generations():
    records = [record(i, 1.0) for i in range(4)]
    assert [r.trial for r in history_of(records[::-1], trial=4, parallel=2)] == [0, 1, 2, 3]
    assert history_of([], trial=1, parallel=2) == []
    with pytest.raises(SearchError, match=r"missing \[3\]"):
        history_of(records[:3], trial=4, parallel=2)
    with pytest.raises(SearchError, match=r"not allowed \[2, 3\]"):
        history_of(records, trial=2, parallel=2)


def test_the_lowest_loss_wins_unless_a_near_equal_trial_is_better_calibrated():
    # Trial 1 has the lowest loss; trial 2 lies within one standard error and is better
    # calibrated; trial 3 is best calibrated but clearly worse.
    records = [record(0, 1.0), record(1, 0.50, 0.20), record(2, 0.505, 0.04), record(3, 0.7, 0.0)]
    choice = choose(records, tolerance=1.0)
    assert (choice.trial, choice.near) == (2, (1, 2))
    assert "best calibrated" in choice.reason and "lowest held-out loss (trial 1)" in choice.reason
    assert choose(records, tolerance=0.0).trial == 1
    assert choose(records, tolerance=100.0).trial == 3


def test_failed_trials_are_skipped_and_all_failed_is_an_error():
    records = [record(0, None), record(1, 2.0), record(2, float("inf"))]
    assert choose(records, tolerance=1.0).trial == 1
    with pytest.raises(SearchError, match="all 2 trials failed"):
        choose([record(0, None), record(1, float("inf"))], tolerance=1.0)


# ---- Through the CLI: trials, choice and training on real (tiny) data ----------------------

TINY = {
    "max_epochs": 4,
    "patience": 4,
    "embedding_hidden": [16],
    "embedding_dim": 8,
    "ensemble": 1,
}
CLI_SPACE = {
    "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True},
    "transforms": {"low": 1, "high": 2},
}
OPTIONS = {"trials": 3, "parallel": 2, "startup": 2, "held_out": 60, "coverage_samples": 20}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 600, 1, 300)
    simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    return out


def trial_argv(data: Path, out: Path, trial: int, history: list[Path], **changes) -> list[str]:
    options = {**OPTIONS, **changes.pop("options", {})}
    space = changes.pop("space", CLI_SPACE)
    return [
        *("search-trial", "--data", str(data), "--out", str(out), "--trial", str(trial)),
        *("--train-options", json.dumps(TINY), "--space", json.dumps(space)),
        *("--options", json.dumps(options), "--history", *map(str, history)),
    ]


@pytest.fixture(scope="module")
def search(data, tmp_path_factory):
    """Three trials (generations of two), their choice, and the model trained with it."""
    root = tmp_path_factory.mktemp("search")
    scores = []
    for trial in range(3):
        out = root / f"trial-{trial}"
        history = scores[: trial // 2 * 2]
        assert cli.main(trial_argv(data, out, trial, history)) == 0
        scores.append(out / "score.json")
    best = root / "best.json"
    argv = ["search-select", "--scores", *map(str, scores), "--options", json.dumps(OPTIONS)]
    assert cli.main([*argv, "--out", str(best)]) == 0
    model = root / "model"
    argv = ["train", "--data", str(data), "--out", str(model), "--options", json.dumps(TINY)]
    assert cli.main([*argv, "--chosen", str(best)]) == 0
    return {"root": root, "scores": scores, "best": best, "model": model}


def without_provenance(path: Path) -> dict:
    document = json.loads(path.read_text())
    document.pop("provenance")
    return document


def test_a_trial_run_again_gives_the_same_options_and_score(search, data, tmp_path):
    again = tmp_path / "again"
    history = search["scores"][:2]
    assert cli.main(trial_argv(data, again, 2, history)) == 0
    first = without_provenance(search["scores"][2])
    second = without_provenance(again / "score.json")
    first["training"].pop("train_seconds"), second["training"].pop("train_seconds")
    assert first == second
    assert first["history"] == [0, 1] and first["status"] == "complete"


def test_the_model_trained_with_the_choice_is_the_chosen_trials(search):
    choice = read_choice(search["best"])
    assert choice.chosen in (0, 1, 2) and len(choice.trials) == 3
    trial = search["root"] / f"trial-{choice.chosen}" / "model" / "posterior.pt"
    chosen = torch.load(trial, weights_only=True)
    final = torch.load(search["model"] / "posterior.pt", weights_only=True)
    assert all(torch.equal(chosen[k], final[k]) for k in chosen)  # same options, seed and data
    recorded = json.loads((search["model"] / "posterior.json").read_text())["search"]
    assert recorded["chosen"] == choice.chosen and recorded["options"] == choice.options


def test_trials_train_members_and_the_chosen_options_train_the_tasks_ensemble(data, tmp_path):
    """Trials train search.members flows (1) whatever train.ensemble; the model trained with
    the choice is the task's ensemble of flows with the chosen options."""
    task = {**TINY, "ensemble": 2}
    out = tmp_path / "trial-0"
    argv = trial_argv(data, out, 0, [])
    argv[argv.index("--train-options") + 1] = json.dumps(task)
    assert cli.main(argv) == 0
    score = json.loads((out / "score.json").read_text())
    assert score["train_config"]["ensemble"] == 1 and score["search"]["members"] == 1
    assert json.loads((out / "model/posterior.json").read_text())["ensemble"] == 1
    best = tmp_path / "best.json"
    options = json.dumps({**OPTIONS, "trials": 1})
    argv = ["search-select", "--scores", str(out / "score.json"), "--options", options]
    assert cli.main([*argv, "--out", str(best)]) == 0
    model = tmp_path / "model"
    argv = ["train", "--data", str(data), "--out", str(model), "--options", json.dumps(task)]
    assert cli.main([*argv, "--chosen", str(best)]) == 0
    trained = json.loads((model / "posterior.json").read_text())
    assert trained["ensemble"] == 2
    assert trained["search"]["options"] == score["options"]
    assert trained["train_config"]["learning_rate"] == score["options"]["learning_rate"]


def test_a_diverged_trial_is_a_failed_result_not_a_failed_job(data, tmp_path):
    """learning_rate 1e9 turns the weights to NaN (as in test_training): the search goes on,
    and the selection skips the trial (test_failed_trials_are_skipped_...)."""
    space = {"learning_rate": {"choices": [1.0e9]}}
    out = tmp_path / "diverged"
    options = {"trials": 2, "parallel": 2}
    assert cli.main(trial_argv(data, out, 0, [], space=space, options=options)) == 0
    score = json.loads((out / "score.json").read_text())
    assert score["status"] == "diverged" and score["held_out"] is None
    assert "training diverged" in score["message"]
    assert read_trial(out / "score.json").complete is False


def test_trials_of_another_search_or_data_are_refused(search, data, tmp_path, capsys):
    # Another seed is another search: its trial 2 cannot be proposed from these trials.
    out = tmp_path / "other"
    argv = trial_argv(data, out, 2, search["scores"][:2], options={"seed": 7})
    assert cli.main(argv) == 2
    assert "is a trial of another search" in capsys.readouterr().err
    # A missing earlier trial.
    assert cli.main(trial_argv(data, out, 2, search["scores"][:1])) == 2
    assert r"missing [1]" in capsys.readouterr().err
    # The selection needs every trial, once.
    with pytest.raises(SearchError, match=r"trials 0 to 2 once each, got trials \[0, 1\]"):
        read_trials(search["scores"][:2], SearchOptions(**OPTIONS))
    # A choice made on other data.
    with pytest.raises(SearchError, match="rerun the search on this data"):
        read_choice(search["best"], "two_moons", "another-digest")


def test_a_finished_trial_is_not_overwritten(search, data, capsys):
    out = search["scores"][0].parent
    assert cli.main(trial_argv(data, out, 0, [])) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_train_refuses_a_file_that_is_not_a_choice(search, data, tmp_path, capsys):
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "m")]
    assert cli.main([*argv, "--chosen", str(search["scores"][0])]) == 2
    assert "its kind is 'search-trial', not 'search-choice'" in capsys.readouterr().err


def edited_copy(path: Path, out: Path, change) -> Path:
    document = json.loads(path.read_text())
    change(document)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))
    return out


def test_trials_scored_on_other_rows_or_edited_are_refused(search, tmp_path):
    scores = search["scores"]

    def other_rows(document):
        document["held_out"]["rows_digest"] = "other"

    copy = edited_copy(scores[1], tmp_path / "1/score.json", other_rows)
    with pytest.raises(SearchError, match="scored on different held-out simulations"):
        read_trials([scores[0], copy, scores[2]], SearchOptions(**OPTIONS))

    def edited(document):
        document["search"]["seed"] = 3

    copy = edited_copy(scores[1], tmp_path / "e/score.json", edited)
    with pytest.raises(SearchError, match="does not match its digest"):
        read_trial(copy)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SearchError, match="is not the score of a search trial"):
        read_trial(tmp_path / "list.json")


def test_choosing_with_other_search_options_is_refused(search):
    with pytest.raises(SearchError, match=r"other search options: seed 0 \(given 7\)"):
        read_trials(search["scores"], SearchOptions(**{**OPTIONS, "seed": 7}))
    with pytest.raises(SearchError, match=r"members 1 \(given 2\)"):
        read_trials(search["scores"], SearchOptions(**{**OPTIONS, "members": 2}))


def test_training_with_other_options_than_the_trials_is_refused(search, data, tmp_path, capsys):
    options = json.dumps({**TINY, "max_epochs": 5})
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--options", options]
    assert cli.main([*argv, "--chosen", str(search["best"])]) == 2
    assert "max_epochs: 5 (search: 4)" in capsys.readouterr().err


def test_a_search_over_the_penalty_keeps_its_options_in_the_identity_and_the_choice():
    """The penalty's draws and rows shape nothing while it is off, so a run without it leaves
    them out of its identity; a search that varies the penalty from a base without it trains
    its trials with the base's draws and rows, so they are the search's, and the model trained
    with a choice that turns it on is the chosen trial's."""
    space = SearchSpace.from_dict({"calibration": {"low": 0.5, "high": 5.0}})
    options = SearchOptions(**OPTIONS)
    identity = search_identity("two_moons", "abc", TrainConfig(), space, options)
    more_draws = search_identity(
        "two_moons", "abc", TrainConfig(calibration_draws=16), space, options
    )
    assert identity["base"]["calibration_draws"] == 8
    assert config_digest(identity) != config_digest(more_draws)
    plain = SearchSpace.from_dict({"learning_rate": {"low": 1e-4, "high": 1e-2}})
    assert (
        "calibration_draws"
        not in search_identity("t", "abc", TrainConfig(), plain, options)["base"]
    )
    choice = SimpleNamespace(search=identity, options={"calibration": 3.0})
    chosen = TrainConfig(calibration=3.0)
    check_base(choice, chosen.shaping(identity["space"]), Path("best.json"))
    with pytest.raises(SearchError, match=r"calibration_rows: 32 \(search: 64\)"):
        check_base(
            choice,
            TrainConfig(calibration=3.0, calibration_rows=32).shaping(identity["space"]),
            Path("best.json"),
        )


def test_a_posterior_that_cannot_be_sampled_is_a_failed_trial(data, tmp_path, monkeypatch):
    from pipeline.sampling import SamplingError
    from pipeline.search import trial

    def refuse(*args, **kwargs):
        raise SamplingError("fewer than 1e-03 of the posterior samples ... inside the prior")

    monkeypatch.setattr(trial, "held_out_score", refuse)
    out = tmp_path / "unsampled"
    assert cli.main(trial_argv(data, out, 0, [])) == 0
    score = json.loads((out / "score.json").read_text())
    assert score["status"] == "unsampled" and score["held_out"] is None
    assert "inside the prior" in score["message"]


def test_too_few_held_out_rows_to_compare_trials_are_refused(tmp_path):
    from pipeline import storage
    from pipeline.search.trial import validation_rows
    from pipeline.training import TrainConfig

    rng = np.random.default_rng(0)
    out = tmp_path / "sims.h5"
    storage.write_simulations(
        out,
        rng.normal(size=(40, 2)),
        rng.normal(size=(40, 2)),
        {"task": "two_moons"},
        overwrite=False,
    )
    config = TrainConfig.from_dict({"val_fraction": 0.1})  # 4 of 40 rows held out
    with pytest.raises(SearchError, match=r"holds out 4 rows .* raise val_fraction"):
        validation_rows(out, config, 100)
    theta, x = validation_rows(out, config.replaced({"val_fraction": 0.5}), 100)
    assert theta.shape == (20, 2) and x.shape == (20, 2)
