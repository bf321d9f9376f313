"""The private DP state of a checkpoint: what it holds, where it is kept (never pushed), and what resuming restores.

The state holds the accountant histories (privacy already spent), the noise generator's state and the Poisson
sampler's seed. The last two are secrets: with them, past noise can be regenerated and the batches replayed. So the
state is not written into the checkpoint folder (``hub_strategy="checkpoint"``/``"all_checkpoints"`` upload checkpoint
folders whole, with no ignore patterns) but next to it, in ``<run dir>/_dp_private/<checkpoint>.pt``: the Trainer's own
uploads of the output directory ignore ``_*`` and ``checkpoint-*``. The output directory as a whole stays as secret as
the training data.

Resuming (:func:`resume_private_state`) restores the accountant and, with secret seeds, draws a **fresh** noise seed
and a fresh Poisson sample. Restoring the generator would draw the same noise again for whatever the resumed run
computes: a checkpoint copied to another directory, a run resumed with other data, code or dropout masks, or the
steps lost after a crash would then release two different gradients under one noise draw, whose difference is
noise-free. Every step of a resumed run is an independent Poisson-subsampled Gaussian release instead. Explicit seeds
(tests) restore both streams, so the resumed run is the uninterrupted one; resuming them from an older checkpoint is
refused (:func:`refuse_noise_replay`). While a run saves checkpoints, a small release log next to the states
(:data:`RELEASE_LOG`) records the privacy spent after every step, so releases after the checkpoint one resumes from
(steps lost in a crash, later checkpoints) stay in the accountant.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

from hf_svd_plugins.dp.seeds import secret_seed

PRIVATE_DIR = "_dp_private"
#: where versions before 2 kept the state (inside the checkpoint folder); still read on resume
LEGACY_STATE_NAME = "dp_state.pt"
STATE_VERSION = 3
#: the release log of a run directory, in PRIVATE_DIR: lineage, releases so far and the accountant after the last
RELEASE_LOG = "releases.pt"


def private_state_path(checkpoint_dir: str) -> str:
    """``<parent of checkpoint_dir>/_dp_private/<checkpoint name>.pt``."""
    ckpt = os.path.normpath(checkpoint_dir)
    return os.path.join(os.path.dirname(ckpt), PRIVATE_DIR, os.path.basename(ckpt) + ".pt")


def _write(state: dict, path: str) -> str:
    """Write ``state`` atomically (a crash never leaves half a file); returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def write_private_state(state: dict, checkpoint_dir: str) -> str:
    """Write ``state`` for ``checkpoint_dir`` (in ``_dp_private/`` next to it); returns the path."""
    return _write(state, private_state_path(checkpoint_dir))


def write_release_log(run_dir: str, lineage: int, noise_draws: int, accountant: dict) -> str:
    """Record, after a released step, the privacy the run ``lineage`` has spent in ``run_dir``."""
    return _write({"lineage": lineage, "noise_draws": noise_draws, "accountant": accountant},
                  os.path.join(run_dir, PRIVATE_DIR, RELEASE_LOG))


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


def _states_of(private_dir: str, pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(private_dir, pattern))):
        try:
            out.append((path, _load(path)))
        except Exception:  # noqa: BLE001 - an unreadable file cannot be compared; it does not block resuming
            continue
    return out


def refuse_noise_replay(checkpoint_dir: str, state: dict) -> None:
    """``ValueError`` if another checkpoint's DP state of the same run (same ``lineage``) in the same run directory
    has drawn more noise than ``state``: resuming from this older checkpoint with the restored generator (explicit
    ``noise_seed``) would re-draw that noise."""
    lineage, draws = state.get("lineage"), int(state.get("noise_draws", 0))
    if lineage is None:
        return
    own = os.path.abspath(private_state_path(checkpoint_dir))
    for path, other in _states_of(os.path.dirname(own), "checkpoint-*.pt"):
        if os.path.abspath(path) == own:
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
    for path in glob.glob(os.path.join(run_dir, PRIVATE_DIR, "checkpoint-*.pt")):
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
            "whose logged training losses are computed from private data and are not covered by the DP guarantee "
            "(total_flos is not counted under DP: it would depend on the secret sample)",
            UserWarning,
            stacklevel=4,
        )


def check_trial_not_pushed(args, trial: object) -> None:
    """Refuse ``push_to_hub`` in a hyperparameter-search trial: a trial saves into ``<output_dir>/run-<id>/``, so its
    private states land in ``run-<id>/_dp_private/``, which the Trainer's push (ignore patterns ``_*`` and
    ``checkpoint-*``, matched from the top of the output directory) would upload."""
    if trial is not None and getattr(args, "push_to_hub", False):
        raise ValueError(
            "push_to_hub=True in a hyperparameter-search trial would upload the trial's private DP state "
            f"(run-*/{PRIVATE_DIR}/: noise generator, sampler seed), which the Trainer's ignore patterns do not "
            "cover below the top of the output directory; search with push_to_hub=False and push the chosen run "
            "afterwards"
        )


def latest_release(checkpoint_dir: str, state: dict) -> dict | None:
    """The record of the same run (``lineage``) in the checkpoint's run directory that has released more steps than
    ``state`` (a later checkpoint, or the release log after steps lost in a crash), the one with the most; else None."""
    lineage, draws = state.get("lineage"), int(state.get("noise_draws", 0))
    if lineage is None:
        return None
    private_dir = os.path.dirname(os.path.abspath(private_state_path(checkpoint_dir)))
    best = None
    for _, other in _states_of(private_dir, "*.pt"):
        if other.get("lineage") == lineage and int(other.get("noise_draws", 0)) > draws and "accountant" in other:
            if best is None or int(other["noise_draws"]) > int(best["noise_draws"]):
                best = other
    return best


def dp_state_dict(trainer) -> dict:
    """Everything a :class:`~.trainer.DPMixin` needs to resume: accountant histories, noise generator, sampler seed
    (secrets), sigma, q, delta, C, the last epoch of shuffled batches."""
    return {
        "version": STATE_VERSION,
        "lineage": trainer._dp_lineage,
        "noise_draws": trainer._dp_noise_draws,
        "accountant": trainer.accountant.state_dict(),
        "noise_generator": trainer._dp_release.generator.get_state(),
        "noise_multiplier": trainer.noise_multiplier,
        "sample_rate": trainer.sample_rate,
        "target_delta": trainer.target_delta,
        "max_grad_norm": trainer.dp_config.max_grad_norm,
        "expected_batch_size": trainer.expected_batch_size,
        "sampler_seed": trainer._dp_sampler_seed,
        "last_epoch": trainer._dp_budget.last_epoch,
        "global_step": trainer.state.global_step,
        "config": trainer.dp_config.to_dict(),
    }


def resume_private_state(trainer, checkpoint_dir: str) -> None:
    """Restore ``trainer``'s DP state from ``checkpoint_dir``: the accountant (with every later release of the same run
    found in its directory), and either the explicit seeds' streams or fresh secret ones (a collective: call it on
    every rank)."""
    cfg = trainer.dp_config
    state, _ = read_private_state(checkpoint_dir)
    if cfg.noise_seed is not None:
        refuse_noise_replay(checkpoint_dir, state)
    trainer.accountant.load_state_dict(state["accountant"])
    trainer._dp_lineage = state.get("lineage", trainer._dp_lineage)
    trainer._dp_noise_draws = int(state.get("noise_draws", trainer.accountant.steps))
    last = state.get("last_epoch")
    trainer._dp_budget.last_epoch = tuple(last) if last is not None else None
    later = latest_release(checkpoint_dir, state)
    if later is not None:
        trainer.accountant.load_state_dict(later["accountant"])
        warnings.warn(
            f"DP: resuming from {checkpoint_dir!r} ({int(state.get('noise_draws', 0))} released steps) while this run "
            f"released {int(later['noise_draws'])} (later checkpoints, or steps lost in a crash): their privacy stays "
            "in the accountant", UserWarning, stacklevel=4,
        )
        trainer._dp_noise_draws = int(later["noise_draws"])
        # shuffled batches follow the public seed: the resumed steps release batches of the epoch in progress a
        # second time, so that epoch is charged again (one more participation for its examples)
        trainer._dp_budget.last_epoch = None
    if cfg.noise_seed is not None:
        trainer._dp_release.generator.set_state(state["noise_generator"])
    else:
        trainer._dp_release.generator = torch.Generator().manual_seed(secret_seed())
    trainer._dp_sampler_seed = int(state["sampler_seed"]) if cfg.sampler_seed is not None else secret_seed()
    if state["sample_rate"] != trainer.sample_rate or state["noise_multiplier"] != trainer.noise_multiplier:
        if cfg.target_epsilon is not None:
            # sigma was calibrated for the original plan; keep it so the plan's guarantee still holds
            trainer.noise_multiplier = trainer._dp_release.noise_multiplier = float(state["noise_multiplier"])
        warnings.warn(
            f"DP: resuming with sample_rate={trainer.sample_rate:.4g}, sigma={trainer.noise_multiplier:.4g} (checkpoint: "
            f"{state['sample_rate']:.4g}, {state['noise_multiplier']:.4g}); the accountant composes both",
            UserWarning,
            stacklevel=4,
        )
