"""A user's own tasks and observations: resolved by import path or task file in every process,
checked against the Task contract, and their errors named with the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cli, simulation
from pipeline.observations import import_observations, read_reference
from pipeline.parallel import SerialComm
from pipeline.tasks import BoxUniform, DiagonalNormal, TaskError, get_task
from tests.conftest import ROOT, run_env, tool

OSCILLATOR = "examples/oscillator/oscillator.py:Oscillator"
OSCILLATOR_YAML = "examples/oscillator/task.yaml"


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    # Specs are paths relative to the working directory, as under Snakemake.
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("spec", [OSCILLATOR, OSCILLATOR_YAML])
def test_a_users_task_resolves_by_path_and_carries_its_spec_as_name(spec):
    task = get_task(spec)
    assert task.name == spec
    assert task.parameter_names == ("omega", "gamma")
    assert task.prior == BoxUniform((0.5, 0.05), (3.0, 0.5))
    theta, x = task.simulate_block(4, np.random.default_rng(0))
    assert theta.shape == (4, 2) and x.shape == (4, 50)


def test_class_and_declared_task_simulate_the_same_data():
    a = get_task(OSCILLATOR).simulate_block(100, np.random.default_rng([1, 0]))
    b = get_task(OSCILLATOR_YAML).simulate_block(100, np.random.default_rng([1, 0]))
    np.testing.assert_array_equal(a[1], b[1])


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_module_path_instance_and_factory_resolve(tmp_path, monkeypatch):
    write(
        tmp_path,
        "my_sims.py",
        """
        from pipeline.tasks import DiagonalNormal, Task

        class Line(Task):
            parameter_names = ("a",)
            parameter_units = ("",)
            x_shape = (3,)
            prior = DiagonalNormal((0.0,), (1.0,))

            def simulate(self, theta, rng):
                return theta * [1.0, 2.0, 3.0]

        line = Line()

        def make():
            return Line()

        def not_a_task():
            return 42
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_sims:Line", "my_sims:line", "my_sims:make"):
        task = get_task(spec)
        assert task.name == spec and task.prior == DiagonalNormal((0.0,), (1.0,))
    with pytest.raises(TaskError, match=r"not_a_task\(\) returned int, not a pipeline.tasks.Task"):
        get_task("my_sims:not_a_task")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("two_moon", r"unknown task 'two_moon': not a built-in task \(bernoulli_glm, "),
        ("no/such.py:Task", r"no/such.py does not exist \(relative paths start at the working"),
        ("no_such_module:Task", r"cannot import 'no_such_module'.*add its folder to PYTHONPATH"),
        (OSCILLATOR.replace("Oscillator", "Osc"), r"defines no 'Osc' \(it defines .*Oscillator"),
        ("examples/oscillator/oscillator.py:TIMES", r"TIMES is a ndarray; expected a subclass"),
        ("missing.yaml", r"task file missing.yaml does not exist"),
        ("pipeline.tasks.base:Task", r"Task\(\) failed: TypeError: Can't instantiate abstract"),
        ("pipeline.tasks.base:BoxUniform", r"BoxUniform\(\) failed: TypeError"),
    ],
)
def test_a_spec_that_does_not_resolve_says_why(spec, message):
    with pytest.raises(TaskError, match=message):
        get_task(spec)


TASK_FILE = """
    parameters: {names: [a, b], units: ["", "km"]}
    prior: {uniform: {low: [0, 0], high: [1, 1]}}
    x: {shape: [2]}
    simulator: {python: "sim.py:simulate"}
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, r"unknown key\(s\) colour; allowed: title, parameters"),
        ({"prior": {"uniform": {"low": [0], "high": [1]}}}, r"prior.uniform.low must be 2 finite"),
        ({"prior": {"uniform": {"low": [1, 0], "high": [0, 1]}}}, r"needs low < high"),
        ({"prior": {"beta": {"a": 1}}}, r"prior: must be one of uniform"),
        ({"parameters": {"names": ["a", "b"], "units": [""]}}, r"parameters.units must list one"),
        ({"x": {"shape": [0]}}, r"x.shape must be a list of positive integers"),
        ({"seed_block_size": 0}, r"seed_block_size must be a positive integer"),
        ({"simulator": {"python": "sim.py:nope"}}, r"sim.py has no function 'nope'"),
        ({"simulator": {"python": "gone.py:simulate"}}, r"gone.py does not exist"),
        ({"simulator": {"fortran": "x"}}, r"simulator: must be python: 'file.py:function'"),
        ({"prior": None}, r"prior: must be one of"),
        ({"prior": {"normal": {"loc": [0, 1e400], "scale": [1, 1]}}}, r"loc must be 2 finite"),
        ({"prior": {"normal": {"loc": [0, 0], "scale": [True, 1]}}}, r"scale must be 2 finite"),
        ({"parameters": {"names": ["a", "b"], "units": [None, ""]}}, r"one unit string per"),
        ({"x": {"shape": [2], "unit": {"k": 1}}}, r"x.unit must be an astropy unit string"),
        (
            {"parameters": {"names": ["a", "b"], "units": ["", "notaunit"]}},
            r"parameter_units of b: 'notaunit' is not a unit astropy reads",
        ),
        ({"x": {"shape": [2], "unit": "Jansky per pixel"}}, r"x_unit: 'Jansky per pixel' is not"),
        ({"simulator": {"python": "broken.py:simulate"}}, r"importing .*broken.py failed: Zero"),
        # Misspelt, these would be ignored: no units, and (without a simulator) no prior.
        ({"parameters": {"names": ["a", "b"], "unit": ["", "km"]}}, r"parameters: unknown key"),
        ({"parameters": {"names": ["a", "b"], "prior": {}}}, r"unknown key\(s\) 'prior'; para"),
        ({"x": {"shape": [2], "units": "mag"}}, r"x: unknown key\(s\) 'units'; x takes shape and"),
    ],
)
def test_task_file_errors_name_the_key_and_the_fix(tmp_path, change, message):
    import yaml

    write(tmp_path, "sim.py", "def simulate(theta, rng):\n    return theta\n")
    write(tmp_path, "broken.py", "1 / 0\n")
    data = {**yaml.safe_load(textwrap.dedent(TASK_FILE)), **change}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TaskError, match=message):
        get_task(str(path))


def test_a_task_whose_prior_disagrees_with_its_names_is_refused(tmp_path, monkeypatch):
    write(
        tmp_path,
        "bad_prior.py",
        """
        from pipeline.tasks import BoxUniform, Task

        class Bad(Task):
            parameter_names = ("a", "b")
            parameter_units = ("", "")
            x_shape = (2,)
            prior = BoxUniform((0.0,), (1.0,))

            def simulate(self, theta, rng):
                return theta
        """,
    )
    with pytest.raises(TaskError, match=r"the prior has 1 dimensions but parameter_names has 2"):
        get_task(str(tmp_path / "bad_prior.py") + ":Bad")


def test_a_simulator_returning_strings_is_named(tmp_path):
    write(tmp_path, "sim.py", "def simulate(theta, rng):\n    return theta.astype(str)\n")
    (tmp_path / "task.yaml").write_text(textwrap.dedent(TASK_FILE))
    task = get_task(str(tmp_path / "task.yaml"))
    plan = simulation.SimulationPlan(task.name, 10, 1, 10)
    with pytest.raises(ValueError, match=r"returned x of dtype <U.*expected real numbers"):
        simulation.run(plan, task, tmp_path / "sims.h5", SerialComm(), overwrite=False)


def test_observe_refuses_a_simulator_whose_x_has_another_shape(tmp_path, capsys):
    # x_shape (3, 4) but x flattened to 12 values: observe must refuse it as simulate does,
    # not write observations no model of the task can read.
    path = write(
        tmp_path,
        "flat.py",
        """
        from pipeline.tasks import BoxUniform, Task

        class Flat(Task):
            parameter_names = ("a",)
            parameter_units = ("",)
            x_shape = (3, 4)
            prior = BoxUniform((0.0,), (1.0,))

            def simulate(self, theta, rng):
                return rng.normal(size=(len(theta), 12)) + theta
        """,
    )
    out = tmp_path / "observations.h5"
    args = ["observe", "--task", f"{path}:Flat", "--num-observations", "2", "--out", str(out)]
    assert cli.main(args) == 2
    assert "returned theta (1, 1) and x (1, 12)" in capsys.readouterr().err
    assert not out.exists()


# A task class of one parameter whose simulator's body is {body}.
SIMULATOR_OF = """
    from pipeline.tasks import BoxUniform, Task

    class Model(Task):
        parameter_names = ("a",)
        parameter_units = ("",)
        x_shape = (1,)
        prior = BoxUniform((0.0,), (1.0,))

        def simulate(self, theta, rng):
            {body}
    """
# One whose simulator takes its shift from a helper module beside its file.
MODEL_WITH_HELPER = "\n    from impl import SHIFT" + SIMULATOR_OF.format(
    body="return theta + SHIFT"
)


def test_a_simulator_that_converts_its_parameters_in_place_leaves_the_stored_ones(tmp_path):
    """``theta *= 10`` inside a simulator (a unit conversion) changed the theta stored beside x:
    277 of 300 rows lay outside the prior. The simulator gets a copy."""
    body = "theta *= 10.0\n            return theta + 0.01 * rng.normal(size=theta.shape)"
    write(tmp_path, "inplace.py", SIMULATOR_OF.format(body=body))
    task = get_task(f"{tmp_path}/inplace.py:Model")
    theta, x = simulation.simulate_range(task, 1, 0, 300)
    assert theta.min() >= 0.0 and theta.max() <= 1.0
    np.testing.assert_allclose(x, 10.0 * theta, atol=0.1)  # x from the converted parameters


@pytest.mark.parametrize("draw", ["np.random.normal(size=theta.shape)", "random.random()"])
def test_a_simulator_drawing_from_a_global_generator_is_refused(tmp_path, draw):
    """np.random.* or the random module: draws that depend on what the process simulated
    before, not on (seed, i), so 1 and 2 MPI ranks gave different data and chunks repeated
    each other's noise."""
    body = f"import random\n            import numpy as np\n            return theta + {draw}"
    write(tmp_path, "global_rng.py", SIMULATOR_OF.format(body=body))
    task = get_task(f"{tmp_path}/global_rng.py:Model")
    with pytest.raises(ValueError, match=r"drew from a global random generator .*\(rng.normal"):
        simulation.simulate_range(task, 1, 0, 10)
    # The synthetic observations and the predictive checks run the simulator too.
    from pipeline.observations import make_observations

    with pytest.raises(ValueError, match=r"drew from a global random generator"):
        make_observations(task, 2, 0, 3, tmp_path / "observations.h5")


def test_an_error_in_a_users_simulator_names_its_line_and_the_calls_shapes(tmp_path, capsys):
    """A per-row simulator given a block (``a, b = theta``) failed with "too many values to
    unpack" and nothing else: no file, no line, no word of the shapes it is called with."""
    body = "a, b = theta\n            return theta"
    write(tmp_path, "per_row.py", SIMULATOR_OF.format(body=body))
    spec = f"{tmp_path}/per_row.py:Model"
    with pytest.raises(simulation.SimulatorError) as error:
        simulation.simulate_range(get_task(spec), 1, 0, 10)
    text = str(error.value)
    assert f"{tmp_path}/per_row.py:" in text and "'a, b = theta'" in text
    assert "ValueError: too many values to unpack" in text
    assert "theta of shape (n, 1) (here n = 1000)" in text and "x of shape (n, 1)" in text
    log = tmp_path / "simulate.log"
    command = ["simulate", "--task", spec, "--num-simulations", "10", "--log", str(log)]
    assert cli.main([*command, "--out", str(tmp_path / "sims.h5")]) == 2
    assert "per_row.py:" in capsys.readouterr().err
    assert "Traceback (most recent call last)" in log.read_text()
    # The observations' and the predictive checks' calls say so too.
    from pipeline.observations import make_observations

    with pytest.raises(simulation.SimulatorError, match="drawing synthetic observation 0"):
        make_observations(get_task(spec), 2, 0, 3, tmp_path / "observations.h5")


def test_a_simulator_drawing_from_a_global_generator_in_some_blocks_only_is_refused(tmp_path):
    """For some parameters only (here a block whose first row's a exceeds 0.9): the first
    block passes, a later one draws; rows of one seed then differed between two runs."""
    draw = "np.random.normal(size=theta.shape) if theta[0, 0] > 0.9 else 0.0"
    body = f"import numpy as np\n            return theta + ({draw})"
    write(tmp_path, "some_blocks.py", SIMULATOR_OF.format(body=body))
    task = get_task(f"{tmp_path}/some_blocks.py:Model")
    first = task.simulate_block(task.seed_block_size, np.random.default_rng([1, 0]))[0]
    assert first[0, 0] <= 0.9  # the first block does not draw: a later one must be caught
    with pytest.raises(ValueError, match=r"drew from a global random generator"):
        simulation.simulate_range(task, 1, 0, 40 * task.seed_block_size)


@pytest.fixture
def forget_impl():
    """Leaves no user helper module named impl bound in this process for other tests."""
    yield
    sys.modules.pop("impl", None)


def test_the_code_a_task_imports_or_runs_beside_it_is_part_of_its_definition(
    tmp_path, forget_impl
):
    from pipeline.tasks.base import source_digest

    write(tmp_path, "impl.py", "SHIFT = 0.0\n")
    write(tmp_path, "model.py", MODEL_WITH_HELPER)
    spec = f"{tmp_path}/model.py:Model"
    before = source_digest(get_task(spec))
    write(tmp_path, "impl.py", "SHIFT = 5.0\n")
    assert source_digest(get_task(spec)) != before
    # A script an interpreter runs, named in the command.
    write(tmp_path, "sim.py", "print(0.5)\n")
    command = "command: [python3, sim.py, '{seed}', '{theta}']"
    task_file = TASK_FILE.replace('python: "sim.py:simulate"', command)
    (tmp_path / "task.yaml").write_text(textwrap.dedent(task_file).replace("[2]", "[1]"))
    task = get_task(str(tmp_path / "task.yaml"))
    assert (tmp_path / "sim.py").resolve() in task.source_files
    before = source_digest(task)
    write(tmp_path, "sim.py", "print(5.5)\n")
    assert source_digest(get_task(str(tmp_path / "task.yaml"))) != before
    # And the modules beside that script, which it may import (impl.py here).
    before = source_digest(get_task(str(tmp_path / "task.yaml")))
    write(tmp_path, "impl.py", "SHIFT = 6.0\n")
    assert source_digest(get_task(str(tmp_path / "task.yaml"))) != before


def test_an_importable_modules_task_is_defined_by_that_module_alone():
    # This pipeline's own package: its revision, which every file records, covers the rest.
    task = get_task("pipeline.tasks.two_moons:TwoMoons")
    assert [path.name for path in task.source_files] == ["two_moons.py"]


def test_a_packages_task_and_a_files_sub_packages_are_part_of_its_definition(
    tmp_path, monkeypatch
):
    """``mypkg.task:Model`` may import ``mypkg.physics``, and a task file's module a package
    beside it: an edit there changes the task's digest (so kept shards are not reused and
    Snakemake reruns what it simulated)."""
    from pipeline.tasks.base import source_digest

    package = tmp_path / "mypkg_t"
    (package / "kernels").mkdir(parents=True)
    write(package, "__init__.py", "")
    write(package, "physics.py", "SHIFT = 0.0\n")
    write(package / "kernels", "__init__.py", "")
    write(package / "kernels", "k.py", "SCALE = 1.0\n")
    write(
        package, "task.py", MODEL_WITH_HELPER.replace("from impl import", "from .physics import")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("mypkg_t.task:Model")
    names = sorted(path.relative_to(package).as_posix() for path in task.source_files)
    assert names == ["__init__.py", "kernels/__init__.py", "kernels/k.py", "physics.py", "task.py"]
    before = source_digest(task)
    write(package / "kernels", "k.py", "SCALE = 2.0\n")
    assert source_digest(get_task("mypkg_t.task:Model")) != before
    # By path, a file's folder: the modules beside it and its sub-packages' modules.
    write(
        tmp_path,
        "model.py",
        MODEL_WITH_HELPER.replace("from impl import", "from mypkg_t.physics import"),
    )
    files = get_task(f"{tmp_path}/model.py:Model").source_files
    assert (package / "kernels" / "k.py").resolve() in files
    # A folder without __init__.py is imported as a namespace package all the same.
    (tmp_path / "physics").mkdir()
    write(tmp_path / "physics", "core.py", "SHIFT = 0.0\n")
    (tmp_path / "venv").mkdir()
    write(tmp_path / "venv", "pyvenv.cfg", "")
    write(tmp_path / "venv", "big.py", "")
    files = get_task(f"{tmp_path}/model.py:Model").source_files
    assert (tmp_path / "physics" / "core.py").resolve() in files
    assert (tmp_path / "venv" / "big.py").resolve() not in files  # a virtual environment
    # A folder of folders only (a project's src/) is no package Python would import from here.
    (tmp_path / "src" / "lib").mkdir(parents=True)
    write(tmp_path / "src" / "lib", "__init__.py", "")
    files = get_task(f"{tmp_path}/model.py:Model").source_files
    assert (tmp_path / "src" / "lib" / "__init__.py").resolve() not in files


def test_a_namespace_packages_task_is_defined_by_its_folder_too(tmp_path, monkeypatch):
    """``nspkg_t.sub.model:Model`` in folders without ``__init__.py`` (namespace packages): the
    modules beside it are part of its definition, as for a file named by its path."""
    from pipeline.tasks.base import source_digest

    folder = tmp_path / "nspkg_t" / "sub"
    folder.mkdir(parents=True)
    write(folder, "helper.py", "SHIFT = 0.0\n")
    write(folder, "model.py", MODEL_WITH_HELPER.replace("from impl import", "from .helper import"))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("nspkg_t.sub.model:Model")
    assert sorted(path.name for path in task.source_files) == ["helper.py", "model.py"]
    before = source_digest(task)
    write(folder, "helper.py", "SHIFT = 1.0\n")
    assert source_digest(get_task("nspkg_t.sub.model:Model")) != before


def test_two_tasks_whose_helpers_share_a_module_name_are_refused_in_one_run(tmp_path, forget_impl):
    # As observe --mock-of would load them: b's "from impl import SHIFT" would get a's impl.
    for folder, shift in (("a", 0.0), ("b", 100.0)):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder, "impl.py", f"SHIFT = {shift}\n")
        write(tmp_path / folder, "task_model.py", MODEL_WITH_HELPER)
    get_task(f"{tmp_path}/a/task_model.py:Model")
    for _ in range(2):  # refused alike when asked again: nothing half-imported was kept
        with pytest.raises(TaskError, match=r"impl.py beside it shares its module name with"):
            get_task(f"{tmp_path}/b/task_model.py:Model")


def test_sample_tells_tasks_apart_by_their_definition_not_the_path_that_named_them(
    tmp_path, monkeypatch, capsys
):
    """Two projects' task.yaml, both given as 'task.yaml': a model of one refuses the other's
    observations; the same file named by its absolute path is the same task."""
    for project, names in (("a", "[omega, gamma]"), ("b", "[mass, spin]")):
        folder = tmp_path / project
        folder.mkdir()
        shutil.copy(ROOT / "examples/oscillator/oscillator.py", folder)
        text = (ROOT / OSCILLATOR_YAML).read_text().replace("[omega, gamma]", names)
        (folder / "task.yaml").write_text(text)
    options = '{"max_epochs": 2, "ensemble": 1, "transforms": 1, "flow_hidden": [8]}'
    monkeypatch.chdir(tmp_path / "a")
    simulate = ["simulate", "--task", "task.yaml", "--num-simulations", "200", "--seed", "1"]
    assert cli.main([*simulate, "--out", "sims.h5"]) == 0
    assert cli.main(["train", "--data", "sims.h5", "--options", options, "--out", "model"]) == 0
    model = str(tmp_path / "a" / "model")
    monkeypatch.chdir(tmp_path / "b")
    observe = ["observe", "--num-observations", "2", "--num-reference-samples", "0"]
    assert cli.main([*observe, "--task", "task.yaml", "--out", "obs.h5"]) == 0
    sample = ["sample", "--model", model, "--num-samples", "20"]
    assert cli.main([*sample, "--observations", "obs.h5", "--out", "s.h5"]) == 2
    assert "another definition of task 'task.yaml'" in capsys.readouterr().err
    assert not Path("s.h5").exists()
    same = str(tmp_path / "a" / "task.yaml")
    assert cli.main([*observe, "--task", same, "--out", "same.h5"]) == 0
    assert cli.main([*sample, "--observations", "same.h5", "--out", "s.h5"]) == 0
    # validate judges the samples' lineage the same way: by definition, not by name.
    from pipeline.sampling import read_samples
    from pipeline.validation import check_drawn_at

    samples = read_samples(Path("s.h5"))
    check_drawn_at(samples, Path("s.h5"), read_reference(Path("same.h5"))[1], Path("same.h5"))
    with pytest.raises(ValueError, match="samples of a definition of task .* other than"):
        check_drawn_at(samples, Path("s.h5"), read_reference(Path("obs.h5"))[1], Path("obs.h5"))


def test_a_users_files_fingerprint_follows_their_bytes_not_their_time(tmp_path, monkeypatch):
    """What the workflow plans by: a file replaced with an older time (rsync -a) changes it;
    a large archive is fingerprinted by size and time, never read in full."""
    import os

    from pipeline import provenance

    path = tmp_path / "obs.npy"
    np.save(path, np.zeros(3))
    before = provenance.fingerprint([path])
    old = path.stat().st_mtime
    np.save(path, np.ones(3))
    os.utime(path, (old - 1000, old - 1000))
    changed = provenance.fingerprint([path])
    assert changed != before
    os.utime(path, (old, old))  # another time, the same bytes: the same file
    assert provenance.fingerprint([path]) == changed
    monkeypatch.setattr(provenance, "CONTENT_FINGERPRINT_BYTES", 10)
    large = provenance.fingerprint([path])
    monkeypatch.setattr(provenance, "file_digest", lambda path: pytest.fail("read in full"))
    os.utime(path, (old + 5, old + 5))
    assert provenance.fingerprint([path]) != large


def test_observations_far_outside_the_simulations_are_told_apart_from_a_poor_model(
    tmp_path, monkeypatch, capsys
):
    """An observation a thousand times too large (a unit mistake) leaves the prior: the stage
    names its row and what to do with the data, not the model; at test simulations, drawn from
    the prior, the same failure is the model's, and the message says so."""
    from pipeline.sampling import outside_prior

    monkeypatch.chdir(tmp_path)
    spec = str(ROOT / OSCILLATOR_YAML)
    simulate = ["simulate", "--task", spec, "--num-simulations", "300", "--seed", "1"]
    assert cli.main([*simulate, "--out", "sims.h5"]) == 0
    options = '{"max_epochs": 5, "ensemble": 1, "transforms": 1, "flow_hidden": [16]}'
    assert cli.main(["train", "--data", "sims.h5", "--options", options, "--out", "model"]) == 0
    x = get_task(spec).simulate_block(3, np.random.default_rng(5))[1]
    x[1] *= 1000.0
    np.save("observed.npy", x)
    assert cli.main(["observe", "--task", spec, "--from", "observed.npy", "--out", "obs.h5"]) == 0
    sample = ["sample", "--model", "model", "--observations", "obs.h5", "--out", "s.h5"]
    assert cli.main([*sample, "--num-samples", "50"]) == 2
    error = capsys.readouterr().err
    assert "at rows 1 of obs.h5 fall inside the prior: those observations lie far" in error
    assert "leave them out of the observations file" in error
    message = str(outside_prior(list(range(12)), Path("test.h5"), drawn=True))
    assert "rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more of test.h5" in message
    assert "the model has not learned the posterior there" in message
    # Synthetic observations, drawn by the simulator from the prior, are the model's failure.
    assert (
        cli.main(
            ["observe", "--task", spec, "--num-observations", "2", "--seed", "4"]
            + ["--num-reference-samples", "0", "--out", "synthetic.h5"]
        )
        == 0
    )
    # Every draw must fall inside the prior: a five-epoch model leaves it somewhere.
    monkeypatch.setattr("pipeline.sampling.MIN_ACCEPTANCE", 1.0)
    sample = ["sample", "--model", "model", "--observations", "synthetic.h5", "--out", "t.h5"]
    assert cli.main([*sample, "--num-samples", "50"]) == 2
    assert "the simulator drew them from it: the model" in capsys.readouterr().err


def test_a_task_without_simulator_trains_but_cannot_simulate(tmp_path):
    path = write(tmp_path, "data.yaml", "parameters: {names: [a]}\nx: {shape: [3]}\n")
    task = get_task(str(path))
    assert not task.has_simulator and task.prior is None
    with pytest.raises(ValueError, match=r"declares no prior, so it cannot draw parameters"):
        task.simulate_block(2, np.random.default_rng(0))


@pytest.mark.mpi
def test_a_users_task_gives_the_same_file_on_one_and_two_mpi_ranks(tmp_path):
    def simulate(out: Path, ranks: int) -> None:
        command = [tool("pipeline"), "simulate", "--task", OSCILLATOR_YAML]
        command += ["--num-simulations", "1000", "--seed", "7", "--chunk-size", "200"]
        command += ["--out", str(out)]
        if ranks > 1:
            command = [tool("mpiexec"), "-n", str(ranks), *command]
        subprocess.run(command, cwd=ROOT, env=run_env(), check=True, capture_output=True)

    simulate(tmp_path / "one.h5", 1)
    simulate(tmp_path / "two.h5", 2)
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert a.attrs["task"] == OSCILLATOR_YAML
        for name in ("theta", "x"):
            np.testing.assert_array_equal(a[name][...], b[name][...])


@pytest.mark.parametrize("kind", ["file", "module"])
def test_the_pipeline_command_resolves_a_spec_in_a_fresh_process(tmp_path, kind):
    """No registration anywhere: the console script, as Snakemake's jobs start it, resolves a
    file path, or a module in the working directory (where Snakemake finds it too)."""
    shutil.copy(ROOT / "examples/oscillator/oscillator.py", tmp_path / "my_oscillator.py")
    spec = "my_oscillator.py:Oscillator" if kind == "file" else "my_oscillator:Oscillator"
    command = [tool("pipeline"), "simulate", "--task", spec, "--num-simulations", "300"]
    command += ["--seed", "1", "--out", "sims.h5"]
    subprocess.run(command, cwd=tmp_path, env=run_env(), check=True, capture_output=True)
    with h5py.File(tmp_path / "sims.h5") as f:
        assert f.attrs["task"] == spec and f["x"].shape == (300, 50)


# Real observations ------------------------------------------------------------------------


def test_real_observations_round_trip_without_truth(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 50))
    np.save(tmp_path / "x_obs.npy", x)
    out = tmp_path / "observations.h5"
    import_observations(get_task(OSCILLATOR), str(tmp_path / "x_obs.npy"), out)
    theta, read_x, reference = read_reference(out)
    assert theta is None and reference is None
    np.testing.assert_array_equal(read_x, x.astype(np.float32))
    with h5py.File(out) as f:
        assert f.attrs["real"] and f.attrs["task"] == OSCILLATOR
        assert len(__import__("json").loads(f.attrs["source"])["sha256"]) == 64


def test_one_observation_and_hdf5_datasets_are_accepted(tmp_path):
    with h5py.File(tmp_path / "obs.h5", "w") as f:
        f["survey/x"] = np.ones(50)
    out = tmp_path / "observations.h5"
    import_observations(get_task(OSCILLATOR), f"{tmp_path}/obs.h5:survey/x", out)
    assert read_reference(out)[1].shape == (1, 50)


def test_observed_data_of_another_task_or_an_unnamed_dataset_beside_others_is_refused(tmp_path):
    """A file of the pipeline records its task; another file's ``x`` may be a wavelength grid
    beside the data, so its dataset must be named where it holds more than one."""
    task = get_task(OSCILLATOR)
    with h5py.File(tmp_path / "spectrum.h5", "w") as f:
        f["x"], f["y"] = np.linspace(650, 665, 50), np.ones(50)
    with pytest.raises(ValueError, match=r"holds the datasets x, y: name the one of the observ"):
        import_observations(task, f"{tmp_path}/spectrum.h5", tmp_path / "a.h5")
    import_observations(task, f"{tmp_path}/spectrum.h5:y", tmp_path / "a.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"], f.attrs["task"] = np.ones((1, 50)), "other/task.yaml"
    with pytest.raises(ValueError, match=r"observations of task 'other/task.yaml', not of"):
        import_observations(task, f"{tmp_path}/other.h5", tmp_path / "b.h5")
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.parametrize(
    ("data", "source", "message"),
    [
        (np.ones((2, 49)), "x.npy", r"shape \(2, 49\) do not fit task .*expected \(n_obs, 50\)"),
        (np.array([[np.nan] * 50, [0.0] * 50]), "x.npy", r"observation\(s\) 0 hold NaN or inf"),
        # 1e39 is finite in float64 but inf as the float32 every stage reads.
        (np.array([[0.0] * 50, [1e39] * 50]), "x.npy", r"observation\(s\) 1 hold NaN or inf"),
        (None, "missing.npy", r"observed data .*missing.npy does not exist"),
        (np.ones((2, 50)), "x.h5:nope", r"x.h5 has no dataset 'nope'. Present: x"),
        (b"not an array", "x.npy", r"x.npy is not readable as a .npy file written by numpy.save"),
        (np.ones((2, 50)) * 1j, "x.npy", r"complex"),
    ],
)
def test_bad_observed_data_is_refused_and_nothing_is_written(tmp_path, data, source, message):
    if isinstance(data, bytes):
        (tmp_path / "x.npy").write_bytes(data)
    elif data is not None and source.startswith("x.h5"):
        with h5py.File(tmp_path / "x.h5", "w") as f:
            f["x"] = data
    elif data is not None:
        np.save(tmp_path / "x.npy", data)
    out = tmp_path / "observations.h5"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        import_observations(get_task(OSCILLATOR), f"{tmp_path}/{source}", out)
    assert not out.exists() and not list(tmp_path.glob(".observations*"))


def test_observe_from_refuses_to_replace_an_output_without_overwrite(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 50)))
    out = tmp_path / "observations.h5"
    out.write_bytes(b"earlier result")
    args = ["observe", "--task", OSCILLATOR, "--from", str(tmp_path / "x.npy"), "--out", str(out)]
    assert cli.main(args) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier result"
    assert cli.main([*args, "--overwrite"]) == 0
    assert read_reference(out)[1].shape == (1, 50)
    # Options of synthetic observations do nothing to real ones: refused, not ignored.
    assert cli.main([*args, "--overwrite", "--num-observations", "7", "--seed", "9"]) == 2
    assert "--num-observations, --seed would do nothing" in capsys.readouterr().err


def test_editing_a_task_file_never_reuses_simulations_of_the_old_definition(tmp_path):
    """A chunk simulated before the prior was changed must be recomputed, not merged with
    chunks of the new prior (the task's files are part of the data's identity)."""
    for name in ("task.yaml", "oscillator.py"):
        shutil.copy(ROOT / "examples/oscillator" / name, tmp_path / name)
    spec, out = str(tmp_path / "task.yaml"), tmp_path / "sims.h5"
    plan = simulation.SimulationPlan(spec, 400, 1, 200)
    simulation.run_chunk(plan, get_task(spec), out, 0)  # the old prior's first chunk
    text = (tmp_path / "task.yaml").read_text()
    (tmp_path / "task.yaml").write_text(text.replace("high: [3.0, 0.5]", "high: [30.0, 5.0]"))
    simulation.run(plan, get_task(spec), out, SerialComm(), overwrite=False)
    clean = tmp_path / "clean.h5"
    simulation.run(plan, get_task(spec), clean, SerialComm(), overwrite=False)
    with h5py.File(out) as a, h5py.File(clean) as b:
        np.testing.assert_array_equal(a["theta"][...], b["theta"][...])
        assert a["theta"][:, 0].max() > 3.0 and a.attrs["task_digest"] == b.attrs["task_digest"]


# An experiment's task keys ----------------------------------------------------------------

ARCHIVE = {"emission_line": "examples/archive/task.yaml"}
DATA = {
    "emission_line": {
        "theta": "examples/archive/theta.npy",
        "x": "examples/archive/x.npy",
        "num_test": 10,
    }
}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"tasks": ["mine"]}, r"config 'tasks': mine: unknown task .*add task_modules: \{mine"),
        ({"observed": {"two_moons": "x.npy"}}, r"config 'observed' names two_moons, which"),
        ({"task_train": {"slcq": {}}}, r"config 'task_train' names slcq: unknown task"),
        ({"task_modules": ARCHIVE}, r"emission_line has no simulator: give its existing"),
        (
            {"tasks": ["sn_cosmology"], "task_modules": {"sn_cosmology": OSCILLATOR}},
            r"task_modules.sn_cosmology: .* built-in task, whose settings \(its task_train",
        ),
        ({"task_modules": ARCHIVE, "data": DATA}, r"no simulator to draw synthetic observ"),
        ({"tasks": ["two_moons", "oscillator"], "budgets": [100]}, r"budgets .* task oscillator"),
        (
            {"task_modules": ARCHIVE, "data": DATA, "observed": {"emission_line": "x.npy"}},
            r"config observed.emission_line: observed data x.npy does not exist",
        ),
        (
            {
                "task_modules": ARCHIVE,
                "data": {"emission_line": {**DATA["emission_line"], "num_test": 6000}},
                "observed": {"emission_line": "examples/archive/observed.npy"},
            },
            r"data.emission_line.num_test is 6000, but the archive holds 6000 rows",
        ),
        (
            {
                "task_modules": {"emission_line": "examples/archive/task.yaml"},
                "data": {
                    "emission_line": {**DATA["emission_line"], "x": "examples/archive/theta.npy"}
                },
                "observed": {"emission_line": "examples/archive/observed.npy"},
            },
            r"config data.emission_line: examples/archive/theta.npy has shape \(6000, 3\), "
            r"expected \(N, 40\)",
        ),
        (
            {"tasks": ["oscillator"], "observed": {"oscillator": "examples/archive/observed.npy"}},
            r"config observed.oscillator: .*observed data of shape \(2, 40\) do not fit",
        ),
    ],
)
def test_an_experiments_task_keys_are_checked_together(keys, message):
    from pipeline.tasks.experiment import resolve_tasks

    settings = {
        "tasks": ["emission_line"],
        "task_modules": {"oscillator": OSCILLATOR, **keys.pop("task_modules", {})},
        "data": {},
        "observed": {},
        "task_train": {},
        "budgets": [],
        **keys,
    }
    with pytest.raises(ValueError, match=message):
        resolve_tasks(**settings)


def test_an_experiment_of_archived_data_and_real_observations_resolves():
    from pipeline.tasks.experiment import resolve_tasks

    observed = {"emission_line": "examples/archive/observed.npy"}
    tasks = resolve_tasks(["emission_line", "two_moons"], ARCHIVE, DATA, observed, {}, [])
    assert tasks["emission_line"].name == "examples/archive/task.yaml"
    assert not tasks["emission_line"].has_simulator and tasks["two_moons"].has_simulator


def test_a_simulator_function_given_as_the_task_says_how_to_declare_it():
    with pytest.raises(
        TaskError, match=r"simulate is a function that takes arguments, not a task"
    ):
        get_task("examples/oscillator/oscillator.py:simulate")


def test_training_on_a_users_npy_says_to_import_it(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((10, 2)))
    args = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "model")]
    assert cli.main(args) == 2
    assert "x.npy is not a simulation file of the pipeline" in capsys.readouterr().err
