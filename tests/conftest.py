"""Shared fixtures: test tasks (NaN, wrong shape), the project's tools, Snakemake runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.tasks import TASKS, register
from pipeline.tasks.two_moons import TwoMoons
from tests import apt

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


@pytest.fixture(scope="session")
def png() -> bytes:
    """A small real PNG, standing in for the pipeline's figures."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    FigureCanvasAgg(figure)
    figure.add_subplot().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=20)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when absent (as root); else the test skips."""
    found = shutil.which("chromium")
    if found:
        return found
    if not apt.can_install():
        pytest.skip("chromium is not installed and apt-get cannot run as root here")
    apt.install("chromium")
    return shutil.which("chromium") or "/usr/bin/chromium"


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


def record_draws(posterior: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The draws of each call of ``posterior.sample_and_log_prob`` (observations x draws), in
    call order, appended to the returned list as the calls happen."""
    calls: list[int] = []
    draw = posterior.sample_and_log_prob

    def recorded(x, num_samples):
        calls.append(len(x) * num_samples)
        return draw(x, num_samples)

    monkeypatch.setattr(posterior, "sample_and_log_prob", recorded)
    return calls


def merged(base: object, changes: object) -> object:
    """``changes`` layered over ``base`` at every depth, as Snakemake layers config files."""
    if not (isinstance(base, dict) and isinstance(changes, dict)):
        return changes
    return {**base, **{key: merged(base.get(key), value) for key, value in changes.items()}}


def copy_workflow(folder: Path) -> Path:
    """A copy of the workflow in ``folder``, so runs keep their .snakemake state out of the
    checkout."""
    for name in ("Snakefile", "workflow", "config", "envs"):
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, folder / name)
    return folder


def run_snakemake(
    workdir: Path,
    *args: str,
    profile: str | Path = "workflow/profiles/local",
    check: bool = True,
    timeout: float = 1200,
) -> subprocess.CompletedProcess:
    """``snakemake --workflow-profile PROFILE ARGS`` in ``workdir``; raises with its output."""
    command = [tool("snakemake"), "--workflow-profile", str(profile), *args]
    result = subprocess.run(
        command, cwd=workdir, env=run_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def planned_jobs(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts per rule from a dry run's "Job stats" table ({} when nothing is to be done)."""
    text = result.stdout + result.stderr
    if "Job stats:" not in text:
        return {}
    table = text.split("Job stats:", 1)[1].splitlines()[3:]
    counts = {}
    for line in table:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def outputs(workdir: Path) -> dict[str, object]:
    """What a tiny two_moons run computed: simulations, weights, samples, validation numbers."""
    import h5py
    import torch

    task = workdir / "results/tiny/two_moons"
    found: dict[str, object] = {}
    for name in ("sims/train.h5", "sims/test.h5", "samples/test.h5", "observations.h5"):
        with h5py.File(task / name, "r") as f:
            for key, dataset in f.items():
                if isinstance(dataset, h5py.Dataset):
                    found[f"{name}:{key}"] = dataset[()]
    for key, tensor in torch.load(task / "model/posterior.pt", weights_only=True).items():
        found[f"weights:{key}"] = tensor.numpy()
    metrics = json.loads((task / "validation/metrics.json").read_text())
    found["c2st"] = metrics["c2st"]["per_observation"]
    found["coverage"] = metrics["coverage"]["tarp"] + metrics["coverage"]["hpd"]
    return found


def assert_same_outputs(a: dict[str, object], b: dict[str, object]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# Test tiers. A test is "integration" when it starts a process or a service (Snakemake, mpiexec,
# a `pipeline` command, SLURM, Chromium), directly or through a fixture, or is marked slow, mpi,
# slurm or browser; the rest, the fast tier (`pytest -m "not integration" -n 2`), runs
# in-process in seconds. Marked here from the code itself, so that a
# new test lands in the right tier without anyone remembering to mark it.
STARTS_A_PROCESS = ("subprocess.", "run_snakemake(", "snakemake(", "tool(", "chromium")
INTEGRATION_MARKERS = ("slow", "mpi", "slurm", "browser")


def _starts_a_process(function: object, seen: set) -> bool:
    import inspect

    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(word in source for word in STARTS_A_PROCESS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == "test_browser.py":
            item.add_marker(pytest.mark.browser)
        seen: set = set()
        functions = [getattr(item, "function", None)]
        for name, definitions in item._fixtureinfo.name2fixturedefs.items():
            if name != "_fast_tier_starts_no_process":  # the guard below, not a user of processes
                functions += [definition.func for definition in definitions]
        marked = any(item.get_closest_marker(name) for name in INTEGRATION_MARKERS)
        if marked or any(_starts_a_process(f, seen) for f in functions if f is not None):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch) -> None:
    """Holds the fast tier to its definition: a test not marked integration that starts a
    process fails, naming the fix (mark its module ``pytestmark = pytest.mark.integration``)."""
    if request.node.get_closest_marker("integration"):
        return

    start = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen, argv: object, *args: object, **kwargs: object) -> None:
        # Provenance asks git for the code revision, and importing h5py asks `uname -p`
        # (platform.processor, once per process): queries, not processes under test.
        if isinstance(argv, list | tuple) and argv and argv[0] in ("git", "uname"):
            return start(self, argv, *args, **kwargs)
        raise AssertionError(
            f"{request.node.nodeid} starts a process ({argv}) but is in the fast tier: mark "
            "it (or its module) pytest.mark.integration"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
