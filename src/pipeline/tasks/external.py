"""Simulators that are programs: a user's executable wrapped through a file contract.

A task declared in YAML (:mod:`pipeline.tasks.declared`) may name a program as its simulator::

    simulator:
      command: ["./oscillator", "{seed}", "{theta}"]   # argv; ./ is the task file's folder
      per: simulation      # or chunk: one run for all rows of a call
      timeout: 10          # seconds per run
      retries: 1           # extra attempts after a failed run

The contract between the pipeline and the program:

- **Placeholders** in ``command`` are replaced for every run: ``{seed}`` by the simulation's
  seed (an integer), ``{theta}`` (an argument by itself) by ``D`` arguments, the parameters
  written with ``'.17g'`` (float64 round trip), ``{input}`` and ``{output}`` by files in a fresh
  temporary folder ``{workdir}``, removed after the run. The program runs in the task file's
  folder; scratch files belong in ``{workdir}``, where parallel runs cannot collide.
- **Input**: ``{input}`` (``theta.txt``) holds one line per simulation, ``seed p1 ... pD``.
- **Output** (``output:``): ``stdout`` (default for ``per: simulation``): the numbers of ``x``,
  separated by spaces or newlines; ``file`` (default for ``per: chunk``): the program writes
  ``{output}``, named by ``output_file`` (default ``x.txt``): an ``.npy`` array of shape
  ``(n, *x_shape)``, or text read by :func:`numpy.loadtxt` (comma-separated for ``.csv``). A
  run yields ``n * prod(x_shape)`` numbers, one row of ``x`` after the other; ``nan`` is a valid
  number (a simulation without result). Text laid out one column per simulation is refused
  (and the simulations run one by one), unless it cannot be told from rows (``n`` equal to
  ``prod(x_shape)``, or to a map's row length).
- **Randomness**: one seed per simulation, ``rng.integers(0, 2**31 - 1, size=n)`` from the
  generator the pipeline seeds with ``(seed, block)``. The program must take all its
  randomness from the seed it is given (its own generator, seeded by it; never the clock or
  ``/dev/urandom``): then the data depend on the seed and the simulation's index alone, and
  one or many MPI ranks write identical files.
- **Failures**: a run that exits non-zero, outlives ``timeout`` (its process group is killed),
  or leaves missing, unparseable or miscounted output is retried ``retries`` times with the same
  seed, then its simulations become rows of NaN, which the pipeline counts and keeps out of
  training; a warning names the parameters, the seed, the cause and the end of stderr. A chunk
  that keeps failing is rerun one row at a time, so a bad simulation costs its own row only. If
  every simulation of a call fails, the program is broken rather than the parameters unlucky:
  :class:`RuntimeError`. The simulator counts failed and timed-out simulations
  (:class:`FailureCount`): the simulate stage records them per shard and simulates a shard
  whose every run failed again when a run resumes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

OPTIONS = ("command", "per", "timeout", "retries", "output", "output_file")
PLACEHOLDERS = ("seed", "theta", "input", "output", "workdir")
INPUT_FILE = "theta.txt"
SEED_HIGH = 2**31 - 1  # seeds fit a C int and every language's seeding function
STDERR_LINES = 8  # the end of stderr shown in warnings and errors
DETAILED_WARNINGS = 5  # failures of one call warned about in full; the rest are counted

Per = Literal["simulation", "chunk"]
Output = Literal["stdout", "file"]


class RunFailed(Exception):
    """One run of the program that left no usable ``x``.

    Attributes:
        argv: The command as run, placeholders replaced.
        cause: What went wrong, e.g. ``"exit status 3"`` or ``"timed out after 10 s"``.
        stderr: The last lines the program wrote to stderr.
    """

    def __init__(
        self, argv: Sequence[str], cause: str, stderr: str = "", *, timed_out: bool = False
    ) -> None:
        super().__init__(cause)
        self.argv, self.cause, self.stderr = list(argv), cause, stderr
        self.timed_out = timed_out


@dataclass
class FailureCount:
    """Simulations whose every run failed (their x is NaN), and of those the ones whose last run
    outlived the timeout, counted over the simulator's calls."""

    failed: int = 0
    timed_out: int = 0


@dataclass(frozen=True)
class ExternalSimulator:
    """A program as simulator: ``theta`` ``(n, D)`` and a generator in, ``x`` out.

    Built from a task file's ``simulator:`` options by :meth:`from_options`; the module
    docstring states the contract with the program.

    Arguments:
        command: The program's argv with placeholders; ``command[0]`` absolute, or a name
            found on ``PATH``.
        cwd: The folder the program runs in (the task file's).
        x_shape: Shape of one simulation ``x``.
        per: ``"simulation"``: one run per row; ``"chunk"``: one run per call.
        timeout: Seconds one run may take.
        retries: Extra attempts after a failed run.
        output: Where the program writes ``x``: ``"stdout"`` or ``"file"`` (``{output}``).
        output_file: Name of ``{output}`` in the run's work folder.

    Example:
        >>> options = {"command": ["./oscillator", "{seed}", "{theta}"]}
        >>> simulator = ExternalSimulator.from_options(  # doctest: +SKIP
        ...     options, Path("examples/c_program"), x_shape=(50,)
        ... )
        >>> x = simulator(np.array([[1.5, 0.2]]), np.random.default_rng(0))  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        (1, 50)
    """

    command: tuple[str, ...]
    cwd: Path
    x_shape: tuple[int, ...]
    per: Per = "simulation"
    timeout: float = 60.0
    retries: int = 1
    output: Output = "stdout"
    output_file: str = "x.txt"
    failures: FailureCount = field(default_factory=FailureCount, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_choice("per", self.per, ("simulation", "chunk"))
        _check_choice("output", self.output, ("stdout", "file"))
        _check_command(self.command, self.per, self.output)
        if Path(self.output_file).name != self.output_file or self.output_file == INPUT_FILE:
            raise ValueError(
                f"simulator option output_file {self.output_file!r}: a plain file name, not "
                f"{INPUT_FILE!r} (it is written in the run's work folder, {{workdir}})"
            )

    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], base: Path, x_shape: tuple[int, ...]
    ) -> ExternalSimulator:
        """The simulator a task file's ``simulator:`` mapping declares.

        Arguments:
            options: ``command`` (required), ``per``, ``timeout``, ``retries``, ``output``,
                ``output_file``; see the module docstring.
            base: The task file's folder: relative paths in ``command[0]`` start there, and
                the program runs there.
            x_shape: Shape of one simulation ``x``.

        Raises:
            ValueError: For an unknown or ill-typed option, or a program that is missing or
                not executable.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown simulator option(s) {unknown}; the allowed ones are {list(OPTIONS)}"
            )
        if "command" not in options:
            raise ValueError(
                "simulator option command is required: the program's argv, e.g. "
                '["./my_program", "{seed}", "{theta}"]'
            )
        base = Path(base).resolve()
        per = options.get("per", "simulation")
        return cls(
            command=_resolve_program(_as_argv(options["command"]), base),
            cwd=base,
            x_shape=tuple(int(size) for size in x_shape),
            per=per,
            timeout=_timeout(options.get("timeout", 60.0)),
            retries=_retries(options.get("retries", 1)),
            output=options.get("output", "file" if per == "chunk" else "stdout"),
            output_file=str(options.get("output_file", "x.txt")),
        )

    @property
    def x_size(self) -> int:
        """Numbers in one simulation, ``prod(x_shape)``."""
        return math.prod(self.x_shape)

    def __call__(self, theta: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Simulates one ``x`` per row of ``theta``.

        Arguments:
            theta: Parameters, shape ``(n, D)``.
            rng: Draws the ``n`` seeds handed to the program, its only source of randomness.

        Returns:
            ``x``, shape ``(n, *x_shape)``, float64; rows of NaN where the program failed.

        Raises:
            RuntimeError: If every one of the ``n >= 2`` simulations failed.
        """
        theta = np.asarray(theta, dtype=np.float64)
        if theta.ndim != 2:
            raise ValueError(f"theta has shape {theta.shape}, expected (n, D)")
        seeds = rng.integers(0, SEED_HIGH, size=len(theta))
        x = np.full((len(theta), self.x_size), np.nan)
        if self.per == "chunk" and len(theta) > 0:
            failures = self._simulate_chunk(theta, seeds, x)
        else:
            failures = self._simulate_rows(theta, seeds, x, range(len(theta)))
        self._report(theta, seeds, failures)
        return x.reshape(len(theta), *self.x_shape)

    def _simulate_chunk(
        self, theta: np.ndarray, seeds: np.ndarray, x: np.ndarray
    ) -> list[tuple[int, RunFailed]]:
        """Fills ``x`` ``(n, x_size)`` with one run; failing that, one run per row."""
        try:
            x[:] = self._run_retrying(theta, seeds)
            return []
        except RunFailed as failure:
            if len(theta) == 1:
                return [(0, failure)]
            log.warning(
                "external simulator: a chunk of %d simulations failed (%s); rerunning them one "
                "at a time",
                len(theta),
                failure.cause,
            )
        return self._simulate_rows(theta, seeds, x, range(len(theta)))

    def _simulate_rows(
        self, theta: np.ndarray, seeds: np.ndarray, x: np.ndarray, rows: range
    ) -> list[tuple[int, RunFailed]]:
        """Fills ``x[i]`` for each row ``i`` with its own run; returns the failed rows."""
        failures = []
        for i in rows:
            try:
                x[i] = self._run_retrying(theta[i : i + 1], seeds[i : i + 1])[0]
            except RunFailed as failure:
                failures.append((i, failure))
        return failures

    def _run_retrying(self, theta: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """``x`` ``(n, x_size)`` of the first of ``1 + retries`` runs that succeeds."""
        for attempt in range(self.retries + 1):
            try:
                return self._run(theta, seeds)
            except RunFailed as failure:
                if attempt == self.retries:
                    raise
                log.debug("external simulator: %s; retrying", failure.cause)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _run(self, theta: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """One run of the program for ``theta`` ``(n, D)``: ``x`` ``(n, x_size)``."""
        with tempfile.TemporaryDirectory(prefix="pipeline-external-") as root:
            workdir = Path(root) / "work"
            workdir.mkdir()
            (workdir / INPUT_FILE).write_text(_input_text(theta, seeds))
            argv = self._argv(theta, seeds, workdir)
            stdout, stderr = Path(root) / "stdout", Path(root) / "stderr"
            status = self._execute(argv, stdout, stderr)
            if status is None:
                cause = f"timed out after {self.timeout:g} s"
                raise RunFailed(argv, cause, _tail(stderr), timed_out=True)
            if status != 0:
                raise RunFailed(argv, _describe_status(status), _tail(stderr))
            try:
                return self._read_x(stdout, workdir / self.output_file, len(theta))
            except (OSError, ValueError, EOFError) as error:  # what np.load and loadtxt raise
                raise RunFailed(argv, str(error), _tail(stderr)) from None

    def _argv(self, theta: np.ndarray, seeds: np.ndarray, workdir: Path) -> list[str]:
        """``command`` with its placeholders replaced for one run."""
        values = {
            "{seed}": str(int(seeds[0])),  # per=simulation only: one row
            "{input}": str(workdir / INPUT_FILE),
            "{output}": str(workdir / self.output_file),
            "{workdir}": str(workdir),
        }
        argv = [self.command[0]]
        for argument in self.command[1:]:
            if argument == "{theta}":
                argv.extend(format(value, ".17g") for value in theta[0])
                continue
            for placeholder, value in values.items():
                argument = argument.replace(placeholder, value)
            argv.append(argument)
        return argv

    def _execute(self, argv: list[str], stdout: Path, stderr: Path) -> int | None:
        """Runs ``argv`` with its output in files; its exit status, or None on timeout."""
        # Files, not pipes: a grandchild that keeps a pipe open cannot hang the wait, and a
        # chatty program cannot fill a pipe buffer and stall.
        with stdout.open("wb") as out, stderr.open("wb") as err:
            try:
                # Its own session: on timeout the whole group goes, shell wrappers' children too.
                process = subprocess.Popen(
                    argv,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as error:
                raise RunFailed(argv, f"could not start: {error}") from None
            try:
                return process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return None
            except BaseException:  # interrupted: leave no orphan simulating on
                _kill_group(process)
                raise

    def _read_x(self, stdout: Path, output: Path, n: int) -> np.ndarray:
        """The run's ``x`` ``(n, x_size)``; ValueError or OSError naming what is wrong."""
        expected = n * self.x_size
        if self.output == "stdout":
            text = stdout.read_text(errors="replace")
            lines = [line.split() for line in text.splitlines() if line.strip()]
            try:
                values = np.array([value for line in lines for value in line], dtype=np.float64)
            except ValueError:
                raise ValueError(f"stdout is not numbers: {_excerpt(text)}") from None
            where = "stdout"
            if len({len(line) for line in lines}) == 1:
                self._check_lines(len(lines), len(lines[0]), n, where)
        elif not output.exists() or output.stat().st_size == 0:
            raise ValueError(
                f"the program wrote no {self.output_file} ({{output}}), or nothing in it"
            )
        elif output.suffix == ".npy":
            values = np.load(output, allow_pickle=False)
            if values.shape not in ((n, *self.x_shape), self.x_shape if n == 1 else None):
                shape = (n, *self.x_shape)
                raise ValueError(f"{self.output_file} has shape {values.shape}, expected {shape}")
            values, where = values.astype(np.float64).ravel(), self.output_file
        else:
            delimiter = "," if output.suffix == ".csv" else None
            table = np.loadtxt(output, dtype=np.float64, delimiter=delimiter, ndmin=2)
            values, where = table.ravel(), self.output_file
            self._check_lines(*table.shape, n, where)
        if values.size != expected:
            raise ValueError(
                f"{where} held {values.size} numbers, expected {expected} "
                f"({n} simulation(s) of shape {self.x_shape})"
            )
        return values.reshape(n, self.x_size)

    def _check_lines(self, lines: int, columns: int, n: int, where: str) -> None:
        """Refuses text laid out one column per simulation (``prod(x_shape)`` lines of ``n``
        numbers), whose numbers would be read across simulations; any other equal-length
        wrapping is read row after row, as documented. Ambiguous where a map's rows are ``n``
        long, or ``n`` equals ``prod(x_shape)``: then it is read as rows."""
        if n < 2 or columns != n or lines != self.x_size or lines == n:
            return
        if len(self.x_shape) > 1 and self.x_shape[-1] == n:
            return
        raise ValueError(
            f"{where} has {lines} lines of {n} numbers: one column per simulation, whose "
            "numbers would be read across simulations; write one line per simulation (or each "
            "simulation's numbers after the previous one's)"
        )

    def _report(
        self, theta: np.ndarray, seeds: np.ndarray, failures: list[tuple[int, RunFailed]]
    ) -> None:
        """Warns about failed simulations; raises if none succeeded."""
        # One failed simulation is a NaN row like any other (observe redraws it); a call whose
        # every simulation failed, two or more, points at the program, not the parameters.
        if len(theta) > 1 and len(failures) == len(theta):
            _, last = failures[-1]
            raise RuntimeError(
                f"external simulator: all {len(theta)} simulations failed; the last run, "
                f"{' '.join(last.argv)} (in {self.cwd}), {last.cause}"
                f"{_stderr_block(last.stderr)}\nRun that command by hand to see why, then fix "
                "the program or the task file's simulator options (command, timeout, output)."
            )
        self.failures.failed += len(failures)
        self.failures.timed_out += sum(failure.timed_out for _, failure in failures)
        for i, failure in failures[:DETAILED_WARNINGS]:
            parameters = ", ".join(format(value, ".6g") for value in theta[i])
            log.warning(
                "external simulator: the simulation for theta = [%s] (seed %d) failed after %d "
                "attempt(s), its x is NaN: %s%s",
                parameters,
                seeds[i],
                self.retries + 1,
                failure.cause,
                _stderr_block(failure.stderr),
            )
        if len(failures) > DETAILED_WARNINGS:
            log.warning(
                "external simulator: %d more of these %d simulations failed (NaN rows)",
                len(failures) - DETAILED_WARNINGS,
                len(theta),
            )


def _check_choice(option: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"simulator option {option} is {value!r}; one of {list(allowed)}")


def _check_command(command: tuple[str, ...], per: Per, output: Output) -> None:
    """Fails unless the placeholders in ``command`` can carry what ``per`` and ``output`` need."""
    if not command:
        raise ValueError("simulator option command is empty: give the program's argv")
    if "{" in command[0]:
        raise ValueError(f"command[0] {command[0]!r} is the program: no placeholders there")
    used = {name for argument in command for name in re.findall(r"\{(\w+)\}", argument)}
    if used - set(PLACEHOLDERS):
        raise ValueError(
            f"unknown placeholder(s) {sorted(used - set(PLACEHOLDERS))} in the simulator "
            f"command; the known ones are {['{' + name + '}' for name in PLACEHOLDERS]}"
        )
    if any("{theta}" in argument and argument != "{theta}" for argument in command):
        raise ValueError(
            "{theta} must be an argument by itself (it becomes D arguments), not part of one"
        )
    if per == "chunk" and used & {"seed", "theta"}:
        raise ValueError(
            "per: chunk runs the program once for many simulations: it reads their seeds and "
            "parameters from {input}, so the command cannot hold {seed} or {theta}"
        )
    if not used & {"theta", "input", "workdir"}:
        raise ValueError(
            "the simulator command passes no parameters: add {theta} (per: simulation) or "
            "{input} (the file of seeds and parameters)"
        )
    if output == "file" and not used & {"output", "workdir"}:
        raise ValueError("output: file needs {output} (or {workdir}) in the command")
    if not used & {"seed", "input", "workdir"}:
        log.warning(
            "the simulator command %s passes no seed ({seed}, or {input} with its seeds): the "
            "program draws the same noise for every simulation, or seeds itself (then no file "
            "can be reproduced); unless it is deterministic, add {seed} to the command",
            list(command),
        )


def _as_argv(command: object) -> tuple[str, ...]:
    """The command option as strings; numbers (YAML's ``5``) are taken as written."""
    if isinstance(command, str) or not isinstance(command, Sequence):
        raise ValueError(
            f"simulator option command is {command!r}: a list of arguments, e.g. "
            '["./my_program", "{seed}", "{theta}"]'
        )
    for argument in command:
        if isinstance(argument, bool) or not isinstance(argument, str | int | float):
            raise ValueError(f"simulator command argument {argument!r} is not a string")
    return tuple(str(argument) for argument in command)


def _resolve_program(command: tuple[str, ...], base: Path) -> tuple[str, ...]:
    """``command`` with ``command[0]`` made absolute (a path) or checked on ``PATH`` (a name)."""
    if not command:
        return command  # __post_init__ names the problem
    program = command[0]
    if "/" not in program:
        local = base / program
        if shutil.which(program) is None and local.exists():
            raise ValueError(
                f"simulator program {program!r} is not on PATH; to run {local}, write ./{program}"
            )
        # Looked up on PATH when run: stages that never simulate (train, sample), whose
        # environment may have another PATH, must still resolve the task.
        return command
    path = Path(program).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        sources = sorted(p.name for p in path.parent.glob(f"{path.name}.*"))
        hint = f"; compile it first (found {', '.join(sources)})" if sources else ""
        raise ValueError(
            f"simulator program {path} does not exist{hint}, or fix command[0] in the task file"
        )
    if not os.access(path, os.X_OK):
        raise ValueError(f"simulator program {path} is not executable: chmod +x {path}")
    return (str(path), *command[1:])


def _timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"simulator option timeout is {value!r}: seconds, a positive number")
    return float(value)


def _retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"simulator option retries is {value!r}: an integer, 0 or more")
    return value


def _input_text(theta: np.ndarray, seeds: np.ndarray) -> str:
    """``{input}``: one line ``seed p1 ... pD`` per simulation, parameters at full precision."""
    return "".join(
        " ".join([str(int(seed)), *(format(value, ".17g") for value in row)]) + "\n"
        for seed, row in zip(seeds, theta, strict=True)
    )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    process.wait()


def _describe_status(status: int) -> str:
    """``"exit status 3"``, or for a crash ``"killed by signal SIGSEGV (exit status -11)"``."""
    if status >= 0:
        return f"exit status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:  # a real-time signal without a name
        name = f"{-status}"
    return f"killed by signal {name} (exit status {status})"


def _tail(path: Path, size: int = 4096) -> str:
    """The last :data:`STDERR_LINES` lines of the file at ``path`` (its last ``size`` bytes)."""
    if not path.exists():
        return ""
    with path.open("rb") as file:
        file.seek(max(path.stat().st_size - size, 0))
        text = file.read().decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-STDERR_LINES:])


def _stderr_block(stderr: str) -> str:
    if not stderr:
        return "; stderr was empty"
    return "; stderr ends with:\n" + "\n".join(f"    {line}" for line in stderr.splitlines())


def _excerpt(text: str, size: int = 200) -> str:
    text = text.strip()
    return repr(text if len(text) <= size else text[:size] + "...")
