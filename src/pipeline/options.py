"""Typed options of a stage: one frozen dataclass per stage, checked before any work starts.

A stage's options are declared once, as fields made by :func:`option` (type, default, bounds,
help); the workflow's schema (``workflow/schemas/config.schema.yaml``) repeats them with their
descriptions, and ``tests/test_options.py`` checks that the two agree. Values arrive from JSON
(``--options``), YAML files or command-line flags and are checked here the same way: unknown
names, wrong types (a string for a number, a number for a switch) and values out of bounds are
:class:`OptionsError` naming the option, the value and what it accepts.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self, get_args, get_origin

import yaml

__all__ = [
    "C2stOptions",
    "ObserveOptions",
    "Options",
    "OptionsError",
    "ReportOptions",
    "SampleOptions",
    "SearchOptions",
    "SimulateOptions",
    "ValidateOptions",
    "json_object",
    "option",
]


class OptionsError(ValueError):
    """An option a user gave is unknown, of the wrong type or out of bounds."""


def option(
    default: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
    help: str = "",  # noqa: A002 - argparse's word
) -> Any:
    """A stage option: its default and the bounds its values (or items, for tuples) must meet."""
    bounds = {
        "minimum": minimum,
        "maximum": maximum,
        "exclusiveMinimum": exclusive_minimum,
        "exclusiveMaximum": exclusive_maximum,
    }
    metadata = {"bounds": {k: v for k, v in bounds.items() if v is not None}, "help": help}
    return field(default=default, metadata=metadata)


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true or false", int: "integers", float: "numbers", str: "strings"}


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return f"a list of {_PLURALS[get_args(hint)[0]]}"
    return _NAMES[hint]


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` demands, or TypeError. Integers given as integral floats (YAML's
    ``1.0e4``) become ints; nothing else is converted (``"3"`` is not a number, ``"no"`` not a
    switch)."""
    if get_origin(hint) is Literal:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            for allowed in get_args(hint):
                if value == allowed and type(value) is type(allowed):
                    return allowed
        raise TypeError
    if get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(_convert(item, get_args(hint)[0]) for item in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError(f"unsupported option type {hint!r}")  # a declaration error, not the user's


_BOUND_TEXT = {
    "minimum": ("at least", lambda v, b: v >= b),
    "maximum": ("at most", lambda v, b: v <= b),
    "exclusiveMinimum": ("above", lambda v, b: v > b),
    "exclusiveMaximum": ("below", lambda v, b: v < b),
}


@dataclass(frozen=True)
class Options:
    """Base of the stages' option dataclasses: construction from untrusted mappings, checked."""

    @classmethod
    def from_dict(cls, data: Any, source: str = "options") -> Self:
        """Options from a mapping of ``name: value``; missing names keep their defaults.

        Raises:
            OptionsError: naming ``source``, the option, the value given and what it accepts.
        """
        if not isinstance(data, dict):
            raise OptionsError(
                f"{source}: expected a mapping of option names to values, got {data!r}"
            )
        known = {f.name: f for f in fields(cls)}
        unknown = [name for name in data if name not in known]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(str(name), known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise OptionsError(
                f"{source}: unknown option(s) {', '.join(hints)}; allowed: {', '.join(known)}"
            )
        types_ = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            hint = types_[name]
            try:
                values[name] = _convert(value, hint)
            except TypeError:
                raise OptionsError(
                    f"{source}: {name} must be {_type_name(hint)}, got {value!r} "
                    f"(default: {json.dumps(_plain(known[name].default))})"
                ) from None
            _check_bounds(source, name, values[name], known[name].metadata.get("bounds", {}))
        options = cls(**values)
        options.check(source)
        return options

    @classmethod
    def from_yaml(cls, path: Path) -> Self:
        """Options from a YAML file of ``name: value`` (plain YAML: no Python tags)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"options file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise OptionsError(f"{path}: not a plain YAML file of options ({error})") from None
        return cls.from_dict({} if data is None else data, str(path))

    def replaced(self, changes: dict[str, Any], source: str = "options") -> Self:
        """These options with ``changes`` applied, checked as :meth:`from_dict` checks."""
        if not isinstance(changes, dict):
            return self.from_dict(changes, source)  # refused, naming what was given
        return self.from_dict({**asdict(self), **changes}, source)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``name: value`` (tuples as lists)."""
        return {k: _plain(v) for k, v in asdict(self).items()}

    def check(self, source: str) -> None:
        """Checks between options (each option's own type and bounds are checked already)."""

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, required: str = "") -> None:
        """``--options JSON`` and a ``--name`` flag per option.

        Flags default to None so that :meth:`from_args` tells given flags from defaults; the
        option named ``required`` has no default on the command line.
        """
        parser.add_argument(
            "--options", metavar="JSON", help="a JSON object of these options (flags override)"
        )
        types_ = typing.get_type_hints(cls)
        for f in fields(cls):
            hint, flag = types_[f.name], "--" + f.name.replace("_", "-")
            needed = f.name == required
            default = "" if needed else f" (default: {_plain(f.default)})"
            text = f"{f.metadata.get('help', '')}{default}"
            if hint is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
            elif get_origin(hint) is Literal:
                parser.add_argument(flag, choices=get_args(hint), help=text)
            else:
                parser.add_argument(flag, type=hint, required=needed, help=text)

    @classmethod
    def from_args(cls, args: argparse.Namespace, source: str = "command line") -> Self:
        """Options from ``--options JSON`` (when the parser has it) overridden by given flags."""
        data = json_object(args.options, "--options") if getattr(args, "options", None) else {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is not None:
                data[f.name] = value
        return cls.from_dict(data, source)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``name: default`` of every option, JSON-ready."""
        return {f.name: _plain(f.default) for f in fields(cls) if f.default is not MISSING}


def json_object(text: str, source: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object, or OptionsError naming ``source``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise OptionsError(f"{source}: not valid JSON ({error}): {text!r}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{source}: expected a JSON object of options, got {text!r}")
    return data


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_bounds(source: str, name: str, value: Any, bounds: dict[str, float]) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if item is None:
            continue
        for key, bound in bounds.items():
            text, holds = _BOUND_TEXT[key]
            if not holds(item, bound):
                what = f"every item of {name}" if isinstance(value, tuple) else name
                raise OptionsError(f"{source}: {what} must be {text} {bound}, got {value!r}")


def as_schema_types(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` (a workflow config, or part of one) read as the JSON Schema ``schema`` types
    it: text where a number, flag, list or mapping is due parsed as YAML (Snakemake passes
    nested --config values as text: rounds='{observation: 3}' gives '3'), and whole floats
    where an integer is due made ints (JSON Schema counts 600.0 as an integer, YAML reads
    6.0e+2 as a float, and the rules use counts as ints)."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and types and "string" not in types:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return value  # validation names it
    if isinstance(value, float) and "integer" in types and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        typed = {}
        for key, item in value.items():
            inner = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            typed[key] = as_schema_types(item, inner if isinstance(inner, dict) else {})
        return typed
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [as_schema_types(item, schema["items"]) for item in value]
    return value


# The stages' options (train's are pipeline.train_config.TrainConfig).
# Defaults and bounds are the workflow schema's; tests/test_options.py holds them equal.

# Seeds are split into 32-bit words by NumPy's SeedSequence, which drops trailing zero words:
# seed 2**32 + 5 with block 0 would draw block 1 of seed 5. One word each keeps streams apart.
SEED_MAX = 2**32 - 1

# train's options of the penalty on over-confidence: while it is off they shape nothing, and
# they are left out of a run's identity (pipeline.training) and of a train job's params (the
# workflow, which imports them from here without torch).
CALIBRATION_ONLY = ("calibration", "calibration_draws", "calibration_rows")


Merge = Literal["copy", "virtual"]
Compression = Literal["gzip", "lzf", "none"]


@dataclass(frozen=True)
class SimulateOptions(Options):
    """``pipeline simulate`` and ``pipeline merge``."""

    num_simulations: int = option(10000, minimum=1, help="simulations to run")
    seed: int = option(
        1, minimum=0, maximum=SEED_MAX, help="simulation i depends on (seed, i) only"
    )
    chunk_size: int = option(1000, minimum=1, help="simulations per shard")
    merge: Merge = option(
        "copy", help="join shards by copying, or as an HDF5 virtual dataset over OUT.shards/"
    )
    compression: Compression = option(
        "gzip", help="HDF5 filter (gzip: portable; lzf: fast, h5py only)"
    )


@dataclass(frozen=True)
class ObserveOptions(Options):
    """``pipeline observe`` drawing synthetic observations (``--from`` reads real ones)."""

    num_observations: int = option(5, minimum=1, help="observations with known truth")
    num_reference_samples: int = option(
        10000, minimum=0, help="reference posterior samples per observation"
    )
    seed: int = option(
        3, minimum=0, maximum=SEED_MAX, help="seed of the observations and references"
    )


@dataclass(frozen=True)
class SampleOptions(Options):
    """``pipeline sample``."""

    num_samples: int = option(1000, minimum=2, help="posterior samples per observation")
    seed: int = option(4, minimum=0, maximum=SEED_MAX, help="seed of posterior sampling")
    mcmc_walkers: int = option(
        0,
        minimum=0,
        help="walkers of each NLE posterior's ensemble (0: 32, more where few observations ask "
        "for many draws each)",
    )
    mcmc_burn_in: int = option(300, minimum=0, help="MCMC steps discarded as burn-in (NLE)")
    mcmc_thin: int = option(10, minimum=1, help="MCMC steps between kept draws (NLE)")
    mcmc_extensions: int = option(
        4, minimum=0, help="times an unconverged NLE chain is extended (thinning doubled)"
    )
    ode_tolerance: float = option(
        1e-4,
        exclusive_minimum=0,
        maximum=0.1,
        help="relative tolerance of an FMPE posterior's ODE solver (absolute: a tenth of it)",
    )

    def check(self, source: str) -> None:
        if self.mcmc_walkers % 2 or 0 < self.mcmc_walkers < 8:
            raise OptionsError(
                f"{source}: mcmc_walkers must be even (the ensemble moves in two halves) and at "
                f"least 8 (two per group of R-hat), or 0 to let the stage choose; got "
                f"{self.mcmc_walkers}"
            )


@dataclass(frozen=True)
class ValidateOptions(Options):
    """``pipeline validate``: settings of the diagnostics."""

    seed: int = option(
        5, minimum=0, maximum=SEED_MAX, help="seed of TARP references and classifiers"
    )
    c2st_folds: int = option(5, minimum=2, help="cross-validation folds of C2ST")
    c2st_max_samples: int = option(0, minimum=0, help="samples per class of C2ST (0: all)")
    local_c2st_null: int = option(
        100, minimum=19, help="classifier refits under local C2ST's null"
    )
    predictive_draws: int = option(100, minimum=20, help="posterior draws simulated per x")
    predictive_replicates: int = option(
        10, minimum=1, help="fresh simulations per test pair for data-space coverage"
    )


@dataclass(frozen=True)
class C2stOptions(Options):
    """``pipeline c2st``: one budget's C2ST, with validate's classifier settings."""

    budget: int = option(1000, minimum=1, help="training simulations the model used")
    seed: int = option(5, minimum=0, maximum=SEED_MAX, help="seed of the classifier")
    max_samples: int = option(0, minimum=0, help="samples per class (0: all)")
    folds: int = option(5, minimum=2, help="cross-validation folds")


@dataclass(frozen=True)
class SearchOptions(Options):
    """``pipeline search-trial`` and ``search-select``: how many trials, and how they are
    proposed, scored and chosen (the space searched is :class:`pipeline.search.SearchSpace`)."""

    trials: int = option(20, minimum=1, help="trials in the search")
    parallel: int = option(
        2, minimum=1, help="trials proposed together from the same earlier results (run at once)"
    )
    seed: int = option(0, minimum=0, maximum=SEED_MAX, help="seed of the proposals")
    startup: int = option(
        10, minimum=1, help="trials proposed at random before TPE models the results"
    )
    held_out: int = option(
        1000, minimum=10, help="validation simulations each trial is scored on (at most)"
    )
    coverage_samples: int = option(
        200, minimum=10, help="posterior samples per held-out simulation for HPD coverage"
    )
    members: int = option(
        1, minimum=1, help="flows each trial trains (the chosen options train train's ensemble)"
    )
    tolerance: float = option(
        1.0,
        minimum=0,
        help="held-out losses this many standard errors above the best count as equal",
    )


@dataclass(frozen=True)
class TruncateOptions(Options):
    """``pipeline truncate``: the region one round leaves to the next (:mod:`pipeline.rounds`)."""

    quantile: float = option(
        1e-4, exclusive_minimum=0, exclusive_maximum=1, help="posterior mass left outside"
    )
    draws: int = option(100000, minimum=100, help="posterior draws that set the threshold")
    prior_draws: int = option(
        100000, minimum=100, help="prior draws that measure the region's prior mass"
    )
    min_prior_mass: float = option(
        1e-4,
        exclusive_minimum=0,
        maximum=1,
        help="smallest prior mass of a region: rejection below it is too slow",
    )
    mcmc_extensions: int = option(
        4,
        minimum=0,
        help="times an NLE posterior's unconverged chains are extended (thinning doubled)",
    )
    seed: int = option(0, minimum=0, maximum=SEED_MAX, help="seed of the draws and of the C2ST")

    def check(self, source: str) -> None:
        if self.draws * self.quantile < 10:
            raise OptionsError(
                f"{source}: quantile {self.quantile:g} of {self.draws} draws rests on fewer "
                f"than 10 draws; raise draws to at least {math.ceil(10 / self.quantile)}"
            )


@dataclass(frozen=True)
class ReportOptions(Options):
    """``pipeline report``: title and the thresholds of the verdicts."""

    title: str = option("SBI pipeline report", help="title of the HTML report")
    c2st_max: float = option(
        0.6, minimum=0.5, maximum=1, help="C2ST passes when every observation scores at most this"
    )
    coverage_max_deviation: float = option(
        0.1,
        exclusive_minimum=0,
        maximum=1,
        help="coverage passes when TARP, HPD and predictive coverage stay this close to the "
        "diagonal",
    )
    misspecification_level: float = option(
        0.05,
        exclusive_minimum=0,
        maximum=1,
        help="level of the misspecification tests over a task's observations together",
    )
