"""Neural likelihood estimation: the batched ensemble sampler, the likelihood-times-prior
posterior, and the sample stage's handling of chains that do not converge."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.ensemble import EnsembleSettings, diagnostics, initial_walkers, sample_ensemble
from pipeline.models.posterior import (
    NeuralPosterior,
    PosteriorSpec,
    load_posterior,
    save_posterior,
)
from pipeline.sampling import sample_posterior
from pipeline.tasks.base import prior_document, prior_from_document

SETTINGS = EnsembleSettings()
BOX = {"kind": "BoxUniform", "low": [-1.0, -1.0], "high": [1.0, 1.0]}
SPEC = PosteriorSpec(
    parameter_names=("a", "b"),
    x_shape=(3,),
    flow="nsf",
    transforms=1,
    flow_hidden=(16,),
    low=(-1.0, -1.0),
    high=(1.0, 1.0),
    method="nle",
    extra={"prior": BOX},
)


def gaussians(mean: torch.Tensor, scale: torch.Tensor):
    """Log-densities of N Gaussians, one per observation: walkers (n, W, D) of ``rows``."""

    def log_prob(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z = (theta - mean[rows][:, None]) / scale[rows][:, None, None]
        return -0.5 * z.square().sum(-1)

    return log_prob


def test_the_ensemble_sampler_draws_every_observations_own_target():
    torch.manual_seed(0)
    mean = torch.tensor([[0.0, 0.0, 0.0], [3.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
    scale = torch.tensor([1.0, 0.1, 2.0])
    candidates = torch.rand(3, 4096, 3) * 20 - 10
    result = sample_ensemble(gaussians(mean, scale), candidates, 2000, EnsembleSettings())
    assert result.samples.shape == (3, 2000, 3) and result.converged.all()
    assert (result.rhat < 1.05).all() and (result.ess >= 200).all()
    # ESS >= 200 per parameter: the mean's standard error is under 0.07 scale; 0.25 is 3.5 of
    # them. The standard deviation's relative error is about 1 / sqrt(2 ESS) = 5%; 15% is 3.
    z = (result.samples.mean(1) - mean.numpy()) / scale.numpy()[:, None]
    assert np.abs(z).max() < 0.25
    ratio = result.samples.std(1) / scale.numpy()[:, None]
    assert np.abs(ratio - 1).max() < 0.15
    # The stored log-densities are the target's at the samples.
    rows = torch.arange(3)
    expected = gaussians(mean, scale)(torch.as_tensor(result.samples), rows)
    np.testing.assert_allclose(result.log_prob, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_few_observations_asking_for_many_draws_get_larger_ensembles():
    settings = EnsembleSettings()
    # A truncate stage: 10^5 draws at one observation. Burn-in (300 steps) may cost a third of
    # the kept steps' 10^6 evaluations: 1111 walkers, rounded down to a multiple of 8.
    assert settings.sized(1, 100_000).walkers == 1104
    assert settings.sized(1, 100_000).candidates == 32 * 1104
    assert settings.sized(5, 10_000).walkers == 104  # five observations' 10^4 draws
    assert settings.sized(256, 1000).walkers == 32  # a test set: never fewer than 32
    assert settings.sized(1, 10**8).walkers == 2048  # at most 2048 stepped together
    assert settings.sized(4, 10**8).walkers == 512
    assert EnsembleSettings(walkers=16).sized(1, 100_000).walkers == 16  # as asked
    assert EnsembleSettings(candidates=4096).sized(1, 100_000).walkers == 128  # 32 per walker


def test_a_large_ensemble_draws_its_target():
    torch.manual_seed(0)
    mean, scale = torch.tensor([[3.0, 1.0, -1.0]]), torch.tensor([0.1])
    candidates = torch.rand(1, 8192, 3) * 20 - 10
    result = sample_ensemble(gaussians(mean, scale), candidates, 30_000, EnsembleSettings())
    # 30000 draws would afford 333 walkers; 8192 candidates hold 32 each for 256.
    assert result.walkers[0] == 256 and result.converged[0]
    assert result.samples.shape == (1, 30_000, 3)
    # ESS >= 3000 per parameter (10% of the draws): the mean's standard error is under 0.02
    # scale, so 0.1 is 5 of them; the standard deviation's relative error about 1.3%, 6% is 4.6.
    z = (result.samples[0].mean(0) - mean[0].numpy()) / 0.1
    assert np.abs(z).max() < 0.1
    assert np.abs(result.samples[0].std(0) / 0.1 - 1).max() < 0.06


def test_a_support_asked_only_of_accepted_moves_gives_the_draws_of_a_target_zero_outside():
    mean, scale = torch.tensor([[0.5, 0.0]]), torch.tensor([1.0])

    def inside(theta: torch.Tensor) -> torch.Tensor:
        asked.append(len(theta))
        return theta[:, 0] > 0

    def zero_outside(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        log_prob = gaussians(mean, scale)(theta, rows)
        return torch.where(theta[..., 0] > 0, log_prob, -torch.inf)

    candidates = torch.rand(1, 1024, 2) * 2
    settings = EnsembleSettings(burn_in=50, thin=2)
    asked: list[int] = []
    torch.manual_seed(0)
    lazy = sample_ensemble(gaussians(mean, scale), candidates, 2000, settings, inside)
    torch.manual_seed(0)
    eager = sample_ensemble(zero_outside, candidates, 2000, settings)
    np.testing.assert_array_equal(lazy.samples, eager.samples)
    assert (lazy.samples[..., 0] > 0).all()
    # 32 walkers of 2 halves over 50 + 63 * 2 steps: the support saw only the accepted moves.
    assert 0 < sum(asked) < 0.8 * 32 * (50 + 63 * 2)


def test_the_ensemble_sampler_logs_its_steps_with_rate_and_eta(caplog):
    torch.manual_seed(0)
    settings = EnsembleSettings(burn_in=20, thin=2, candidates=64)
    with caplog.at_level("INFO", logger="pipeline.ensemble"):
        sample_ensemble(
            gaussians(torch.zeros(1, 2), torch.ones(1)), torch.randn(1, 64, 2), 64, settings
        )
    # 20 burn-in steps, then 10 draws per walker (the floor) of 2 steps each.
    assert "40/40 MCMC steps (100%)" in caplog.text and "ETA" in caplog.text


def test_chains_short_only_of_ess_keep_every_other_draw_when_extended(caplog):
    torch.manual_seed(0)
    mean, scale = torch.zeros(1, 6), torch.tensor([1.0])
    candidates = torch.randn(1, 1024, 6)
    # Burn-in from draws of the target itself, so R-hat passes at once; at a thinning of 1 the
    # 100 draws per walker hold an ESS under 10 % of the 3200 draws.
    settings = EnsembleSettings(burn_in=100, thin=1)
    with caplog.at_level("INFO", logger="pipeline.ensemble"):
        result = sample_ensemble(gaussians(mean, scale), candidates, 3200, settings)
    assert "extending them with thinning 2, keeping every other draw" in caplog.text
    # 50 draws kept of the first pool, 50 new ones 2 steps apart.
    assert "100/100 MCMC steps of extension 1 (100%)" in caplog.text
    assert result.converged[0] and result.thin[0] >= 2
    # ESS >= 320 per parameter: the mean's standard error is under 0.056, so 0.25 is 4.5 of
    # them; the standard deviation's relative error about 1 / sqrt(2 ESS) = 4 %, 15 % is 3.8.
    assert np.abs(result.samples[0].mean(0)).max() < 0.25
    assert np.abs(result.samples[0].std(0) - 1).max() < 0.15


def test_chains_that_cannot_converge_are_flagged_not_called_converged():
    torch.manual_seed(0)
    mean, scale = torch.zeros(1, 4), torch.tensor([0.01])
    # Started far out, with no burn-in, a thinning of 1 and no extension: the chains are still
    # travelling towards the target while the pool is kept.
    candidates = torch.rand(1, 64, 4) * 5 + 5
    settings = EnsembleSettings(burn_in=0, thin=1, max_extensions=0, candidates=64)
    result = sample_ensemble(gaussians(mean, scale), candidates, 256, settings)
    assert not result.converged[0] and result.rhat[0] > 1.05


def test_initial_walkers_refuse_an_observation_of_zero_likelihood():
    def log_prob(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        values = -theta.square().sum(-1)
        values[rows == 1] = -torch.inf
        return values

    with pytest.raises(ValueError, match=r"observations \[1\] have a finite likelihood at fewer"):
        initial_walkers(log_prob, torch.randn(2, 100, 2), 32)


def test_every_prior_round_trips_through_its_document():
    from pipeline.tasks import get_task

    rng = np.random.default_rng(0)
    for name in ("two_moons", "gaussian_linear", "bernoulli_glm"):  # box, diagonal, full normal
        prior = get_task(name).prior
        # Sampled first: the full normal then caches its factors beside its fields.
        theta = prior.sample(10, rng)
        copy = prior_from_document(json.loads(json.dumps(prior_document(prior))))
        np.testing.assert_allclose(copy.log_prob(theta), prior.log_prob(theta))
    with pytest.raises(ValueError, match="unknown prior 'Cauchy'"):
        prior_from_document({"kind": "Cauchy"})


def test_an_nle_posterior_is_likelihood_times_prior_and_saves_with_weights_only(tmp_path):
    torch.manual_seed(0)
    posterior = NeuralPosterior(SPEC, theta_std=torch.tensor([0.1, 0.1])).eval()
    theta = torch.tensor([[0.5, -0.5], [2.0, 0.0]])  # the second is outside the prior's box
    x = torch.randn(2, 3)
    with torch.no_grad():
        log_q = posterior.log_prob(theta, x)
        likelihood = -posterior.validation_loss(theta, x)
    assert torch.isclose(log_q[0], likelihood[0] - np.log(4.0))  # box of area 4
    assert log_q[1] == -torch.inf and torch.isfinite(likelihood[1])
    save_posterior(posterior, tmp_path, {"task": "test"})
    loaded, document = load_posterior(tmp_path)  # torch.load(..., weights_only=True)
    assert document["spec"]["extra"]["prior"] == BOX and loaded.is_likelihood
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(theta, x), log_q)
    with pytest.raises(TypeError, match="sampled by MCMC"):
        loaded.sample_and_log_prob(x, 10)


@pytest.mark.slow
def test_nle_samples_follow_the_likelihood_times_prior_on_a_grid():
    """The MCMC's draws against the exact posterior of the same (untrained) network, on a grid
    over the prior's box: every transpose, standardisation and the prior must be right."""
    torch.manual_seed(1)
    posterior = NeuralPosterior(SPEC, theta_std=torch.tensor([0.2, 0.2])).eval()
    x = torch.randn(2, 3) * 2
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 201)] * 2, indexing="ij"), -1)
    grid = grid.reshape(-1, 1, 2).expand(-1, 2, 2)  # (G, N, D): every point at both x
    with torch.no_grad():
        weights = torch.softmax(posterior.log_prob(grid, x), dim=0)  # (G, N)
    exact_mean = (weights[..., None] * grid).sum(0).numpy()
    exact_std = ((weights[..., None] * grid.square()).sum(0).numpy() - exact_mean**2) ** 0.5
    torch.manual_seed(2)
    result = sample_posterior(posterior, x.numpy(), 4000)
    assert result.mcmc["converged"].all() and result.sampled.all()
    # ESS >= 400 (10% of 4000): the mean's standard error is at most 0.05 std; 0.25 is 5.
    z = (result.samples.mean(1) - exact_mean) / exact_std
    assert np.abs(z).max() < 0.25, (result.samples.mean(1), exact_mean)
    assert np.abs(result.samples.std(1) / exact_std - 1).max() < 0.15
    assert (np.abs(result.samples) <= 1).all()


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(0)
    posterior = NeuralPosterior(SPEC, theta_std=torch.tensor([0.2, 0.2]))
    folder = tmp_path / "model"
    save_posterior(posterior, folder, {"task": "custom", "provenance": {}})
    return folder


def sample_cli(model, observations, out, *, iid: bool = False, **options) -> int:
    flags = ["--iid"] if iid else []
    return cli.main(
        [
            "sample",
            "--model",
            str(model),
            "--observations",
            str(observations),
            "--out",
            str(out),
            "--options",
            json.dumps({"num_samples": 200, **options}),
            *flags,
        ]
    )


def test_independent_observations_are_combined_in_calls_of_bounded_size(monkeypatch):
    """Every walker at every observation in one call grew with their product (1024 starting
    walkers at 8000 observations took 7.5 GB and the process was killed): the likelihood is
    summed over slices of the observations, to the same value."""
    import pipeline.models.posterior as posterior_module

    torch.manual_seed(0)
    posterior = NeuralPosterior(SPEC, theta_std=torch.tensor([0.2, 0.2])).eval()
    theta, x = torch.rand(64, 2) - 0.5, torch.randn(300, 3)
    with torch.no_grad():
        whole = posterior.iid_log_prob(theta, x)
        sizes = []
        real = posterior._mixture_log_prob

        def recorded(rows, part):
            sizes.append(rows.shape[:-1].numel())
            return real(rows, part)

        monkeypatch.setattr(posterior, "_mixture_log_prob", recorded)
        monkeypatch.setattr(posterior_module, "IID_PAIRS", 64 * 50)
        sliced = posterior.iid_log_prob(theta, x)
    assert max(sizes) <= 64 * 50 and len(sizes) == 6  # 300 observations, 50 at a time
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-3)


def test_a_pool_with_a_walker_that_never_moved_is_not_converged():
    """Four of 32 walkers frozen at +3 sd (12.5 % of the draws) passed R-hat over four groups
    in 86 % of pools: one frozen walker marks its observation not converged."""
    pool = np.random.default_rng(0).normal(size=(2, 32, 40, 2))
    pool[1, 5] = 3.0  # every draw of one walker at one point
    rhat, ess = diagnostics(pool)
    assert rhat[0] < 1.1 and rhat[1] == np.inf
    assert ess[1] > 0  # the pool is otherwise fine: it is the stuck walker that fails it


def test_the_sample_stage_records_each_observations_chain_diagnostics(tmp_path, model):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3, 3)).astype("f4"))
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "samples.h5") == 0
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["samples"].shape == (3, 200, 2)
        assert f["mcmc_converged"][...].all() and (f["mcmc_rhat"][...] < 1.05).all()
        assert f["mcmc_ess"].shape == (3,) and f.attrs["method"] == "nle"
        # 200 draws per observation: the burn-in would outweigh the kept steps of more walkers.
        assert (f["mcmc_walkers"][...] == 32).all()
        assert json.loads(f.attrs["mcmc"])["walkers"] is None  # the stage's choice


def test_the_sample_stage_runs_the_walkers_the_options_ask_for(tmp_path, model):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(1, 3)).astype("f4"))
    options = {"mcmc_walkers": 16, "num_samples": 5000}
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "samples.h5", **options) == 0
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["samples"].shape == (1, 5000, 2) and f["mcmc_walkers"][0] == 16


def test_unconverged_chains_at_an_observation_are_an_error_naming_the_fix(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(2, 3)).astype("f4"))
    starved = {"mcmc_burn_in": 0, "mcmc_thin": 1, "mcmc_extensions": 0, "mcmc_walkers": 8}
    code = sample_cli(model, tmp_path / "x.npy", tmp_path / "samples.h5", **starved)
    error = capsys.readouterr().err
    assert code != 0 and "did not converge" in error and "raise mcmc_thin" in error, error
    assert not (tmp_path / "samples.h5").exists()


def test_an_odd_number_of_walkers_is_refused(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 3), dtype="f4"))
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "s.h5", mcmc_walkers=9) != 0
    assert "mcmc_walkers must be even" in capsys.readouterr().err


def test_a_task_whose_x_is_not_a_vector_cannot_train_nle():
    from pipeline.options import OptionsError
    from pipeline.tasks import get_task
    from pipeline.training import TrainConfig, _spec

    with pytest.raises(OptionsError, match=r"method nle models x itself, which must be a vector"):
        _spec(TrainConfig(method="nle"), get_task("grf_cosmology"))


class RightOfBox:
    """The region a > 0.3 of the box (35 % of its mass), as a round's truncated prior."""

    def accepts(self, theta: np.ndarray) -> np.ndarray:
        return theta[:, 0] > 0.3

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform((0.3, -1.0), (1.0, 1.0), size=(n, 2))


def test_samples_of_nle_restricted_to_a_region_are_its_posterior_inside_the_region():
    """MCMC on the posterior restricted to a round's region draws what the unrestricted
    posterior's draws inside the region are: nothing is rejected."""
    torch.manual_seed(0)
    posterior = NeuralPosterior(SPEC).eval()
    x = np.full((1, 3), 0.5, "f4")
    region = RightOfBox()
    torch.manual_seed(1)
    inside = sample_posterior(posterior, x, 8000, region=region)
    torch.manual_seed(2)
    free = sample_posterior(posterior, x, 8000)
    assert inside.sampled.all() and region.accepts(inside.samples.reshape(-1, 2)).all()
    kept = free.samples[0][region.accepts(free.samples[0])]
    # Chains keep an ESS of at least 10 % (800 draws; the restricted ones ~2800 in the region):
    # the means' standard errors are under 0.6 / sqrt(800) = 0.021 each, so their difference's
    # is under 0.03, and 0.1 is more than 3 of them.
    np.testing.assert_allclose(inside.samples[0].mean(0), kept.mean(0), atol=0.1)
    np.testing.assert_allclose(inside.samples[0].std(0), kept.std(0), atol=0.1)


def test_a_region_that_no_prior_draw_reaches_stops_nle_naming_the_quantile():
    """The chains start from the truncated prior's draws, so a region too small to draw them
    from stops as the next round's simulations would, naming the option to change."""
    from pipeline.rounds.records import Truncation, TruncationError
    from pipeline.rounds.region import TruncatedPrior

    posterior = NeuralPosterior(SPEC).eval()
    x_obs = np.zeros(3, "f4")
    empty = Truncation(
        task="test",
        threshold=float("inf"),
        quantile=1e-4,
        prior_mass=0.01,
        num_draws=10**5,
        num_prior_draws=10**5,
        min_prior_mass=1e-3,
        model_digest="0" * 16,
        observation={"file": "0" * 16, "index": 0, "selected_index": 0},
        x_obs=x_obs.tolist(),
    )
    region = TruncatedPrior(prior_from_document(BOX), [posterior], x_obs, empty)
    with pytest.raises(TruncationError, match=r"0 of \d+ prior draws .* rounds.quantile"):
        sample_posterior(posterior, x_obs[None], 10, region=region)


@pytest.fixture
def first_chain_fails(monkeypatch):
    import pipeline.sampling as sampling

    real = sampling.sample_ensemble

    def first_fails(*args, **kwargs):
        result = real(*args, **kwargs)
        result.converged[0] = False
        return result

    monkeypatch.setattr(sampling, "sample_ensemble", first_fails)


def _with_theta(path, **attrs):
    with h5py.File(path, "w") as f:
        f["theta"] = np.zeros((3, 2), "f4")
        f["x"] = np.random.default_rng(0).normal(size=(3, 3)).astype("f4")
        f.attrs.update(attrs)
    return path


def test_unconverged_test_simulations_are_left_out_and_counted(tmp_path, model, first_chain_fails):
    """In a test set, an observation whose chains fail is left out of coverage and counted (one
    hard posterior must not fail the thousand others); in observations it is an error (above)."""
    test = _with_theta(tmp_path / "test.h5", num_simulations=3)
    assert sample_cli(model, test, tmp_path / "samples.h5") == 0
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f["samples"].shape == (2, 200, 2) and f.attrs["num_unconverged_excluded"] == 1
        assert json.loads(f.attrs["observation_index"]) == [1, 2]
        assert f.attrs["sampled"] == "simulations"  # what validate takes as a test set


def test_unconverged_chains_at_synthetic_observations_are_an_error(
    tmp_path, model, first_chain_fails, capsys
):
    """``pipeline observe``'s files hold the true theta too, but they are the observations a
    user reads the posterior of, not a test set: an unconverged one fails the stage."""
    observed = _with_theta(tmp_path / "observations.h5", num_reference_samples=0)
    assert sample_cli(model, observed, tmp_path / "samples.h5") != 0
    assert "observations 0 (R-hat" in capsys.readouterr().err
    assert not (tmp_path / "samples.h5").exists()
    # Named by its row in the file, not among the rows sampled (row 0's NaN is not sampled).
    with h5py.File(observed, "a") as f:
        f["x"][0] = np.nan
    assert sample_cli(model, observed, tmp_path / "samples.h5") != 0
    assert "observations 1 (R-hat" in capsys.readouterr().err


@pytest.mark.slow
def test_independent_observations_combine_into_one_posterior_on_a_grid():
    """``--iid``: the rows are observations of one theta, whose posterior is the product of
    their likelihoods and the prior; MCMC against the grid of the same product."""
    torch.manual_seed(1)
    posterior = NeuralPosterior(SPEC, theta_std=torch.tensor([0.2, 0.2])).eval()
    x = torch.randn(6, 3)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 201)] * 2, indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    with torch.no_grad():
        weights = torch.softmax(posterior.iid_log_prob(grid, x), dim=0)[:, None]  # (G, 1)
        one = posterior.log_prob(grid[:, None], x[:1])[:, 0]
        torch.testing.assert_close(posterior.iid_log_prob(grid, x[:1]), one)
    exact_mean = (weights * grid).sum(0).numpy()
    exact_std = ((weights * grid.square()).sum(0).numpy() - exact_mean**2) ** 0.5
    torch.manual_seed(2)
    result = sample_posterior(posterior, x.numpy(), 4000, iid=True)
    assert result.samples.shape == (1, 4000, 2) and result.mcmc["converged"].all()
    # As for one observation above: 0.25 standard deviations is 5 standard errors of the mean.
    assert np.abs((result.samples[0].mean(0) - exact_mean) / exact_std).max() < 0.25
    assert np.abs(result.samples[0].std(0) / exact_std - 1).max() < 0.15


def test_the_iid_sample_stage_writes_one_posterior_and_refuses_what_it_cannot_combine(
    tmp_path, model, capsys
):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(4, 3)).astype("f4"))
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "s.h5", iid=True) == 0
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["samples"].shape == (1, 200, 2) and f["x"].shape == (1, 4, 3)
        assert f.attrs["iid"] == 4
        assert json.loads(f.attrs["observation_index"]) == [0, 1, 2, 3]
        assert f.attrs["sampled"] == "observations"
    with h5py.File(tmp_path / "test.h5", "w") as f:
        f["theta"], f["x"] = rng.normal(size=(4, 2)).astype("f4"), rng.normal(size=(4, 3))
    assert sample_cli(model, tmp_path / "test.h5", tmp_path / "t.h5", iid=True) != 0
    assert "have different true theta" in capsys.readouterr().err
    # A data set that cannot be read is not dropped from the one posterior of all of them.
    x = rng.normal(size=(4, 3)).astype("f4")
    x[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert sample_cli(model, tmp_path / "nan.npy", tmp_path / "n.h5", iid=True) != 0
    assert "rows [2] of" in capsys.readouterr().err and not (tmp_path / "n.h5").exists()


def test_validation_refuses_a_posterior_combined_from_independent_observations(tmp_path, model):
    """Validation pairs each observation with its own posterior: one drawn from all rows at
    once has no reference and no test set, so both the test set's and the observations' sides
    refuse it, naming --iid, before reading the observation file."""
    from pipeline.validation import _read_test_samples, score_budget

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3, 3)).astype("f4"))
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "s.h5", iid=True) == 0
    with pytest.raises(ValueError, match="one posterior from 3 independent observations"):
        _read_test_samples(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="without --iid"):
        score_budget(
            tmp_path / "s.h5",
            tmp_path / "x.npy",
            tmp_path / "c2st.json",
            budget=1,
            seed=0,
            max_samples=None,
        )


def test_only_a_likelihood_combines_independent_observations():
    from pipeline.models.posterior import PosteriorSpec as Spec

    npe = NeuralPosterior(Spec(parameter_names=("a", "b"), x_shape=(3,))).eval()
    with pytest.raises(ValueError, match="needs a likelihood: this model is npe"):
        sample_posterior(npe, np.zeros((3, 3), "f4"), 10, iid=True)
    with pytest.raises(TypeError, match="train with method nle"):
        npe.iid_log_prob(torch.zeros(2), torch.zeros(3, 3))


def test_validation_records_the_chains_and_names_the_simulations_left_out():
    from pipeline.validation import _left_out, _mcmc

    test = {
        "theta": np.zeros((8, 2)),
        "mcmc_rhat": np.array([1.01, 1.03] * 4),
        "mcmc_ess": np.array([300.0, 150.0] * 4),
        "mcmc_acceptance": np.full(8, 0.25),
        "attrs": {"num_unconverged_excluded": 2},
    }
    observed = {"mcmc_rhat": np.array([1.002]), "mcmc_ess": np.array([2500.0]), "attrs": {}}
    mcmc = _mcmc(test, observed)
    assert (mcmc.test_rhat_max, mcmc.test_ess_min, mcmc.num_unconverged_excluded) == (
        1.03,
        150.0,
        2,
    )
    assert mcmc.observation_rhat == [1.002]
    assert "2 of 10 test simulations left out" in _left_out(test)["mcmc"]
    # NPE's samples carry no chains: nothing recorded, nothing skipped.
    assert _mcmc({"attrs": {}}, {"attrs": {}}) is None and _left_out({"attrs": {}}) == {}


def test_an_observation_of_the_wrong_shape_is_refused_before_any_chain(tmp_path, model, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 4), dtype="f4"))  # the model's x has 3 entries
    assert sample_cli(model, tmp_path / "x.npy", tmp_path / "s.h5") != 0
    assert "observations have shape (2, 4), expected (n_obs, 3)" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


def test_a_few_samples_still_rest_on_enough_draws_to_be_checked():
    """Five samples from 32 walkers: the pool keeps 10 draws per walker, so R-hat and ESS are
    defined and a Gaussian passes; only the first five draws are returned."""
    torch.manual_seed(0)
    mean, scale = torch.zeros(2, 2), torch.ones(2)
    result = sample_ensemble(gaussians(mean, scale), torch.randn(2, 1024, 2) * 3, 5, SETTINGS)
    assert result.samples.shape == (2, 5, 2) and result.converged.all()


def test_truncate_stops_naming_the_option_when_the_chains_at_the_observation_fail(
    tmp_path, first_chain_fails
):
    """Unconverged draws would set the region's threshold from NaN densities: a region of no
    prior mass, blamed on the quantile."""
    from dataclasses import replace

    from pipeline.options import TruncateOptions
    from pipeline.rounds.region import truncate
    from pipeline.sampling import SamplingError

    torch.manual_seed(0)
    posterior = NeuralPosterior(replace(SPEC, x_shape=(2,)), theta_std=torch.tensor([0.2, 0.2]))
    save_posterior(posterior, tmp_path / "model", {"task": "two_moons", "provenance": {}})
    observe = ["observe", "--task", "two_moons", "--num-observations", "1"]
    observe += ["--num-reference-samples", "100", "--out", str(tmp_path / "obs.h5")]
    assert cli.main(observe) == 0
    options = TruncateOptions(quantile=0.01, draws=2000, prior_draws=1000, mcmc_extensions=1)
    with pytest.raises(SamplingError, match=r"after 1 extensions.*rounds.mcmc_extensions"):
        truncate(tmp_path / "model", tmp_path / "obs.h5", 0, options)
