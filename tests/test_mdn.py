"""The mixture density network (``flow: mdn``): trained by the same stage as the flows, it
learns a conjugate posterior, draws with densities of its own draws, and is refused what only
a flow has."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import simulation
from pipeline.models.flows import build_flow
from pipeline.models.posterior import NeuralPosterior, PosteriorSpec, load_posterior
from pipeline.parallel import SerialComm
from pipeline.tasks import get_task
from pipeline.training import TrainConfig, train


@pytest.fixture(scope="module")
def gaussian_linear(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sims.h5"
    plan = simulation.SimulationPlan("gaussian_linear", 3000, 1, 1000)
    simulation.run(plan, get_task("gaussian_linear"), out, SerialComm(), overwrite=False)
    return out


def test_a_linear_mdn_learns_the_conjugate_posterior(gaussian_linear, tmp_path):
    """One Gaussian whose mean is linear in x is gaussian_linear's exact family: N(x/2, 0.05 I)."""
    options = {
        "flow": "mdn",
        "components": 1,
        "flow_hidden": [],
        "embedding": "identity",
        "ensemble": 1,
        "weight_decay": 0.0,
        "learning_rate": 1e-2,
        "max_epochs": 100,
        "patience": 100,
    }
    train(gaussian_linear, tmp_path / "model", TrainConfig.from_dict(options))
    posterior, document = load_posterior(tmp_path / "model")  # torch.load(weights_only=True)
    assert document["spec"]["flow"] == "mdn" and document["spec"]["components"] == 1
    x = torch.tensor(np.random.default_rng(1).normal(0.0, 0.45, (3, 10)), dtype=torch.float32)
    torch.manual_seed(2)
    with torch.no_grad():
        theta = posterior.sample(x, 20000)  # (M, N, D)
    # The fitted mean's error from 2700 training pairs is about 0.22 * sqrt(10 / 2700) = 0.013
    # per coordinate, the draws' own 0.0016: 0.05 is about four of those errors.
    assert np.abs(theta.mean(0).numpy() - x.numpy() / 2).max() < 0.05
    # The log-scales are linear in x too, ten slopes each fitted to about 1/sqrt(2 * 2700) =
    # 0.014: about 4 % on a standard deviation at a typical x, 13 % for the worst of these 30;
    # a sampler that ignored the covariance or the standardisation is off by 40 % or more.
    assert np.abs(theta.std(0).numpy() / np.sqrt(0.05) - 1).max() < 0.25


@pytest.mark.parametrize("ensemble", [1, 3])
def test_an_mdns_draws_come_with_the_density_of_those_draws(ensemble):
    torch.manual_seed(0)
    spec = PosteriorSpec(
        parameter_names=("a", "b"), x_shape=(3,), flow="mdn", components=3, ensemble=ensemble
    )
    posterior = NeuralPosterior(spec).eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        theta, log_q = posterior.sample_and_log_prob(x, 50)
        assert theta.shape == (50, 4, 2) and posterior.sample(x, 7).shape == (7, 4, 2)
        torch.testing.assert_close(posterior.log_prob(theta, x), log_q)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"flow": "mdn", "transforms": 5},
            "flow mdn is a mixture with no transformations; leave transforms at its default "
            "and set components",
        ),
        ({"flow": "maf", "components": 2}, "components counts the Gaussians of flow mdn"),
        ({"components": 2}, r"not set here \(flow auto\)"),
        ({"method": "fmpe", "components": 2}, "method fmpe has no components"),
        ({"flow": "mdn", "components": 0}, "components must be at least 1, got 0"),
    ],
)
def test_options_of_a_flow_and_of_a_mixture_are_refused_on_the_other(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(options)


def test_an_mdns_components_start_together_apart_in_scale_whatever_the_context():
    """Components started at random places died where no data reached them; started near the
    centre with scales from 1 to e^-2 they all take part (benchmarks/README.md, NLE)."""
    torch.manual_seed(0)
    mdn = build_flow("mdn", features=3, context=2, transforms=1, hidden_features=(), components=3)
    a, b = mdn(torch.tensor([[-2.0, 1.0]])), mdn(torch.tensor([[3.0, 0.5]]))
    torch.testing.assert_close(a.base.loc, b.base.loc)
    torch.testing.assert_close(a.base.scale_tril, b.base.scale_tril)
    assert a.base.loc.abs().max() < 0.5  # N(0, 0.1^2) in standardised units
    scales = torch.diagonal(a.base.scale_tril, dim1=-2, dim2=-1)[0]  # (components, features)
    expected = torch.exp(torch.tensor([0.0, -1.0, -2.0]))[:, None].expand(3, 3)
    torch.testing.assert_close(scales, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.softmax(a.logits, -1), torch.full((1, 3), 1 / 3))
