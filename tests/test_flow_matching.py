"""FMPE (pipeline.models.flow_matching): the vector field's shapes, the loss's draws, and the
density its ODE defines, through the same NeuralPosterior interface as a flow."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pipeline import sampling
from pipeline.models.flow_matching import TOLERANCE, FlowMatching, VectorField
from pipeline.models.posterior import (
    NeuralPosterior,
    PosteriorSpec,
    load_posterior,
    save_posterior,
)
from tests.conftest import record_draws

SPEC = PosteriorSpec(
    parameter_names=("a", "b"),
    x_shape=(3,),
    flow_hidden=(32, 32),
    embedding_dim=8,
    embedding_hidden=(16,),
    method="fmpe",
)


@pytest.fixture
def posterior() -> NeuralPosterior:
    torch.manual_seed(0)
    return NeuralPosterior(SPEC, theta_mean=torch.tensor([0.5, -1.0]), theta_std=torch.ones(2))


def test_the_vector_field_broadcasts_times_parameters_and_context():
    field = VectorField(features=2, context=5, hidden_features=(16,))
    z, c = torch.randn(7, 4, 2), torch.randn(4, 5)
    assert field(torch.tensor(0.3), z, c).shape == (7, 4, 2)
    assert field(torch.rand(4), z[0], c).shape == (4, 2)


def test_an_ode_solve_in_chunks_is_the_solve_in_one_batch(posterior, monkeypatch):
    """Each chunk of rows is its own ODE solve (zuko's solver sizes every step by the worst row
    of its batch); densities and draws are the batch's, to the solver's tolerance."""
    from pipeline.models import flow_matching

    generator = torch.Generator().manual_seed(0)
    flow = posterior.members[0].flow
    with torch.no_grad():
        flow.field.output.weight.normal_(0.0, 0.1, generator=generator)  # zero at start
    flow.tolerance = 1e-5
    theta, x = torch.randn(10, 4, 2, generator=generator), torch.randn(4, 3, generator=generator)

    def solves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        count = [0]
        transform = flow.transform

        def counted(c: torch.Tensor):
            count[0] += 1
            return transform(c)

        monkeypatch.setattr(flow, "transform", counted)
        with torch.no_grad():
            log_q = posterior.log_prob(theta, x)
            torch.manual_seed(1)
            draws = posterior.sample(x, 10)
            torch.manual_seed(1)
            with_densities = posterior.sample_and_log_prob(x, 10)
        return log_q, draws, *with_densities, count[0]

    *whole, calls = solves()
    assert calls == 3  # one solve each
    monkeypatch.setattr(flow_matching, "CPU_CHUNK", 7)  # 40 rows: 6 chunks, the last short
    *chunked, calls = solves()
    assert calls == 3 * 6
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked[1], chunked[2])  # the same noise solves to the same draws
    with torch.no_grad():  # each row's density is its own observation's
        alone = torch.stack(
            [posterior.log_prob(theta[:, j : j + 1], x[j : j + 1]) for j in range(4)]
        )
    torch.testing.assert_close(alone[..., 0].T, chunked[0], atol=1e-4, rtol=1e-4)


def test_the_loss_depends_on_its_generator_alone():
    flow = FlowMatching(2, 5, (16,))
    z, c = torch.randn(10, 2), torch.randn(10, 5)

    def loss(seed: int) -> torch.Tensor:
        return flow.loss(z, c, torch.Generator().manual_seed(seed))

    assert loss(0).shape == (10,) and torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(0), loss(1))
    loss(0).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


def test_the_density_integrates_to_one(posterior):
    """exp(log q) summed over a grid that holds the mass: 1 within the grid's error (the ODE
    solver's tolerance and the grid step; an untrained field is close to the identity)."""
    grid = torch.linspace(-5.5, 6.5, 161)
    step = float(grid[1] - grid[0])
    theta = torch.stack(torch.meshgrid(grid, grid - 1.5, indexing="ij"), dim=-1).reshape(-1, 1, 2)
    with torch.no_grad():
        log_q = posterior.log_prob(theta, torch.randn(1, 3))
    assert not log_q.requires_grad
    assert float(log_q.exp().sum()) * step**2 == pytest.approx(1.0, abs=0.02)


def test_sampled_log_densities_are_the_densities_of_the_samples(posterior):
    x = torch.randn(3, 3)
    with torch.no_grad():
        theta, log_q = posterior.sample_and_log_prob(x, 50)
        again = posterior.log_prob(theta, x)
    assert theta.shape == (50, 3, 2) and log_q.shape == (50, 3)
    # Both are ODE solves, from opposite ends: equal within the solver's tolerance.
    np.testing.assert_allclose(log_q.numpy(), again.numpy(), atol=2e-2)


@pytest.mark.parametrize("members", [1, 2])
def test_draws_without_densities_are_the_draws_with_them(members):
    """``densities=False`` skips only the ODE's trace: the same seed gives the same draws (an
    ensemble's draws take the same path; one member's differ by the solver's tolerance, whose
    steps the trace changes), their log_prob is NaN, and they stay inside the box."""
    from pipeline.sampling import sample_posterior

    spec = PosteriorSpec(**{**SPEC.__dict__, "ensemble": members})
    torch.manual_seed(0)
    posterior = NeuralPosterior(spec).eval()
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    low, high = -np.ones(2), np.ones(2)

    def draw(densities: bool):
        torch.manual_seed(1)
        return sample_posterior(posterior, x, 200, low=low, high=high, densities=densities)

    with_densities, without = draw(True), draw(False)
    assert np.isfinite(with_densities.log_prob).all() and np.isnan(without.log_prob).all()
    assert ((without.samples >= low) & (without.samples <= high)).all()
    np.testing.assert_allclose(without.samples, with_densities.samples, atol=1e-3)


def test_a_looser_ode_tolerance_solves_in_fewer_steps_to_nearby_densities(posterior):
    """The sample stage's ode_tolerance trades the solver's steps for accuracy: at the default
    (10^-4) well under half the field evaluations of 10^-6, densities close to its."""
    generator = torch.Generator().manual_seed(1)
    field = posterior.members[0].flow.field
    with torch.no_grad():
        field.output.weight.normal_(std=0.3, generator=generator)  # a field that bends paths
    calls = []
    field.register_forward_hook(lambda *_: calls.append(1))
    theta, x = torch.randn(100, 4, 2), torch.randn(4, 3)

    def solve(tolerance: float) -> tuple[np.ndarray, int]:
        posterior.set_ode_tolerance(tolerance)
        calls.clear()
        with torch.no_grad():
            return posterior.log_prob(theta, x).numpy(), len(calls)

    tight, tight_calls = solve(1e-6)
    loose, loose_calls = solve(TOLERANCE)
    assert loose_calls < tight_calls / 2, (loose_calls, tight_calls)
    # This bent field's log-densities (up to 14 nats) move by at most 0.001 at 10^-4, 0.012 at
    # 10^-3 and 0.35 at 10^-2 (measured once): 0.005 holds the default's error with room and
    # would catch a solve tenfold looser than asked.
    np.testing.assert_allclose(loose, tight, atol=0.005)
    assert not np.allclose(loose, tight, atol=1e-6)


def test_the_sample_stage_solves_at_its_ode_tolerance_and_records_it(tmp_path, posterior):
    import h5py

    from pipeline.cli import main
    from pipeline.options import SampleOptions

    # The stage's default is the model's own (options.py does not import the models).
    assert SampleOptions().ode_tolerance == TOLERANCE

    save_posterior(posterior, tmp_path / "model", {"task": "test", "provenance": {}})
    np.save(tmp_path / "x.npy", np.zeros((2, 3), dtype=np.float32))
    args = ["sample", "--model", str(tmp_path / "model"), "--observations"]
    args += [str(tmp_path / "x.npy"), "--out", str(tmp_path / "samples.h5")]
    assert main([*args, "--options", '{"num_samples": 20, "ode_tolerance": 0.01}']) == 0
    with h5py.File(tmp_path / "samples.h5") as f:
        assert f.attrs["ode_tolerance"] == 0.01


def test_an_nle_posterior_is_never_drawn_without_densities():
    from pipeline.sampling import sample_posterior

    torch.manual_seed(0)
    box = {"kind": "BoxUniform", "low": [-1.0, -1.0], "high": [1.0, 1.0]}
    spec = {**SPEC.__dict__, "method": "nle", "flow": "maf", "extra": {"prior": box}}
    posterior = NeuralPosterior(PosteriorSpec(**spec))
    with pytest.raises(ValueError, match="MCMC evaluates its density at every step"):
        sample_posterior(posterior, np.zeros((1, 3)), 10, densities=False)


def test_an_fmpe_ensemble_saves_and_loads_with_weights_only(tmp_path):
    """Also with a time embedding other than the default, which the spec must carry."""
    spec = PosteriorSpec(**{**SPEC.__dict__, "ensemble": 2, "time_features": 4})
    torch.manual_seed(0)
    posterior = NeuralPosterior(spec)
    save_posterior(posterior, tmp_path, {"task": "test"})
    saved = json.loads((tmp_path / "posterior.json").read_text())["spec"]
    assert saved["method"] == "fmpe" and saved["time_features"] == 4
    loaded, _ = load_posterior(tmp_path)
    assert loaded.members[1].flow.field.time.in_features == 2 * 4
    theta, x = torch.randn(4, 2), torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(theta, x), posterior.log_prob(theta, x))
        assert loaded.member_loss(theta, x, torch.Generator().manual_seed(0)).shape == (2, 4)


def test_an_unknown_method_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="unknown method 'nre'; choose one of npe, fmpe, nle"):
        NeuralPosterior(PosteriorSpec(**{**SPEC.__dict__, "method": "nre"}))


def test_fmpe_on_cpu_samples_in_calls_small_enough_to_log_progress(posterior, monkeypatch, caplog):
    # A call of 2^18 FMPE draws with densities took a quarter of an hour at ten parameters, and
    # progress is logged between calls: calls here hold at most FMPE_CPU_SAMPLES_PER_CALL draws.
    monkeypatch.setattr(sampling, "FMPE_CPU_SAMPLES_PER_CALL", 64)
    calls = record_draws(posterior, monkeypatch)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="pipeline.sampling"):
        result = sampling.sample_posterior(posterior, x, 32)
    assert result.samples.shape == (5, 32, 2) and calls == [64, 64, 32]
    assert "5/5 observations" in caplog.text
