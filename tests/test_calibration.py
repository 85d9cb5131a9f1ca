"""NPE's penalty on over-confidence (``train: {calibration: ...}``): its value, the direction of
its gradient, and a trained posterior it widens where the plain loss is over-confident."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import simulation
from pipeline.diagnostics.coverage import hpd_coverage
from pipeline.models.posterior import load_posterior, overconfidence
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.training import TrainConfig, train

LEVELS = np.linspace(0.05, 0.95, 19)


def test_the_penalty_is_the_sorted_credibilities_excess_over_the_uniform():
    draws = torch.arange(8.0)[:, None].expand(8, 4)  # log-densities 0..7 of 8 draws, 4 pairs
    # Every truth denser than every draw: credibility 0, inside every region: no penalty.
    assert overconfidence(torch.full((4,), 9.0), draws).item() == 0.0
    # Every truth below every draw: credibility 1 for all four, against quantiles 1/5..4/5.
    expected = np.mean((1 - np.arange(1, 5) / 5) ** 2)
    assert overconfidence(torch.full((4,), -1.0), draws).item() == pytest.approx(expected)
    # Truths with 8, 0, 4 and 7 denser draws: credibilities 1, 0, 1/2, 7/8, sorted 0, 1/2,
    # 7/8, 1 against 1/5, 2/5, 3/5, 4/5: excesses 0, 1/10, 11/40, 1/5.
    truth = torch.tensor([-1.0, 7.5, 3.5, 0.5])
    assert overconfidence(truth, draws).item() == pytest.approx((0.1**2 + 0.275**2 + 0.2**2) / 4)


def test_its_gradient_widens_an_over_confident_gaussian_and_leaves_a_wide_one():
    # theta ~ N(0, 1) against q = N(0, s^2): s < 1 is over-confident, s > 1 under-confident.
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(4000, generator=generator)
    penalties, gradients = {}, {}
    for scale in (0.5, 2.0):
        log_scale = torch.tensor(float(np.log(scale)), requires_grad=True)
        q = torch.distributions.Normal(0.0, log_scale.exp())
        draws = q.sample((16, 4000)).detach()
        penalty = overconfidence(q.log_prob(theta), q.log_prob(draws))
        penalty.backward()
        penalties[scale], gradients[scale] = penalty.item(), log_scale.grad.item()
    # s = 0.5: the truth's credibility is P(|Z| < |theta| / 0.5), far above uniform (a mean
    # excess near 0.2, squared ~0.05); 4000 pairs leave sampling noise near 1e-4.
    assert penalties[0.5] > 0.02 and gradients[0.5] < 0, (penalties, gradients)
    assert penalties[2.0] < 1e-3 and abs(gradients[2.0]) < 1e-3, (penalties, gradients)


def test_options_are_npes_alone_and_shape_a_run_only_when_on():
    for method in ("nle", "fmpe"):
        with pytest.raises(ValueError, match=f"method {method} has no calibration"):
            TrainConfig.from_dict({"method": method, "calibration": 1.0})
    # Off, they are not part of what checkpoints, search trials and a search's choice are
    # keyed on: those of runs without the penalty stay valid.
    names = {"calibration", "calibration_draws", "calibration_rows"}
    assert not names & set(TrainConfig.from_dict({"calibration_draws": 4}).shaping())
    assert names <= set(TrainConfig.from_dict({"calibration": 1.0}).shaping())


def hpd_deviation(model: Path, theta: np.ndarray, x: np.ndarray) -> float:
    """The largest signed deviation of the HPD coverage of ``model`` on pairs ``(theta, x)``
    from the diagonal (negative: over-confident), from 500 draws per pair."""
    posterior, _ = load_posterior(model)
    torch.manual_seed(1)
    with torch.no_grad():
        x = torch.as_tensor(x, dtype=torch.float32)
        draws, log_q = posterior.sample_and_log_prob(x, 500)
        log_q_true = posterior.log_prob(torch.as_tensor(theta, dtype=torch.float32), x)
    coverage = hpd_coverage(log_q.T.numpy(), log_q_true.numpy(), LEVELS)
    deviation = coverage - LEVELS
    return float(deviation[np.argmax(np.abs(deviation))])


@pytest.mark.slow
def test_the_penalty_widens_an_over_fitted_posterior(tmp_path):
    # 300 two_moons simulations, no early stopping and no weight decay: the flow over-fits and
    # reads over-confident on fresh pairs (its HPD coverage 0.22 below the diagonal).
    data = tmp_path / "sims.h5"
    plan = simulation.SimulationPlan("two_moons", 300, 1, 300)
    simulation.run(plan, get_task("two_moons"), data, SerialComm(), overwrite=False)
    rng = np.random.default_rng(2)
    theta = get_task("two_moons").prior.sample(400, rng)
    x = get_task("two_moons").simulate(theta, rng)
    options = {
        "ensemble": 1,
        "weight_decay": 0.0,
        "max_epochs": 100,
        "patience": 100,
        "batch_size": 64,
    }
    deviation = {}
    for weight in (0.0, 20.0):
        out = tmp_path / f"model-{weight}"
        train(data, out, TrainConfig.from_dict({**options, "calibration": weight}))
        deviation[weight] = hpd_deviation(out, theta, x)
    # 400 pairs: a coverage's binomial standard error is at most 0.025. The penalty lifts the
    # curve to the diagonal or above (0.075 above it here: it leans to width), not to the
    # prior's width, whose credible regions would cover nearly every truth at every level.
    assert deviation[0.0] < -0.15, deviation
    assert -0.05 < deviation[20.0] < 0.15, deviation
