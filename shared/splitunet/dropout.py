"""Site dropout: which sites a training step leaves out (the aggregator's rule, also used by the in-process study).

Each site is left out independently with probability ``rate``; if that would leave out every site, one (drawn at
random) stays. The draw comes from its own generator seeded by ``(seed, step)``: a replayed step leaves out the same
sites, and no other random stream (the sampler's) is touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Salt of the dropout generator's seed, so its stream differs from the sampler's for the same job seed.
_DROPOUT_SALT = 24


def dropped_sites(sites: Sequence[str], rate: float, seed: int, step: int) -> list[str]:
    """The sites (of ``sites``, in order) left out of ``step`` by dropout at ``rate``; never all of them."""
    if rate <= 0 or len(sites) < 2:
        return []
    rng = np.random.default_rng([seed, step, _DROPOUT_SALT])
    drop = rng.random(len(sites)) < rate
    if drop.all():
        drop[int(rng.integers(len(sites)))] = False
    return [s for s, d in zip(sites, drop) if d]
