"""Debian packages the tests need (slurm-wlm, munge, chromium), installed with apt when absent."""

from __future__ import annotations

import os
import shutil
import subprocess


def can_install() -> bool:
    """Whether apt-get can run here as root."""
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(*packages: str, timeout: float = 900) -> None:
    """``apt-get install`` without recommends; refreshes a stale package index once."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(command, env=env, capture_output=True, timeout=timeout).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=timeout)
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=timeout)
