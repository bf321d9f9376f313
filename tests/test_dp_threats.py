"""The DP threat model, tested as an attacker would probe it: the sample and the noise stay secret, nothing outside
the privatised parameters trains, nothing un-noised computed from the private batches reaches the model or the Hub,
and nothing of the user's is modified.

Each test fails on the code before the audit (issue 8): there EVA ran on the private batches, BatchNorm in eval mode
was accepted, the Poisson sample was seeded from ``TrainingArguments.seed``, a parameter unfrozen after construction
trained on raw gradients, ``dp_state.pt`` sat inside pushed checkpoint folders and an older checkpoint replayed its
noise, explicit seeds did not warn and ``TrainingArguments`` were modified in place.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
import torch
from test_dp_trainer import _StopAt
from tiny import VOCAB, TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.dp import DPConfig, DPTrainer
from hf_svd_plugins.dp.checkpoint import LEGACY_STATE_NAME, PRIVATE_DIR, private_state_path
from hf_svd_plugins.dp.per_sample import trainable_parameters
from hf_svd_plugins.dp.sampling import PoissonBatchSampler

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\((noise|sampler)_seed")


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=100, seed=42, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _dp(tmp_path, model=None, dataset=None, dp=None, collator=pad_collate, callbacks=None, **kw) -> DPTrainer:
    return DPTrainer(model=model if model is not None else tiny_lora_model("llama"), args=_args(tmp_path, **kw),
                     train_dataset=dataset if dataset is not None else TinyTokenDataset(n=32),
                     data_collator=collator, callbacks=callbacks,
                     dp_config=dp if dp is not None else DPConfig(noise_multiplier=1.0))


class RecordingCollator:
    """``pad_collate`` that records which examples (indices into ``dataset``) every micro-batch held."""

    def __init__(self, dataset: TinyTokenDataset) -> None:
        # the Trainer's column-removing wrapper copies the dicts, not the tensors
        self.index = {id(item["input_ids"]): i for i, item in enumerate(dataset.items)}
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict]) -> dict:
        self.batches.append([self.index[id(f["input_ids"])] for f in features])
        return pad_collate(features)


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


# ----------------------------------------------------------------------------------------------- 1. EVA on private


def test_eva_on_private_batches_refused_public_eva_runs(tmp_path):
    """EVA on the Trainer's batches writes an un-noised SVD of private activations into LoRA A: refused at
    construction and, for a callback added later, at train(). EVA on a public loader runs, and (at lr=0) A is exactly
    what EVA computes from that public loader alone, not from the private data."""
    from hf_svd_plugins.eva import EvaCallback

    with pytest.raises(ValueError, match=r"EvaCallback\(dataloader=public_loader\).*eva_init"):
        _dp(tmp_path, callbacks=[EvaCallback(rho=1.0)])
    late = _dp(tmp_path)
    late.add_callback(EvaCallback(rho=1.0))
    before = _lora_a(late.model)
    with pytest.raises(ValueError, match="private training batches"):
        late.train()
    assert all(torch.equal(before[n], p) for n, p in _lora_a(late.model).items())

    public = tiny_batches(n_batches=4, batch_size=8, seed=7)
    private = TinyTokenDataset(n=32, seed=11)
    dp = _dp(tmp_path / "dp", dataset=private, callbacks=[EvaCallback(dataloader=public, rho=1.0)], learning_rate=0.0)
    dp.train()

    def plain_eva(train_dataset, **eva_kwargs):
        trainer = Trainer(model=tiny_lora_model("llama"), args=_args(tmp_path / "plain", learning_rate=0.0, max_steps=1),
                          train_dataset=train_dataset, data_collator=pad_collate,
                          callbacks=[EvaCallback(rho=1.0, **eva_kwargs)])
        trainer.train()
        return _lora_a(trainer.model)

    from_public = plain_eva(TinyTokenDataset(n=32, seed=99), dataloader=public)  # other train data: irrelevant
    from_private = plain_eva(private)
    got = _lora_a(dp.model)
    for n in got:
        torch.testing.assert_close(got[n], from_public[n], rtol=0, atol=1e-6, msg=n)
    assert max((got[n] - from_private[n]).abs().max().item() for n in got) > 0.1


# --------------------------------------------------------------------------------------------------- 2. BatchNorm


class NormClassifier(torch.nn.Module):
    """Mean-pooled embeddings -> a norm layer -> a linear head (trainable), the rest frozen."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8).requires_grad_(False)
        self.norm = norm.requires_grad_(False)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"logits": self.head(self.norm(self.embed(input_ids).mean(dim=1)))}


@pytest.mark.parametrize(
    "norm",
    [lambda: torch.nn.BatchNorm1d(8).eval(), lambda: torch.nn.BatchNorm1d(8, track_running_stats=False),
     lambda: torch.nn.InstanceNorm1d(8, track_running_stats=True).eval()],
    ids=["batchnorm-eval", "batchnorm-no-running-stats", "instancenorm-tracking"],
)
def test_batch_statistics_refused_whatever_the_mode(tmp_path, norm):
    """``from_pretrained`` returns eval mode; the Trainer then puts the model in train mode and BatchNorm updates its
    running statistics from private data (and mixes the batch's examples). Refused in any mode, as Opacus does."""
    model = NormClassifier(norm()).eval()
    with pytest.raises(ValueError, match="GroupNorm"):
        _dp(tmp_path, model=model, dataset=TinyTokenDataset(n=32, kind="cls"))


class RunningMean(torch.nn.Module):
    """Not a norm layer, but it keeps a saved running statistic of its (private) inputs."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(dim=0))
        return x - self.mean


def test_saved_buffers_updated_from_private_data_refused(tmp_path):
    """Whatever module does it: a saved buffer that changes during a step is refused before that step's release."""
    model = NormClassifier(RunningMean(8))
    before = model.norm.mean.clone()
    trainer = _dp(tmp_path, model=model, dataset=TinyTokenDataset(n=32, kind="cls"),
                  dp=DPConfig(noise_multiplier=1.0, per_sample_method="loop", sampler_seed=0))
    with pytest.raises(ValueError, match=r"saved buffers \['norm.mean'\] changed"):
        trainer.train()
    assert trainer.accountant.steps == 0 and not torch.equal(model.norm.mean, before)


# ------------------------------------------------------------------------------------------- 3. a secret sample


def test_poisson_sample_is_secret_by_default(tmp_path):
    """Two trainers with identical TrainingArguments (the public seed=42) draw different samples, neither being the
    one seeded from args.seed. Counting draws over 400 steps: every example is still included with rate q."""
    trainers = [_dp(tmp_path) for _ in range(2)]
    samples = [list(t.get_train_dataloader().batch_sampler) for t in trainers]
    public = list(PoissonBatchSampler(32, 4 / 32, 8, 1, seed=42))
    assert samples[0] != samples[1] and public not in samples
    assert trainers[0]._dp_sampler_seed != trainers[1]._dp_sampler_seed

    sampler = trainers[0].get_train_dataloader().batch_sampler
    counts = torch.zeros(32)
    sizes = []
    for epoch in range(50):  # 50 epochs x 8 steps
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts[batch] += 1
            sizes.append(len(batch))
    q, steps = 4 / 32, 400
    assert len(sizes) == steps
    assert ((counts - q * steps).abs() < 5 * (q * (1 - q) * steps) ** 0.5).all()  # each one Binomial(400, q)
    sizes = torch.tensor(sizes, dtype=torch.float64)
    assert abs(sizes.mean().item() - 4) < 3 * (32 * q * (1 - q) / steps) ** 0.5
    assert abs(sizes.var().item() / (32 * q * (1 - q)) - 1) < 0.3


@pytest.mark.filterwarnings("default")
def test_explicit_seeds_warn(tmp_path):
    with pytest.warns(UserWarning, match="sampler_seed=3.*predictable"):
        _dp(tmp_path, dp=DPConfig(noise_multiplier=1.0, sampler_seed=3))
    with pytest.warns(UserWarning, match="noise_seed=3.*same noise"):
        _dp(tmp_path, dp=DPConfig(noise_multiplier=1.0, noise_seed=3))


@pytest.mark.parametrize("explicit", [None, 0])
def test_training_twice_draws_new_batches(tmp_path, explicit):
    """A second train() composes in the accountant as independent steps, so it must not replay the first call's
    Poisson batches (with a secret seed, or with an explicit one)."""
    dataset = TinyTokenDataset(n=32)
    collate = RecordingCollator(dataset)
    trainer = _dp(tmp_path, dataset=dataset, collator=collate, max_steps=6,
                  dp=DPConfig(noise_multiplier=1.0, sampler_seed=explicit))
    trainer.train()
    first, collate.batches = collate.batches, []
    trainer.train()
    assert first and collate.batches and first != collate.batches  # (empty Poisson batches are never collated)
    assert trainer.accountant.steps == 12


def test_resume_restores_the_secret_sampler_seed(tmp_path):
    """The secret seed lives in the private DP state: a run resumed with fresh (different) secrets takes exactly the
    batches the interrupted run would have taken next, and continues its noise stream."""
    dataset = TinyTokenDataset(n=32)
    first = _dp(tmp_path, dataset=dataset, max_steps=6, save_strategy="steps", save_steps=3)
    first.add_callback(_StopAt(3))
    first.train()
    interrupted_noise = first._dp_release.generator.get_state()
    would_take = [b for b in PoissonBatchSampler(32, 4 / 32, 8, 1, seed=first._dp_sampler_seed)][3:6]

    collate = RecordingCollator(dataset)
    resumed = _dp(tmp_path, dataset=dataset, collator=collate, max_steps=6)
    assert resumed._dp_sampler_seed != first._dp_sampler_seed
    seen_noise = []
    resumed.add_callback(_RecordNoiseState(resumed, seen_noise))
    resumed.train(resume_from_checkpoint=True)
    assert resumed._dp_sampler_seed == first._dp_sampler_seed
    assert collate.batches == [b for b in would_take if b]  # the skipped steps 1-3 are not loaded, nor empty ones
    assert torch.equal(seen_noise[0], interrupted_noise)
    assert resumed.accountant.history == [(1.0, 4 / 32, 6)]


class _RecordNoiseState(TrainerCallback):
    def __init__(self, trainer, out: list) -> None:
        self.trainer, self.out = trainer, out

    def on_train_begin(self, args, state, control, **kwargs):
        self.out.append(self.trainer._dp_release.generator.get_state())


# --------------------------------------------------------------------------- 4. only the privatised parameters


def test_parameter_unfrozen_after_construction_refused(tmp_path):
    """The privatised set is fixed at construction. LoRA A unfrozen afterwards went into the optimizer and, under
    Opacus hooks, trained on the raw batch gradient (it moved with C=1e-12 and sigma=0). Refused at train()."""
    model = tiny_lora_model("llama")
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    trainer = _dp(tmp_path, model=model, learning_rate=1.0,
                  dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e-12, per_sample_method="hooks", sampler_seed=0))
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(True)
    before = _lora_a(model)
    with pytest.raises(ValueError, match="in the optimizer but not privatised"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in _lora_a(model).items())


class _UnfreezeAfter(TrainerCallback):
    def __init__(self, model, step: int) -> None:
        self.model, self.step = model, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for n, p in self.model.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(True)


def test_parameter_unfrozen_during_training_refused(tmp_path):
    """Unfrozen mid-run, Opacus' backward leaves the raw batch gradient in A.grad: training stops at that step."""
    model = tiny_lora_model("llama")
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    trainer = _dp(tmp_path, model=model, max_steps=4, callbacks=[_UnfreezeAfter(model, 1)],
                  dp=DPConfig(noise_multiplier=1.0, per_sample_method="hooks", sampler_seed=0))
    assert all(len(b) for b in list(trainer.get_train_dataloader().batch_sampler)[1:3])
    with pytest.raises(ValueError, match="holding a gradient outside the privatised set"):
        trainer.train()
    assert trainer.state.global_step == 1


def test_custom_optimizer_over_frozen_parameters_refused(tmp_path):
    model = tiny_lora_model("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=TinyTokenDataset(n=32),
                        data_collator=pad_collate, optimizers=(optimizer, None), dp_config=DPConfig(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="in the optimizer but not privatised"):
        trainer.train()


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


def test_resuming_from_an_older_checkpoint_refused(tmp_path):
    """From checkpoint-2 while checkpoint-4 of the same noise stream exists, steps 3-4 would draw the same noise again
    for other gradients (their difference is noise-free) and their privacy would be forgotten."""
    first = _dp(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    again = _dp(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match="draw the noise of the later steps"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    os.remove(private_state_path(str(tmp_path / "checkpoint-4")))  # "their outputs were never seen by anyone"
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert again.accountant.steps == 4


def test_private_states_rotate_with_checkpoints(tmp_path):
    trainer = _dp(tmp_path, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer.train()
    assert sorted(os.listdir(tmp_path / PRIVATE_DIR)) == ["checkpoint-6.pt"]
    assert not os.path.exists(tmp_path / "checkpoint-6" / LEGACY_STATE_NAME)


# ------------------------------------------------------------------------------ 13. the user's objects stay as given


def test_user_arguments_and_config_not_modified(tmp_path):
    args = _args(tmp_path, max_grad_norm=1.0)
    config = DPConfig(noise_multiplier=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 is disabled"):
        trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                            data_collator=pad_collate, dp_config=config)
    assert args.max_grad_norm == 1.0 and trainer.args.max_grad_norm == 0.0
    config.noise_multiplier = 5.0
    assert trainer.dp_config.noise_multiplier == 1.0 and trainer.noise_multiplier == 1.0
    trainer.train()
    assert trainable_parameters(trainer.model)
