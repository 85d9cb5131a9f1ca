"""Two moons: a crescent-shaped likelihood whose posterior has two crescent-shaped modes."""

from __future__ import annotations

import numpy as np

from pipeline.tasks.base import BoxUniform, Task, sample_by_rejection

SQRT2 = np.sqrt(2.0)


class TwoMoons(Task):
    r"""The ``two_moons`` task of Greenberg et al. (2019) as defined in sbibm.

    .. math::
        \theta \sim \mathcal{U}(-1, 1)^2, \quad a \sim \mathcal{U}(-\pi/2, \pi/2), \quad
        r \sim \mathcal{N}(0.1, 0.01^2), \quad p = (r \cos a + 0.25, r \sin a),

    .. math::
        x = p + \left(-|\theta_1 + \theta_2| / \sqrt{2}, (-\theta_1 + \theta_2) / \sqrt{2}\right).

    The map :math:`f: \theta \mapsto x - p` is, on either side of the line
    :math:`\theta_1 + \theta_2 = 0`, a rotation or a reflection (:math:`|\det J| = 1`), so the
    posterior is :math:`p(\theta \mid x) \propto p_p(x - f(\theta))` on the prior box. The
    reference samples it exactly: draw :math:`p` as the simulator does, invert :math:`f` on a
    branch chosen with probability 1/2, and reject draws outside the box.

    References:
        | Automatic Posterior Transformation for Likelihood-Free Inference
        | (Greenberg et al., 2019) https://arxiv.org/abs/1905.07488
        | Benchmarking Simulation-Based Inference (Lueckmann et al., 2021)
        | https://arxiv.org/abs/2101.04653 (task ``two_moons`` of sbibm)
    """

    name = "two_moons"
    parameter_names = ("theta_1", "theta_2")
    parameter_units = ("", "")
    x_shape = (2,)
    reference_method = "exact (rejection)"
    # Below this acceptance rate the reference gives up: x_obs is then (almost) outside the
    # support of the simulator, and sampling would take ~1/rate proposals per sample.
    min_acceptance: float = 1e-4

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform(low=(-1.0, -1.0), high=(1.0, 1.0))

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws ``x = p + f(theta)``: ``(n, 2)`` to ``(n, 2)``."""
        theta = np.asarray(theta, dtype=np.float64)
        return sample_crescent(len(theta), rng) + moons_shift(theta)

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Exact posterior samples by inversion and rejection, shape ``(num_samples, 2)``.

        Raises:
            ValueError: If fewer than ``min_acceptance`` of the proposals land in the prior box.
        """
        x_obs = self.check_observation(x_obs)
        return sample_by_rejection(
            lambda n: invert_shift(x_obs - sample_crescent(n, rng), rng),
            self.prior,
            num_samples,
            min_acceptance=self.min_acceptance,
            failure=(
                f"two_moons reference for x_obs={x_obs.tolist()}, (almost) outside the "
                "support of the simulator"
            ),
        )


def sample_crescent(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws the noise ``p = (r cos a + 0.25, r sin a)``, shape ``(n, 2)``."""
    a = rng.uniform(-np.pi / 2, np.pi / 2, size=n)
    r = rng.normal(0.1, 0.01, size=n)
    return np.stack([r * np.cos(a) + 0.25, r * np.sin(a)], axis=-1)


def moons_shift(theta: np.ndarray) -> np.ndarray:
    """The shift ``f(theta) = (-|t1 + t2|, -t1 + t2) / sqrt2``: ``(n, 2)`` to ``(n, 2)``."""
    t1, t2 = theta[..., 0], theta[..., 1]
    return np.stack([-np.abs(t1 + t2) / SQRT2, (-t1 + t2) / SQRT2], axis=-1)


def invert_shift(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Solves ``f(theta) = u`` on a random branch of ``|.|``: ``(n, 2)`` to ``(n, 2)``.

    Each of the two solutions is picked with probability 1/2, the weight that the two-to-one,
    volume-preserving map ``f`` gives each. Where ``u_1 > 0`` no solution exists (the first
    output of ``f`` is never positive); those rows are NaN.
    """
    sign = rng.choice([-1.0, 1.0], size=len(u))
    z1 = np.where(u[:, 0] <= 0, -u[:, 0] * sign, np.nan)  # = (t1 + t2) / sqrt2
    z2 = u[:, 1]  # = (t2 - t1) / sqrt2
    return np.stack([(z1 - z2) / SQRT2, (z1 + z2) / SQRT2], axis=-1)
