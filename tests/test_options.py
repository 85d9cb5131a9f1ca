"""Every stage's options: the dataclasses agree with the workflow schema, and any JSON a user
can write gives either valid options or a clear error naming the option, never a traceback."""

from __future__ import annotations

import inspect
import json
import logging
import math
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import storage
from pipeline.cli import main
from pipeline.options import (
    C2stOptions,
    ObserveOptions,
    Options,
    OptionsError,
    ReportOptions,
    SampleOptions,
    SearchOptions,
    SimulateOptions,
    ValidateOptions,
    as_schema_types,
)
from pipeline.training import TrainConfig
from pipeline.validation import score_budget, validate
from tests.conftest import ROOT

SCHEMA = yaml.safe_load(
    (Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text()
)["properties"]

# (options class, schema section, {field: schema property} where the names differ or only some
# of the section's properties are the stage's).
PAIRS = [
    (TrainConfig, "train", None),
    (ValidateOptions, "validate", None),
    (ReportOptions, "report", None),
    (ObserveOptions, "observations", None),
    (
        SimulateOptions,
        "simulate",
        {n: n for n in ("num_simulations", "seed", "chunk_size", "merge", "compression")},
    ),
    (SampleOptions, "sample", {"num_samples": "num_test_samples", "seed": "seed"}),
    (SearchOptions, "search", None),
    (
        C2stOptions,
        "validate",
        {"seed": "seed", "max_samples": "c2st_max_samples", "folds": "c2st_folds"},
    ),
]
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def described(options: type[Options], name: str) -> dict[str, object]:
    """A field as a JSON-schema property: type, default, enum or item bounds, bounds."""
    f = {f.name: f for f in fields(options)}[name]
    hint = typing.get_type_hints(options)[name]
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    bounds = dict(f.metadata["bounds"])
    if get_origin(hint) is Literal:
        return {"type": "string", "enum": list(get_args(hint)), "default": default}
    if get_origin(hint) is tuple:
        items = {"type": JSON_TYPES[get_args(hint)[0]], **bounds}
        return {"type": "array", "items": items, "default": default}
    return {"type": JSON_TYPES[hint], "default": default, **bounds}


def in_schema(prop: dict[str, object]) -> dict[str, object]:
    keep = ("type", "enum", "default", "minimum", "maximum", "exclusiveMinimum")
    keep += ("exclusiveMaximum",)
    out = {k: v for k, v in prop.items() if k in keep}
    if "items" in prop:
        out["items"] = {k: v for k, v in prop["items"].items() if k in keep}
    return out


@pytest.mark.parametrize(("options", "section", "names"), PAIRS, ids=lambda p: str(p)[:30])
def test_schema_and_dataclass_agree(options, section, names):
    properties = SCHEMA[section].get("properties") or SCHEMA[section]["additionalProperties"]
    properties = properties.get("properties", properties)
    names = names or {f.name: f.name for f in fields(options)}
    if section in ("train", "validate", "report", "observations") and options.__name__ != (
        "C2stOptions"
    ):
        assert set(names.values()) == set(properties), "schema and dataclass name other options"
    for name, schema_name in names.items():
        assert described(options, name) == in_schema(properties[schema_name]), name


def test_sample_option_bounds_hold_for_both_sample_counts():
    sample = SCHEMA["sample"]["properties"]
    assert (
        sample["num_observation_samples"]["minimum"]
        == described(SampleOptions, "num_samples")["minimum"]
    )


def test_library_defaults_are_the_options_defaults():
    for function, options in ((validate, ValidateOptions), (score_budget, C2stOptions)):
        parameters = inspect.signature(function).parameters
        for name, default in options.defaults().items():
            given = parameters[name].default
            if given is not inspect.Parameter.empty and given is not None:
                assert given == default, (function.__name__, name)


def test_compression_choices_are_storage_filters():
    assert set(get_args(typing.get_type_hints(SimulateOptions)["compression"])) == set(
        storage.COMPRESSIONS
    )


# Any JSON value: what a user's --options or config file can carry (NaN and inf too: Python's
# json reads them).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
CLASSES = [pair[0] for pair in PAIRS[:-1]] + [C2stOptions]


def mappings(options: type[Options]) -> st.SearchStrategy:
    """Mappings mostly of the class's own option names (some unknown), with any JSON values."""
    names = st.sampled_from([f.name for f in fields(options)]) | st.text(max_size=8)
    return st.dictionaries(names, JSON, max_size=4) | JSON


def assert_valid(options: Options) -> None:
    hints = typing.get_type_hints(type(options))
    for f in fields(options):
        value, hint = getattr(options, f.name), hints[f.name]
        items = value if get_origin(hint) is tuple else (value,)
        kind = get_args(hint)[0] if get_origin(hint) is tuple else hint
        for item in items:
            if get_origin(kind) is Literal:
                assert item in get_args(kind)
            else:
                assert type(item) is kind, (f.name, item)
            if isinstance(item, float):
                assert math.isfinite(item)
            if isinstance(item, str | bool):
                continue
            bounds = f.metadata["bounds"]
            assert item >= bounds.get("minimum", -math.inf), f.name
            assert item <= bounds.get("maximum", math.inf), f.name
            assert item > bounds.get("exclusiveMinimum", -math.inf), f.name
            assert item < bounds.get("exclusiveMaximum", math.inf), f.name


@pytest.mark.parametrize("options", CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_json_gives_valid_options_or_a_clear_error(options, data):
    given_ = data.draw(mappings(options))
    try:
        result = options.from_dict(given_, source="--options")
    except OptionsError as error:
        message = str(error)
        assert message.startswith("--options: ")
        if isinstance(given_, dict):
            # The message names an offending option (or says which ones are unknown).
            assert any(str(name) in message for name in given_) or "unknown" in message
    else:
        assert_valid(result)


# Each stage with its path arguments pointing nowhere: options are checked before any file is
# read, so a bad option is reported as such, and good ones lead to a clear missing-file error.
STAGES = {
    "simulate": ["--task", "two_moons", "--out", "{tmp}/sims.h5"],
    "observe": ["--task", "two_moons", "--out", "{tmp}/obs.h5"],
    "train": ["--data", "{tmp}/none.h5", "--out", "{tmp}/model"],
    "sample": ["--model", "{tmp}/model", "--observations", "{tmp}/none.h5", "--out", "{tmp}/s"],
    "validate": [
        *("--test-samples", "{tmp}/a.h5", "--observation-samples", "{tmp}/b.h5"),
        *("--observations", "{tmp}/c.h5", "--out", "{tmp}/v"),
    ],
    "c2st": [
        *("--observation-samples", "{tmp}/b.h5", "--observations", "{tmp}/c.h5"),
        *("--budget", "100", "--out", "{tmp}/c.json"),
    ],
    "report": ["--experiment-dir", "{tmp}/none", "--tasks", "two_moons", "--out", "{tmp}/r"],
    "search-trial": [
        *("--data", "{tmp}/none.h5", "--out", "{tmp}/t", "--trial", "0"),
        *("--space", '{{"learning_rate": {{"low": 0.001, "high": 0.01}}}}'),
    ],
    "search-select": ["--scores", "{tmp}/a.json", "--out", "{tmp}/best.json"],
}
STAGE_OPTIONS = {
    "simulate": SimulateOptions,
    "observe": ObserveOptions,
    "train": TrainConfig,
    "sample": SampleOptions,
    "validate": ValidateOptions,
    "c2st": C2stOptions,
    "report": ReportOptions,
    "search-trial": SearchOptions,
    "search-select": SearchOptions,
}


@pytest.mark.parametrize("stage", list(STAGES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_stage_reports_bad_options_without_a_traceback(stage, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(stage)
    given_ = data.draw(mappings(STAGE_OPTIONS[stage]))
    if stage in ("simulate", "observe"):
        # Valid options would start real work: make the output's folder a file, so that even
        # those stop at the first write with an OS error.
        (tmp / "blocker").write_text("")
        tmp = tmp / "blocker"
    argv = [stage, *(arg.format(tmp=tmp) for arg in STAGES[stage])]
    argv.append(f"--options={json.dumps(given_)}")
    logger = logging.getLogger("pipeline")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        code = main(argv)
    finally:
        logger.removeHandler(handler)
    assert code == 2
    failed = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert failed and failed[-1].startswith(f"{stage} failed: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "--num-samples", "0"], "num_samples must be at least 2, got 0"),
        (["c2st", "--budget", "-1"], "budget must be at least 1, got -1"),
        (["validate", "--local-c2st-null", "5"], "local_c2st_null must be at least 19, got 5"),
        (["validate", "--c2st-folds", "1"], "c2st_folds must be at least 2, got 1"),
        (["report", "--c2st-max", "0.4"], "c2st_max must be at least 0.5, got 0.4"),
        (["simulate", "--chunk-size", "0"], "chunk_size must be at least 1, got 0"),
    ],
)
def test_out_of_bounds_flags_are_refused_before_any_work(tmp_path, capsys, argv, message):
    stage = argv[0]
    paths = [arg.format(tmp=tmp_path) for arg in STAGES[stage]]
    flags = dict(zip(paths[::2], paths[1::2], strict=True)) | dict([argv[1:]])
    assert main([stage, *(item for pair in flags.items() for item in pair)]) == 2
    assert f"{stage} failed: command line: {message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_config_file_with_python_tags_is_refused(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text('seed: !!python/object/apply:os.system ["touch pwned"]\n')
    argv = ["train", "--data", str(tmp_path / "sims.h5"), "--out", str(tmp_path / "model")]
    assert main([*argv, "--config", str(config)]) == 2
    assert "train.yaml: not a plain YAML file of options" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_a_config_is_read_as_the_workflow_schema_types_it():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    config = {
        "experiment": "123",  # a string where a string is due stays one
        "simulate": {"num_simulations": 600.0, "budgets": [300.0, "1000"]},
        "rounds": {"observation": "3", "simulations": "[100, 200]"},
        "train": {"learning_rate": "0.001", "max_epochs": "5"},
        "task_train": {"two_moons": {"ensemble": 2.0, "flow_hidden": "[32, 32]"}},
    }
    assert as_schema_types(config, schema) == {
        "experiment": "123",
        "simulate": {"num_simulations": 600, "budgets": [300, 1000]},
        "rounds": {"observation": 3, "simulations": [100, 200]},
        "train": {"learning_rate": 0.001, "max_epochs": 5},
        "task_train": {"two_moons": {"ensemble": 2, "flow_hidden": [32, 32]}},
    }
    # Not a whole number, or not a number at all: left for the schema's validation to name.
    assert as_schema_types({"simulate": {"num_simulations": 6.5}}, schema) == {
        "simulate": {"num_simulations": 6.5}
    }
    assert as_schema_types({"rounds": {"observation": "x: ["}}, schema) == {
        "rounds": {"observation": "x: ["}
    }


def test_training_options_are_checked_without_torch_and_name_the_families_built():
    # The workflow checks every task's training options before any job, in every Snakemake
    # process: importing torch there would cost seconds each time.
    code = "import sys, pipeline.train_config; print('torch' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False"
    from pipeline.models.flow_matching import HALF_TURNS
    from pipeline.models.flows import FLOWS
    from pipeline.train_config import FLOW_FAMILIES

    assert sorted(FLOWS) == sorted(FLOW_FAMILIES)
    help_text = next(f for f in fields(TrainConfig) if f.name == "time_features").metadata["help"]
    assert "{:g} to {:g} half-turns".format(*HALF_TURNS) in help_text


def test_a_seed_beyond_one_32_bit_word_is_refused():
    # NumPy's SeedSequence drops trailing zero words: (2**32 + 5, block 0) drew (5, block 1), so
    # a test set of seed 5 repeated the training rows of seed 2**32 + 5 unnoticed.
    import numpy as np

    assert np.array_equal(
        np.random.default_rng([2**32 + 5, 0]).random(3), np.random.default_rng([5, 1]).random(3)
    )
    SimulateOptions.from_dict({"seed": 2**32 - 1})
    for options in (SimulateOptions, ObserveOptions, TrainConfig):
        with pytest.raises(OptionsError, match=r"seed must be at most 4294967295"):
            options.from_dict({"seed": 2**32})
