"""Client data shards for the federated side: IID and label-skewed (Dirichlet) partitions of a data set.

Index lists only (no tensors, no Trainer): :class:`~hf_svd_plugins.fedsvd.federation.Federation` and the Flower recipe
turn them into per-client subsets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["partition_dirichlet", "partition_iid"]


def partition_iid(num_examples: int, num_clients: int, seed: int = 0) -> list[list[int]]:
    """Split ``range(num_examples)`` uniformly at random into ``num_clients`` shards of near-equal size.

    Returns sorted index lists (sorted, so one client with everything sees the data set in its original order).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise ValueError(
            f"cannot give {num_clients} clients at least one of {num_examples} examples; use fewer clients"
        )
    perm = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int = 0, min_size: int = 1, max_tries: int = 100
) -> list[list[int]]:
    """Non-IID split by label: for each class, client proportions are drawn from ``Dirichlet(alpha * 1)``.

    Small ``alpha`` (0.1) gives clients few classes each; large ``alpha`` approaches IID. Redraws (up to
    ``max_tries``) until every client has at least ``min_size`` examples.

    Returns:
        ``num_clients`` sorted index lists covering ``range(len(labels))`` exactly once.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number (e.g. 0.5), got {alpha!r}")
    labels_arr = np.asarray([int(x) for x in labels])
    if len(labels_arr) < num_clients * min_size:
        raise ValueError(f"{len(labels_arr)} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels_arr):
            idx = rng.permutation(np.flatnonzero(labels_arr == c))
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise ValueError(
        f"partition_dirichlet could not give every one of {num_clients} clients >= {min_size} examples in "
        f"{max_tries} draws with alpha={alpha}; use a larger alpha, fewer clients or more data"
    )
