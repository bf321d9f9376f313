"""DP state in checkpoints, as an attacker and an auditor would probe it: nothing secret is pushed, a resume never
replays noise (a checkpoint copied into another directory included) and never forgets privacy already spent (later
checkpoints, steps lost in a crash), and ``trainer_state.json`` holds nothing that depends on the secret sample.

Each test fails on the code before the review of issue 8: a copied checkpoint resumed the first run's noise stream,
the steps lost in a crash were forgotten, ``total_flos`` counted the tokens of the batches drawn, and an epoch of
shuffled batches resumed after a crash was charged once although some of its batches were released twice.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
import torch
from test_dp_threats import _dp
from test_dp_trainer import _StopAt
from tiny import TinyTokenDataset
from transformers import TrainerCallback

from hf_svd_plugins.dp import DPConfig
from hf_svd_plugins.dp.checkpoint import LEGACY_STATE_NAME, PRIVATE_DIR, RELEASE_LOG, private_state_path

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\((noise|sampler)_seed")

# ------------------------------------------------------------------------------------------ resume: fresh secrets


def test_resume_draws_fresh_secrets_also_in_a_copied_directory(tmp_path):
    """The refusal of noise replay only looked in the run directory: checkpoint-2 copied with its private state into
    a new directory resumed with the first run's noise generator, so steps 3-4 drew the same noise for other
    gradients (their difference is noise-free). A resume with secret seeds now draws a fresh noise seed and a fresh
    Poisson sample; the privacy already spent is kept."""
    import shutil

    dataset = TinyTokenDataset(n=32)
    first = _dp(tmp_path / "run", dataset=dataset, max_steps=4, save_strategy="steps", save_steps=2)
    after_step: list[torch.Tensor] = []
    first.add_callback(_RecordNoiseAfterStep(first, after_step))
    first.train()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", copy / "checkpoint-2")
    os.makedirs(copy / PRIVATE_DIR)
    shutil.copy(private_state_path(str(tmp_path / "run" / "checkpoint-2")), private_state_path(str(copy / "checkpoint-2")))

    resumed = _dp(copy, dataset=dataset, max_steps=4)
    at_begin: list[torch.Tensor] = []
    resumed.add_callback(_RecordNoiseState(resumed, at_begin))
    resumed.train(resume_from_checkpoint=str(copy / "checkpoint-2"))
    assert not torch.equal(at_begin[0], after_step[1])  # not the first run's stream after its step 2
    assert resumed._dp_sampler_seed != first._dp_sampler_seed
    assert resumed.accountant.history == [(1.0, 4 / 32, 4)]


def test_resume_after_a_crash_keeps_the_lost_steps_privacy(tmp_path):
    """Step 3 was released (its loss and grad_norm may have been logged) and lost in a crash: resuming from
    checkpoint-2 with fresh noise releases step 3 again, so both releases stay in the accountant."""
    first = _dp(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first.add_callback(_StopAt(3))
    first.train()
    assert first.accountant.steps == 3 and not os.path.isdir(tmp_path / "checkpoint-3")
    resumed = _dp(tmp_path, max_steps=4)
    with pytest.warns(UserWarning, match="2 released steps.* while this run released 3"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.accountant.history == [(1.0, 4 / 32, 2 + 1 + 2)]


def test_shuffled_epoch_resumed_after_a_crash_is_charged_again(tmp_path):
    """poisson_sampling=False: the batch order follows the public seed, so a run resumed from checkpoint-2 after a
    crash at step 3 releases step 3's batch a second time in the same epoch. That epoch then counts as a second
    participation of its examples (it was charged once)."""
    dp = DPConfig(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        first = _dp(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, dp=dp)
    first.add_callback(_StopAt(3))
    first.train()
    assert first.accountant.unamplified == [(1.0, 1.0, 1)]
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        resumed = _dp(tmp_path, max_steps=4, dp=dp)
    with pytest.warns(UserWarning, match="while this run released 3"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.accountant.unamplified == [(1.0, 1.0, 2)]
    in_place = _dp(tmp_path / "clean", max_steps=4, save_strategy="steps", save_steps=2, dp=dp)
    in_place.add_callback(_StopAt(2))
    in_place.train()
    again = _dp(tmp_path / "clean", max_steps=4, dp=dp)
    again.train(resume_from_checkpoint=str(tmp_path / "clean" / "checkpoint-2"))  # nothing released twice
    assert again.accountant.unamplified == [(1.0, 1.0, 1)]


class _RecordNoiseAfterStep(TrainerCallback):
    def __init__(self, trainer, out: list) -> None:
        self.trainer, self.out = trainer, out

    def on_step_end(self, args, state, control, **kwargs):
        self.out.append(self.trainer._dp_release.generator.get_state())


class _RecordNoiseState(TrainerCallback):
    def __init__(self, trainer, out: list) -> None:
        self.trainer, self.out = trainer, out

    def on_train_begin(self, args, state, control, **kwargs):
        self.out.append(self.trainer._dp_release.generator.get_state())


# ------------------------------------------------------------------------------------ 6. checkpoints and the Hub


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records every upload; files are listed when the upload "runs",
    which for the Trainer's ``run_as_future=True`` uploads is after the checkpoint is complete."""

    def __init__(self) -> None:
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        done = concurrent.futures.Future()
        done.set_result(None)
        return done

    def uploaded_files(self) -> list[str]:
        from huggingface_hub.utils import filter_repo_objects

        files = []
        for up in self.uploads:
            root = up["folder_path"]
            rel = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
            files += [os.path.join(root, r) for r in filter_repo_objects(
                rel, allow_patterns=up.get("allow_patterns"), ignore_patterns=up.get("ignore_patterns"))]
        return files


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_dp_state_never_pushed(tmp_path, monkeypatch, strategy):
    """hub_strategy="checkpoint"/"all_checkpoints" upload checkpoint folders whole: the noise generator and sampler
    seed must not be in them. A warning says what is pushed and that checkpoints are not self-resumable."""
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    with pytest.warns(UserWarning, match=f"hub_strategy='{strategy}' uploads whole checkpoint folders"):
        trainer = _dp(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True,
                      hub_strategy=strategy, hub_model_id="dp-test")
    trainer.train()
    uploaded = hub.uploaded_files()
    assert any(os.sep + "checkpoint-4" + os.sep in f for f in uploaded)  # checkpoints were pushed
    assert not [f for f in uploaded if PRIVATE_DIR in f or f.endswith(LEGACY_STATE_NAME)]
    state = torch.load(private_state_path(str(tmp_path / "checkpoint-4")), weights_only=True)
    assert state["sampler_seed"] == trainer._dp_sampler_seed


def test_resuming_from_an_older_checkpoint(tmp_path):
    """From checkpoint-2 while checkpoint-4 of the same run exists: with secret seeds the resumed steps draw fresh
    noise and steps 3-4's privacy stays in the accountant. With an explicit noise_seed the restored generator would
    draw steps 3-4's noise again for other gradients: refused."""
    first = _dp(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    again = _dp(tmp_path, max_steps=4)
    with pytest.warns(UserWarning, match="while this run released 4"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.accountant.steps == 4 + 2

    explicit = DPConfig(noise_multiplier=1.0, noise_seed=0)
    _dp(tmp_path / "seeded", max_steps=4, save_strategy="steps", save_steps=2, dp=explicit).train()
    replay = _dp(tmp_path / "seeded", max_steps=4, dp=explicit)
    with pytest.raises(ValueError, match="draw the noise of the later steps"):
        replay.train(resume_from_checkpoint=str(tmp_path / "seeded" / "checkpoint-2"))


def test_private_states_rotate_with_checkpoints(tmp_path):
    trainer = _dp(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer.train()
    assert sorted(os.listdir(tmp_path / PRIVATE_DIR)) == ["checkpoint-6.pt", RELEASE_LOG]
    assert not os.path.exists(tmp_path / "checkpoint-6" / LEGACY_STATE_NAME)


# ---------------------------------------------------------------------------------- what the checkpoints reveal


def test_total_flos_does_not_depend_on_the_secret_sample(tmp_path):
    """trainer_state.json (pushed with hub_strategy checkpoint/all_checkpoints) held total_flos, the token count of
    the batches actually drawn: a function of the secret Poisson sample."""
    flos = []
    for seed in (0, 1):
        trainer = _dp(tmp_path / str(seed), max_steps=3, dp=DPConfig(noise_multiplier=1.0, sampler_seed=seed))
        trainer.train()
        flos.append(trainer.state.total_flos)
    assert flos[0] == flos[1]


def test_hyperparameter_trial_with_push_refused(tmp_path, monkeypatch):
    """A trial checkpoints into run-<id>/, its private state into run-<id>/_dp_private/: the Trainer's push ignores
    `_*` and `checkpoint-*` only at the top of the output directory, so it would upload that state. Refused before
    training (optuna / ray are not installed here: the trial is passed as the Trainer's hyperparameter search does)."""
    from huggingface_hub.utils import filter_repo_objects

    state = os.path.relpath(private_state_path(str(tmp_path / "run-0" / "checkpoint-2")), tmp_path)
    assert state == os.path.join("run-0", PRIVATE_DIR, "checkpoint-2.pt")
    assert list(filter_repo_objects([state], ignore_patterns=["_*", "checkpoint-*"])) == [state]  # not ignored
    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHub())
    trainer = _dp(tmp_path, push_to_hub=True, hub_model_id="dp-test")
    with pytest.raises(ValueError, match="push_to_hub=True in a hyperparameter-search trial"):
        trainer.train(trial={"learning_rate": 0.1})
    assert trainer.state.global_step == 0
