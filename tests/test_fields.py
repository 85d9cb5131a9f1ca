"""Field-level cosmology: the power spectrum, the map simulators, the exact likelihood and its
reference posterior, the Fisher bound, and the errors a user can cause."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
import torch
from astropy.cosmology import Planck18
from scipy import integrate, stats

from pipeline.models.embeddings import build_embedding
from pipeline.tasks import get_task
from pipeline.tasks.fields import GaussianFieldCosmology, LognormalFieldCosmology
from pipeline.tasks.power_spectrum import LinearPower

# The power spectrum.


def test_power_spectrum_has_the_requested_sigma_8() -> None:
    power = LinearPower()
    radius = 8 / Planck18.h

    def sigma_8_squared(omega_m: float, sigma_8: float) -> float:
        def integrand(ln_k: float) -> float:
            k = np.exp(ln_k)
            window = 3 * (np.sin(k * radius) - k * radius * np.cos(k * radius)) / (k * radius) ** 3
            p = power(np.array([k]), [omega_m], [sigma_8])[0, 0]
            return k**3 * p * window**2 / (2 * np.pi**2)

        value, _ = integrate.quad(integrand, np.log(1e-6), np.log(1e3), limit=500)
        return value

    for omega_m, sigma_8 in ((0.1, 0.5), (0.3, 0.8), (0.5, 1.1)):
        # Adaptive quadrature over a wider range: 1e-4 relative covers the fixed grid's error.
        assert np.sqrt(sigma_8_squared(omega_m, sigma_8)) == pytest.approx(sigma_8, rel=1e-4)


def test_transfer_function_without_baryons_is_eisenstein_hu_zero_baryon_form() -> None:
    """With Omega_b = 0 the fit reduces to eqs. 28-29 of Eisenstein & Hu (1998) with
    Gamma = Omega_m h, written out here independently."""
    cosmology = Planck18.clone(Ob0=0.0)
    power = LinearPower(cosmology=cosmology)
    k = np.logspace(-4, 1, 50)
    omega_m = 0.3
    q = k / cosmology.h * (cosmology.Tcmb0.value / 2.7) ** 2 / (omega_m * cosmology.h)
    l0 = np.log(2 * np.e + 1.8 * q)
    expected = l0 / (l0 + (14.2 + 731 / (1 + 62.5 * q)) * q**2)
    np.testing.assert_allclose(power.transfer(k, np.array([omega_m]))[0], expected, rtol=1e-12)


def test_transfer_function_limits_and_turnover() -> None:
    power = LinearPower()
    transfer = power.transfer(np.array([1e-6, 1e-2, 1.0]), np.array([0.3]))[0]
    assert transfer[0] == pytest.approx(1.0, abs=1e-4)  # large scales are not suppressed
    assert 1 > transfer[1] > transfer[2] > 0
    k = np.logspace(-3, 0, 400)
    peak = k[np.argmax(power(k, [0.3111], [0.8102])[0])]
    # Planck18's linear spectrum peaks near k = 0.015 h/Mpc = 0.010/Mpc.
    assert 0.007 < peak < 0.014


# Simulation.


@pytest.mark.parametrize("name", ["grf_cosmology_32", "lognormal_cosmology_32"])
def test_maps_have_the_spectrum_of_the_model(name: str) -> None:
    """Averaged over maps, each mode's |X_k|^2 / N^2 is P_2D / A_pix + sigma_n^2 (module doc)."""
    task = get_task(name)
    theta = np.tile([[0.3, 0.9]], (400, 1))
    x = task.simulate(theta, np.random.default_rng(0))
    power = np.abs(np.fft.fft2(x)) ** 2 / task.num_pixels**2
    _, index, counts = task._shells
    measured = np.bincount(index[index >= 0], power.mean(axis=0)[index >= 0]) / counts
    expected = task.shell_power(theta[:1])[0] + task.noise_std**2
    # Per mode |X_k|^2 is exponential (variance = mean^2), halved by the pairing of k and -k:
    # the shell mean of 400 maps has relative std sqrt(2 / (400 counts)). 4.5 sigma over ~100
    # shells keeps the false-alarm rate below 1e-3; the lognormal clipping costs < 1 %.
    z = (measured / expected - 1) / np.sqrt(2 / (400 * counts))
    assert np.max(np.abs(z)) < 4.5, z


def test_lognormal_density_is_skewed_and_bounded_below() -> None:
    task = LognormalFieldCosmology(num_pixels=32)
    theta = np.tile([[0.3, 1.0]], (200, 1))
    delta = task.density(task.shell_power(theta), np.random.default_rng(1))
    assert delta.min() > -1
    assert abs(delta.mean()) < 0.01  # the exact sigma_g^2 / 2 offset makes the mean zero
    assert stats.skew(delta.reshape(-1)) > 0.5
    gaussian = GaussianFieldCosmology(num_pixels=32)
    g = gaussian.density(gaussian.shell_power(theta), np.random.default_rng(1))
    assert abs(stats.skew(g.reshape(-1))) < 0.05


def test_simulation_refuses_unphysical_parameters() -> None:
    task = get_task("grf_cosmology_32")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"rows \[1\].*Omega_m must exceed Omega_b"):
        task.simulate(np.array([[0.3, 0.8], [-0.1, 0.8]]), rng)
    with pytest.raises(ValueError, match="sigma_8 must be positive"):
        task.simulate(np.array([[0.3, 0.0]]), rng)
    with pytest.raises(ValueError, match="outside the physical range"):
        task.simulate(np.array([[0.3, np.nan]]), rng)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        task.simulate(np.array([0.3, 0.8]), rng)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_pixels": 48}, "power of two"),
        ({"num_pixels": 4}, "power of two of at least 8"),
        ({"box_size": 256.0}, "astropy length"),
        ({"box_size": 3 * u.s}, "astropy length"),
        ({"box_size": -1 * u.Mpc}, "positive"),
        ({"noise_std": -0.1}, "noise_std"),
    ],
)
def test_task_refuses_bad_geometry(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianFieldCosmology(**kwargs)


def test_box_size_accepts_any_length_unit() -> None:
    task = GaussianFieldCosmology(num_pixels=8, box_size=256 * u.Mpc / Planck18.h)
    assert task.box_size.unit == u.Mpc
    assert task.box_size.value == pytest.approx(256 / Planck18.h)


def test_summary_covers_every_mode_once() -> None:
    task = get_task("grf_cosmology_32")
    weights = task._band_weights
    assert weights.sum() == 32**2 - 1  # every mode but k = 0, conjugate pairs counted twice
    assert np.all(weights.sum(axis=0) > 0)
    x = task.simulate(np.array([[0.3, 0.8]] * 3), np.random.default_rng(0))
    summary = task.summary(x)
    assert summary.shape == (3, task.summary_size) and np.all(np.isfinite(summary))
    # Parseval: the band powers, weighted by their mode counts, add up to the map's variance.
    total = np.exp(summary[:, :-2]) @ weights.sum(axis=0) / 32**2
    np.testing.assert_allclose(total, x.reshape(3, -1).var(axis=1), rtol=1e-10)
    # Then the pixels' skewness and excess kurtosis: near 0 for a Gaussian field; for an
    # exponential one-point distribution (skewness 2, kurtosis 6; over 1024 pixels the
    # estimates scatter by 0.25 and 2.4) clearly positive.
    assert np.all(np.abs(summary[:, -2:]) < 0.5)
    skewed = task.summary(np.random.default_rng(1).exponential(size=(2, 32, 32)))
    assert np.all((skewed[:, -2] > 1) & (skewed[:, -2] < 3) & (skewed[:, -1] > 1)), skewed


# The exact likelihood and the reference.


def test_likelihood_equals_the_pixel_space_gaussian_density() -> None:
    """On 8x8 maps the likelihood in Fourier space, up to a constant, is the multivariate
    normal density with the circulant covariance built from the correlation function."""
    task = GaussianFieldCosmology(num_pixels=8)
    thetas = np.array([[0.2, 0.6], [0.3, 0.8], [0.45, 1.0]])
    x = task.simulate(thetas[1:2], np.random.default_rng(2))[0]
    grid = np.indices((8, 8)).reshape(2, -1).T
    exact = []
    for theta in thetas:
        power = task._grid_power(task.shell_power(theta[None]))[0]
        xi = np.fft.irfft2(power, s=(8, 8))
        lag = (grid[:, None, :] - grid[None, :, :]) % 8
        cov = xi[lag[..., 0], lag[..., 1]] + task.noise_std**2 * np.eye(64)
        exact.append(stats.multivariate_normal(np.zeros(64), cov).logpdf(x.reshape(-1)))
    ours = task.log_likelihood(x, thetas)
    np.testing.assert_allclose(ours - ours[0], np.array(exact) - exact[0], atol=1e-8)


def test_reference_resolves_the_posterior() -> None:
    task = get_task("grf_cosmology")
    theta, x = task.simulate_block(20, np.random.default_rng(3))
    for xi in x:
        reference = task.reference(xi, 1000, np.random.default_rng(4))
        assert reference.diagnostics["cells_per_std_min"] >= 5
        low, high = task.prior.bounds
        assert np.all((reference.samples >= low) & (reference.samples <= high))


def test_reference_matches_the_prior_box_grid() -> None:
    """The zoomed grids give the posterior a single fine grid over the whole prior gives."""
    task = get_task("grf_cosmology_32")
    _, x = task.simulate_block(1, np.random.default_rng(5))
    samples = task.reference(x[0], 20000, np.random.default_rng(6)).samples
    centres, _, log_post = task._grid(task.shell_statistics(x[0]), *task.prior.bounds, 600)
    mass = np.exp(log_post - log_post.max())
    mass /= mass.sum()
    mean = mass @ centres
    std = np.sqrt(mass @ (centres - mean) ** 2)
    # 20000 samples: the mean's standard error is std / 141; allow 4 of them. The std's
    # relative standard error is 1 / sqrt(2 * 20000) = 0.5 %; allow 3 %.
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=4 * std.max() / 141)
    np.testing.assert_allclose(samples.std(axis=0), std, rtol=0.03)


@pytest.mark.slow  # 64^2 maps: seconds
def test_fisher_bound_matches_the_posterior_of_large_maps() -> None:
    """With 256^2 maps the posterior is Gaussian with covariance F^-1 (Bernstein-von Mises),
    far from the prior's edges; this checks the Fisher matrix against the exact likelihood."""
    task = get_task("grf_cosmology_256")
    theta = np.array([[0.3, 0.8]])
    x = task.simulate(theta, np.random.default_rng(7))[0]
    samples = task.reference(x, 20000, np.random.default_rng(8)).samples
    bound = np.sqrt(np.diag(np.linalg.inv(task.fisher_information(theta)[0])))
    # The observed information differs from the expected one by O(1/sqrt(modes)) ~ 1 %, and
    # the posterior's non-Gaussianity at this size by a few %: 10 %.
    np.testing.assert_allclose(samples.std(axis=0), bound, rtol=0.10)


def test_lognormal_task_has_no_reference() -> None:
    task = get_task("lognormal_cosmology")
    assert not task.has_reference and task.reference_method == ""
    assert task.name == "lognormal_cosmology" and task.x_shape == (64, 64)


# The embedding.


def test_invariant_cnn_is_invariant_to_rotations_and_reflections() -> None:
    torch.manual_seed(0)
    cnn, width = build_embedding("cnn_invariant", (16, 16), 5, (4, 8))
    plain, _ = build_embedding("cnn", (16, 16), 5, (4, 8))
    maps = torch.randn(3, 16, 16)
    out = cnn(maps)
    assert out.shape == (3, width)
    for image in (torch.rot90(maps, 1, (-2, -1)), maps.flip(-1), maps.transpose(-2, -1)):
        torch.testing.assert_close(cnn(image), out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain(torch.rot90(maps, 1, (-2, -1))), plain(maps), atol=1e-4)
    with pytest.raises(ValueError, match="square maps"):
        build_embedding("cnn_invariant", (16, 8), 5, (4,))
