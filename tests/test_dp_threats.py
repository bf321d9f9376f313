"""The DP threat model, tested as an attacker would probe it: the sample and the noise stay secret, nothing outside
the privatised parameters trains, nothing un-noised computed from the private batches reaches the model or the Hub,
and nothing of the user's is modified.

Each test fails on the code before the audit (issue 8) or its review: there EVA ran on the private batches (also
when added during training, or given a loader over the training set), BatchNorm in eval mode was accepted, the
Poisson sample was seeded from ``TrainingArguments.seed``, a parameter unfrozen after construction trained on raw
gradients (hooks) or was silently left untrained (vmap, loop), explicit seeds did not warn, ``TrainingArguments`` were
modified in place and an overridden ``compute_loss`` was silently not trained. Checkpoints and resume:
``test_dp_checkpoints.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny import VOCAB, TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.dp import DPConfig, DPTrainer
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
    with pytest.raises(ValueError, match="private training batches"):
        late.add_callback(EvaCallback(rho=1.0))
    assert not any(isinstance(cb, EvaCallback) for cb in late.callback_handler.callbacks)
    late.callback_handler.callbacks.append(EvaCallback(rho=1.0))  # behind the Trainer's back
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
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (self.embed(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return {"logits": self.head(self.norm(pooled))}


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


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_parameter_unfrozen_during_training_refused(tmp_path, method):
    """Unfrozen mid-run, Opacus' backward leaves the raw batch gradient in A.grad; vmap and loop silently left A
    untrained. Whatever the method, training stops at that step."""
    model = tiny_lora_model("llama")
    for n, p in model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    trainer = _dp(tmp_path, model=model, max_steps=4, callbacks=[_UnfreezeAfter(model, 1)],
                  dp=DPConfig(noise_multiplier=1.0, per_sample_method=method, sampler_seed=0))
    assert all(len(b) for b in list(trainer.get_train_dataloader().batch_sampler)[1:3])
    match = "holding a gradient outside" if method == "hooks" else r"trainable \(requires_grad\) but not privatised"
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 1


def test_custom_optimizer_over_frozen_parameters_refused(tmp_path):
    model = tiny_lora_model("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=TinyTokenDataset(n=32),
                        data_collator=pad_collate, optimizers=(optimizer, None), dp_config=DPConfig(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="in the optimizer but not privatised"):
        trainer.train()


# ------------------------------------------------------------------------------ 13. the user's objects stay as given


def test_user_arguments_and_config_not_modified(tmp_path):
    args = _args(tmp_path, max_grad_norm=2.0)
    config = DPConfig(noise_multiplier=1.0)
    with pytest.warns(UserWarning, match="max_grad_norm=2.0 .* is disabled"):
        trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                            data_collator=pad_collate, dp_config=config)
    assert args.max_grad_norm == 2.0 and trainer.args.max_grad_norm == 0.0
    config.noise_multiplier = 5.0
    assert trainer.dp_config.noise_multiplier == 1.0 and trainer.noise_multiplier == 1.0
    trainer.train()
    assert trainable_parameters(trainer.model)


# ---------------------------------------------------------------------------- callbacks added during training


class _WritesFromBatches(TrainerCallback):
    """Stands in for EVA on the training batches: declares reading them, and writes into LoRA A when it runs."""

    reads_train_data = True

    def __init__(self, model) -> None:
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if "lora_A" in n:
                    p.fill_(1.0)


class _AddsCallback(TrainerCallback):
    def __init__(self, add) -> None:
        self.add = add

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.add()


@pytest.mark.parametrize("how", ["add_callback", "append"])
def test_callback_reading_the_batches_added_during_training_refused(tmp_path, how):
    """The refusal only ran at construction and train begin: a callback added by another callback during training
    ran, and wrote into LoRA A. Refused at once by add_callback, else at the next step begin, before it runs."""
    model = tiny_lora_model("llama")
    holder: list = []

    def add():
        bad = _WritesFromBatches(model)
        if how == "add_callback":
            holder[0].add_callback(bad)
        else:
            holder[0].callback_handler.callbacks.append(bad)

    trainer = _dp(tmp_path, model=model, max_steps=3, learning_rate=0.0, callbacks=[_AddsCallback(add)],
                  save_strategy="steps", save_steps=1, dp=DPConfig(noise_multiplier=1.0, sampler_seed=0))
    holder.append(trainer)
    before = _lora_a(model)
    with pytest.raises(ValueError, match=r"\['_WritesFromBatches'\] read the Trainer's private training batches"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer.accountant.steps == 1
    if how == "add_callback":  # refused before it was ever called
        assert all(torch.equal(before[n], p) for n, p in _lora_a(model).items())
    else:  # appended behind the Trainer's back it ran in the same event, but nothing after it is saved or released
        assert not os.path.exists(tmp_path / "checkpoint-1")


def test_eva_on_a_loader_over_the_private_training_set_refused(tmp_path):
    """EvaCallback(dataloader=...) is for public data; a loader over the training set itself (or a Subset of it)
    is the private data without the Trainer's sampling."""
    from hf_svd_plugins.eva import EvaCallback

    private = TinyTokenDataset(n=32)
    for loader in (torch.utils.data.DataLoader(private, batch_size=8, collate_fn=pad_collate),
                   torch.utils.data.DataLoader(torch.utils.data.Subset(private, range(16)), batch_size=8,
                                               collate_fn=pad_collate)):
        with pytest.raises(ValueError, match="dataloader over the private training set"):
            _dp(tmp_path, dataset=private, callbacks=[EvaCallback(dataloader=loader, rho=1.0)])
    trainer = _dp(tmp_path, dataset=private)
    with pytest.raises(ValueError, match="dataloader over the private training set"):
        trainer.add_callback(EvaCallback(dataloader=torch.utils.data.DataLoader(private, collate_fn=pad_collate)))


def test_hf_dataset_views_share_the_training_set():
    from datasets import Dataset

    from hf_svd_plugins.dp.checks import shares_dataset

    ds = Dataset.from_dict({"input_ids": [[1, 2], [3, 4], [5, 6]]})
    assert shares_dataset(torch.utils.data.DataLoader(ds.select([0, 1])), ds)
    assert shares_dataset(ds.shuffle(seed=0), ds)
    assert not shares_dataset(Dataset.from_dict({"input_ids": [[1, 2]]}), ds)


# --------------------------------------------------------------------------------- a loss DP would not train


def test_overridden_compute_loss_refused(tmp_path):
    """DP computes each example's loss from the logits and never calls compute_loss: a subclass's own loss was
    silently replaced by the plain one (its compute_loss was called 0 times)."""

    class WeightedLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return 2 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    from hf_svd_plugins.dp import DPMixin

    class DPWeighted(DPMixin, WeightedLoss):
        pass

    with pytest.raises(ValueError, match="WeightedLoss.compute_loss is never called under DP"):
        DPWeighted(model=tiny_lora_model("llama"), args=_args(tmp_path), train_dataset=TinyTokenDataset(n=32),
                   data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0))


def _token_lists(n: int = 32) -> list[dict]:
    return [{"input_ids": it["input_ids"].tolist(), "labels": it["labels"].tolist()} for it in TinyTokenDataset(n=n).items]


@pytest.mark.parametrize("poisson", [True, False])
@pytest.mark.parametrize("collator", ["flatten_no_positions", "flatten", "drop_row", "duplicate_row"])
def test_collator_not_one_row_per_example_refused_before_any_release(tmp_path, collator, poisson):
    """DataCollatorWithFlattening concatenates a micro-batch into one row (without position_ids nothing else marks
    it): DP clipped that row as one example, so removing one example moved the release by up to 2 C. A collator that
    drops or duplicates a row breaks the bound the same way. Refused as the batch is collated, before any gradient."""
    from transformers import DataCollatorWithFlattening

    flatten = {"flatten_no_positions": DataCollatorWithFlattening(return_position_ids=False),
               "flatten": DataCollatorWithFlattening()}
    if collator in flatten:
        dataset, collate, name = _token_lists(), flatten[collator], "DataCollatorWithFlattening"
    else:
        def collate(features):
            out = pad_collate(features)
            rows = out["input_ids"].shape[0]
            keep = torch.arange(rows - 1) if collator == "drop_row" else torch.cat([torch.arange(rows), torch.zeros(1, dtype=torch.long)])
            return {k: v[keep] for k, v in out.items()}
        dataset, name = TinyTokenDataset(n=32), "collate"
    trainer = _dp(tmp_path, dataset=dataset, collator=collate, remove_unused_columns=False,
                  dp=DPConfig(noise_multiplier=1.0, poisson_sampling=poisson, sampler_seed=0))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=f"data collator {name} returned `input_ids` with \\d+ rows for the \\d+ "
                                         "examples.*DataCollatorWithPadding"):
        trainer.train()
    assert trainer.accountant.steps == 0 and trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_row_count_check_ignores_scalars_and_accepts_one_row_per_example():
    from transformers import BatchEncoding

    from hf_svd_plugins.dp.batch import check_one_row_per_example

    batch = BatchEncoding({"input_ids": torch.zeros(3, 5, dtype=torch.long), "num_items": torch.tensor(7)})
    check_one_row_per_example(batch, 3, pad_collate)
    with pytest.raises(ValueError, match="pad_collate returned `input_ids` with 3 rows for the 2 examples"):
        check_one_row_per_example(batch, 2, pad_collate)


def test_neftune_refused(tmp_path):
    """NEFTune's noise is alpha / sqrt(T_padded * d): an example's gradient depends on the longest example of its
    batch."""
    with pytest.raises(ValueError, match="neftune_noise_alpha=5.0 is not supported under DP"):
        _dp(tmp_path, neftune_noise_alpha=5.0)
