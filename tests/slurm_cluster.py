"""A real one-node SLURM cluster on this machine, for the tests and the scheduling benchmark.

Debian's ``slurm-wlm`` and ``munge`` are installed with apt when absent (as root). The cluster
talks over 127.0.0.1 on free ports, keeps its state, logs and munge key in a temporary folder,
and is stopped (daemons, jobs, config) by :meth:`SlurmCluster.stop`. Its config has to live at
``/etc/slurm/slurm.conf``: job steps started by ``slurmd`` do not see ``SLURM_CONF`` from the
submitting shell. A machine with a SLURM config of its own is left alone (the caller skips).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests import apt

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# Written by tests/slurm_cluster.py for the test suite; removed when it stops."
PACKAGES = ("slurm-wlm", "munge")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (the reason says why); tests skip."""


def ensure_installed() -> None:
    """Installs slurm-wlm and munge with apt when ``slurmctld`` is missing."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if not apt.can_install():
        raise ClusterUnavailable("slurm-wlm is not installed and apt-get cannot run as root here")
    apt.install(*PACKAGES)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4000


class SlurmCluster:
    """``slurmctld`` + ``slurmd`` (+ ``munged``) serving one node: this machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.processes: list[subprocess.Popen] = []

    def config(self) -> str:
        f = self.folder
        return f"""{MARKER}
ClusterName=pipelinetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={f}/munge.socket
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# No accounting database: finished jobs stay visible to squeue for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=3600
KillWait=5
OverTimeLimit=0
DefMemPerCPU=500
InactiveLimit=0
# Refuse at submission what the partition can never run (as production clusters do).
EnforcePartLimits=ALL
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb() // 2}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def start(self) -> None:
        ensure_installed()
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
            raise ClusterUnavailable(f"{SLURM_CONF} belongs to this machine's own SLURM")
        for daemon in ("slurmctld", "slurmd"):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 0:
                raise ClusterUnavailable(f"a {daemon} already runs on this machine")
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self.config())
        try:
            for daemon in (["slurmctld", "-D", "-c"], ["slurmd", "-D"]):
                log = open(self.folder / f"{daemon[0]}.out", "w")
                self.processes.append(subprocess.Popen(daemon, stdout=log, stderr=log))
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        key = self.folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        f = self.folder
        daemon = ["munged", "--foreground", "--force", f"--key-file={key}"]
        daemon += [f"--socket={f}/munge.socket", f"--pid-file={f}/munged.pid"]
        daemon += [f"--log-file={f}/munged.log", f"--seed-file={f}/munged.seed"]
        self.processes.append(subprocess.Popen(daemon, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while not (f / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start; see {f}/munged.log")
            time.sleep(0.2)

    def _wait_until_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        logs = (self.folder / "slurmd.log", self.folder / "slurmctld.log")
        tails = "\n".join(p.read_text()[-2000:] for p in logs if p.exists())
        raise RuntimeError(f"the SLURM node did not become idle in {timeout:.0f} s:\n{tails}")

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller remembers (finished ones too): id, name, state, work dir,
        reason and comment (Snakemake's SLURM plugin writes ``rule_<rule>...`` there)."""
        fields = ("id", "name", "state", "workdir", "reason", "comment")
        out = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%Z|%r|%k"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]

    def stop(self) -> None:
        """Cancels the jobs, stops the daemons this cluster started, and removes its config."""
        if shutil.which("scancel") and SLURM_CONF.exists():
            subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if SLURM_CONF.exists() and MARKER in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
