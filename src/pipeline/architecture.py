"""What ``flow: auto`` and ``embedding: auto`` stand for, from a task's shapes.

The rule comes from training one set of options on every shipped reference task at 10^3 and
10^4 simulations (``benchmarks/defaults.py``; figures in ``benchmarks/README.md``, "global
defaults"): with 2 to 5 parameters a spline flow (NSF) on an MLP embedding of ``x`` was the most
accurate (on ``x`` itself it lost 0.06 of C2ST on slcp); with 10 parameters an affine
autoregressive flow (MAF) on ``x`` itself was, by up to 0.08 at 10^3 simulations, and it is
``x`` itself that counts there (a MAF on an MLP embedding did as badly as the NSF). Between 6
and 9 parameters nothing was measured.
"""

from __future__ import annotations

AUTO = "auto"
# Parameters from which a MAF on x itself replaces an NSF on an MLP embedding.
MANY_PARAMETERS = 8
# x itself feeds every transform of every member: a longer vector (a spectrum, a map) goes
# through the MLP, whose one first layer compresses it. The gain was measured at 10 features.
MAX_RAW_FEATURES = 64
# A MAF's density costs about 15 times less than an NSF's at 10 features, which an MCMC pays at
# every step; on the reference tasks it was also the more accurate likelihood.
NLE_FLOW = "maf"


def auto_flow(method: str, num_parameters: int) -> str:
    """The flow family for ``auto``: of ``theta`` given ``x`` (npe), or of ``x`` (nle)."""
    if method == "nle":
        return NLE_FLOW
    return "maf" if num_parameters >= MANY_PARAMETERS else "nsf"


def auto_embedding(num_parameters: int, x_shape: tuple[int, ...]) -> str:
    """The embedding of ``x`` for ``auto``: ``x`` itself from ``MANY_PARAMETERS`` parameters
    where ``x`` is a vector of at most ``MAX_RAW_FEATURES``, an MLP otherwise."""
    short_vector = len(x_shape) == 1 and x_shape[0] <= MAX_RAW_FEATURES
    if num_parameters >= MANY_PARAMETERS and short_vector:
        return "identity"
    return "mlp"
