"""Type Ia supernova Hubble diagram in flat wCDM, with distance moduli vectorised over theta."""

from __future__ import annotations

import warnings
from functools import cached_property

import astropy.constants as const
import astropy.units as u
import numpy as np

from pipeline.tasks.base import BoxUniform, Task, sample_cells

# A stand-in for a survey's redshift distribution, chosen for this project: evenly spaced so
# that low and high redshift (where Omega_m and w0 act differently) weigh alike.
REDSHIFTS = np.linspace(0.02, 1.4, 40)
REDSHIFTS.setflags(write=False)

# Nodes per redshift interval: the integrand is smooth on intervals of width ~0.035, and 4 nodes
# already agree with 64 to 1e-14 mag over the prior box; 6 leave a margin outside it.
QUADRATURE_ORDER = 6

# Rows of theta per vectorised block, bounding the (rows, redshifts, nodes) temporaries to ~10 MB.
BLOCK_ROWS = 4096


class SNCosmology(Task):
    r"""Distance moduli of type Ia supernovae at fixed redshifts, in flat wCDM.

    .. math::
        E(z)^2 = \Omega_m (1 + z)^3 + (1 - \Omega_m) (1 + z)^{3 (1 + w_0)}, \quad
        D_L(z) = (1 + z) \frac{c}{H_0} \int_0^z \frac{dz'}{E(z')}, \quad
        \mu = 5 \log_{10} \frac{D_L}{10\,\mathrm{pc}},

    and :math:`x_k = \mu(z_k) + \epsilon_k` with :math:`\epsilon_k \sim \mathcal{N}(0, 0.15^2)`
    (the order of the intrinsic scatter of standardised SNe Ia) at the 40 redshifts
    ``np.linspace(0.02, 1.4, 40)``, a design choice of this project that stands in for a survey's
    redshift distribution. :math:`H_0 = 70` km/s/Mpc is fixed and there is no radiation
    (:math:`T_\mathrm{CMB,0} = 0`, astropy's default), so the model is astropy's
    ``FlatwCDM(H0=70, Om0=Omega_m, w0=w0)``. Priors: :math:`\Omega_m \sim \mathcal{U}(0.1, 0.6)`,
    :math:`w_0 \sim \mathcal{U}(-2, -0.4)`.

    The reference posterior is the exact Gaussian likelihood on a ``grid_size``-squared grid of
    cells over the prior box, sampled by drawing cells and jittering uniformly within them.
    At ``grid_size = 300`` a cell is 0.0017 by 0.0053. The posterior is a thin tilted ridge, so
    what the grid must resolve is its conditional standard deviation along each axis: over 500
    prior-predictive observations it spans a median of 20 cells per parameter and never fewer
    than 3.3 (for Omega_m, near the corner Omega_m = 0.1, w0 = -2), where the jitter widens the
    posterior by < 1 % in variance ((1 / 3.3)^2 / 12). A ``RuntimeWarning`` flags observations
    whose posterior spans fewer than 3 cells per conditional standard deviation.

    Parameters outside the prior: the simulator stays the same function of theta (astropy's
    model) wherever :math:`E(z)^2 > 0` on ``[0, 1.4]``; rows where it is not (e.g. a negative
    Omega_m) are all NaN, which the pipeline counts and excludes.

    References:
        | Distance measures in cosmology (Hogg, 1999) https://arxiv.org/abs/astro-ph/9905116
        | Observational Evidence from Supernovae for an Accelerating Universe and a
        | Cosmological Constant (Riess et al., 1998) https://arxiv.org/abs/astro-ph/9805201
    """

    name = "sn_cosmology"
    parameter_names = ("Omega_m", "w0")
    parameter_units = ("", "")
    x_shape = REDSHIFTS.shape
    x_unit = "mag"
    reference_method = "grid"
    redshifts = REDSHIFTS
    hubble_constant = 70.0 * u.km / u.s / u.Mpc
    sigma_mag: float = 0.15
    grid_size: int = 300

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform(low=(0.1, -2.0), high=(0.6, -0.4))

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws noisy distance moduli: ``(n, 2)`` to ``(n, 40)``."""
        mu = self.distance_modulus(np.asarray(theta, dtype=np.float64))
        return mu + rng.normal(0.0, self.sigma_mag, size=mu.shape)

    def distance_modulus(self, theta: np.ndarray) -> np.ndarray:
        """Noise-free distance moduli in mag: ``(n, 2)`` to ``(n, 40)``."""
        return distance_modulus(theta[:, 0], theta[:, 1], self.redshifts, self.hubble_constant)

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Samples of the gridded exact posterior, shape ``(num_samples, 2)``."""
        x_obs = self.check_observation(x_obs)
        centres, widths, mu = self._grid
        log_like = -0.5 * np.sum((x_obs - mu) ** 2, axis=-1) / self.sigma_mag**2
        # The prior is flat on the box, so cell masses are proportional to the likelihood.
        mass = np.exp(log_like - log_like.max())
        mass /= mass.sum()
        _warn_if_unresolved(centres, widths, mass)
        return sample_cells(centres, widths, mass, num_samples, rng)

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell centres ``(G^2, 2)``, cell widths ``(2,)`` and the centres' moduli ``(G^2, 40)``.

        The same for every observation, so computed once per task instance (~1.5 s, 30 MB).
        """
        low, high = self.prior.bounds
        widths = (high - low) / self.grid_size
        cells = np.arange(self.grid_size) + 0.5
        axes = [lo + w * cells for lo, w in zip(low, widths, strict=True)]
        centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
        return centres, widths, self.distance_modulus(centres)


class SNCosmologyOffset(SNCosmology):
    """``sn_cosmology_offset``: :class:`SNCosmology` with every distance modulus 0.1 mag
    fainter by a miscalibrated zero point, ``x + 0.1``: a forward model the simulations of
    ``sn_cosmology`` do not contain, for misspecification experiments
    (``mocks: {sn_cosmology: sn_cosmology_offset}``). Its exact posterior is ``sn_cosmology``'s at
    ``x - 0.1``."""

    name = "sn_cosmology_offset"
    offset: float = 0.1

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy distance moduli plus the offset: ``(n, 2)`` to ``(n, 40)``."""
        return super().simulate(theta, rng) + self.offset

    def reference_posterior(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Samples of the gridded exact posterior, shape ``(num_samples, 2)``."""
        return super().reference_posterior(
            self.check_observation(x_obs) - self.offset, num_samples, rng
        )


def distance_modulus(
    omega_m: np.ndarray, w0: np.ndarray, redshifts: np.ndarray, hubble_constant: u.Quantity
) -> np.ndarray:
    r"""Distance moduli of flat wCDM without radiation, in mag: ``(n,)``, ``(n,)`` to ``(n, K)``.

    Agrees with ``astropy.cosmology.FlatwCDM(H0, Om0, w0).distmod(z)`` (Tcmb0 = 0), which takes
    only scalar parameters and 25-35 ms per parameter set. Rows where :math:`E(z)^2 \le 0` at
    some quadrature node (unphysical parameters) are NaN.

    Arguments:
        omega_m: Matter densities, shape ``(n,)``.
        w0: Dark-energy equations of state, shape ``(n,)``.
        redshifts: Increasing positive redshifts, shape ``(K,)``.
        hubble_constant: :math:`H_0` as a Quantity.
    """
    z, weights = _interval_quadrature(np.asarray(redshifts, dtype=np.float64))
    # c / H0 in units of 10 pc, so that mu = 5 log10 of the distance in those units.
    hubble_distance = (const.c / hubble_constant).to_value(u.Unit("10 pc"))
    blocks = [
        _comoving_integral(omega_m[i : i + BLOCK_ROWS], w0[i : i + BLOCK_ROWS], z, weights)
        for i in range(0, len(omega_m), BLOCK_ROWS)
    ]
    integral = np.concatenate(blocks) if blocks else np.empty((0, len(redshifts)))
    return 5 * np.log10((1 + np.asarray(redshifts)) * hubble_distance * integral)


def _interval_quadrature(redshifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on ``[0, z_1], [z_1, z_2], ...``: each ``(K, order)``."""
    if redshifts.ndim != 1 or np.any(np.diff(redshifts) <= 0) or redshifts[0] <= 0:
        raise ValueError("redshifts must be a 1-d array of increasing positive numbers")
    nodes, weights = np.polynomial.legendre.leggauss(QUADRATURE_ORDER)
    edges = np.concatenate([[0.0], redshifts])
    half = np.diff(edges)[:, None] / 2
    return edges[:-1, None] + half * (nodes + 1), half * weights


def _comoving_integral(
    omega_m: np.ndarray, w0: np.ndarray, z: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """``int_0^{z_k} dz / E(z)`` from interval nodes ``(K, order)``: ``(n,)`` to ``(n, K)``."""
    log1pz = np.log1p(z)
    omega_m, w0 = omega_m[:, None, None], w0[:, None, None]
    e2 = omega_m * np.exp(3 * log1pz) + (1 - omega_m) * np.exp(3 * (1 + w0) * log1pz)
    physical = np.all(e2 > 0, axis=(1, 2))
    inv_e = 1 / np.sqrt(np.where(e2 > 0, e2, 1.0))  # placeholder 1.0 avoids warnings, then NaN
    integral = np.cumsum(np.sum(weights * inv_e, axis=-1), axis=-1)
    return np.where(physical[:, None], integral, np.nan)


def _warn_if_unresolved(centres: np.ndarray, widths: np.ndarray, mass: np.ndarray) -> None:
    """Warns if a cell is wider than 1/3 of the posterior's conditional standard deviation."""
    # The conditional widths (for a Gaussian, 1 / sqrt(diag(inverse covariance))) measure the
    # ridge along each axis, which is what a grid has to resolve. In 2-d, the conditional
    # variance of one parameter is det(cov) / var(other); a single-cell posterior gives 0.
    cov = np.cov(centres.T, aweights=mass, bias=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        conditional_std = np.sqrt(max(np.linalg.det(cov), 0.0) / np.diag(cov)[::-1])
        cells_per_sigma = conditional_std / widths
    if not np.all(cells_per_sigma >= 3):
        warnings.warn(
            f"sn_cosmology reference grid resolves the posterior with only {cells_per_sigma} "
            "cells per conditional standard deviation; raise grid_size",
            RuntimeWarning,
            stacklevel=3,
        )
