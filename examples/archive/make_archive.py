"""Writes this example's stand-in for a user's earlier simulation campaign and observed data.

An emission line (amplitude, centre, width) on a flat continuum, observed at 40 wavelengths
with Gaussian noise: ``theta.npy`` (N, 3) and ``x.npy`` (N, 40), float32, from a uniform prior;
and ``observed.npy`` (2, 40), two "real" spectra whose parameters are not recorded. The
pipeline never sees this script: it reads the arrays, as it would read a user's archive.

    python examples/archive/make_archive.py    # rewrites the three files (seeded: same bytes)
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WAVELENGTH = np.linspace(650.0, 660.0, 40)  # nm
LOW, HIGH = np.array([0.5, 654.0, 0.3]), np.array([3.0, 658.0, 1.5])


def spectra(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """theta (n, 3) = (amplitude, centre in nm, width in nm) -> flux (n, 40)."""
    amplitude, centre, width = theta[:, :1], theta[:, 1:2], theta[:, 2:]
    line = amplitude * np.exp(-0.5 * ((WAVELENGTH - centre) / width) ** 2)
    return 1.0 + line + 0.1 * rng.standard_normal(line.shape)


def main(num_simulations: int = 6000) -> None:
    rng = np.random.default_rng(2024)
    theta = rng.uniform(LOW, HIGH, size=(num_simulations, 3))
    np.save(HERE / "theta.npy", theta.astype(np.float32))
    np.save(HERE / "x.npy", spectra(theta, rng).astype(np.float32))
    observed_theta = np.array([[1.2, 655.3, 0.6], [2.5, 656.8, 1.1]])
    np.save(HERE / "observed.npy", spectra(observed_theta, rng).astype(np.float32))


if __name__ == "__main__":
    main()
