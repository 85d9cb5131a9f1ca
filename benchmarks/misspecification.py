"""False-positive and detection rates of validate's misspecification tests.

Two parts, figures in benchmarks/README.md:

- ``fields`` (no model needed): the data-space test of ``grf_cosmology`` maps against 1000 test
  maps, on 1000 fresh Gaussian maps (false positives) and on 300 ``lognormal_cosmology`` maps of
  the same parameters (a forward model the simulations do not contain: detection), with the
  task's summaries and with its band powers alone.
- ``--results results/default`` (after README command 1): for each task of a trained experiment,
  1000 fresh observations from the task's own simulator are sampled with its model and tested
  against the experiment's test samples exactly as validate does (false positives of both tests
  and of the combined p-value); for ``sn_cosmology`` also 300 observations whose distance moduli
  carry a systematic offset (0.1, 0.2 and 0.3 mag; ``pipeline sample`` itself refuses data so far
  out that the posterior's mass leaves the prior, which is recorded as such).

Usage::

    .venv/bin/python benchmarks/misspecification.py --results results/default \
        --out results/misspecification.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from pipeline.diagnostics import typicality_pvalues
from pipeline.options import SampleOptions
from pipeline.sampling import read_samples, sample
from pipeline.tasks import get_task
from pipeline.validation import misspecification_tests

LEVEL = 0.05


def rate(pvalues: list[float] | np.ndarray | None) -> float | None:
    """Fraction of p-values below :data:`LEVEL` (None where the test did not run)."""
    return None if pvalues is None else float(np.mean(np.asarray(pvalues) < LEVEL))


def fields() -> dict[str, dict[str, float]]:
    """Data-space rates for Gaussian maps (the simulations) and lognormal mocks."""
    gaussian, lognormal = get_task("grf_cosmology"), get_task("lognormal_cosmology")
    _, x_test = gaussian.simulate_block(1000, np.random.default_rng(2))
    _, x_fresh = gaussian.simulate_block(1000, np.random.default_rng(11))
    theta, _ = gaussian.simulate_block(300, np.random.default_rng(12))
    x_mock = lognormal.simulate(theta, np.random.default_rng(13))
    reference = gaussian.summary(x_test)
    result = {}
    for name, x in (("grf_fresh", x_fresh), ("lognormal_mocks", x_mock)):
        summary = gaussian.summary(x)
        result[name] = {
            "summaries": rate(typicality_pvalues(summary, reference)),
            "band_powers_alone": rate(typicality_pvalues(summary[:, :8], reference[:, :8])),
            "num": len(x),
        }
    return result


def trained(results: Path, work: Path) -> dict[str, dict[str, dict[str, float | None]]]:
    """Both tests' rates at fresh and (sn_cosmology) offset observations, per trained task."""
    found = {}
    for folder in sorted(p.parent.parent for p in results.glob("*/model/posterior.pt")):
        task = get_task(folder.name)
        test = read_samples(folder / "samples" / "test.h5")
        _, x_fresh = task.simulate_block(1000, np.random.default_rng(11))
        cases = {"fresh": x_fresh}
        if folder.name == "sn_cosmology":
            _, x = task.simulate_block(300, np.random.default_rng(12))
            cases |= {f"offset_{d}_mag": x + d for d in (0.1, 0.2, 0.3)}
        found[folder.name] = {}
        for case, x in cases.items():
            np.save(work / f"{folder.name}-{case}.npy", x)
            out = work / f"{folder.name}-{case}.h5"
            options = SampleOptions(num_samples=test["samples"].shape[1], seed=7)
            try:
                sample(
                    folder / "model",
                    work / f"{folder.name}-{case}.npy",
                    out,
                    options,
                    overwrite=True,
                )
            except RuntimeError as error:  # the sample stage's own refusal of alien data
                found[folder.name][case] = {"sample_refused": str(error), "num": len(x)}
                print(folder.name, case, "sample refused:", error, flush=True)
                continue
            tests = misspecification_tests(task, test, read_samples(out))
            found[folder.name][case] = {
                "typicality": rate(tests.typicality),
                "surprise": rate(tests.surprise),
                "combined": rate(tests.pvalue),
                "num": len(x),
            }
            print(folder.name, case, found[folder.name][case], flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="a trained experiment, e.g. results/default")
    parser.add_argument("--out", type=Path, help="also write the rates here (JSON)")
    args = parser.parse_args()
    report = {"level": LEVEL, "fields": fields()}
    print("fields", report["fields"], flush=True)
    if args.results is not None:
        with tempfile.TemporaryDirectory() as work:
            report["trained"] = trained(args.results, Path(work))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
