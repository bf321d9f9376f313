"""The private DP state of a checkpoint: where it is kept, so that it is never pushed, and when resuming is refused.

The state holds the accountant history (privacy already spent), the noise generator's state and the Poisson sampler's
seed. The last two are secrets: with them, past noise can be regenerated and the batches replayed. So the state is
not written into the checkpoint folder (``hub_strategy="checkpoint"``/``"all_checkpoints"`` upload checkpoint folders
whole, with no ignore patterns) but next to it, in ``<run dir>/_dp_private/<checkpoint>.pt``: the Trainer's own
uploads of the output directory ignore ``_*`` and ``checkpoint-*``. The output directory as a whole stays as secret as
the training data.

Resuming restores the generator, so a resumed run continues the same noise stream (and is the uninterrupted run).
Resuming from a checkpoint older than another state of the same noise stream would draw the later steps' noise a
second time, for another gradient, and forget the privacy those later steps spent: :func:`refuse_noise_replay`.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

PRIVATE_DIR = "_dp_private"
#: where versions before 2 kept the state (inside the checkpoint folder); still read on resume
LEGACY_STATE_NAME = "dp_state.pt"
STATE_VERSION = 2


def private_state_path(checkpoint_dir: str) -> str:
    """``<parent of checkpoint_dir>/_dp_private/<checkpoint name>.pt``."""
    ckpt = os.path.normpath(checkpoint_dir)
    return os.path.join(os.path.dirname(ckpt), PRIVATE_DIR, os.path.basename(ckpt) + ".pt")


def write_private_state(state: dict, checkpoint_dir: str) -> str:
    """Write ``state`` for ``checkpoint_dir`` atomically (a crash never leaves half a file); returns the path."""
    path = private_state_path(checkpoint_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_private_state(checkpoint_dir: str) -> tuple[dict, str]:
    """The DP state saved with ``checkpoint_dir`` and its path; ``ValueError`` saying where it was looked for."""
    path = private_state_path(checkpoint_dir)
    legacy = os.path.join(checkpoint_dir, LEGACY_STATE_NAME)
    for candidate in (path, legacy):
        if os.path.isfile(candidate):
            return _load(candidate), candidate
    raise ValueError(
        f"resume_from_checkpoint={checkpoint_dir!r} has no DP state (looked for {path} and {legacy}). Without it, "
        "resuming would forget the privacy already spent. The state is written outside the checkpoint folder so "
        "that it is never pushed: a checkpoint downloaded from the Hub, copied alone, or not written by a DP trainer "
        f"has none; copy the run's {PRIVATE_DIR}/<checkpoint>.pt (kept private) to {path}"
    )


def refuse_noise_replay(checkpoint_dir: str, state: dict) -> None:
    """``ValueError`` if another DP state of the same noise stream (same ``lineage``) in the same run directory has
    drawn more noise than ``state``: resuming from this older checkpoint would re-draw that noise."""
    lineage, draws = state.get("lineage"), int(state.get("noise_draws", 0))
    if lineage is None:
        return
    own = os.path.abspath(private_state_path(checkpoint_dir))
    for path in sorted(glob.glob(os.path.join(os.path.dirname(own), "*.pt"))):
        if os.path.abspath(path) == own:
            continue
        try:
            other = _load(path)
        except Exception:  # noqa: BLE001 - an unreadable file cannot be compared; it does not block resuming
            continue
        if other.get("lineage") == lineage and int(other.get("noise_draws", 0)) > draws:
            raise ValueError(
                f"resume_from_checkpoint={checkpoint_dir!r} is older than {path} of the same run ({draws} vs "
                f"{int(other['noise_draws'])} noised steps). Resuming from it would draw the noise of the later steps "
                "again for different gradients (their difference is then noise-free) and forget the privacy those "
                "steps spent. Resume from the latest checkpoint; if the later checkpoints' models, logs and pushes "
                f"were never seen by anyone, delete their states in {os.path.dirname(own)} first"
            )


def prune_private_states(run_dir: str) -> None:
    """Delete the private states whose checkpoint folder is gone (``save_total_limit`` rotation)."""
    for path in glob.glob(os.path.join(run_dir, PRIVATE_DIR, "*.pt")):
        name = os.path.basename(path)[: -len(".pt")]
        if not os.path.isdir(os.path.join(run_dir, name)):
            os.remove(path)


def warn_if_checkpoints_pushed(args) -> None:
    """Warn when ``push_to_hub`` uploads checkpoint folders (``hub_strategy`` checkpoint / all_checkpoints)."""
    strategy = str(getattr(getattr(args, "hub_strategy", None), "value", getattr(args, "hub_strategy", "")))
    if getattr(args, "push_to_hub", False) and strategy in ("checkpoint", "all_checkpoints"):
        warnings.warn(
            f"push_to_hub with hub_strategy={strategy!r} uploads whole checkpoint folders. The DP state (noise "
            f"generator, sampler seed) is kept out of them, in {PRIVATE_DIR}/ of the output directory, which is never "
            "pushed, so a pushed checkpoint cannot be resumed by itself. The folders still carry trainer_state.json, "
            "whose logged training losses are computed from private data and are not covered by the DP guarantee",
            UserWarning,
            stacklevel=4,
        )
