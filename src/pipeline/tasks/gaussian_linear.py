"""Gaussian linear: a Gaussian prior, a Gaussian likelihood and an analytic posterior."""

from __future__ import annotations

import numpy as np

from pipeline.tasks.base import DiagonalNormal, Task

DIM = 10


class GaussianLinear(Task):
    r"""The ``gaussian_linear`` task of sbibm, in 10 dimensions.

    .. math::
        \theta \sim \mathcal{N}(0, 0.1 I), \qquad x \mid \theta \sim \mathcal{N}(\theta, 0.1 I)

    Prior and likelihood are conjugate, so the reference posterior is the exact Gaussian
    :math:`\mathcal{N}(x / 2, 0.05 I)`, computed from the general conjugate formula.

    References:
        | Benchmarking Simulation-Based Inference (Lueckmann et al., 2021)
        | https://arxiv.org/abs/2101.04653 (task ``gaussian_linear`` of sbibm)
    """

    name = "gaussian_linear"
    parameter_names = tuple(f"theta_{i + 1}" for i in range(DIM))
    parameter_units = ("",) * DIM
    x_shape = (DIM,)
    reference_method = "exact (analytic)"
    prior_variance: float = 0.1
    noise_variance: float = 0.1

    @property
    def prior(self) -> DiagonalNormal:
        return DiagonalNormal(loc=(0.0,) * DIM, scale=(np.sqrt(self.prior_variance),) * DIM)

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws ``x ~ N(theta, 0.1 I)``: ``(n, 10)`` to ``(n, 10)``."""
        theta = np.asarray(theta, dtype=np.float64)
        return theta + rng.normal(0.0, np.sqrt(self.noise_variance), size=theta.shape)

    def analytic_posterior(self, x_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``(10,)`` and covariance ``(10, 10)`` of ``p(theta | x_obs)``.

        Written for any Gaussian prior ``N(mu0, S0)`` and noise ``N(0, S)`` rather than the
        shortcut ``N(x / 2, 0.05 I)``, so that the tests can check it against the shortcut.
        """
        x_obs = self.check_observation(x_obs)
        prior_mean = np.asarray(self.prior.loc)
        prior_precision = np.diag(1.0 / np.asarray(self.prior.scale) ** 2)
        noise_precision = np.eye(DIM) / self.noise_variance
        cov = np.linalg.inv(prior_precision + noise_precision)
        mean = cov @ (noise_precision @ x_obs + prior_precision @ prior_mean)
        return mean, cov

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Exact samples of the analytic posterior, shape ``(num_samples, 10)``."""
        mean, cov = self.analytic_posterior(x_obs)
        z = rng.standard_normal((num_samples, DIM))
        return mean + z @ np.linalg.cholesky(cov).T
