"""Seeds of the two random choices DP-SGD must keep secret: the Poisson sample and the Gaussian noise.

Amplification by subsampling assumes the attacker does not know which examples a step used, and the noise only
protects if nobody can regenerate it. So both seeds default to fresh OS entropy (``secrets``), drawn on rank 0 and
broadcast (every rank must take its share of the same sample and add the same noise to the same all-reduced sum),
and are stored only in the private DP state. An explicit seed is for tests and debugging, and warns.
"""

from __future__ import annotations

import hashlib
import secrets
import warnings

from hf_svd_plugins.distributed import broadcast_int

_EXPLICIT_SEED_WARNINGS = {
    "noise_seed": (
        "DPConfig(noise_seed={seed}) makes the Gaussian noise reproducible: anyone who knows or guesses the seed can "
        "regenerate and subtract it, and every run with this seed (e.g. each federated round) adds the same noise, "
        "so the reported epsilon does not hold. Use it only for tests; leave noise_seed=None for real privacy"
    ),
    "sampler_seed": (
        "DPConfig(sampler_seed={seed}) makes the Poisson sample predictable: the privacy amplification by "
        "subsampling that the accountant assumes needs a secret sample (against an attacker who knows the batches, "
        "sigma=1, q=0.01 and 1000 steps give epsilon ~18 instead of the reported ~1.8). Use it only for tests; leave "
        "sampler_seed=None for real privacy"
    ),
}


def shared_seed(explicit: int | None, name: str) -> int:
    """``explicit`` (with a warning), or 62 bits from ``secrets`` on rank 0; the same value on every rank.

    Call it on all ranks at the same point (it is a collective in a distributed run).
    """
    if explicit is not None:
        warnings.warn(_EXPLICIT_SEED_WARNINGS[name].format(seed=explicit), UserWarning, stacklevel=3)
        return int(explicit)
    return secret_seed()


def secret_seed() -> int:
    """62 bits from ``secrets`` on rank 0, the same on every rank (a collective in a distributed run)."""
    return broadcast_int(secrets.randbits(62), src=0)


def derived_seed(seed: int, index: int) -> int:
    """A seed for the ``index``-th use of an explicit ``seed`` (index 0 is ``seed`` itself), so that calling
    ``train()`` again does not replay the same Poisson batches."""
    if index == 0:
        return int(seed)
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2
