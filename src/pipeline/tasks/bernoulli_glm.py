"""Bernoulli GLM: a spiking neuron driven by a white-noise stimulus through a linear filter."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from pipeline.mcmc import sample_emcee
from pipeline.tasks.base import MultivariateNormal, Reference, Task

NUM_BINS = 100
FILTER_LENGTH = 9
DIM = FILTER_LENGTH + 1
STIMULUS_SEED = 42


def white_noise_stimulus() -> np.ndarray:
    """sbibm's stimulus: ``RandomState(42).randn(100)`` rounded to float32, shape ``(100,)``."""
    stimulus = np.random.RandomState(STIMULUS_SEED).randn(NUM_BINS).astype(np.float32)
    return stimulus.astype(np.float64)


def design_matrix(stimulus: np.ndarray) -> np.ndarray:
    """``X`` with ``X[t] = (1, I_t, I_{t-1}, ..., I_{t-8})``, zero before the stimulus starts.

    Shape ``(100,)`` to ``(100, 10)``: ``X @ theta`` is the bias plus the causal convolution of
    the stimulus with the filter ``theta[1:]``.
    """
    design = np.zeros((len(stimulus), DIM))
    design[:, 0] = 1.0
    for lag in range(FILTER_LENGTH):
        design[lag:, lag + 1] = stimulus[: len(stimulus) - lag]
    return design


def prior_precision() -> np.ndarray:
    """sbibm's prior precision ``(10, 10)``: 1/2 for the bias, ``F^T F`` for the filter.

    ``F = D^2 + diag(sqrt(k / 9))``, ``k = 0..8``, with ``D`` the first-difference matrix (1 on
    the diagonal, -1 below it): a penalty on the filter's second differences (smoothness) plus
    a ridge that grows with the lag.
    """
    first_difference = np.eye(FILTER_LENGTH) - np.eye(FILTER_LENGTH, k=-1)
    f = first_difference @ first_difference + np.diag(
        np.sqrt(np.arange(FILTER_LENGTH) / FILTER_LENGTH)
    )
    precision = np.zeros((DIM, DIM))
    precision[0, 0] = 0.5
    precision[1:, 1:] = f.T @ f
    return precision


class BernoulliGLM(Task):
    r"""The ``bernoulli_glm`` task of sbibm (sufficient summary statistics, 10 of them).

    A neuron spikes in each of 100 time bins independently with probability
    :math:`\sigma(\psi_t)`, :math:`\sigma(u) = 1 / (1 + e^{-u})`, where
    :math:`\psi = X \theta`: the bias :math:`\theta_1` plus the stimulus convolved with a
    9-tap filter :math:`\theta_{2..10}` (:func:`design_matrix`). The summary statistics are the
    spike count and the spike-triggered sums of the stimulus at lags 0..8, i.e.
    :math:`x = X^\top y` for the spike train :math:`y \in \{0, 1\}^{100}`, shape ``(10,)``.

    .. math::
        \theta \sim \mathcal{N}(0, B^{-1}), \qquad y_t \mid \theta \sim
        \mathrm{Bernoulli}(\sigma(X_t \theta)), \qquad x = X^\top y,

    with the precision :math:`B` of :func:`prior_precision` (smooth filters, bias variance 2).

    Design: sbibm loads the stimulus from ``sbibm/tasks/bernoulli_glm/files/stimulus_I.pt``,
    which its ``_setup`` generates as ``np.random.RandomState(42).randn(100)`` cast to float32.
    That file is not used here; the task regenerates the stimulus the same way. It agrees with
    sbibm's file: the summary statistics of sbibm's observation 1 (``files/num_observation_1``,
    ``observation.csv``), recomputed from its spike train (``observation_raw.csv``) with this
    design, match to float32 precision (checked in ``tests/test_reference_tasks.py``). sbibm
    computes the spike-triggered sums with ``conv1d(y, I, padding=8)[-9:]``, which equals
    :math:`X_{:, 2..10}^\top y`.

    Reference posterior: :math:`x = X^\top y` is sufficient for :math:`\theta` (the likelihood
    of the spike train is :math:`\exp(\theta^\top X^\top y - \sum_t \log(1 + e^{X_t \theta}))`),
    so :math:`p(\theta \mid x) = p(\theta \mid y)` and the posterior is known up to a constant
    from :math:`x` alone; it is log-concave. It is sampled by MCMC (emcee,
    :func:`pipeline.mcmc.sample_emcee`) with walkers started from the Laplace approximation at
    the MAP (found by Newton's method, ``scipy.optimize.minimize(method="trust-exact")``).
    sbibm sampled the same posterior with a Polya-Gamma Gibbs sampler on the spike train.

    References:
        | Flexible statistical inference for mechanistic models of neural dynamics
        | (Lueckmann et al., 2017) https://arxiv.org/abs/1711.01861
        | Benchmarking Simulation-Based Inference (Lueckmann et al., 2021)
        | https://arxiv.org/abs/2101.04653 (task ``bernoulli_glm`` of sbibm,
        | ``sbibm/tasks/bernoulli_glm/task.py``)
    """

    name = "bernoulli_glm"
    parameter_names = ("bias",) + tuple(f"filter_{i + 1}" for i in range(FILTER_LENGTH))
    parameter_units = ("",) * DIM
    x_shape = (DIM,)
    reference_method = "mcmc (emcee)"
    # Walkers: many amortise emcee's per-step Python overhead (the log-density is vectorised).
    num_walkers: int = 256

    @property
    def prior(self) -> MultivariateNormal:
        return self._prior

    @cached_property
    def _prior(self) -> MultivariateNormal:
        precision = prior_precision()
        return MultivariateNormal(loc=(0.0,) * DIM, precision=tuple(map(tuple, precision)))

    @cached_property
    def design(self) -> np.ndarray:
        """The design matrix ``X``, shape ``(100, 10)``."""
        design = design_matrix(white_noise_stimulus())
        design.setflags(write=False)
        return design

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws spike trains and returns their summary statistics: ``(n, 10)`` to ``(n, 10)``."""
        psi = np.asarray(theta, dtype=np.float64) @ self.design.T  # (n, 100)
        spikes = rng.uniform(size=psi.shape) < _sigmoid(psi)
        return spikes.astype(np.float64) @ self.design

    def log_likelihood(self, theta: np.ndarray, x_obs: np.ndarray) -> np.ndarray:
        """``log p(y | theta)`` of any spike train ``y`` with ``X^T y = x_obs``: ``(n, 10)`` to
        ``(n,)``. It differs from ``log p(x_obs | theta)`` by a constant in ``theta`` (the log
        of the number of such spike trains)."""
        theta = np.asarray(theta, dtype=np.float64)
        return theta @ x_obs - np.sum(np.logaddexp(0.0, theta @ self.design.T), axis=-1)

    def log_posterior(self, theta: np.ndarray, x_obs: np.ndarray) -> np.ndarray:
        """Unnormalised log-posterior, ``(n, 10)`` to ``(n,)``."""
        return self.log_likelihood(theta, x_obs) + self.prior.log_prob(theta)

    def laplace(self, x_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MAP ``(10,)`` and the inverse Hessian of the negative log-posterior there ``(10, 10)``.

        The negative log-posterior is strictly convex (the prior's precision is positive
        definite), so Newton's method finds the unique MAP from 0.
        """
        from scipy import optimize  # here, not at the top: importing the registry stays fast

        x_obs = self.check_observation(x_obs)
        design, precision = self.design, prior_precision()

        def objective(theta: np.ndarray) -> float:
            return -float(self.log_posterior(theta[None], x_obs)[0])

        def gradient(theta: np.ndarray) -> np.ndarray:
            return design.T @ _sigmoid(design @ theta) - x_obs + precision @ theta

        def hessian(theta: np.ndarray) -> np.ndarray:
            p = _sigmoid(design @ theta)
            return (design.T * (p * (1 - p))) @ design + precision

        result = optimize.minimize(
            objective, np.zeros(DIM), jac=gradient, hess=hessian, method="trust-exact"
        )
        if not result.success:
            raise RuntimeError(f"bernoulli_glm: MAP search failed for x_obs={x_obs.tolist()}")
        return result.x, np.linalg.inv(hessian(result.x))

    def reference(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> Reference:
        """Posterior samples by MCMC started from the Laplace approximation.

        Returns:
            ``(num_samples, 10)`` samples, with R-hat, ESS, acceptance and the chain's lengths
            as diagnostics.

        Raises:
            ValueError: If ``x_obs`` has the wrong shape or is not finite.
            RuntimeError: If the MCMC does not converge (see :func:`sample_emcee`).
        """
        x_obs = self.check_observation(x_obs)
        mode, cov = self.laplace(x_obs)
        initial = rng.multivariate_normal(mode, cov, size=self.num_walkers)
        label = f"bernoulli_glm reference for x_obs={np.round(x_obs, 4).tolist()}"
        result = sample_emcee(
            lambda theta: self.log_posterior(theta, x_obs), initial, num_samples, rng, label=label
        )
        return Reference(
            samples=result.samples, method=self.reference_method, diagnostics=result.diagnostics
        )


def _sigmoid(u: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-u))`` without overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * u))
