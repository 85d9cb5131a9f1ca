"""envs/requirements.lock, pyproject.toml, envs/*.yaml and the installed environment agree:
a pin changed in one place and not the others fails here."""

from __future__ import annotations

import importlib.util
import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("lock", ROOT / "envs/lock.py")
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)

LOCKED = lock.read_lock()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(requirements: list[str]) -> dict[str, str]:
    found = {}
    for text in requirements:
        requirement = Requirement(text)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{text}: pyproject pins exact versions"
        found[canonicalize_name(requirement.name)] = specifier.version
    return found


def test_the_lock_holds_pyprojects_pins():
    wanted = pins(PROJECT["dependencies"]) | pins(PROJECT["optional-dependencies"]["test"])
    assert {name: LOCKED.get(name) for name in wanted} == wanted


@pytest.mark.parametrize("env", sorted(p.name for p in (ROOT / "envs").glob("*.yaml")))
def test_the_conda_environments_pin_what_the_lock_pins(env):
    document = yaml.safe_load((ROOT / "envs" / env).read_text())
    pip = next(item["pip"] for item in document["dependencies"] if isinstance(item, dict))
    lines = [line for line in pip if re.match(r"^[A-Za-z0-9_.-]+==", line)]
    assert lines, f"envs/{env} pins nothing"
    for name, version in pins(lines).items():
        assert LOCKED.get(name) == version, (
            f"envs/{env}: {name}=={version}, lock {LOCKED.get(name)}"
        )


def test_this_environment_is_the_lock():
    # Run in an install from the lock (README, .ci/run): what sbi-pipeline[test] requires here
    # is exactly the lock. A dependency added to pyproject.toml without `python envs/lock.py`
    # fails, and so does an environment that drifted.
    installed = lock.installed_closure()
    missing = sorted(set(installed) - set(LOCKED))
    differ = {
        n: (installed[n], LOCKED[n])
        for n in installed
        if n in LOCKED and installed[n] != LOCKED[n]
    }
    assert not missing, f"installed but not locked (run envs/lock.py): {missing}"
    assert not differ, f"installed version differs from the lock (installed, locked): {differ}"
