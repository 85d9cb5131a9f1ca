"""Sequential rounds (pipeline.rounds): regions, their sampling, their files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy import stats

from pipeline import storage
from pipeline.cli import main
from pipeline.models.npe import NPE
from pipeline.models.posterior import (
    NeuralPosterior,
    PosteriorSpec,
    load_posterior,
    log_mean_weight,
)
from pipeline.observations import read_reference, select_observation
from pipeline.options import OptionsError, TruncateOptions
from pipeline.provenance import file_digest
from pipeline.report.results import ResultsError, read_rounds
from pipeline.rounds.proposal import StackProposal, stack_proposal
from pipeline.rounds.records import Truncation, TruncationError, round_seed
from pipeline.rounds.region import TruncatedPrior, load_region, truncate, truncated_task
from pipeline.rounds.stack import stack_rounds
from pipeline.sampling import read_samples, sample_posterior
from pipeline.tasks import get_task
from pipeline.tasks.base import source_digest
from pipeline.validation import _left_out, _misspecification_skipped
from tests.conftest import run_env, tool

TASK = get_task("two_moons")
# Enough posterior and prior draws that the quantile and the prior mass are estimated to a few
# thousandths (binomial standard errors below 0.005), yet truncate takes a second.
OPTIONS = TruncateOptions(quantile=0.1, draws=20000, prior_draws=20000, min_prior_mass=1e-3)


@pytest.fixture(scope="module")
def round0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small two_moons posterior (round 0) and two observations with references."""
    folder = tmp_path_factory.mktemp("round0")
    # One small flow: the region tests below need posteriors narrow enough after 20 epochs.
    options = {"max_epochs": 20, "transforms": 2, "flow_hidden": [32, 32], "ensemble": 1}
    options = json.dumps({**options, "weight_decay": 0.0})
    steps = [
        ["simulate", "--task", "two_moons", "--num-simulations", "1000", "--seed", "1"],
        ["train", "--data", str(folder / "sims.h5"), "--options", options],
        ["observe", "--task", "two_moons", "--num-observations", "2"],
        # 1000 reference samples: C2ST (in truncate) on 10^4 would dominate the module's time.
    ]
    steps[2] += ["--num-reference-samples", "1000"]
    outs = ["sims.h5", "model", "observations.h5"]
    for step, out in zip(steps, outs, strict=True):
        assert main([*step, "--out", str(folder / out)]) == 0
    return folder


@pytest.fixture(scope="module")
def truncated(round0: Path) -> Path:
    """round0 with the region of its posterior at observation 0 (truncation.json)."""
    truncation = truncate(round0 / "model", round0 / "observations.h5", 0, OPTIONS)
    truncation.write(round0 / "truncation.json", overwrite=True)
    return round0


def region_of(folder: Path, truncation: Truncation) -> TruncatedPrior:
    posterior, _ = load_posterior(folder / "model")
    x_obs = np.asarray(truncation.x_obs, dtype=np.float32)
    return TruncatedPrior(TASK.prior, [posterior], x_obs, truncation)


def test_a_region_holds_one_minus_the_quantile_of_the_posterior_and_its_prior_mass(round0):
    truncation = truncate(round0 / "model", round0 / "observations.h5", 1, OPTIONS)
    region = region_of(round0, truncation)
    posterior, _ = load_posterior(round0 / "model")
    torch.manual_seed(7)
    x_obs = np.asarray(truncation.x_obs, dtype=np.float32)[None]
    fresh = sample_posterior(posterior, x_obs, 20000, low=TASK.prior.low, high=TASK.prior.high)
    inside = np.mean(fresh.log_prob[0] >= truncation.threshold)
    # 1 - quantile, up to the threshold's and this check's sampling errors (~0.003 each).
    assert inside == pytest.approx(0.9, abs=0.015)
    prior_draws = TASK.prior.sample(20000, np.random.default_rng(11))
    assert np.mean(region.accepts(prior_draws)) == pytest.approx(truncation.prior_mass, abs=0.02)
    assert 0.01 < truncation.prior_mass < 0.9
    assert truncation.observation["index"] == 1
    assert truncation.c2st is not None  # the observation has a reference


def test_a_real_observation_has_a_region_but_no_c2st(round0, tmp_path):
    _, x, _ = read_reference(round0 / "observations.h5")
    np.save(tmp_path / "x.npy", x[:1])
    real = tmp_path / "real.h5"
    assert (
        main(
            [
                "observe",
                "--task",
                "two_moons",
                "--from",
                str(tmp_path / "x.npy"),
                "--out",
                str(real),
            ]
        )
        == 0
    )
    truncation = truncate(round0 / "model", real, 0, OPTIONS)
    assert truncation.c2st is None
    assert truncation.prior_mass > 0


def test_truncate_says_how_to_make_an_observations_file_of_an_npy(round0, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(2, "f4"))
    with pytest.raises(ValueError, match="pipeline observe --task two_moons --from"):
        truncate(round0 / "model", tmp_path / "x.npy", 0, OPTIONS)


def test_observations_of_another_task_are_refused(round0, tmp_path):
    other = tmp_path / "mixture.h5"
    args = ["observe", "--task", "gaussian_mixture", "--num-observations", "1"]
    assert main([*args, "--num-reference-samples", "0", "--out", str(other)]) == 0
    with pytest.raises(ValueError, match="holds observations of task 'gaussian_mixture'"):
        truncate(round0 / "model", other, 0, OPTIONS)


def test_the_truncated_prior_is_the_prior_restricted_to_the_region(truncated):
    region = region_of(truncated, Truncation.read(truncated / "truncation.json"))
    samples = region.sample(2000, np.random.default_rng(5))
    assert samples.shape == (2000, 2)
    assert region.accepts(samples).all()
    np.testing.assert_array_equal(samples, region.sample(2000, np.random.default_rng(5)))
    prior_draws = TASK.prior.sample(40000, np.random.default_rng(6))
    restricted = prior_draws[region.accepts(prior_draws)]
    for dim in range(2):
        # Same distribution: a fixed-seed KS test far from rejection (p well above 0.01).
        assert stats.ks_2samp(samples[:, dim], restricted[:, dim]).pvalue > 0.01


def test_a_region_that_holds_nothing_stops_naming_the_quantile(truncated):
    round0 = truncated
    truncation = Truncation.read(truncated / "truncation.json")
    empty = Truncation(**{**truncation.__dict__, "threshold": float("inf")})
    with pytest.raises(TruncationError, match=r"0 of \d+ prior draws .* Lower rounds.quantile"):
        region_of(round0, empty).sample(10, np.random.default_rng(0))
    strict = TruncateOptions(quantile=0.5, draws=2000, prior_draws=2000, min_prior_mass=1.0)
    with pytest.raises(TruncationError, match=r"rounds.quantile \(now 0.5\) to widen"):
        truncate(round0 / "model", round0 / "observations.h5", 0, strict)


def test_a_lower_floor_lets_a_region_be_sampled_and_changes_no_draw(truncated, tmp_path):
    """The floor the rounds' error advises lowering is given to the simulate job apart from
    the truncation file (so the rounds before it are kept): it decides whether sampling stops,
    never which parameters are drawn."""
    models = [truncated / "model"]
    recorded = Truncation.read(truncated / "truncation.json").__dict__
    # A recorded mass of 0.37 sizes batches of 649 draws for 200 (not a multiple of the 240
    # a floor of 1 would size, so that no number of either draws as many as the other), and
    # the region, smaller, needs more draws than a floor of 1 allows.
    for name, floor in [("strict", 1.0), ("loose", 1e-3)]:
        changed = {"prior_mass": 0.37, "min_prior_mass": floor}
        Truncation(**recorded | changed).write(tmp_path / f"{name}.json", overwrite=False)
    with pytest.raises(TruncationError, match="below min_prior_mass 1\\).*--min-prior-mass"):
        load_region(tmp_path / "strict.json", models, TASK.prior).sample(
            200, np.random.default_rng(5)
        )
    lowered = load_region(tmp_path / "strict.json", models, TASK.prior, min_prior_mass=1e-3)
    loose = load_region(tmp_path / "loose.json", models, TASK.prior)
    # The same parameters, and the generator left where it was: the simulator's draws after
    # them (x) are the same too, which batches sized by the floor (above the mass) changed.
    rngs = np.random.default_rng(5), np.random.default_rng(5)
    np.testing.assert_array_equal(lowered.sample(200, rngs[0]), loose.sample(200, rngs[1]))
    assert rngs[0].bit_generator.state == rngs[1].bit_generator.state
    flags = ["--truncation", str(tmp_path / "strict.json"), "--model", str(models[0])]
    command = ["simulate", "--task", "two_moons", "--num-simulations", "50", *flags]
    assert main([*command, "--out", str(tmp_path / "sims.h5"), "--min-prior-mass", "1e-3"]) == 0
    assert main([*command, "--out", str(tmp_path / "no.h5"), "--min-prior-mass", "0"]) == 2
    assert not (tmp_path / "no.h5").exists()


def test_a_prior_mass_resting_on_few_prior_draws_is_warned_about(round0, caplog):
    # The proposal weights of the next rounds are one over the regions' masses.
    few = TruncateOptions(quantile=0.1, draws=2000, prior_draws=500, min_prior_mass=1e-3)
    with caplog.at_level(logging.WARNING, logger="pipeline.rounds.region"):
        truncation = truncate(round0 / "model", round0 / "observations.h5", 0, few)
    accepted = round(truncation.prior_mass * 500)
    assert f"rests on {accepted} of 500 prior draws" in caplog.text
    assert "raise rounds.prior_draws" in caplog.text


def test_too_few_draws_for_the_quantile_are_refused():
    with pytest.raises(OptionsError, match="raise draws to at least 100000"):
        TruncateOptions.from_dict({"quantile": 1e-4, "draws": 20000})


def test_round_seeds_differ_between_rounds_and_repeat_for_the_same_round():
    seeds = [round_seed(1, index) for index in range(5)]
    assert len(set(seeds)) == 5
    assert seeds == [round_seed(1, index) for index in range(5)]
    assert round_seed(2, 0) != seeds[0]


def simulate_round(folder: Path, out: Path, *extra: str, n: int = 600) -> np.ndarray:
    """The next round's simulations from the region in ``folder``; returns their theta."""
    args = ["simulate", "--task", "two_moons", "--num-simulations", str(n)]
    args += ["--seed", str(round_seed(1, 1)), "--truncation", str(folder / "truncation.json")]
    assert main([*args, "--model", str(folder / "model"), "--out", str(out), *extra]) == 0
    return storage.read_simulations(out).theta


def test_round_simulations_lie_in_the_region_whatever_the_chunks(truncated, tmp_path):
    # 2500 simulations span three seed blocks of 1000: chunks of 700 cut across them.
    theta = simulate_round(truncated, tmp_path / "a.h5", "--chunk-size", "2500", n=2500)
    again = simulate_round(truncated, tmp_path / "b.h5", "--chunk-size", "700", n=2500)
    np.testing.assert_array_equal(theta, again)
    truncation = Truncation.read(truncated / "truncation.json")
    assert region_of(truncated, truncation).accepts(theta).all()
    attrs = storage.read_attrs(tmp_path / "a.h5")
    assert attrs["proposal"]["model"] == truncation.model_digest
    assert attrs["proposal"]["threshold"] == truncation.threshold


def test_a_stopped_round_simulation_resumes_from_its_finished_shards(
    truncated, tmp_path, monkeypatch
):
    """A round's simulate stopped after its first shard keeps that shard when rerun and ends
    with the file of a run never stopped."""
    from pipeline import simulation

    simulate_round(truncated, tmp_path / "straight.h5", n=2500)
    straight = storage.read_simulations(tmp_path / "straight.h5")
    original, written = simulation.write_shard, []

    def stopped_after_one(*args):
        if written:
            raise KeyboardInterrupt  # an interrupt before the second shard is written
        written.append(args[4:6])
        return original(*args)

    monkeypatch.setattr(simulation, "write_shard", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        simulate_round(truncated, tmp_path / "resumed.h5", n=2500)
    assert not (tmp_path / "resumed.h5").exists()

    def counted(*args):
        written.append(args[4:6])
        return original(*args)

    monkeypatch.setattr(simulation, "write_shard", counted)
    simulate_round(truncated, tmp_path / "resumed.h5", n=2500)
    assert written == [(0, 1000), (1000, 2000), (2000, 2500)]  # the first shard drawn once
    resumed = storage.read_simulations(tmp_path / "resumed.h5")
    np.testing.assert_array_equal(resumed.theta, straight.theta)
    np.testing.assert_array_equal(resumed.x, straight.x)


def test_a_truncation_of_another_task_is_refused(truncated):
    with pytest.raises(ValueError, match="is a region of task 'two_moons', not of 'gaussian_m"):
        truncated_task(
            TASK, "gaussian_mixture", truncated / "truncation.json", truncated / "model"
        )


def test_test_samples_are_restricted_to_the_region(truncated, tmp_path):
    simulate_round(truncated, tmp_path / "test.h5", "--chunk-size", "600", n=20)
    args = ["sample", "--model", str(truncated / "model"), "--observations"]
    args += [str(tmp_path / "test.h5"), "--num-samples", "200", "--out"]
    region = ["--truncation", str(truncated / "truncation.json")]
    assert main([*args, str(tmp_path / "samples.h5"), *region]) == 0
    truncation = Truncation.read(truncated / "truncation.json")
    accepts = region_of(truncated, truncation).accepts
    restricted = read_samples(tmp_path / "samples.h5")
    assert accepts(restricted["samples"].reshape(-1, 2)).all()
    assert restricted["attrs"]["truncation"]["threshold"] == truncation.threshold
    # Without the restriction some test posteriors reach outside the region.
    posterior, _ = load_posterior(truncated / "model")
    free = sample_posterior(posterior, storage.read_simulations(tmp_path / "test.h5").x, 200)
    assert not accepts(free.samples.reshape(-1, 2)).all()


def test_test_simulations_are_sampled_only_in_the_region_they_were_drawn_from(
    truncated, tmp_path, capsys
):
    region = ["--truncation", str(truncated / "truncation.json")]
    simulate_round(truncated, tmp_path / "test.h5", "--chunk-size", "600", n=20)
    other = tmp_path / "other.json"
    shutil.copy(truncated / "truncation.json", other)
    other.write_text(other.read_text() + "\n")  # the same region, another file: other digest
    args = ["sample", "--model", str(truncated / "model"), "--num-samples", "20", "--out"]
    args += [str(tmp_path / "s.h5"), "--observations"]
    cases = [
        (truncated / "sims.h5", region, "drawn from the prior, not from the region"),
        (tmp_path / "test.h5", [], "drawn from a round's region"),
        (tmp_path / "test.h5", ["--truncation", str(other)], "drawn from another region"),
    ]
    for observations, extra, message in cases:
        assert main([*args, str(observations), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "s.h5").exists()


def test_the_training_simulations_are_not_a_test_set(round0, tmp_path, capsys):
    args = ["sample", "--model", str(round0 / "model"), "--observations", str(round0 / "sims.h5")]
    assert main([*args, "--num-samples", "20", "--out", str(tmp_path / "s.h5")]) == 2
    assert "simulated with seed 1, a seed of the data" in capsys.readouterr().err
    assert load_posterior(round0 / "model")[1]["data"]["seeds"] == [1]


def test_a_truncation_of_other_weights_is_refused(truncated, tmp_path):
    model = shutil.copytree(truncated / "model", tmp_path / "model")
    state = torch.load(model / "posterior.pt", weights_only=True)
    name = next(iter(state))
    torch.save({**state, name: state[name] + 1e-3}, model / "posterior.pt")
    with pytest.raises(ValueError, match="computed from other weights than"):
        truncated_task(TASK, "two_moons", truncated / "truncation.json", model)


def test_simulate_refuses_a_truncation_without_its_model(truncated, tmp_path, capsys):
    args = ["simulate", "--task", "two_moons", "--num-simulations", "10", "--out"]
    args += [str(tmp_path / "x.h5"), "--truncation", str(truncated / "truncation.json")]
    assert main(args) == 2
    assert "--truncation and --model go together" in capsys.readouterr().err


@pytest.fixture(scope="module")
def nested(truncated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Round 1: simulations from round 0's region, a posterior trained on rounds 0 and 1, and
    its region at observation 0 inside round 0's (round1/truncation.json)."""
    folder = tmp_path_factory.mktemp("round1")
    simulate_round(truncated, folder / "sims.h5", n=1000)
    stack_rounds(
        "two_moons",
        [truncated / "sims.h5", folder / "sims.h5"],
        folder / "train.h5",
        overwrite=False,
    )
    options = {"max_epochs": 10, "transforms": 2, "flow_hidden": [32, 32], "ensemble": 1}
    options = json.dumps({**options, "weight_decay": 0.0})
    args = ["train", "--data", str(folder / "train.h5"), "--options", options]
    assert main([*args, "--out", str(folder / "model")]) == 0
    args = ["truncate", "--model", str(folder / "model"), "--observations"]
    args += [str(truncated / "observations.h5"), "--within", str(truncated / "truncation.json")]
    args += ["--region-models", str(truncated / "model"), "--options"]
    args += [json.dumps(OPTIONS.__dict__), "--out", str(folder / "truncation.json")]
    assert main(args) == 0
    return folder


def test_a_rounds_region_lies_inside_the_earlier_rounds_regions(truncated, nested):
    outer = Truncation.read(truncated / "truncation.json")
    inner = Truncation.read(nested / "truncation.json")
    assert inner.within == outer.levels and len(inner.levels) == 2
    models = [truncated / "model", nested / "model"]
    region = load_region(nested / "truncation.json", models, TASK.prior)
    prior_draws = TASK.prior.sample(20000, np.random.default_rng(8))
    inside = region.accepts(prior_draws)
    own = region.log_q(prior_draws) >= inner.threshold
    assert not (inside & ~region_of(truncated, outer).accepts(prior_draws)).any()
    # Round 1's own region reaches outside round 0's: nesting is what keeps it inside.
    assert (own & ~inside).any()
    # Prior mass of the intersection, to 3 binomial standard errors of 20000 draws each.
    assert np.mean(inside) == pytest.approx(inner.prior_mass, abs=0.01)
    theta = simulate_round(nested, nested / "round2.h5", "--region-models", str(models[0]))
    assert region.accepts(theta).all()


@pytest.mark.parametrize(
    "method, extra",
    [
        ("npe", {}),
        ("fmpe", {}),
        # A Gaussian prior: NLE's posterior adds a log-prior that varies from row to row.
        ("nle", {"prior": {"kind": "DiagonalNormal", "loc": [0.0, 0.5], "scale": [1.0, 2.0]}}),
    ],
)
def test_a_region_decides_every_row_as_the_ensembles_density_does(method, extra):
    """Members are evaluated one at a time and rows decided early (log_prob_reaches): the
    verdicts must be those of the whole mixture's density, rows above and below alike."""
    spec = PosteriorSpec(
        parameter_names=("a", "b"),
        x_shape=(3,),
        flow="maf",
        transforms=1,
        flow_hidden=(8,),
        embedding_hidden=(8,),
        embedding_dim=4,
        ensemble=3,
        method=method,
        extra=extra,
    )
    torch.manual_seed(0)
    posterior = NeuralPosterior(spec).eval()
    theta = torch.randn(400, 2) * 2
    x = torch.randn(1, 3)
    with torch.no_grad():
        log_q = posterior.log_prob(theta[:, None], x)[:, 0].double()
    # Thresholds that put most rows above, about half, and most below.
    for threshold in np.quantile(log_q.numpy(), [0.1, 0.5, 0.9]):
        reaches = posterior.log_prob_reaches(theta, x, float(threshold))
        # Rows within float32 rounding of the threshold may fall either way.
        clear = (log_q - threshold).abs() > 1e-4
        assert torch.equal(reaches[clear], (log_q >= threshold)[clear])


def test_a_nested_region_needs_every_earlier_rounds_model_in_order(
    truncated, nested, tmp_path, capsys
):
    models = [truncated / "model", nested / "model"]
    with pytest.raises(ValueError, match="is the region of 2 rounds' posteriors .* --region-mod"):
        truncated_task(TASK, "two_moons", nested / "truncation.json", models[1])
    with pytest.raises(ValueError, match="other weights than .* for its round 0"):
        truncated_task(TASK, "two_moons", nested / "truncation.json", models[0], [models[1]])
    # A seed of its own: round 1's seed would draw the training round's parameters again.
    extra = ["--region-models", str(models[0]), "--seed", "77"]
    simulate_round(nested, tmp_path / "test.h5", *extra, n=20)
    args = ["sample", "--model", str(models[1]), "--observations", str(tmp_path / "test.h5")]
    args += ["--num-samples", "50", "--truncation", str(nested / "truncation.json")]
    assert main([*args, "--out", str(tmp_path / "alone.h5")]) == 2
    assert "pass the earlier rounds' models with --region-models" in capsys.readouterr().err
    args += ["--region-models", str(models[0])]
    assert main([*args, "--out", str(tmp_path / "samples.h5")]) == 0
    found = read_samples(tmp_path / "samples.h5")
    region = load_region(nested / "truncation.json", models, TASK.prior)
    assert region.accepts(found["samples"].reshape(-1, 2)).all()
    assert found["attrs"]["truncation"]["levels"] == 2


def test_the_report_refuses_rounds_whose_regions_do_not_nest(truncated, nested, tmp_path):
    task_dir = tmp_path / "two_moons"
    for index, source in enumerate([truncated, nested]):
        folder = task_dir / "rounds" / f"round-{index}"
        folder.mkdir(parents=True)
        shutil.copytree(source / "model", folder / "model")
        shutil.copy(source / "sims.h5", folder / "sims.h5")
        shutil.copy(source / "truncation.json", folder / "truncation.json")
    shutil.copytree(nested / "model", task_dir / "model")
    (task_dir / "sims").mkdir()
    shutil.copy(truncated / "sims.h5", task_dir / "sims/test.h5")
    # Nested rounds pass on to the checks of the last round (here: test data from the prior).
    with pytest.raises(ResultsError, match="was not drawn from the last round's region"):
        read_rounds(task_dir, 2)
    # A round's folder holding another run's files: a model retrained after its truncation,
    # or simulations drawn from another region than the round before's.
    round0 = task_dir / "rounds/round-0"
    shutil.copy(nested / "model/posterior.pt", round0 / "model/posterior.pt")
    with pytest.raises(ResultsError, match="round-0/truncation.json was cut with other weights"):
        read_rounds(task_dir, 2)
    shutil.copy(truncated / "model/posterior.pt", round0 / "model/posterior.pt")
    shutil.copy(truncated / "sims.h5", task_dir / "rounds/round-1/sims.h5")
    with pytest.raises(ResultsError, match="round-1/sims.h5 was not drawn from round 0's region"):
        read_rounds(task_dir, 2)
    shutil.copy(nested / "sims.h5", task_dir / "rounds/round-1/sims.h5")
    alone = truncate(nested / "model", truncated / "observations.h5", 0, OPTIONS)
    alone.write(task_dir / "rounds/round-1/truncation.json", overwrite=True)
    with pytest.raises(ResultsError, match="round-1/truncation.json is not a region inside rou"):
        read_rounds(task_dir, 2)


def test_a_region_within_another_observations_region_is_refused(truncated, nested):
    with pytest.raises(ValueError, match="at another observation than observation 1"):
        truncate(
            nested / "model",
            truncated / "observations.h5",
            1,
            OPTIONS,
            truncated / "truncation.json",
            [truncated / "model"],
        )


def test_shards_drawn_from_a_region_are_neither_reused_nor_merged_as_the_priors(
    truncated, tmp_path, capsys
):
    # The same seed, task and chunks: only the region tells the runs apart.
    out = tmp_path / "sims.h5"
    prior = ["--task", "two_moons", "--num-simulations", "600", "--seed", str(round_seed(1, 1))]
    prior += ["--chunk-size", "300", "--out", str(out)]
    region = ["--truncation", str(truncated / "truncation.json"), "--model"]
    region += [str(truncated / "model")]
    for start in ("0", "300"):
        assert main(["simulate", *prior, *region, "--chunk", start]) == 0
    assert main(["merge", *prior]) == 2
    assert "belongs to another run" in capsys.readouterr().err and not out.exists()
    assert main(["merge", *prior, *region]) == 0
    merged = storage.read_simulations(out).theta
    truncation = Truncation.read(truncated / "truncation.json")
    assert region_of(truncated, truncation).accepts(merged).all()
    # A run from the prior into the same --out draws its own chunks.
    assert main(["simulate", *prior, "--overwrite"]) == 0
    assert "already simulated" not in capsys.readouterr().err
    from_prior = storage.read_simulations(out)
    assert "proposal" not in storage.read_attrs(out)
    assert not region_of(truncated, truncation).accepts(from_prior.theta).all()


@pytest.mark.mpi
def test_two_mpi_ranks_simulate_the_same_round(truncated, tmp_path):
    simulate_round(truncated, tmp_path / "serial.h5", "--chunk-size", "300")
    command = [tool("mpiexec"), "-n", "2", tool("pipeline"), "simulate", "--task", "two_moons"]
    command += ["--num-simulations", "600", "--seed", str(round_seed(1, 1)), "--chunk-size"]
    command += ["300", "--truncation", str(truncated / "truncation.json"), "--model"]
    command += [str(truncated / "model"), "--out", str(tmp_path / "mpi.h5")]
    subprocess.run(command, check=True, env=run_env(), timeout=300)
    serial = storage.read_simulations(tmp_path / "serial.h5")
    parallel = storage.read_simulations(tmp_path / "mpi.h5")
    np.testing.assert_array_equal(serial.theta, parallel.theta)
    np.testing.assert_array_equal(serial.x, parallel.x)


def test_stacked_rounds_hold_every_round_in_order(truncated, tmp_path):
    round1 = tmp_path / "round1.h5"
    simulate_round(truncated, round1, "--chunk-size", "600")
    sources = [truncated / "sims.h5", round1]
    stack_rounds("two_moons", sources, tmp_path / "train.h5", overwrite=False)
    stacked = storage.read_simulations(tmp_path / "train.h5")
    parts = [storage.read_simulations(path) for path in sources]
    np.testing.assert_array_equal(stacked.x, np.concatenate([p.x for p in parts]))
    np.testing.assert_array_equal(stacked.theta, np.concatenate([p.theta for p in parts]))
    attrs = storage.read_attrs(tmp_path / "train.h5")
    assert [entry["file"] for entry in attrs["rounds"]] == [str(path) for path in sources]
    with pytest.raises(FileExistsError):
        stack_rounds("two_moons", sources, tmp_path / "train.h5", overwrite=False)


def test_simulations_whose_posterior_misses_the_region_are_left_out_and_counted(
    truncated, tmp_path
):
    # A small region (half the posterior's mass) and simulations from the prior, not from it:
    # many posteriors lie wholly outside.
    small = TruncateOptions(quantile=0.5, draws=2000, prior_draws=20000, min_prior_mass=1e-4)
    truncation = truncate(truncated / "model", truncated / "observations.h5", 0, small)
    truncation.write(tmp_path / "truncation.json", overwrite=False)
    args = ["simulate", "--task", "two_moons", "--num-simulations", "60", "--seed", "9"]
    assert main([*args, "--out", str(tmp_path / "prior.h5")]) == 0
    # Recorded as drawn from the region, which the sample stage checks before it restricts.
    digest = file_digest(tmp_path / "truncation.json")
    with h5py.File(tmp_path / "prior.h5", "r+") as f:
        f.attrs["proposal"] = json.dumps({"truncation": digest})
    args = ["sample", "--model", str(truncated / "model"), "--observations"]
    args += [str(tmp_path / "prior.h5"), "--num-samples", "20"]
    args += ["--truncation", str(tmp_path / "truncation.json")]
    assert main([*args, "--out", str(tmp_path / "samples.h5")]) == 0
    found = read_samples(tmp_path / "samples.h5")
    outside = found["attrs"]["num_outside_region_excluded"]
    assert 0 < outside < 60
    assert len(found["samples"]) == len(found["attrs"]["observation_index"]) == 60 - outside
    assert np.isfinite(found["samples"]).all()
    prior = storage.read_simulations(tmp_path / "prior.h5")
    np.testing.assert_array_equal(found["x"], prior.x[found["attrs"]["observation_index"]])


def test_a_stack_out_of_order_or_with_a_round_twice_is_refused(truncated, tmp_path):
    round1 = tmp_path / "round1.h5"
    simulate_round(truncated, round1, "--chunk-size", "600")
    prior = truncated / "sims.h5"
    cases = {
        "drawn from the prior; stack round 0": [prior, round1, prior],
        "drawn from a truncated region; stack round 0": [round1, prior],
        "repeats another file of the stack": [prior, round1, round1],
        # Observations have theta and x too; the error was a bare "num_simulations".
        "observations.h5 is not a round's simulations": [truncated / "observations.h5"],
    }
    for message, sources in cases.items():
        with pytest.raises(ValueError, match=message):
            stack_rounds("two_moons", sources, tmp_path / "t.h5", overwrite=False)


def test_a_stack_is_one_chain_of_regions_aimed_at_one_observation(truncated, nested, tmp_path):
    """A round drawn from a region cut without --within has the same last threshold as the
    nested one (the quantile is of q's own draws), so only the whole chain tells them apart;
    a round cut around another observation is no round of this chain either. Both would be
    stacked and weighted as this chain's rounds."""
    models = ["--region-models", str(truncated / "model"), "--seed", "78"]
    simulate_round(nested, tmp_path / "round2.h5", *models, n=50)
    chain = [truncated / "sims.h5", nested / "sims.h5", tmp_path / "round2.h5"]
    stack_rounds("two_moons", chain, tmp_path / "chain.h5", overwrite=False)
    assert storage.read_attrs(nested / "sims.h5")["proposal"]["levels"] == (
        Truncation.read(truncated / "truncation.json").levels
    )
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copytree(nested / "model", flat / "model")
    alone = truncate(nested / "model", truncated / "observations.h5", 0, OPTIONS)
    alone.write(flat / "truncation.json", overwrite=False)
    assert alone.threshold == Truncation.read(nested / "truncation.json").threshold
    simulate_round(flat, tmp_path / "flat.h5", "--seed", "79", n=50)
    with pytest.raises(ValueError, match="round 2 of the stack.* a region of 1 level"):
        stack_rounds(
            "two_moons", [*chain[:2], tmp_path / "flat.h5"], tmp_path / "t.h5", overwrite=False
        )
    elsewhere = tmp_path / "elsewhere.h5"
    shutil.copy(tmp_path / "round2.h5", elsewhere)
    with h5py.File(elsewhere, "r+") as f:
        proposal = json.loads(f.attrs["proposal"])
        f.attrs["proposal"] = json.dumps({**proposal, "observation": "0123456789abcdef"})
    with pytest.raises(ValueError, match="cut at different observations"):
        stack_rounds("two_moons", [*chain[:2], elsewhere], tmp_path / "t.h5", overwrite=False)
    assert not (tmp_path / "t.h5").exists()


def test_stacking_another_tasks_simulations_is_refused(truncated, tmp_path):
    other = tmp_path / "other.h5"
    args = ["simulate", "--task", "gaussian_linear", "--num-simulations", "50"]
    assert main([*args, "--out", str(other)]) == 0
    sources = [truncated / "sims.h5", other]
    with pytest.raises(storage.DataFileError, match="holds simulations of task 'gaussian_linear'"):
        stack_rounds("two_moons", sources, tmp_path / "t.h5", overwrite=False)


def test_a_stack_of_rounds_of_two_definitions_of_a_users_task_is_refused(tmp_path):
    from types import SimpleNamespace

    from pipeline.rounds.region import TruncatedTask

    task = get_task("examples/oscillator/task.yaml")
    (tmp_path / "truncation.json").write_text("{}")
    level = {"model_digest": "m", "threshold": -1.0}
    truncation = SimpleNamespace(**level, prior_mass=0.5, levels=[level], observation_digest="o")
    region = SimpleNamespace(truncation=truncation)
    truncated = TruncatedTask(task, region, [tmp_path / "truncation.json"])
    assert truncated.proposal["task_digest"] == source_digest(task)
    rng = np.random.default_rng(0)
    rounds = [tmp_path / "round0.h5", tmp_path / "round1.h5"]
    # Round 1 drawn after the task's files were edited: its proposal records another digest.
    edited = {**truncated.proposal, "task_digest": "0123456789abcdef"}
    definitions = [
        {"task_digest": source_digest(task), "seed": 1},
        {"task_digest": "fedcba9876543210", "seed": 2, "proposal": edited},
    ]
    named = {"task": task.name, "num_simulations": 10, "x_unit": task.x_unit}
    named |= {"parameter_names": list(task.parameter_names)}
    named |= {"parameter_units": list(task.parameter_units)}
    for path, attrs in zip(rounds, definitions, strict=True):
        theta, x = rng.normal(size=(10, task.dim_theta)), rng.normal(size=(10, *task.x_shape))
        storage.write_simulations(path, theta, x, named | attrs, overwrite=False)
    with pytest.raises(ValueError, match="round 1 of the stack.* another definition of task"):
        stack_rounds(task.name, rounds, tmp_path / "train.h5", overwrite=False)
    # One definition throughout: the stack records it, which a model trained on it keeps.
    theta, x = rng.normal(size=(10, task.dim_theta)), rng.normal(size=(10, *task.x_shape))
    attrs = named | {"seed": 2, "proposal": truncated.proposal}
    storage.write_simulations(rounds[1], theta, x, attrs, overwrite=True)
    stack_rounds(task.name, rounds, tmp_path / "train.h5", overwrite=False)
    assert storage.read_attrs(tmp_path / "train.h5")["task_digest"] == source_digest(task)


def test_the_selected_observation_keeps_its_truth_and_reference(round0, tmp_path):
    out = tmp_path / "one.h5"
    select_observation(round0 / "observations.h5", 1, out)
    with h5py.File(round0 / "observations.h5") as f, h5py.File(out) as g:
        for name in ("theta", "x", "reference_samples"):
            np.testing.assert_array_equal(g[name][...], f[name][1:2])
        assert storage.decode_attr(g.attrs["selected_index"]) == 1
        assert len(storage.decode_attr(g.attrs["reference"])["diagnostics"]) == 1
    with pytest.raises(ValueError, match="holds 2 observations; there is no observation 2"):
        select_observation(round0 / "observations.h5", 2, tmp_path / "none.h5")
    # Selected again, it is still the task's observation 1.
    select_observation(out, 0, tmp_path / "again.h5")
    with h5py.File(tmp_path / "again.h5") as g:
        assert storage.decode_attr(g.attrs["selected_index"]) == 1
    # A simulation file has theta and x too, and its attributes would have been copied.
    with pytest.raises(ValueError, match=r"sims.h5 is a file of simulations, not of observ"):
        select_observation(round0 / "sims.h5", 0, tmp_path / "sim.h5")


def test_validation_says_how_many_test_simulations_coverage_left_out():
    test = {"attrs": {"num_outside_region_excluded": 3}, "theta": np.zeros((7, 2))}
    assert "3 of 10 test simulations left out of coverage" in _left_out(test)["region"]
    assert _left_out({"attrs": {}, "theta": np.zeros((7, 2))}) == {}


def test_misspecification_is_not_tested_against_a_region_chosen_at_the_observation():
    """Test simulations from a round's region are not exchangeable with the observation the
    region was cut around (bernoulli_glm's rounds flagged 2 of 5 simulated observations at
    p 0.004 and 0.008): validate skips the tests, saying why, rather than raise false alarms."""
    reason = _misspecification_skipped({"attrs": {"truncation": "{}"}})["misspecification"]
    assert "chosen at the observation" in reason and "amortized posterior" in reason
    assert _misspecification_skipped({"attrs": {}}) == {}


def test_the_stacks_proposal_weighs_each_round_by_its_share_over_its_regions_mass(
    truncated, nested
):
    truncation = Truncation.read(truncated / "truncation.json")
    proposal = stack_proposal(
        nested / "train.h5", truncated / "truncation.json", [truncated / "model"]
    )
    # float32 first: the ratio sees theta as the training batches hold it.
    theta = TASK.prior.sample(20000, np.random.default_rng(0)).astype(np.float32)
    inside = region_of(truncated, truncation).accepts(theta.astype(np.float64))
    w = proposal.ratio(torch.as_tensor(theta)).numpy()
    # Rounds 0 and 1 hold 1000 simulations each: half the draws from the prior, half from the
    # region of prior mass m.
    np.testing.assert_allclose(w[~inside], 0.5, rtol=1e-6)
    np.testing.assert_allclose(w[inside], 0.5 + 0.5 / truncation.prior_mass, rtol=1e-6)
    assert proposal.ratio(torch.tensor([[5.0, 5.0]])).item() == 0  # outside the prior's box
    # A density ratio to the prior: its prior mean is 1, up to the estimated mass (20000 prior
    # draws each here and in truncate: a standard error below 0.01).
    assert abs(w.mean() - 1) < 0.03


def test_a_proposal_needs_a_stack_of_this_runs_rounds(truncated, nested, tmp_path):
    region = [truncated / "truncation.json", [truncated / "model"]]
    with pytest.raises(ValueError, match="is not a stack of rounds .* train without --trunc"):
        stack_proposal(truncated / "sims.h5", *region)
    both = [truncated / "model", nested / "model"]
    with pytest.raises(ValueError, match="a region of 1 levels, but .* has 2: pass the trunc"):
        stack_proposal(nested / "train.h5", nested / "truncation.json", both)
    older = tmp_path / "older.h5"
    shutil.copy(nested / "train.h5", older)
    with h5py.File(older, "r+") as f:
        rounds = json.loads(f.attrs["rounds"])
        older_rounds = [{k: v for k, v in r.items() if k != "num_simulations"} for r in rounds]
        f.attrs["rounds"] = json.dumps(older_rounds)
    with pytest.raises(ValueError, match="stack the rounds again with `pipeline stack-rounds"):
        stack_proposal(older, *region)
    other = tmp_path / "other.json"
    document = json.loads((truncated / "truncation.json").read_text())
    other.write_text(json.dumps({**document, "threshold": document["threshold"] + 1}))
    with pytest.raises(ValueError, match="round 1 of .* was drawn from another region"):
        stack_proposal(nested / "train.h5", other, [truncated / "model"])


def test_train_takes_the_region_with_the_posteriors_of_its_levels(nested, tmp_path, capsys):
    args = ["train", "--data", str(nested / "train.h5"), "--out", str(tmp_path / "model")]
    assert main([*args, "--truncation", str(nested / "truncation.json")]) != 0
    assert "--truncation and --region-models go together" in capsys.readouterr().err


def test_log_mean_weight_has_the_value_and_gradient_of_log_e_q_w():
    # q = N(mu, 1), w = 0.5 + 2 [theta > 0]: E_q[w] = 0.5 + 2 Phi(mu).
    torch.manual_seed(0)
    mu = torch.tensor(0.3, requires_grad=True)
    q = torch.distributions.Normal(mu, 1.0)
    draws = q.sample((256, 2000))
    w = 0.5 + 2.0 * (draws > 0)
    out = log_mean_weight(w, q.log_prob(draws), floor=0.5)
    out.mean().backward()
    expected = 0.5 + 2 * stats.norm.cdf(0.3)
    # 2000 columns of 256 draws: standard errors near 0.002 (value) and 0.0015 (gradient);
    # the self-normalised gradient's bias is of order 1/256.
    assert abs(out.mean().item() - np.log(expected)) < 0.01
    assert abs(mu.grad.item() - 2 * stats.norm.pdf(0.3) / expected) < 0.01
    nothing = log_mean_weight(torch.zeros(4, 3), torch.zeros(4, 3), floor=0.5)
    np.testing.assert_allclose(nothing.numpy(), np.log(0.5 / 4))  # one draw of the floor


class HalfLine:
    """A region of one level, theta > 0, for a proposal without a trained posterior."""

    truncation = Truncation("toy", 0.0, 0.1, 0.5, 1, 1, 1e-3, "", {}, [])

    def depth(self, theta: np.ndarray) -> np.ndarray:
        return (theta[:, 0] > 0).astype(int)


def fit_gaussian(theta: torch.Tensor, x: torch.Tensor, proposal: StackProposal | None):
    """q(theta | x) Gaussian with a mean linear in x: the exact family of the toy model."""
    spec = PosteriorSpec(
        parameter_names=("a",),
        x_shape=(1,),
        flow="maf",
        transforms=1,
        flow_hidden=(),
        embedding="identity",
        ensemble=1,
    )
    posterior = NeuralPosterior(spec, theta.mean(0), theta.std(0), x.mean(0), x.std(0))
    torch.manual_seed(0)
    module = NPE(posterior, learning_rate=0.01, lr_schedule="constant", proposal=proposal)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(theta, x),
        batch_size=256,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    trainer = pl.Trainer(
        max_epochs=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    return posterior.eval()


def test_the_normalised_loss_learns_the_posterior_the_plain_loss_cuts_at_the_region():
    # theta ~ N(0, 1), x ~ N(theta, 0.5^2); half the pairs drawn from theta > 0 (prior mass
    # 0.5). At x = -0.5 the posterior N(-0.4, 0.447^2) puts 19 % of its mass above 0, which the
    # proposal weighs three times as much as the rest.
    rng = np.random.default_rng(0)
    theta = rng.normal(size=(8000, 1))
    theta[4000:] = np.abs(theta[4000:])
    x = theta + 0.5 * rng.normal(size=theta.shape)
    theta, x = (torch.as_tensor(a, dtype=torch.float32) for a in (theta, x))
    proposal = StackProposal(HalfLine(), [4000, 4000], [0.5])
    means = {}
    for name, used in (("plain", None), ("normalised", proposal)):
        posterior = fit_gaussian(theta, x, used)
        with torch.no_grad():
            means[name] = posterior.sample(torch.tensor([[-0.5]]), 20000).mean().item()
    # 8000 pairs fit the mean to about 0.01; 20000 draws add 0.003.
    assert abs(means["normalised"] + 0.4) < 0.04, means
    assert means["plain"] > -0.4 + 0.08, means
