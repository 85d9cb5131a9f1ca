"""Field-level cosmology: projected matter density maps of a periodic box, Gaussian and lognormal.

Conventions. A map has ``N x N`` pixels of side ``L / N`` over a periodic box of side ``L``. Its
discrete Fourier transform ``X_k = sum_r x_r exp(-i k.r)`` (numpy's ``fft2``) has, for a
statistically homogeneous field of power spectrum ``P_2D(k)`` (area units) plus white noise of
variance ``sigma_n^2`` per pixel,

    E|X_k|^2 / N^2 = s_k = P_2D(k) / A_pix + sigma_n^2,     A_pix = (L / N)^2,

and distinct modes are independent (the pair ``k, -k`` of a real map aside). The map is the box's
3D linear density projected along its third axis over the full depth ``L``: only ``k_z = 0``
modes survive, so ``P_2D(k) = P_3D(k) / L`` exactly, with ``P_3D`` from
:class:`pipeline.tasks.power_spectrum.LinearPower` at redshift 0. The mode ``k = 0`` carries no
signal (a density contrast has zero mean over the box).
"""

from __future__ import annotations

from functools import cached_property

import astropy.units as u
import numpy as np
from scipy import stats

from pipeline.tasks.base import BoxUniform, Reference, Task, sample_cells
from pipeline.tasks.power_spectrum import LinearPower

DEFAULT_PIXELS = 64
DEFAULT_BOX = 256 * u.Mpc
DEFAULT_NOISE = 0.3
# Bands of the power-spectrum summary the predictive checks compare (log-spaced in |k|).
SUMMARY_BANDS = 8
# Grid of the exact posterior: the prior box, then twice a box around the mass (see reference).
GRID_SIZES = (64, 64, 256)
# Cells whose log density lies this far below the maximum carry < e^-20 of the mass each.
GRID_CUTOFF = 20.0


class FieldCosmology(Task):
    """What the Gaussian and lognormal map tasks share: geometry, prior, simulation, summaries.

    Arguments:
        num_pixels: ``N``, a power of two >= 8 (the CNN embedding halves maps; FFTs are fastest).
        box_size: ``L`` as an astropy length.
        noise_std: Pixel noise ``sigma_n`` (in units of the density contrast).
        power: The 3D linear power spectrum.
    """

    base_name: str
    parameter_names = ("Omega_m", "sigma_8")
    parameter_units = ("", "")
    x_unit = ""
    # A block of 100 maps of 256^2 pixels holds ~50 MB of complex modes; smaller maps less.
    seed_block_size = 100
    summary_label = "|k| band (log power), then pixel skewness and kurtosis"

    def __init__(
        self,
        num_pixels: int = DEFAULT_PIXELS,
        box_size: u.Quantity = DEFAULT_BOX,
        noise_std: float = DEFAULT_NOISE,
        power: LinearPower | None = None,
    ) -> None:
        if not isinstance(num_pixels, int) or num_pixels < 8 or num_pixels & (num_pixels - 1):
            raise ValueError(
                f"num_pixels must be a power of two of at least 8 (the CNN embedding halves the "
                f"map at each stage), got {num_pixels!r}; e.g. 32, 64, 128 or 256"
            )
        if not isinstance(box_size, u.Quantity) or box_size.unit.physical_type != "length":
            raise ValueError(
                f"box_size must be an astropy length, e.g. 256 * astropy.units.Mpc, got "
                f"{box_size!r}"
            )
        if not box_size.to_value(u.Mpc) > 0:
            raise ValueError(f"box_size must be positive, got {box_size}")
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be zero or positive, got {noise_std}")
        self.num_pixels = num_pixels
        self.box_size = box_size.to(u.Mpc)
        self.noise_std = float(noise_std)
        self.power = power or LinearPower()
        self.x_shape = (num_pixels, num_pixels)
        suffix = "" if num_pixels == DEFAULT_PIXELS else f"_{num_pixels}"
        self.name = self.base_name + suffix

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform(low=(0.1, 0.5), high=(0.5, 1.1))

    # Fourier geometry.

    @cached_property
    def _shells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wavenumbers of the shells of equal ``|n|^2 > 0`` (1/Mpc), ``(S,)``; the shell of each
        mode of the ``fft2`` grid ``(N, N)`` (-1 for ``k = 0``), whose first ``N // 2 + 1``
        columns are the ``rfft2`` grid; and each shell's number of modes, ``(S,)``."""
        n = self.num_pixels
        nx = np.fft.fftfreq(n, 1 / n)
        n2 = (nx[:, None] ** 2 + nx[None, :] ** 2).astype(np.int64)
        values, counts = np.unique(n2[n2 > 0], return_counts=True)
        index = np.where(n2 > 0, np.searchsorted(values, n2), -1)
        k = 2 * np.pi / self.box_size.to_value(u.Mpc) * np.sqrt(values)
        return k, index, counts

    def shell_power(self, theta: np.ndarray) -> np.ndarray:
        """``P_2D(k) / A_pix`` of each shell, the signal in ``s_k``: ``(n, 2)`` to ``(n, S)``."""
        theta = self._check_theta(theta)
        k, _, _ = self._shells
        side = self.box_size.to_value(u.Mpc)
        return self.power(k, theta[:, 0], theta[:, 1]) * self.num_pixels**2 / side**3

    def _grid_power(self, shell_power: np.ndarray) -> np.ndarray:
        """Spreads shell values ``(n, S)`` over the ``rfft2`` grid ``(n, N, N // 2 + 1)``, 0 at
        ``k = 0``."""
        _, index, _ = self._shells
        padded = np.concatenate([shell_power, np.zeros((len(shell_power), 1))], axis=1)
        return padded[:, index[:, : self.num_pixels // 2 + 1]]  # index -1: the trailing zero

    def _check_theta(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, dtype=np.float64)
        if theta.ndim != 2 or theta.shape[1] != 2:
            raise ValueError(f"theta must have shape (n, 2) (Omega_m, sigma_8), got {theta.shape}")
        omega_b = self.power.cosmology.Ob0
        bad = ~(theta[:, 0] > omega_b) | ~(theta[:, 1] > 0)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(
                f"{self.name}: parameters outside the physical range in rows {rows[:5].tolist()}"
                f" (e.g. Omega_m={theta[rows[0], 0]}, sigma_8={theta[rows[0], 1]}): Omega_m must "
                f"exceed Omega_b={omega_b:.4f} and sigma_8 must be positive"
            )
        return theta

    # Simulation.

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draws noisy maps: ``(n, 2)`` to ``(n, N, N)``, in blocks of rows that bound the FFTs'
        temporaries to ~100 MB."""
        theta = self._check_theta(theta)
        rows = max(1, 2**22 // self.num_pixels**2)
        x = np.empty((len(theta), *self.x_shape))
        for start in range(0, len(theta), rows):
            block = slice(start, start + rows)
            delta = self.density(self.shell_power(theta[block]), rng)
            x[block] = delta + rng.normal(0.0, self.noise_std, size=delta.shape)
        return x

    def density(self, shell_power: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise-free density contrasts ``(n, N, N)`` with shell powers ``(n, S)``."""
        return self._filter_white_noise(self._grid_power(shell_power), rng)

    def _filter_white_noise(self, power: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gaussian maps ``(n, N, N)`` whose modes have variance ``N^2 power``.

        ``power`` is given on the ``rfft2`` grid, ``(n, N, N // 2 + 1)``.
        """
        white = rng.standard_normal((len(power), *self.x_shape))
        modes = np.fft.rfft2(white) * np.sqrt(power)
        return np.fft.irfft2(modes, s=self.x_shape)

    # Summaries for posterior predictive checks.

    def summary(self, x: np.ndarray) -> np.ndarray:
        """Log band powers ``log(mean |X_k|^2 / N^2)`` in 8 log-spaced ``|k|`` bands, then the
        skewness and excess kurtosis of the pixel values: ``(n, N, N)`` to ``(n, 10)``; what
        predictive checks, local C2ST and the misspecification tests compare.

        The power spectrum says nothing of the one-point distribution: a lognormal field has
        exactly a Gaussian one's spectrum (``lognormal_cosmology``), and only its skewness and
        tails tell them apart.
        """
        x = np.asarray(x, dtype=np.float64).reshape(-1, *self.x_shape)
        power = np.abs(np.fft.rfft2(x)) ** 2 / self.num_pixels**2
        weights = self._band_weights
        bands = np.log(power.reshape(len(x), -1) @ weights / weights.sum(axis=0))
        pixels = x.reshape(len(x), -1)
        moments = [stats.skew(pixels, axis=1), stats.kurtosis(pixels, axis=1)]
        return np.concatenate([bands, np.stack(moments, axis=1)], axis=1)

    @property
    def summary_size(self) -> int:
        return SUMMARY_BANDS + 2

    @cached_property
    def _band_weights(self) -> np.ndarray:
        """``(N * (N // 2 + 1), B)``: how often each ``rfft2`` mode counts in each band (2 where
        its conjugate is not on the half grid, 1 where it is; 0 outside the band and at k = 0)."""
        n = self.num_pixels
        nx, ny = np.fft.fftfreq(n, 1 / n), np.arange(n // 2 + 1)
        radius = np.sqrt(nx[:, None] ** 2 + ny[None, :] ** 2).reshape(-1)
        edges = np.geomspace(1.0, radius.max() * (1 + 1e-9), SUMMARY_BANDS + 1)
        band = np.searchsorted(edges, radius, side="right") - 1
        multiplicity = np.broadcast_to(
            np.where((ny == 0) | (ny == n // 2), 1.0, 2.0), (n, len(ny))
        )
        onehot = (band[:, None] == np.arange(SUMMARY_BANDS)) & (radius[:, None] > 0)
        return onehot * multiplicity.reshape(-1, 1)


class GaussianFieldCosmology(FieldCosmology):
    r"""``grf_cosmology``: a projected Gaussian density field with noise, from (Omega_m, sigma_8).

    .. math::
        x = \delta + n, \quad \delta \sim \mathcal{GRF}\big(P_\mathrm{2D}(k) = P_\mathrm{3D}(k;
        \Omega_m, \sigma_8) / L\big), \quad n_r \overset{iid}{\sim} \mathcal{N}(0, 0.3^2),

    on ``N x N`` pixels (64 by default) of a periodic box of side ``L = 256 Mpc`` (pixels of
    4 Mpc; ``k`` from 0.025 to 0.79 per Mpc across the turnover's tail and the quasi-linear
    range, the field's rms is about 0.45 at sigma_8 = 0.8). Priors :math:`\Omega_m \sim
    \mathcal{U}(0.1, 0.5)`, :math:`\sigma_8 \sim \mathcal{U}(0.5, 1.1)`. ``P_3D`` is the linear
    Eisenstein & Hu (no-wiggle) spectrum of a flat LambdaCDM with the other parameters of
    astropy's Planck18 (see :mod:`pipeline.tasks.power_spectrum`). Simulation is one FFT pair
    per map: white noise filtered by ``sqrt(P_2D / A_pix)``, so the discrete field has the
    spectrum of the module docstring exactly (the continuous field's aliasing is not modelled;
    this discrete model is the task's definition).

    Exact reference: the likelihood is diagonal in Fourier space,

    .. math::
        \log p(x \mid \theta) = -\frac12 \sum_{k \ne 0} \Big(\frac{|X_k|^2 / N^2}{s_k(\theta)}
        + \log s_k(\theta)\Big) + \mathrm{const},

    summed over all modes (each pair ``k, -k`` counted twice with weight 1/2 is exactly the
    density of one complex mode; self-conjugate modes are real Gaussians), and depends on the
    map only through the power in each shell of equal ``|k|``. With the flat prior, the
    posterior on a grid of cells is sampled by drawing cells in proportion to their mass and
    jittering uniformly within them: a 64^2 grid over the prior box, then twice a grid (64^2,
    then 256^2) over the bounding box of the cells within ``e^-20`` of the maximum, padded by
    a cell. :attr:`Reference.diagnostics` records the finest grid's cells per conditional
    standard deviation (>= 5 keeps the jitter's variance inflation below 0.4 %).

    :meth:`fisher_information` gives the Fisher matrix of the same likelihood, whose inverse
    bounds the covariance of unbiased estimators (Cramer-Rao): the yardstick without the prior.

    Arguments: as for :class:`FieldCosmology`.

    References:
        | Baryonic Features in the Matter Transfer Function (Eisenstein & Hu, 1998)
        | https://arxiv.org/abs/astro-ph/9709112
        | Karhunen-Loeve eigenvalue problems in cosmology: how should we tackle large data
        | sets? (Tegmark, Taylor & Heavens, 1997) https://arxiv.org/abs/astro-ph/9603021
        | (the Fisher matrix of Gaussian data with a parameter-dependent covariance)
    """

    base_name = "grf_cosmology"
    reference_method = "grid (exact likelihood)"

    # The exact likelihood and the reference posterior.

    def shell_statistics(self, x_obs: np.ndarray) -> np.ndarray:
        """``sum |X_k|^2 / N^2`` over each shell of equal ``|k|``: ``(N, N)`` to ``(S,)``, the
        likelihood's sufficient statistic."""
        x_obs = self.check_observation(x_obs)
        power = np.abs(np.fft.fft2(x_obs)) ** 2 / self.num_pixels**2
        k, index, _ = self._shells
        signal = index >= 0
        return np.bincount(index[signal], power[signal], len(k))

    def log_likelihood(self, x_obs: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Exact ``log p(x_obs | theta)`` up to a constant: ``(N, N)``, ``(n, 2)`` to ``(n,)``."""
        return self._log_likelihood(self.shell_statistics(x_obs), self.shell_power(theta))

    def _log_likelihood(self, statistics: np.ndarray, shell_power: np.ndarray) -> np.ndarray:
        _, _, counts = self._shells
        s = self.field_variance(shell_power)
        return -0.5 * np.sum(statistics / s + counts * np.log(s), axis=-1)

    def field_variance(self, shell_power: np.ndarray) -> np.ndarray:
        """``s_k = P_2D / A_pix + sigma_n^2`` of each shell: ``(n, S)``."""
        return shell_power + self.noise_std**2

    def reference(
        self, x_obs: np.ndarray, num_samples: int, rng: np.random.Generator
    ) -> Reference:
        """Samples of the gridded exact posterior, shape ``(num_samples, 2)``, and the finest
        grid's resolution (``cells_per_std_min``)."""
        statistics = self.shell_statistics(x_obs)
        low, high = self.prior.bounds
        for size in GRID_SIZES:
            centres, widths, log_post = self._grid(statistics, low, high, size)
            keep = log_post >= log_post.max() - GRID_CUTOFF
            low = np.maximum(centres[keep].min(axis=0) - 1.5 * widths, self.prior.bounds[0])
            high = np.minimum(centres[keep].max(axis=0) + 1.5 * widths, self.prior.bounds[1])
        mass = np.exp(log_post - log_post.max())
        mass /= mass.sum()
        samples = sample_cells(centres, widths, mass, num_samples, rng)
        std = np.sqrt(np.diag(np.linalg.inv(np.cov(centres.T, aweights=mass, bias=True))))
        cells = float(np.min(1 / std / widths))
        return Reference(samples, self.reference_method, {"cells_per_std_min": cells})

    def _grid(
        self, statistics: np.ndarray, low: np.ndarray, high: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell centres ``(size^2, 2)``, widths ``(2,)`` and log posterior ``(size^2,)`` on
        ``[low, high]``, row by row of Omega_m (bounding memory to ``size x S`` values)."""
        widths = (high - low) / size
        axes = [lo + w * (np.arange(size) + 0.5) for lo, w in zip(low, widths, strict=True)]
        # sigma_8 only scales the spectrum: shell powers at sigma_8 = 1 for each Omega_m row.
        unit_power = self.shell_power(np.stack([axes[0], np.ones(size)], axis=-1))
        log_post = np.stack(
            [
                self._log_likelihood(statistics, axes[1][:, None] ** 2 * row[None, :])
                for row in unit_power
            ]
        )
        centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
        return centres, widths, log_post.reshape(-1)

    def fisher_information(self, theta: np.ndarray) -> np.ndarray:
        """Fisher matrix of one map at ``theta``: ``(n, 2)`` to ``(n, 2, 2)``.

        ``F_ij = 1/2 sum_{k != 0} d_i log s_k d_j log s_k`` (all modes of the map), with the
        derivatives by central differences of relative step 1e-4 (error ~1e-8 relative).
        """
        theta = self._check_theta(theta)
        _, _, counts = self._shells
        gradients = []
        for i in range(2):
            step = np.zeros(2)
            step[i] = 1e-4
            up = np.log(self.field_variance(self.shell_power(theta * (1 + step))))
            down = np.log(self.field_variance(self.shell_power(theta * (1 - step))))
            gradients.append((up - down) / (2e-4 * theta[:, i : i + 1]))
        grad = np.stack(gradients, axis=1)  # (n, 2, S)
        return 0.5 * np.einsum("nis,njs,s->nij", grad, grad, counts)


class LognormalFieldCosmology(FieldCosmology):
    r"""``lognormal_cosmology``: the field of ``grf_cosmology`` made lognormal, with noise.

    .. math::
        \delta = \exp(g - \sigma_g^2 / 2) - 1, \qquad x = \delta + n,

    where ``g`` is a Gaussian field whose correlation function is
    :math:`\xi_g(r) = \log(1 + \xi(r))`, with :math:`\xi` the correlation function of the
    Gaussian task's ``P_2D``: then ``delta`` has zero mean and exactly that correlation
    function (Coles & Jones 1991), but a skewed one-point distribution bounded below by -1, as
    real matter fields have. Where :math:`\xi_g`'s spectrum is negative (a few modes; the
    transform does not guarantee positivity) it is set to zero. There is no closed-form
    likelihood, so the task has no reference; it is validated by coverage.

    References:
        | A lognormal model for the cosmological mass distribution (Coles & Jones, 1991)
        | https://doi.org/10.1093/mnras/248.1.1
    """

    base_name = "lognormal_cosmology"

    def density(self, shell_power: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Lognormal density contrasts ``(n, N, N)`` whose spectrum has shell powers ``(n, S)``."""
        gaussian_power = self.gaussian_power(shell_power)
        # sigma_g^2 of the field actually filtered (after clipping): its correlation at r = 0.
        variance = np.fft.irfft2(gaussian_power, s=self.x_shape)[:, :1, :1]
        return np.expm1(self._filter_white_noise(gaussian_power, rng) - variance / 2)

    def gaussian_power(self, shell_power: np.ndarray) -> np.ndarray:
        """``P_g / A_pix`` on the ``rfft2`` grid, ``(n, N, N // 2 + 1)``, from ``log(1 + xi)``."""
        xi = np.fft.irfft2(self._grid_power(shell_power), s=self.x_shape)
        if np.any(xi <= -1):
            raise ValueError(f"{self.name}: correlation function <= -1, no lognormal field exists")
        return np.maximum(np.fft.rfft2(np.log1p(xi)).real, 0.0)
