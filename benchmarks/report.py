"""Report generation for a finished experiment, against Snakemake's own report of the same run
(issue: reports people read). Needs the experiment's results (README command 1 first).

    .venv/bin/python benchmarks/report.py --repeats 3

Each repeat, one after the other in this script, from the repository root:

- ``snakemake --forcerun report --until report``: the report rule alone, rebuilt from the
  validation results; wall time of the whole command (Snakemake's DAG included) and the rule's
  own time from its benchmark file (``results/<experiment>/benchmarks/report.tsv``);
- ``snakemake --report``: Snakemake's zip report of the same figures, the peer.

Prints the medians, the ratio, and the size of ``report.html``; writes
``benchmarks/results/report.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "report.json"
PROFILE = ("--workflow-profile", "workflow/profiles/local", "--cores", "2")


def snakemake(*args: str) -> float:
    """Runs ``snakemake`` with the local profile; returns its wall time in seconds."""
    command = [str(Path(sys.executable).parent / "snakemake"), *PROFILE, *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds


def rule_seconds(benchmark: Path) -> float:
    """The ``s`` column of a Snakemake benchmark file (its last row)."""
    with benchmark.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return float(rows[-1]["s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configfile", default="config/config.yaml")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    config = yaml.safe_load((ROOT / args.configfile).read_text())
    experiment = ROOT / config["results"] / config["experiment"]
    page = experiment / "report.html"
    if not page.exists():
        raise SystemExit(f"{page} does not exist: run the pipeline first (README command 1)")
    extra = ("--configfile", args.configfile)
    ours, rule, peer = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            ours.append(snakemake(*extra, "--forcerun", "report", "--until", "report"))
            rule.append(rule_seconds(experiment / "benchmarks" / "report.tsv"))
            peer.append(snakemake(*extra, "--report", str(Path(folder) / "report.zip")))
            zip_size = (Path(folder) / "report.zip").stat().st_size
            print(
                f"repeat {repeat + 1}/{args.repeats}: report rule {rule[-1]:.1f} s "
                f"(snakemake {ours[-1]:.1f} s), snakemake --report {peer[-1]:.1f} s",
                flush=True,
            )
    html = page.read_text()
    result = {
        "machine": {
            "host": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "experiment": config["experiment"],
        "repeats": args.repeats,
        "report_rule_seconds": rule,
        "report_command_seconds": ours,
        "snakemake_report_seconds": peer,
        "report_bytes": page.stat().st_size,
        "report_images": html.count("<img"),
        "snakemake_report_zip_bytes": zip_size,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    median = statistics.median
    print(
        f"report rule {median(rule):.1f} s (whole snakemake command {median(ours):.1f} s), "
        f"snakemake --report {median(peer):.1f} s: ratio {median(ours) / median(peer):.2f}; "
        f"report.html {page.stat().st_size / 1e6:.2f} MB with {result['report_images']} images, "
        f"report.zip {zip_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
