import json
import os
import signal
import subprocess
import time

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from pipeline import simulation, storage
from pipeline.architecture import auto_embedding
from pipeline.models.embeddings import Flatten
from pipeline.models.posterior import load_posterior
from pipeline.parallel import Layout, SerialComm, launch_layout
from pipeline.tasks import TASKS, get_task, register
from pipeline.tasks.two_moons import TwoMoons
from pipeline.training import TrainConfig, check_checkpoints, default_checkpoint_dir, train
from tests.conftest import ROOT, run_env, tool

TINY = {
    "max_epochs": 3,
    "flow_hidden": [16],
    "embedding_hidden": [16],
    "embedding_dim": 8,
    "transforms": 1,
    "batch_size": 64,
    "patience": 5,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 800, 1, 400)
    simulation.run(plan, get_task("two_moons"), out, SerialComm(), overwrite=False)
    return out


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) 'lerning_rate' \(did you mean 'learning_rate'\?\); allowed",
    ):
        TrainConfig.from_dict({"lerning_rate": 0.1})


@pytest.mark.parametrize("option", ["batch_size", "ensemble"])
def test_non_positive_option_is_refused(option):
    with pytest.raises(ValueError, match=f"{option} must be at least 1, got 0"):
        TrainConfig.from_dict({option: 0})


def test_trained_posterior_loads_without_lightning(data, tmp_path):
    metadata = train(data, tmp_path / "model", TrainConfig.from_dict(TINY))
    assert metadata["num_train"] + metadata["num_val"] == 800
    state = torch.load(tmp_path / "model" / "posterior.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    posterior, document = load_posterior(tmp_path / "model")
    assert document["task"] == "two_moons" and document["epochs"] == 3
    theta, log_q = posterior.sample_and_log_prob(torch.zeros(4, 2), 5)
    assert theta.shape == (5, 4, 2) and log_q.shape == (5, 4)
    # The model's log-density of its own samples matches what sampling returned.
    torch.testing.assert_close(
        posterior.log_prob(theta, torch.zeros(4, 2)), log_q, atol=1e-4, rtol=1e-4
    )
    lines = (tmp_path / "model" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["epoch", "step", "train_loss", "val_loss"]
    assert len(lines) == 1 + 2 * 3  # one train and one val row per epoch
    assert not (tmp_path / "model.checkpoints").exists() or not any(
        (tmp_path / "model.checkpoints").iterdir()
    )
    # New weights beside the old JSON (a save killed between its two renames) are refused,
    # though the architecture matches.
    torch.save({k: v + 1e-3 for k, v in state.items()}, tmp_path / "model" / "posterior.pt")
    with pytest.raises(ValueError, match="is not the file .* was saved with"):
        load_posterior(tmp_path / "model")


@pytest.mark.parametrize(
    ("task", "method", "flow", "embedding"),
    [
        ("two_moons", "npe", "nsf", "mlp"),  # 2 parameters
        ("slcp", "npe", "nsf", "mlp"),  # 5
        ("bernoulli_glm", "npe", "maf", "identity"),  # 10, x a vector of 10
        ("grf_cosmology_32", "npe", "nsf", "mlp"),  # 2, x a map
        ("bernoulli_glm", "nle", "maf", "auto"),  # nle has no embedding
        ("bernoulli_glm", "fmpe", "auto", "identity"),  # fmpe has no flow family
    ],
)
def test_auto_stands_for_a_flow_and_embedding_chosen_by_the_tasks_shapes(
    task, method, flow, embedding
):
    chosen = TrainConfig(method=method).for_task(get_task(task))
    assert (chosen.flow, chosen.embedding) == (flow, embedding)
    long = auto_embedding(10, (65,)), auto_embedding(10, (64,)), auto_embedding(10, (8, 8))
    assert long == ("mlp", "identity", "mlp")  # a long vector or a map goes through the MLP
    explicit = TrainConfig(flow="naf", embedding="mlp").for_task(get_task("bernoulli_glm"))
    assert (explicit.flow, explicit.embedding) == ("naf", "mlp")  # a choice made is kept


def test_a_model_trained_with_auto_records_what_it_stood_for(tmp_path):
    data = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("gaussian_linear", 300, 1, 300)
    simulation.run(plan, get_task("gaussian_linear"), data, SerialComm(), overwrite=False)
    metadata = train(data, tmp_path / "model", TrainConfig.from_dict({**TINY, "ensemble": 1}))
    assert (metadata["flow"], metadata["embedding"]) == ("maf", "identity")
    assert metadata["train_config"]["flow"] == "maf"
    posterior, document = load_posterior(tmp_path / "model")
    assert document["spec"]["flow"] == "maf" and document["spec"]["embedding"] == "identity"
    assert isinstance(posterior.members[0].embedding, Flatten)  # x itself


@pytest.mark.slow
def test_the_shipped_linear_conditioner_recovers_the_gaussian_linear_posterior(tmp_path):
    # config.yaml's gaussian_linear block: one MAF transform with no hidden layer, the exact
    # family of its posterior N(x / 2, 0.05 I).
    block = yaml.safe_load((ROOT / "config/config.yaml").read_text())["task_train"]
    options = {**block["gaussian_linear"], "ensemble": 1, "max_epochs": 60, "patience": 60}
    # A larger step annealed to zero converges within the 60 epochs.
    options |= {"learning_rate": 0.01, "batch_size": 128, "lr_schedule": "cosine"}
    assert options["flow_hidden"] == []
    data = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("gaussian_linear", 4000, 1, 1000)
    simulation.run(plan, get_task("gaussian_linear"), data, SerialComm(), overwrite=False)
    train(data, tmp_path / "model", TrainConfig.from_dict(options))
    posterior, document = load_posterior(tmp_path / "model")
    assert document["spec"]["flow_hidden"] == []
    linear = [m for m in posterior.members[0].flow.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1  # the conditioner is one (masked) linear map
    x = torch.full((1, 10), 0.6)
    with torch.no_grad():
        theta = posterior.sample_and_log_prob(x, 4000)[0][:, 0].numpy()
    # The prior's mean is 0 and its sd 0.32: an estimator that ignored x would miss the mean by
    # 0.3 and the sd by 41 %; training seeds 0-2 missed by at most 0.034 and 10 %.
    np.testing.assert_allclose(theta.mean(axis=0), 0.3, atol=0.1)
    np.testing.assert_allclose(theta.std(axis=0), np.sqrt(0.05), rtol=0.2)


def test_ensemble_trains_distinct_members_and_round_trips(data, tmp_path):
    metadata = train(data, tmp_path / "model", TrainConfig.from_dict({**TINY, "ensemble": 2}))
    assert metadata["ensemble"] == 2
    posterior, document = load_posterior(tmp_path / "model")
    assert len(posterior.members) == 2 and document["spec"]["ensemble"] == 2
    theta, x = torch.zeros(3, 2), torch.zeros(3, 2)
    with torch.no_grad():
        member_log_prob = posterior.member_log_prob(theta, x)
    assert not torch.allclose(member_log_prob[0], member_log_prob[1])


def test_same_seed_gives_identical_weights_on_cpu(data, tmp_path):
    config = TrainConfig.from_dict(TINY)
    train(data, tmp_path / "a", config)
    train(data, tmp_path / "b", config)
    a = torch.load(tmp_path / "a" / "posterior.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "posterior.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(data, tmp_path / "c", TrainConfig.from_dict({**TINY, "seed": 1}))
    c = torch.load(tmp_path / "c" / "posterior.pt", weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nonfinite_rows_are_excluded_and_reported(tmp_path):
    out = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("nan_two_moons", 1000, 1, 1000)
    simulation.run(plan, get_task("nan_two_moons"), out, SerialComm(), overwrite=False)
    bad = storage.read_simulations(out).attrs["num_nonfinite"]
    metadata = train(out, tmp_path / "model", TrainConfig.from_dict({**TINY, "max_epochs": 1}))
    assert metadata["num_nonfinite_excluded"] == bad > 0
    assert metadata["num_train"] + metadata["num_val"] == 1000 - bad
    assert np.isfinite(metadata["best_val_loss"])


def test_streamed_blocks_whose_every_row_is_nan_are_left_out(tmp_path):
    # Streamed in blocks of 100 rows, of which the first three are all NaN: the splits draw
    # whole blocks, so one of them would get a batch of no rows.
    out = tmp_path / "sims.h5"
    rng = np.random.default_rng(0)
    theta, x = rng.uniform(-1, 1, (2000, 2)), rng.normal(size=(2000, 2))
    x[:300] = np.nan
    storage.write_simulations(out, theta, x, {"task": "two_moons"}, overwrite=False)
    options = {**TINY, "loading": "stream", "batch_size": 100, "max_epochs": 2}
    metadata = train(out, tmp_path / "model", TrainConfig.from_dict(options))
    assert metadata["num_nonfinite_excluded"] == 300
    assert metadata["num_train"] + metadata["num_val"] == 1700
    assert np.isfinite(metadata["best_val_loss"])


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_extreme_rows_are_refused_by_name_before_training(tmp_path, loading):
    # Ten finite rows of 1e38 among 2000: z-scored with them, every other x would be ~0.
    out = tmp_path / "sims.h5"
    rng = np.random.default_rng(0)
    theta, x = rng.uniform(-1, 1, (2000, 2)), rng.normal(size=(2000, 2))
    x[1990:] = 1e38
    storage.write_simulations(out, theta, x, {"task": "two_moons"}, overwrite=False)
    options = {**TINY, "loading": loading, "batch_size": 100}
    where = r"row 199\d" if loading == "memory" else r"rows 1900-1999"
    with pytest.raises(ValueError, match=f"{where}.* more than 1e\\+06 robust standard dev"):
        train(out, tmp_path / "model", TrainConfig.from_dict(options))
    assert not (tmp_path / "model").exists()


def test_heavy_tailed_columns_are_not_outliers():
    from pipeline.data import Outliers

    rng = np.random.default_rng(1)
    theta, x = rng.uniform(size=(100_000, 2)), rng.standard_cauchy(size=(100_000, 3))
    x[:, 2] = 0.0  # a constant column has no spread to measure against: not checked
    assert Outliers(theta, x).rows(theta, x).size == 0


def test_all_nan_data_fail_before_training(tmp_path):
    out = tmp_path / "sims.h5"
    theta = np.zeros((10, 2))
    storage.write_simulations(
        out, theta, np.full((10, 2), np.nan), {"task": "two_moons"}, overwrite=False
    )
    with pytest.raises(ValueError, match="0 finite simulations cannot be split"):
        train(out, tmp_path / "model", TrainConfig.from_dict(TINY))


def test_an_observations_file_given_as_training_data_is_named(tmp_path):
    from pipeline import cli

    observations = tmp_path / "observations.h5"
    argv = ["observe", "--task", "two_moons", "--num-observations", "2", "--seed", "1"]
    assert cli.main([*argv, "--num-reference-samples", "10", "--out", str(observations)]) == 0
    with pytest.raises(ValueError, match=r"holds observations .* not simulations to train on"):
        train(observations, tmp_path / "model", TrainConfig.from_dict(TINY))


def test_a_models_file_given_for_its_folder_is_named(tmp_path):
    from pipeline.models.posterior import load_posterior

    weights = tmp_path / "model" / "posterior.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match=r"is a file; a model is the folder .*: give "):
        load_posterior(weights)


def test_data_of_the_wrong_shape_fail_before_training(tmp_path):
    out = tmp_path / "sims.h5"
    rng = np.random.default_rng(0)
    attrs = {"task": "two_moons"}
    storage.write_simulations(
        out, rng.normal(size=(50, 2)), rng.normal(size=(50, 3)), attrs, overwrite=False
    )
    with pytest.raises(
        ValueError, match=r"x \(3,\) do not match task 'two_moons', whose .* x \(2,\)"
    ):
        train(out, tmp_path / "model", TrainConfig.from_dict(TINY))


def test_checkpoints_of_another_config_are_refused(tmp_path):
    folder = tmp_path / "ckpt"
    check_checkpoints(folder, TrainConfig(), "abc", write=True)
    # Lightning's own launcher's count is not the run's: the processes that trained are.
    check_checkpoints(folder, TrainConfig(devices=2), "abc", write=True)
    # Another number of processes trains on other batches: refused, not resumed.
    with pytest.raises(ValueError, match=r"world size 1 \(nodes .* this run has 2: resume with 1"):
        check_checkpoints(folder, TrainConfig(), "abc", write=True, world_size=2)
    # A stamp written before it recorded the world size gains it.
    stamp = json.loads((folder / "identity.json").read_text())
    del stamp["world_size"]
    (folder / "identity.json").write_text(json.dumps(stamp))
    check_checkpoints(folder, TrainConfig(), "abc", write=True, world_size=2)
    assert json.loads((folder / "identity.json").read_text())["world_size"] == 2
    (folder / "identity.json").write_text(json.dumps(stamp))
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 -> 0.01"):
        check_checkpoints(folder, TrainConfig(learning_rate=0.01), "abc", write=True)
    with pytest.raises(ValueError, match="data_digest: 'abc' -> 'xyz'"):
        check_checkpoints(folder, TrainConfig(), "xyz", write=True)
    # The same stack trained with the loss normalised over a rounds' proposal is another run.
    with pytest.raises(ValueError, match="proposal: None -> 'f00d'"):
        check_checkpoints(folder, TrainConfig(), "abc", write=True, proposal="f00d")
    plain = default_checkpoint_dir(tmp_path / "model", TrainConfig(), "abc")
    assert default_checkpoint_dir(tmp_path / "model", TrainConfig(), "abc", "f00d") != plain
    # Memory and streaming split the rows differently: the loading chosen is part of the run.
    loaded = default_checkpoint_dir(tmp_path / "model", TrainConfig(loading="memory"), "abc")
    assert default_checkpoint_dir(tmp_path / "model", TrainConfig(loading="stream"), "abc") != (
        loaded
    )
    # A folder moved since it was stamped: Lightning would forget its best checkpoint.
    moved = tmp_path / "moved"
    folder.rename(moved)
    with pytest.raises(ValueError, match=r"was written at .*ckpt, and Lightning restores"):
        check_checkpoints(moved, TrainConfig(), "abc", write=True)


def test_data_simulated_again_is_other_data_to_checkpoints_and_searches():
    """The plan's digest stays when a file is simulated again with --overwrite (after a fix of
    the simulator): when it was written tells the files apart."""
    attrs = {"config_digest": "plan", "provenance": {"created": "2026-12-07T06:00:00+00:00"}}
    again = {**attrs, "provenance": {"created": "2026-12-07T07:00:00+00:00"}}
    assert storage.data_digest(attrs) == storage.data_digest(dict(attrs))
    assert storage.data_digest(again) != storage.data_digest(attrs)


def test_ranks_that_split_the_data_differently_are_refused():
    from pipeline.training import check_same_split

    check_same_split([("memory", 900, 100), ("memory", 900, 100)])
    with pytest.raises(RuntimeError, match=r"rank 1: stream, 896 training .* train.loading"):
        check_same_split([("memory", 900, 100), ("stream", 896, 104)])


def test_a_constant_feature_of_what_the_flow_models_is_refused(tmp_path):
    """A likelihood over x with a constant summary fits a spike there (its loss falls without
    bound); a posterior only conditions on it, which is harmless."""
    rng = np.random.default_rng(0)
    theta = rng.uniform(-1, 1, size=(600, 2))
    x = np.c_[theta + 0.3 * rng.normal(size=(600, 2)), np.zeros(600)]
    path = tmp_path / "sims.h5"
    attrs = {"task": "three_x", "parameter_names": ["theta_1", "theta_2"], "num_nonfinite": 0}
    storage.write_simulations(path, theta, x, attrs, overwrite=False)
    register("three_x", ThreeX)
    try:
        config = TrainConfig.from_dict({**TINY, "max_epochs": 1, "ensemble": 1})
        train(path, tmp_path / "npe", config, tmp_path / "npe-ckpt")
        embedding = ("embedding_dim", "embedding_hidden")
        nle = {k: v for k, v in TINY.items() if k not in embedding} | {"method": "nle"}
        nle = TrainConfig.from_dict({**nle, "max_epochs": 1, "ensemble": 1})
        with pytest.raises(ValueError, match=r"x feature\(s\) \[2\] take one value .* nle"):
            train(path, tmp_path / "nle", nle, tmp_path / "nle-ckpt")
    finally:
        TASKS.pop("three_x")


class ThreeX(TwoMoons):
    """two_moons' parameters with an x of three summaries (for the constant-feature test)."""

    name = "three_x"
    x_shape = (3,)


class PlateauState(pl.Callback):
    """The plateau scheduler's state (its best loss, bad epochs, learning rate) at the start of
    each epoch; with ``crash_at``, the run dies there, as a killed process would."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.states: dict[int, tuple[float, int, float]] = {}
        self.crash_at = crash_at

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        lr = scheduler.optimizer.param_groups[0]["lr"]
        self.states[trainer.current_epoch] = (scheduler.best, scheduler.num_bad_epochs, lr)
        if trainer.current_epoch == self.crash_at:
            raise RuntimeError("killed")


def test_a_resumed_run_takes_the_plateau_step_of_the_epoch_it_resumes_after(data, tmp_path):
    # Learning rate 0.03: the loss stalls and the step halves at epoch 20 of 30 (one flow).
    options = {**TINY, "max_epochs": 30, "patience": 30, "learning_rate": 0.03, "ensemble": 1}
    config = TrainConfig.from_dict(options)
    whole = PlateauState()
    train(data, tmp_path / "whole", config, tmp_path / "whole-ckpt", callbacks=[whole])
    with pytest.raises(RuntimeError, match="killed"):
        train(data, tmp_path / "part", config, tmp_path / "ckpt", [PlateauState(crash_at=20)])
    resumed = PlateauState()
    train(data, tmp_path / "part", config, tmp_path / "ckpt", callbacks=[resumed])
    first = min(resumed.states)  # the epoch after the last checkpoint's
    assert 0 < first <= 20
    assert resumed.states[first] == whole.states[first]
    assert min(lr for _, _, lr in whole.states.values()) < 0.03  # the step did halve it
    weights = [torch.load(tmp_path / run / "posterior.pt") for run in ("whole", "part")]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


LONG = {"max_epochs": 120, "patience": 120}  # ~10 s: long enough to be killed midway
# Each estimator family's options over TINY, with the options it has not (fmpe: transforms;
# nle: the embedding's) back at their defaults.
METHOD_OPTIONS = {
    "npe": {},
    "fmpe": {"method": "fmpe", "transforms": 3},
    "nle": {"method": "nle", "embedding_dim": 32, "embedding_hidden": [64, 64]},
}
# Runs a kill must not change: each family, and NPE with the penalty's seeded draws.
RUN_OPTIONS = {**METHOD_OPTIONS, "npe-calibrated": {"calibration": 5.0}}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Weights of a run of LONG that nothing interrupts, per method (each trained once)."""
    weights = {}

    def of(method: str) -> dict[str, torch.Tensor]:
        if method not in weights:
            folder = tmp_path_factory.mktemp(f"uninterrupted-{method}")
            command = _train_command(folder, data, {**LONG, **RUN_OPTIONS[method]})
            subprocess.run(
                command, check=True, env=run_env(), timeout=600, stderr=subprocess.DEVNULL
            )
            weights[method] = torch.load(folder / "model" / "posterior.pt", weights_only=True)
        return weights[method]

    return of


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "kill"),
    [
        ("npe", signal.SIGTERM),
        ("npe", signal.SIGKILL),
        ("fmpe", signal.SIGKILL),
        ("nle", signal.SIGKILL),
        ("npe-calibrated", signal.SIGKILL),
    ],
)
def test_killed_training_resumes_to_the_uninterrupted_weights(
    data, tmp_path, method, kill, uninterrupted
):
    options = {**LONG, **RUN_OPTIONS[method]}
    ckpt = tmp_path / "ckpt"
    command = [*_train_command(tmp_path, data, options), "--checkpoint-dir", str(ckpt)]
    process = subprocess.Popen(command, env=run_env(), stderr=subprocess.DEVNULL)
    # Signalled once the log shows epoch 5 done (checkpoints of earlier epochs written): a point
    # every machine reaches, far from the end of LONG's epochs.
    log = tmp_path / "train.log"
    deadline = time.monotonic() + 300  # a bound for a stuck run, not a timing assumption
    while not (log.exists() and f"epoch 5/{LONG['max_epochs']}" in log.read_text()):
        assert process.poll() is None, "training ended before epoch 5 was logged"
        assert time.monotonic() < deadline, "epoch 5 not logged in 5 minutes"
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be signalled"
    process.send_signal(kill)
    process.wait(timeout=120)
    # Not 0 (Lightning's own exit status on SIGTERM): a scheduler must see a failed job.
    assert process.returncode in (128 + signal.SIGTERM, -signal.SIGKILL), process.returncode
    assert (ckpt / "last.ckpt").exists() and not (tmp_path / "model" / "posterior.pt").exists()
    subprocess.run(command, check=True, env=run_env(), timeout=600, stderr=subprocess.DEVNULL)
    assert "resuming from" in (tmp_path / "train.log").read_text()
    document = json.loads((tmp_path / "model" / "posterior.json").read_text())
    assert document["epochs"] == LONG["max_epochs"]
    epochs = [
        line.split(",")[0]
        for line in (tmp_path / "model" / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert epochs[0] == "0" and epochs[-1] == str(LONG["max_epochs"] - 1)  # history kept
    assert not ckpt.exists()
    # Each epoch's batches (and FMPE's draws) depend on (seed, epoch, step) alone: resuming
    # changes nothing (CPU).
    resumed = torch.load(tmp_path / "model" / "posterior.pt", weights_only=True)
    expected = uninterrupted(method)
    assert all(torch.equal(resumed[k], expected[k]) for k in resumed)


def test_schedules_clipping_and_streaming_train(data, tmp_path):
    options = {**TINY, "lr_schedule": "cosine", "gradient_clip": 1.0, "loading": "stream"}
    metadata = train(data, tmp_path / "model", TrainConfig.from_dict(options))
    assert metadata["loading"] == "stream" and np.isfinite(metadata["best_val_loss"])
    metadata = train(
        data, tmp_path / "constant", TrainConfig.from_dict({**TINY, "lr_schedule": "constant"})
    )
    assert metadata["loading"] == "memory"  # auto: 800 rows fit
    # Clipping changes the weights; same seed without it gives others.
    clipped = torch.load(tmp_path / "model" / "posterior.pt", weights_only=True)
    train(data, tmp_path / "plain", TrainConfig.from_dict({**options, "gradient_clip": 0.0}))
    plain = torch.load(tmp_path / "plain" / "posterior.pt", weights_only=True)
    assert not all(torch.equal(clipped[k], plain[k]) for k in clipped)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "bf16-mixed"}, "precision 'bf16-mixed' needs a GPU"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of 'plateau', 'cosine', 'constant'"),
        ({"loading": "disk"}, "loading must be one of 'auto', 'memory', 'stream'"),
        ({"gradient_clip": -1}, "gradient_clip must be at least 0, got -1"),
        ({"max_epochs": "3"}, r"max_epochs must be an integer, got '3' \(default: 200\)"),
        ({"compile": "no"}, "compile must be true or false, got 'no'"),
        ({"flow_hidden": 64}, "flow_hidden must be a list of integers, got 64"),
        ({"method": "nre"}, "method must be one of 'npe', 'fmpe', 'nle', got 'nre'"),
        ({"method": "nle", "embedding": "identity"}, "method nle has no embedding \\(nle's flow"),
        ({"method": "nle", "embedding_dim": 8}, "method nle has no embedding_dim"),
        ({"method": "fmpe", "flow": "maf"}, "method fmpe has no flow \\(options of npe's"),
        ({"method": "fmpe", "transforms": 5}, "method fmpe has no transforms"),
        ({"method": "fmpe", "compile": True}, "compile is not available with method fmpe"),
        ({"method": "fmpe", "flow_hidden": []}, "fmpe's vector field needs at least one hidden"),
        ({"embedding": "cnn", "embedding_hidden": []}, "embedding cnn takes its stages' channels"),
        (
            {"time_features": 8},
            r"method npe has no time_features \(an option of fmpe's vector field\): leave them "
            "at their defaults or set method: fmpe",
        ),
        ({"method": "nle", "time_features": 8}, "method nle has no time_features"),
        (
            {"method": "nle", "proposal_draws": 4},
            "method nle has no proposal_draws \\(a likelihood does not depend on the proposal",
        ),
        ({"method": "fmpe", "proposal_draws": 0}, "method fmpe has no proposal_draws"),
        ({"method": "nle", "proposal_rows": 8}, "method nle has no proposal_rows"),
    ],
)
def test_bad_training_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(options)


def test_embedding_options_that_x_itself_does_not_use_are_logged(caplog):
    from pipeline.tasks import get_task
    from pipeline.training import warn_unused_embedding_options

    task = get_task("gaussian_linear")  # ten parameters: auto sees x itself
    config = TrainConfig.from_dict({"embedding_dim": 64}).for_task(task)
    assert config.embedding == "identity"
    warn_unused_embedding_options(config, task)
    assert "embedding_dim unused: task gaussian_linear's posterior sees x itself" in caplog.text
    caplog.clear()
    warn_unused_embedding_options(TrainConfig().for_task(task), task)
    assert "unused" not in caplog.text


@pytest.mark.slow
def test_compiled_training_matches_eager(data, tmp_path):
    # torch.compile reorders float operations: equal to rounding, not bit for bit.
    options = {**TINY, "max_epochs": 1}
    eager = train(data, tmp_path / "eager", TrainConfig.from_dict(options))
    compiled = train(
        data, tmp_path / "compiled", TrainConfig.from_dict({**options, "compile": True})
    )
    assert compiled["best_val_loss"] == pytest.approx(eager["best_val_loss"], abs=1e-3)


def _train_command(tmp_path, data, options, launcher=()):
    """``pipeline train`` on ``data`` with TINY updated by ``options``, under ``launcher``."""
    return [
        *launcher,
        tool("pipeline"),
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "model"),
        "--options",
        json.dumps({**TINY, **options}),
        "--log",
        str(tmp_path / "train.log"),
    ]


@pytest.mark.slow
def test_ddp_with_lightning_launcher(tmp_path, data):
    command = [*_train_command(tmp_path, data, {"max_epochs": 2}), "--devices", "2"]
    subprocess.run(command, check=True, env=run_env(), timeout=600)
    document = json.loads((tmp_path / "model" / "posterior.json").read_text())
    assert document["world_size"] == 2 and document["launcher"] == "lightning"
    assert document["effective_batch_size"] == 2 * TINY["batch_size"]


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_ddp_under_mpiexec(tmp_path, data, method):
    options = {"max_epochs": 2, **METHOD_OPTIONS[method]}
    command = _train_command(tmp_path, data, options, [tool("mpiexec"), "-n", "2"])
    subprocess.run(command, check=True, env=run_env(), timeout=600)
    document = json.loads((tmp_path / "model" / "posterior.json").read_text())
    assert document["world_size"] == 2 and document["launcher"] == "mpi"
    assert document["method"] == document["spec"]["method"] == method


@pytest.mark.slow
def test_ddp_under_torchrun(tmp_path, data):
    launcher = [tool("torchrun"), "--nproc_per_node", "2", "--master_port", "29517"]
    command = _train_command(tmp_path, data, {"max_epochs": 2}, launcher)
    command[command.index("--log")] = "--log-file"  # torchrun takes --log for its --log-dir
    subprocess.run(command, check=True, env=run_env(), timeout=600)
    document = json.loads((tmp_path / "model" / "posterior.json").read_text())
    assert document["world_size"] == 2 and document["launcher"] == "torchrun"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_NNODES": "2"},
            "SLURM runs 3 tasks on 2 nodes: set --ntasks-per-node",
        ),
        (
            {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "3"},
            "3 processes cannot be spread evenly with 2 per node; set `torchrun --nproc_per_node`",
        ),
    ],
)
def test_inconsistent_launcher_layout_names_the_setting(monkeypatch, env, message):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "PMI", "OMPI_", "MPI_LOCAL", "TORCHELASTIC")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        launch_layout(1)


def test_launcher_layouts_come_from_the_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "PMI", "OMPI_", "MPI_LOCAL", "TORCHELASTIC")):
            monkeypatch.delenv(name)
    assert launch_layout(2) == Layout(2, 1, "lightning")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    assert launch_layout(1) == Layout(4, 2, "slurm")


def test_a_diverged_training_saves_nothing_and_fails_naming_the_fix(data, tmp_path, capsys):
    """learning_rate 1e9 turns the weights to NaN within an epoch: the run must fail (exit 2),
    say what to change, and leave no posterior that looks trained."""
    from pipeline import cli

    options = json.dumps({**TINY, "learning_rate": 1e9})
    out = tmp_path / "model"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--options", options]) == 2
    message = capsys.readouterr().err
    assert "training diverged: best validation loss" in message
    assert "weight tensors hold NaN or inf; no model was saved" in message
    assert "Lower learning_rate (now 1e+09), set gradient_clip" in message
    assert not (out / "posterior.pt").exists() and not (out / "posterior.json").exists()


def test_a_constant_column_keeps_unit_scale_and_the_moments_are_exact():
    from pipeline.data import Moments

    rng = np.random.default_rng(0)
    rows = np.column_stack([np.full(1000, 0.7, np.float32), rng.normal(5.0, 2.0, 1000)])
    moments = Moments()
    moments.add(rows)  # sum_sq - n mean^2 left a deviation of 1e-7 here
    mean, std = moments.mean_std()
    # The constant sums to exactly zero about the first row: no rounding residue to scale by.
    assert std[0] == 0 and mean[0] == np.float32(0.7)
    np.testing.assert_allclose(mean[1], rows[:, 1].mean(), rtol=1e-6)
    np.testing.assert_allclose(std[1], rows[:, 1].std(ddof=1), rtol=1e-6)
