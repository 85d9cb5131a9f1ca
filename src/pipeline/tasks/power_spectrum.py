"""Linear matter power spectrum of flat LambdaCDM, vectorised over Omega_m.

The shape is the Eisenstein & Hu (1998) transfer function without baryon oscillations ("no
wiggle", their eqs. 26-31), the amplitude is fixed by sigma_8, both at redshift 0. The other
cosmological parameters (h, Omega_b, T_CMB) come from an ``astropy.cosmology`` instance, Planck18
by default; astropy has no transfer functions, and one closed-form fit needs no extra package.

References:
    | Baryonic Features in the Matter Transfer Function (Eisenstein & Hu, 1998)
    | https://arxiv.org/abs/astro-ph/9709112
    | Planck 2018 results. VI. Cosmological parameters (Planck Collaboration, 2020)
    | https://arxiv.org/abs/1807.06209 (n_s = 0.9665, TT,TE,EE+lowE+lensing+BAO)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
from astropy.cosmology import FLRW, Planck18

# Planck 2018's spectral index; astropy's Planck18 does not carry it.
N_S = 0.9665

# sigma_8's integral in ln k: the top-hat window of 8 Mpc/h and T(k) are smooth on scales of
# 0.05 in ln k: 2048 nodes from 1e-5 to 1e2 / Mpc agree with 16384 to 1e-9 in sigma_8^2, and
# with adaptive quadrature over 1e-6 to 1e3 to 1e-4 in sigma_8 (tests/test_fields.py).
_LN_K = np.linspace(np.log(1e-5), np.log(1e2), 2048)


@dataclass(frozen=True)
class LinearPower:
    """``P(k)`` in Mpc^3 for flat LambdaCDM with free Omega_m and sigma_8.

    Arguments:
        cosmology: Supplies h, Omega_b and T_CMB (its Omega_m is replaced per call).
        n_s: Primordial spectral index.
    """

    cosmology: FLRW = field(default_factory=lambda: Planck18)
    n_s: float = N_S

    def __call__(self, k: np.ndarray, omega_m: np.ndarray, sigma_8: np.ndarray) -> np.ndarray:
        """Power at wavenumbers ``k`` (1/Mpc), shape ``(K,)``, for ``(n,)`` parameters: ``(n, K)``.

        ``P(k) = sigma_8^2 k^n_s T(k)^2 / sigma_unit^2`` with ``sigma_unit`` the rms of
        ``k^n_s T(k)^2`` in spheres of 8 Mpc/h; ``P(0) = 0``.
        """
        omega_m = np.atleast_1d(np.asarray(omega_m, dtype=np.float64))
        sigma_8 = np.atleast_1d(np.asarray(sigma_8, dtype=np.float64))
        return (sigma_8**2 / self.sigma_8_unit(omega_m))[:, None] * self.shape(k, omega_m)

    def shape(self, k: np.ndarray, omega_m: np.ndarray) -> np.ndarray:
        """``k^n_s T(k)^2`` in arbitrary units: ``(K,)``, ``(n,)`` to ``(n, K)``."""
        k = np.asarray(k, dtype=np.float64)
        with np.errstate(divide="ignore"):
            power = np.where(k > 0, k**self.n_s, 0.0)
        return power * self.transfer(k, omega_m) ** 2

    def sigma_8_unit(self, omega_m: np.ndarray) -> np.ndarray:
        """``sigma_8^2`` of :meth:`shape`, shape ``(n,)`` (``int k^3 P W^2 dln k / 2 pi^2``)."""
        k = np.exp(_LN_K)
        radius = 8.0 / self.cosmology.h  # Mpc
        kr = k * radius
        window = 3 * (np.sin(kr) - kr * np.cos(kr)) / kr**3
        integrand = k**3 * self.shape(k, omega_m) * window**2 / (2 * np.pi**2)
        return np.trapezoid(integrand, _LN_K, axis=-1)

    def transfer(self, k: np.ndarray, omega_m: np.ndarray) -> np.ndarray:
        """Eisenstein & Hu's no-wiggle ``T(k)``: ``(K,)`` in 1/Mpc, ``(n,)`` to ``(n, K)``."""
        omega_m = np.asarray(omega_m, dtype=np.float64)[:, None]
        h = self.cosmology.h
        theta_cmb = self.cosmology.Tcmb0.to_value(u.K) / 2.7
        baryon_fraction = self.cosmology.Ob0 / omega_m
        omh2 = omega_m * h**2
        obh2 = self.cosmology.Ob0 * h**2
        sound_horizon = 44.5 * np.log(9.83 / omh2) / np.sqrt(1 + 10 * obh2**0.75)  # eq. 26, Mpc
        alpha = (
            1
            - 0.328 * np.log(431 * omh2) * baryon_fraction
            + 0.38 * np.log(22.3 * omh2) * baryon_fraction**2
        )  # eq. 31
        gamma = omega_m * h * (alpha + (1 - alpha) / (1 + (0.43 * k * sound_horizon) ** 4))
        q = k / h * theta_cmb**2 / gamma  # eq. 28
        log_term = np.log(2 * np.e + 1.8 * q)
        return log_term / (log_term + (14.2 + 731 / (1 + 62.5 * q)) * q**2)  # eq. 29
