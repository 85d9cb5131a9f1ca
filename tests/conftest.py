"""Shared fixtures: a task whose simulator emits NaN, and paths to the project's tools."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.tasks import TASKS, register
from pipeline.tasks.two_moons import TwoMoons

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class NaNTwoMoons(TwoMoons):
    """two_moons whose simulator returns NaN for every simulation with theta_1 > 0.8 (~10%)."""

    name = "nan_two_moons"

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = super().simulate(theta, rng)
        x[theta[:, 0] > 0.8] = np.nan
        return x


class WrongShape(TwoMoons):
    """A broken task: returns x with one column too many."""

    name = "wrong_shape"

    def simulate(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((len(theta), 3))


@pytest.fixture(autouse=True, scope="session")
def test_tasks() -> None:
    register("nan_two_moons", NaNTwoMoons)
    register("wrong_shape", WrongShape)
    yield
    TASKS.pop("nan_two_moons")
    TASKS.pop("wrong_shape")


def tool(name: str) -> str:
    """A console script of this environment (pipeline, mpiexec, snakemake)."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def run_env() -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, single-threaded BLAS."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env
