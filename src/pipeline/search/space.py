"""The space a hyperparameter search explores: training options and the values each may take.

A space is written in the config as ``{option: range}``, where ``range`` is ``{low, high}``
(with ``log: true`` for a scale such as a learning rate) for a numeric option, or
``{choices: [...]}`` for any option (flows, widths, schedules). Every name, range and choice is
checked against :class:`pipeline.train_config.TrainConfig` before any trial runs: a search must
not spend an hour of trials to find that one value was out of bounds.
"""

from __future__ import annotations

import difflib
import itertools
import json
import typing
from dataclasses import dataclass, fields
from typing import Any, get_origin

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from pipeline.options import OptionsError
from pipeline.search.records import describe_range
from pipeline.train_config import FMPE_ONLY, NPE_ONLY, TrainConfig

__all__ = ["Dimension", "SearchSpace", "NOT_SEARCHABLE"]

# Options a search may not vary, and why: every trial is scored on the same held-out
# simulations and differs from the others by what it learns, not where it runs.
NOT_SEARCHABLE = {
    "seed": "every trial starts from the same seed, so trials differ by their options alone",
    "val_fraction": "every trial must be scored on the same held-out simulations",
    "loading": "it says where the data live, not what the model learns",
    "devices": "it says where training runs, not what the model learns",
    "accelerator": "it says where training runs, not what the model learns",
    "num_workers": "it says where training runs, not what the model learns",
    "precision": "it says where training runs; set it in train for every trial",
    "compile": "it says how training runs, not what the model learns",
    "max_time": "a time limit would make trials depend on the machine's speed",
    "ensemble": (
        "a mixture's held-out loss is never above its members' mean, so the loss favours the "
        "largest ensemble whatever the other options; trials train search.members flows each "
        "(1), and the chosen options then train the task's train.ensemble"
    ),
}
RANGE_KEYS = {"low", "high", "log"}


@dataclass(frozen=True)
class Dimension:
    """One searched option: a numeric range ``[low, high]`` (``log``: searched on a log scale)
    or a tuple of ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution; choices that are lists are encoded as JSON strings."""
        if self.choices is not None:
            return CategoricalDistribution([_encode(c) for c in self.choices])
        if isinstance(self.low, int):
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def decode(self, value: Any) -> Any:
        """A value proposed by Optuna as the training option's value."""
        if self.choices is not None and isinstance(value, str) and _is_list(self.name):
            return json.loads(value)
        return value

    def describe(self) -> str:
        """The range in words, for the report."""
        return describe_range(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        """The range as the config writes it."""
        if self.choices is not None:
            return {"choices": [list(c) if isinstance(c, tuple) else c for c in self.choices]}
        return {"low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class SearchSpace:
    """The searched options, in the order the config lists them."""

    dimensions: tuple[Dimension, ...]

    @classmethod
    def from_dict(cls, data: Any, source: str = "search.space") -> SearchSpace:
        """The space from the config's mapping, every range checked against ``TrainConfig``.

        Raises:
            OptionsError: naming the option and what is wrong with its range.
        """
        if not isinstance(data, dict) or not data:
            raise OptionsError(
                f"{source}: expected a mapping of training options to ranges, such as "
                "{learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}}, got "
                f"{json.dumps(data)}"
            )
        dimensions = (_dimension(name, spec, f"{source}.{name}") for name, spec in data.items())
        return cls(tuple(dimensions))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {d.name: d.distribution() for d in self.dimensions}

    def options(self, params: dict[str, Any]) -> dict[str, Any]:
        """The training options that Optuna's ``params`` stand for."""
        return {d.name: d.decode(params[d.name]) for d in self.dimensions}

    def as_dict(self) -> dict[str, Any]:
        return {d.name: d.as_dict() for d in self.dimensions}

    def check_against(self, base: TrainConfig, source: str = "search.space") -> None:
        """Refuses a space whose values a task's own options ``base`` cannot take, each value
        set on its own or with another option's (every pair of choices and range ends), or
        where ``method`` may be one that lacks an option searched.

        Raises:
            OptionsError: naming the option and the value.
        """
        methods = {base.method}
        for dimension in self.dimensions:
            if dimension.name == "method":
                methods = set(dimension.choices or ())
        if "nle" in methods:
            raise OptionsError(
                f"{source}: method nle cannot be searched: trials are scored by the held-out "
                "density of theta given x, which an NLE posterior only has up to a constant "
                "that differs between observations; search npe or fmpe"
            )
        for only, lacking, having in ((NPE_ONLY, "fmpe", "npe"), (FMPE_ONLY, "npe", "fmpe")):
            clash = [name for name in self.names if name in only]
            if lacking in methods and clash:
                raise OptionsError(
                    f"{source}: {', '.join(clash)} cannot be searched where method may be "
                    f"{lacking}, which has none; search them with method {having} only"
                )
        grids = [d.choices or (d.low, d.high) for d in self.dimensions]
        for dimension, values in zip(self.dimensions, grids, strict=True):
            for value in values:
                base.replaced({dimension.name: value}, source=f"{source}.{dimension.name}")
        # Values can clash together (flow mdn with transforms, a cnn embedding with no stages):
        # every pair of options' choices and range ends, before any trial proposes one. Pairs,
        # not the whole product, which grows exponentially with the options searched; the
        # options' checks each relate two of them.
        for i, j in itertools.combinations(range(len(self.dimensions)), 2):
            for values in itertools.product(grids[i], grids[j]):
                combination = dict(zip((self.names[i], self.names[j]), values, strict=True))
                try:
                    base.replaced(combination, source=source)
                except OptionsError as error:
                    raise OptionsError(
                        f"{source}: a trial could propose {json.dumps(combination)}, which is "
                        f"refused ({error}); narrow the space so that no such pair remains"
                    ) from None


def _dimension(name: Any, spec: Any, source: str) -> Dimension:
    known = [f.name for f in fields(TrainConfig)]
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionsError(f"{source}: {name!r} is not a training option{hint}")
    if name in NOT_SEARCHABLE:
        raise OptionsError(f"{source}: {name} cannot be searched: {NOT_SEARCHABLE[name]}")
    if not isinstance(spec, dict):
        raise OptionsError(
            f"{source}: expected {{low: ..., high: ...}} or {{choices: [...]}}, got "
            f"{json.dumps(spec)}"
        )
    if set(spec) == {"choices"}:
        return _choices(name, spec["choices"], source)
    if "choices" in spec or not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
        raise OptionsError(
            f"{source}: give either choices, or low and high (and optionally log), got keys "
            f"{sorted(spec)}"
        )
    return _range(name, spec, source)


def _choices(name: str, choices: Any, source: str) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise OptionsError(f"{source}.choices: expected a non-empty list, got {choices!r}")
    values = tuple(_checked(name, c, source) for c in choices)
    if len({_encode(v) for v in values}) != len(values):
        raise OptionsError(f"{source}.choices: a value is listed twice in {choices!r}")
    return Dimension(name, choices=values)


def _range(name: str, spec: dict[str, Any], source: str) -> Dimension:
    hint = typing.get_type_hints(TrainConfig)[name]
    if hint not in (int, float):
        raise OptionsError(f"{source}: {name} is not a number; give it as choices: [...]")
    low, high = (_checked(name, spec[k], f"{source}.{k}") for k in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise OptionsError(f"{source}.log: expected true or false, got {log!r}")
    if not low < high:
        raise OptionsError(f"{source}: low must be below high, got low {low} and high {high}")
    if log and low <= 0:
        raise OptionsError(f"{source}: a log scale needs low above 0, got {low}")
    return Dimension(name, low=low, high=high, log=log)


def _checked(name: str, value: Any, source: str) -> Any:
    """``value`` as the option's type, checked against its bounds by TrainConfig itself (of a
    method that has the option: whether the task's method has it is check_against's to say)."""
    base = TrainConfig(method="fmpe") if name in FMPE_ONLY else TrainConfig()
    return getattr(base.replaced({name: value}, source=source), name)


def _is_list(name: str) -> bool:
    return get_origin(typing.get_type_hints(TrainConfig)[name]) is tuple


def _encode(value: Any) -> Any:
    """Optuna's categorical values must be scalars: tuples travel as JSON text."""
    return json.dumps(list(value)) if isinstance(value, tuple) else value
