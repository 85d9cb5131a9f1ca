"""Writes envs/requirements.lock: every package ``sbi-pipeline[test]`` installs, at the version
installed in this environment, so that every install of the pipeline gets the same packages.

Run it in a fresh virtual environment made from pyproject.toml, after changing a pin there:

    python3 -m venv /tmp/lockenv && /tmp/lockenv/bin/pip install -e ".[test]"
    /tmp/lockenv/bin/python envs/lock.py

Local version labels are dropped (``torch 2.13.0+cpu`` is locked as ``torch==2.13.0``): which
build of a version installs depends on the index (CPU wheels here, CUDA ones from PyPI).
tests/test_lock.py checks the lock against pyproject.toml, envs/*.yaml and the environment.
"""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, EXTRAS = "sbi-pipeline", ("test",)
LOCK = Path(__file__).with_name("requirements.lock")


def installed_closure(root: str = ROOT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """``{canonical name: version}`` of ``root`` (with ``extras``) and all it requires here,
    ``root`` itself excluded; markers are evaluated for this interpreter."""
    found: dict[str, str] = {}
    todo = [(root, set(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        distribution = metadata.distribution(name)
        if key[0] != canonicalize_name(root):
            found[key[0]] = distribution.version.split("+")[0]
        for text in distribution.requires or []:
            requirement = Requirement(text)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            marker = requirement.marker
            if marker is None or any(marker.evaluate(env) for env in environments):
                todo.append((requirement.name, set(requirement.extras)))
    return found


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file's ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def main() -> None:
    closure = installed_closure()
    header = [
        "# Every package sbi-pipeline[test] installs, exactly: written by envs/lock.py from a",
        "# fresh environment; install with: pip install -r envs/requirements.lock -e '.[test]'",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(closure.items())]
    LOCK.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {LOCK}: {len(lines)} packages")


if __name__ == "__main__":
    main()
