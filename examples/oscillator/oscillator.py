"""A damped harmonic oscillator observed at 50 times with Gaussian noise: a user's own task.

Run it through the pipeline by its path, without installing or registering anything:
``pipeline simulate --task examples/oscillator/oscillator.py:Oscillator ...`` or, in an
experiment config, ``task_modules: {oscillator: examples/oscillator/oscillator.py:Oscillator}``.
"""

import numpy as np

from pipeline.tasks import BoxUniform, Task

TIMES = np.linspace(0.0, 10.0, 50)
NOISE = 0.05


def simulate(theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x(t) = exp(-gamma t) cos(omega t) + noise, for each row (omega, gamma) of theta.

    theta (n, 2) -> x (n, 50), float64. All randomness comes from ``rng``.
    """
    omega, gamma = theta[:, :1], theta[:, 1:]
    signal = np.exp(-gamma * TIMES) * np.cos(omega * TIMES)
    return signal + NOISE * rng.standard_normal(signal.shape)


class Oscillator(Task):
    parameter_names = ("omega", "gamma")
    parameter_units = ("rad / s", "1 / s")
    x_shape = (50,)
    seed_block_size = 100
    summary_label = "displacement"

    @property
    def prior(self) -> BoxUniform:
        return BoxUniform(low=(0.5, 0.05), high=(3.0, 0.5))

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return simulate(theta, rng)
