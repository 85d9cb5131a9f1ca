"""C2ST's classifier at small sample sizes: sklearn's 10 epochs of patience against the
pipeline's wait counted in Adam steps (:func:`pipeline.diagnostics.c2st._patience`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/c2st_patience.py

Two pairs of Gaussians of known Bayes accuracy: N(0, I) against N(0, diag(1/4, 1, ...)) (a
difference of width, whose boundary is curved; 0.662) and against N(0.8 e_1, I) (a shift, a
plane; Phi(0.4) = 0.655), in 2, 5 and 10 dimensions, at 300 to 10^4 samples per set, two draws
each, 5 folds, seed 5 as the validate stage. Prints each accuracy with both patiences and their
times; a classifier that learnt the boundary scores near the Bayes accuracy.
"""

from __future__ import annotations

import importlib
import time

import numpy as np

# The module, not the function the package exports under the same name.
c2st_module = importlib.import_module("pipeline.diagnostics.c2st")

BAYES = {"width": 0.662, "shift": 0.655}


def pair(kind: str, n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of N(0, I) and of the other Gaussian of ``kind``, each (n, dim)."""
    p, q = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    if kind == "width":
        q[:, 0] *= 0.5
    else:
        q[:, 0] += 0.8
    return p, q


def timed(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    start = time.perf_counter()
    accuracy = c2st_module.c2st(p, q, seed=5)
    return accuracy, time.perf_counter() - start


def main() -> None:
    steps = c2st_module._patience
    rng = np.random.default_rng(0)
    print("kind  D  n/set  patience  accuracy: 10 epochs / steps (seconds)  Bayes")
    for kind in BAYES:
        for dim in (2, 5, 10):
            for n in (300, 1000, 3000, 10_000):
                cells = []
                for _ in range(2):
                    p, q = pair(kind, n, dim, rng)
                    c2st_module._patience = lambda size, folds: 10
                    fixed = timed(p, q)
                    c2st_module._patience = steps
                    counted = timed(p, q)
                    cells.append(
                        f"{fixed[0]:.3f}/{counted[0]:.3f} ({fixed[1]:.0f}/{counted[1]:.0f} s)"
                    )
                print(f"{kind:5} {dim:2} {n:6} {steps(n, 5):8}  {'  '.join(cells)}  {BAYES[kind]}")


if __name__ == "__main__":
    main()
