"""SLCP: a simple likelihood whose posterior is complex (four symmetric modes, thin ridges)."""

from __future__ import annotations

import numpy as np

from pipeline.mcmc import LogProb, resample_distinct, sample_emcee
from pipeline.tasks.base import BoxUniform, Reference, Task

NUM_POINTS = 4
DIM = 5


class SLCP(Task):
    r"""The ``slcp`` task ("simple likelihood, complex posterior") as defined in sbibm.

    .. math::
        \theta \sim \mathcal{U}(-3, 3)^5, \qquad
        x_j \mid \theta \overset{iid}{\sim} \mathcal{N}(m_\theta, S_\theta), \quad j = 1..4,

    .. math::
        m_\theta = (\theta_1, \theta_2), \quad s_1 = \theta_3^2, \quad s_2 = \theta_4^2, \quad
        \rho = \tanh \theta_5, \quad
        S_\theta = \begin{pmatrix} s_1^2 + \epsilon & \rho s_1 s_2 \\
        \rho s_1 s_2 & s_2^2 + \epsilon \end{pmatrix}, \quad \epsilon = 10^{-6},

    and :math:`x = (x_{1,1}, x_{1,2}, x_{2,1}, \ldots, x_{4,2})`, shape ``(8,)``: four
    two-dimensional points, flattened point by point as sbibm's ``flatten_data`` does. The
    :math:`\epsilon` on the diagonal is sbibm's (``sbibm/tasks/slcp/task.py``, "add eps to
    diagonal to ensure PSD"); it is part of the model, not only of the implementation.

    Reference posterior: the likelihood is the tractable Gaussian density above, sampled by MCMC
    (emcee, :func:`pipeline.mcmc.sample_emcee`). The likelihood depends on :math:`\theta_3` and
    :math:`\theta_4` only through their squares and the prior is symmetric about 0 in each, so
    the posterior is exactly invariant under the four sign flips of :math:`(\theta_3,
    \theta_4)`: it is four copies of its restriction to :math:`\theta_3, \theta_4 \ge 0`, each
    of mass 1/4. The MCMC therefore samples that restriction (one mode; an ensemble sampler
    would almost never hop between the copies, so sampling all four at once would leave their
    weights to chance), and each sample's signs of :math:`\theta_3, \theta_4` are then flipped
    independently with probability 1/2. If :math:`\theta \sim p` restricted to the orthant
    and :math:`g` is a uniformly random element of the sign-flip group, :math:`g \theta` has
    density :math:`\frac14 \sum_g p|_{\text{orthant}}(g^{-1} \theta) \cdot 4 = p(\theta)`, so
    the result is exact (the boundary :math:`\theta_3 = 0` or :math:`\theta_4 = 0` has measure
    zero). The walkers start by sampling-importance-resampling: ``num_candidates`` prior draws
    in the orthant weighted by the likelihood, ``num_walkers`` of them picked without
    replacement. sbibm drew its reference by rejection sampling from a flow fitted to
    sampling-importance-resampling draws; the target is the same posterior.

    References:
        | Sequential Neural Likelihood: Fast Likelihood-free Inference with Autoregressive
        | Flows (Papamakarios et al., 2019) https://arxiv.org/abs/1805.07226
        | Benchmarking Simulation-Based Inference (Lueckmann et al., 2021)
        | https://arxiv.org/abs/2101.04653 (task ``slcp`` of sbibm, ``sbibm/tasks/slcp/task.py``)
    """

    name = "slcp"
    parameter_names = tuple(f"theta_{i + 1}" for i in range(DIM))
    parameter_units = ("",) * DIM
    x_shape = (2 * NUM_POINTS,)
    reference_method = "mcmc (emcee)"
    eps: float = 1e-6
    # 256 walkers amortise emcee's per-step Python overhead (the log-density is vectorised);
    # the autocorrelation time in steps does not grow with their number.
    num_walkers: int = 256
    # Sampling-importance-resampling for the starting ensemble: draws per round, and rounds of
    # adapting the proposal after the first from the prior.
    num_candidates: int = 100_000
    adaptation_rounds: int = 3

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform(low=(-3.0,) * DIM, high=(3.0,) * DIM)

    def mean_and_covariance(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The Gaussian's mean ``(n, 2)`` and covariance ``(n, 2, 2)`` for ``theta`` ``(n, 5)``."""
        theta = np.asarray(theta, dtype=np.float64)
        s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, np.tanh(theta[:, 4])
        cov = np.empty((len(theta), 2, 2))
        cov[:, 0, 0] = s1**2 + self.eps
        cov[:, 1, 1] = s2**2 + self.eps
        cov[:, 0, 1] = cov[:, 1, 0] = rho * s1 * s2
        return theta[:, :2], cov

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws four points per row: ``(n, 5)`` to ``(n, 8)``."""
        mean, cov = self.mean_and_covariance(theta)
        chol = np.linalg.cholesky(cov)  # (n, 2, 2)
        z = rng.standard_normal((len(mean), NUM_POINTS, 2))
        points = mean[:, None, :] + np.einsum("nij,npj->npi", chol, z)
        return points.reshape(len(mean), 2 * NUM_POINTS)

    def log_likelihood(self, theta: np.ndarray, x_obs: np.ndarray) -> np.ndarray:
        """``log p(x_obs | theta)`` per row of ``theta``: ``(n, 5)``, ``(8,)`` to ``(n,)``."""
        mean, cov = self.mean_and_covariance(theta)
        a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
        det = a * c - b**2
        d = np.asarray(x_obs, dtype=np.float64).reshape(NUM_POINTS, 2)[None] - mean[:, None]
        dx, dy = d[..., 0], d[..., 1]  # (n, 4)
        quad = (c[:, None] * dx**2 - 2 * b[:, None] * dx * dy + a[:, None] * dy**2) / det[:, None]
        return -0.5 * np.sum(quad, axis=-1) - NUM_POINTS * (0.5 * np.log(det) + np.log(2 * np.pi))

    def reference(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> Reference:
        """Posterior samples by MCMC on the folded posterior plus random sign flips.

        Returns:
            ``(num_samples, 5)`` samples, with R-hat, ESS, acceptance and the chain's lengths
            as diagnostics.

        Raises:
            ValueError: If ``x_obs`` has the wrong shape or is not finite.
            RuntimeError: If the MCMC does not converge (see :func:`sample_emcee`).
        """
        x_obs = self.check_observation(x_obs)
        low, high = np.asarray(self.prior.low), np.asarray(self.prior.high)
        low[2:4] = 0.0  # the orthant theta_3, theta_4 >= 0

        def log_prob(theta: np.ndarray) -> np.ndarray:
            inside = np.all((theta >= low) & (theta <= high), axis=-1)
            out = np.full(len(theta), -np.inf)
            out[inside] = self.log_likelihood(theta[inside], x_obs)
            return out

        initial = self._initial_walkers(log_prob, low, high, rng)
        label = f"slcp reference for x_obs={np.round(x_obs, 4).tolist()}"
        result = sample_emcee(log_prob, initial, num_samples, rng, label=label)
        samples = result.samples.copy()
        samples[:, 2:4] *= rng.choice([-1.0, 1.0], size=(num_samples, 2))
        return Reference(
            samples=samples, method=self.reference_method, diagnostics=result.diagnostics
        )

    def _initial_walkers(
        self, log_prob: LogProb, low: np.ndarray, high: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Walkers in the bulk of the folded posterior by adaptive importance sampling.

        Round 0 proposes from the prior (uniform on the folded box); each later round from a
        defensive mixture, 90 % a Gaussian with the mean and twice the covariance of the
        walkers picked in the round before and 10 % the prior. ``num_walkers`` distinct draws
        are picked per round with probability by their importance weight. A posterior far
        narrower than the prior (a few effective draws among 10^5 prior draws) thus still gets
        walkers spread like itself rather than like the best prior draws.
        """
        volume = float(np.prod(high - low))
        candidates = rng.uniform(low, high, size=(self.num_candidates, DIM))
        log_weights = log_prob(candidates)
        for _ in range(self.adaptation_rounds):
            walkers = resample_distinct(candidates, log_weights, self.num_walkers, rng)
            mean, cov = walkers.mean(axis=0), 2 * np.cov(walkers.T) + 1e-12 * np.eye(DIM)
            num_gaussian = rng.binomial(self.num_candidates, 0.9)
            candidates = np.concatenate(
                [
                    rng.multivariate_normal(mean, cov, size=num_gaussian),
                    rng.uniform(low, high, size=(self.num_candidates - num_gaussian, DIM)),
                ]
            )
            inside = np.all((candidates >= low) & (candidates <= high), axis=-1)
            log_q = np.logaddexp(
                np.log(0.9) + _gaussian_log_density(candidates, mean, cov),
                np.where(inside, np.log(0.1 / volume), -np.inf),
            )
            log_weights = log_prob(candidates) - log_q
        return resample_distinct(candidates, log_weights, self.num_walkers, rng)


def _gaussian_log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``log N(x; mean, cov)`` for rows of ``x``: ``(n, D)`` to ``(n,)``."""
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (x - mean).T)
    log_det = 2 * np.sum(np.log(np.diag(chol)))
    return -0.5 * (np.sum(z**2, axis=0) + log_det + len(mean) * np.log(2 * np.pi))
