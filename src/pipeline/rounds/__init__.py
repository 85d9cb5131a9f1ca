"""Sequential inference in rounds: truncated sequential NPE (TSNPE, Deistler et al. 2022).

Round 0 simulates from the prior. After round ``r`` trains on the simulations of rounds
``0..r``, its posterior ``q_r`` at the one observation ``x_o`` defines the region round ``r+1``
simulates from: the previous region truncated to ``{theta : log q_r(theta | x_o) >= t_r}``,
with ``t_r`` the ``quantile`` of ``log q_r`` over draws of ``q_r(. | x_o)``, so that the region
is the highest-density region holding ``1 - quantile`` of the posterior's mass. The regions are
nested: inside the last one every round's proposal is proportional to the prior, so a posterior
trained on every round's simulations with the ordinary NPE loss is the true posterior there for
every ``x`` (no importance weights, no atomic loss), and its coverage can be checked on
simulations from the last region. Without nesting, the parts of a later region outside an
earlier one are under-represented in training and the posterior of an ``x`` simulated there is
biased, which coverage reads as over-confidence.

Randomness: round ``r``'s simulations are an ordinary run (:mod:`pipeline.simulation`) with the
seed :func:`round_seed` ``(seed, r)``, whose blocks draw their parameters from the region by
rejection against the prior with the block's own generator. They therefore depend on
``(seed, r, i)`` and on the earlier rounds' posterior and truncation files only (whose digests
are part of the run's identity, so shards of another proposal are never reused).

Reference:
    | Truncated proposals for scalable and hassle-free simulation-based inference
    | (Deistler, Goncalves & Macke, NeurIPS 2022) https://arxiv.org/abs/2210.04815
"""
