"""What produced an output: config digest, package versions, code revision, host and time."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "sbi-pipeline",
    "numpy",
    "scipy",
    "torch",
    "lightning",
    "zuko",
    "optuna",
    "h5py",
    "astropy",
    "mpi4py",
    "scikit-learn",
    "snakemake",
)


def config_digest(config: Any) -> str:
    """SHA-256 (first 16 hex digits) of ``config`` serialised as canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (16 hex digits), read each call: the file may have changed."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()[:16]


# Files up to this size are fingerprinted by their bytes, larger ones (archives of simulations)
# by size and modification time, so that planning a run never reads gigabytes.
CONTENT_FINGERPRINT_BYTES = 64 * 2**20


def fingerprint(paths: list[Path]) -> str:
    """16 hex digits that change when any of ``paths`` changes, whatever its modification
    time: its bytes' SHA-256 up to :data:`CONTENT_FINGERPRINT_BYTES`, else its size and
    modification time (a larger file replaced by one of the same size and time goes unseen)."""
    digest = hashlib.sha256()
    for path in paths:
        status = os.stat(path)
        if status.st_size <= CONTENT_FINGERPRINT_BYTES:
            digest.update(file_digest(Path(path)).encode())
        else:
            digest.update(f"{status.st_size}:{status.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def software_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results, plus Python's (cached)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@functools.cache
def code_revision() -> str:
    """The git commit of the source tree (``+dirty`` when modified), or ``"unknown"``; asked
    once per process (a run writing 10^4 shards would otherwise start 2 * 10^4 gits)."""
    root = Path(__file__).resolve().parent
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    )
    return result.stdout.strip()


def hardware() -> str:
    """The machine in a few words: CPU model and cores, and GPUs if torch was imported."""
    cpu = platform.machine()  # not platform.processor(), which starts `uname -p`
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = f"{cpu}, {os.cpu_count()} cores"
    torch = sys.modules.get("torch")  # never imported here just to ask
    if torch is not None and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        described += ", GPUs: " + ", ".join(names)
    return described


def provenance(config: Any) -> dict[str, Any]:
    """Everything an output records about how it was made."""
    return {
        "config_digest": config_digest(config),
        "code_revision": code_revision(),
        "versions": software_versions(),
        "hostname": platform.node(),
        "hardware": hardware(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
