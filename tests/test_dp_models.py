"""DPTrainer on model quirks that used to break per-example sensitivity or mis-train silently, each checked against a
reference DP code did not write: every example's gradient of the model's own loss, computed alone and unpadded in
float64 (a brute-force loop), or the model's own loss.

- left padding with learned positions (GPT-2 ``wpe``) under all three per-example methods; RoPE (Llama) too;
- causal-LM detection for a subclass and a remote-code style model, and the first-batch loss check;
- sliding-window attention (Mistral, Qwen2 with mixed layer types) when the first batch is shorter than the window;
- Opacus hooks on parameters applied to the whole batch (learned position embeddings) or used outside their module
  (a tied output matrix): refused, ``auto`` falls back;
- padding on either side: sequence classifiers without ``config.pad_token_id``, models ignoring ``attention_mask``,
  a batch-of-one shortcut only vmap takes, collator ``position_ids`` counted over the padded row;
- a model whose loss is the mean of per-sequence means (DP's own objective) passes the first-batch loss check.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from test_dp_trainer import _lora_b_nonzero
from tiny import VOCAB, TinyTokenDataset, pad_collate, tiny_lora_model, tiny_model
from transformers import TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_svd_plugins.dp import DPConfig, DPTrainer
from hf_svd_plugins.dp.per_sample import NotPrivatizableError, trainable_parameters
from hf_svd_plugins.dp.sampling import PoissonBatchSampler

# explicit seeds (they warn): the tests need to know the batches
pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\((noise|sampler)_seed")


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
                disable_tqdm=True, logging_steps=100, max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def _exact(method: str = "auto", **kw) -> DPConfig:
    """sigma = 0 and a huge C: one SGD step at lr=1 moves the parameters by exactly -sum_i g_i / B."""
    return DPConfig(**{"noise_multiplier": 0.0, "max_grad_norm": 1e9, "per_sample_method": method, "sampler_seed": 0,
                       "noise_seed": 0, **kw})


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def left_pad_collate(batch: list[dict]) -> dict:
    """Pad on the left (as for generation): ``input_ids`` 0, ``attention_mask`` 0, ``labels`` -100."""
    longest = max(len(x["input_ids"]) for x in batch)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.stack([torch.cat([torch.full((longest - len(x[key]),), fill, dtype=x[key].dtype), x[key]])
                                for x in batch])
    return out


def _steps(n: int, batch: int, steps: int, ga: int = 1, seed: int = 0) -> list[list[int]]:
    """The indices of every optimizer step's Poisson batch (expected size ``batch``) with sampler_seed=``seed``: what
    DPTrainer draws in its first epoch."""
    micro = list(PoissonBatchSampler(n, batch / n, n // batch, ga, seed=seed))
    return [[i for mb in micro[s * ga : (s + 1) * ga] for i in mb] for s in range(steps)]


def _reference_sgd(model64: torch.nn.Module, dataset, steps: list[list[int]], batch: int) -> dict[str, torch.Tensor]:
    """Brute-force DP-SGD with sigma = 0, no clipping, lr = 1: every step moves by -sum_i g_i / B, where g_i is the
    gradient of the model's own loss on example i alone, unpadded, in float64."""
    params = trainable_parameters(model64)
    for indices in steps:
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in indices:
            item = dataset[i]
            out = model64(input_ids=item["input_ids"][None], labels=item["labels"][None])
            loss = out["loss"] if isinstance(out, dict) else out.loss
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                total[n] += g
        with torch.no_grad():
            for n, p in params.items():
                p -= total[n] / batch
    return {n: p.detach() for n, p in params.items()}


def _assert_trained_like_reference(trainer, reference: dict[str, torch.Tensor]) -> None:
    got = trainable_parameters(trainer.model)
    assert set(got) == set(reference)
    for n, p in got.items():
        torch.testing.assert_close(p.detach().double(), reference[n], rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------- left padding / positions


@pytest.mark.parametrize(("kind", "method"), [("gpt2", "vmap"), ("gpt2", "hooks"), ("gpt2", "loop"), ("llama", "vmap")])
def test_left_padding_gives_each_example_its_own_positions(tmp_path, kind, method):
    """GPT-2 numbers positions over the padded row, so under left padding an example's gradient depended on the
    longest example of its batch (its sensitivity was not C). With positions counted from the mask, each example's
    gradient (LoRA and the learned position embeddings ``wpe`` trainable) equals its gradient alone, unpadded."""
    dataset = TinyTokenDataset(n=24, seed=1, min_len=4, max_len=16)
    model = _no_dropout(_lora_b_nonzero(tiny_lora_model(kind)))
    if kind == "gpt2":
        model.base_model.model.transformer.wpe.weight.requires_grad_(True)
    reference_model = copy.deepcopy(model).double()
    steps = _steps(24, 4, 1)
    assert len({len(dataset[i]["input_ids"]) for i in steps[0]}) > 1  # the batch really is left-padded
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=left_pad_collate,
                        dp_config=_exact(method))
    trainer.train()
    assert trainer.dp_method_used == method and trainer._dp_engine.positions == "from_mask"
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, steps, 4))


def test_targets_on_padding_and_packed_rows_refused(tmp_path):
    """A target at a padded position makes an example's loss depend on its batch's padded length; position_ids that
    restart inside a row pack several examples into it. Both are refused before any gradient is taken."""
    dataset = TinyTokenDataset(n=16)
    assert len(_steps(16, 4, 1)[0]) >= 2

    def pad_labels_not_ignored(batch):
        out = pad_collate(batch)
        out["labels"] = out["input_ids"].clone()  # padding tokens (id 0) become targets
        return out

    def packed(batch):
        out = pad_collate(batch)
        out["position_ids"] = torch.cat([torch.arange(4), torch.arange(out["input_ids"].shape[1] - 4)]).expand(
            out["input_ids"].shape[0], -1)
        out.pop("attention_mask")
        return out

    for collate, match in ((pad_labels_not_ignored, "padded positions"), (packed, "restart inside a row")):
        trainer = DPTrainer(model=tiny_lora_model("llama"), args=_args(tmp_path), train_dataset=dataset,
                            data_collator=collate, dp_config=DPConfig(noise_multiplier=1.0, sampler_seed=0))
        with pytest.raises(ValueError, match=match):
            trainer.train()


# ------------------------------------------------------------------------------------------------ loss detection


class RemoteStyleLM(tf.LlamaPreTrainedModel, tf.GenerationMixin):
    """A causal LM as remote code ships one: not a transformers causal-LM class, but it can generate."""

    def __init__(self, config):
        super().__init__(config)
        self.model = tf.LlamaModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class SubclassedLlama(tf.LlamaForCausalLM):
    pass


def _llama_config() -> tf.LlamaConfig:
    return tiny_model("llama").config


@pytest.mark.parametrize("cls", [SubclassedLlama, RemoteStyleLM])
def test_causal_lm_detected_through_class_hierarchy(tmp_path, cls):
    """Class-name matching missed subclasses and remote-code models, which then trained on the unshifted token loss
    (learning to copy their input). The update must equal the brute-force one for the model's own (shifted) loss."""
    torch.manual_seed(0)
    model = cls(_llama_config())
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("lm_head") or ".layers.1.mlp." in n)
    dataset = TinyTokenDataset(n=24, seed=2)
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                        dp_config=_exact("vmap"))
    trainer.train()
    assert trainer.dp_loss_type == "causal_lm"
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, _steps(24, 4, 1), 4))


class PlainCausalLM(torch.nn.Module):
    """Not a transformers model at all: nothing in its class says it is a causal LM, but its own loss is shifted."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return out


def test_first_batch_loss_check_names_the_loss_type(tmp_path):
    """When the guess is wrong, the per-example losses do not average to the model's own loss on the first batch:
    training stops with an error naming DPConfig(loss_type=...) instead of training the wrong objective."""
    dataset = TinyTokenDataset(n=16)
    torch.manual_seed(0)
    trainer = DPTrainer(model=PlainCausalLM(), args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                        dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="loop", sampler_seed=0))
    with pytest.raises(ValueError, match=r"DPConfig\(loss_type='causal_lm'\)"):
        trainer.train()
    ok = DPTrainer(model=PlainCausalLM(), args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                   dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="loop", loss_type="causal_lm",
                                      sampler_seed=0))
    ok.train()
    assert ok.dp_loss_type == "causal_lm" and ok._dp_engine.loss_verified


# -------------------------------------------------------------------------------------------------- sliding window


def _windowed(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, **shape))
    else:  # layer 0 full attention, layer 1 sliding: one mask per layer type
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                   **shape))
    for n, p in model.named_parameters():
        p.requires_grad_(".self_attn.o_proj." in n or ".mlp.down_proj." in n)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_sliding_window_mask_verified_again_on_longer_batches(tmp_path, kind):
    """The vmap mask was decided on the first batch: a first batch shorter than the window made full causal attention
    look exact, and later long batches trained with it. Step 1 here only sees rows of 4 tokens (window 4), step 2
    also rows of 12; both updates must equal the brute-force ones."""
    n = 16
    steps = _steps(n, 4, 2)
    long_rows = set(steps[1]) - set(steps[0])  # only in the second step
    assert steps[0] and long_rows
    dataset = TinyTokenDataset(n=n, seed=3, min_len=12, max_len=12)
    for i, item in enumerate(dataset.items):
        if i not in long_rows:
            for key in item:
                item[key] = item[key][:4]
    model = _windowed(kind)
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=dataset,
                        data_collator=pad_collate, dp_config=_exact("vmap"))
    trainer.train()
    assert trainer._dp_engine.mask_kind == ("sliding_causal" if kind == "mistral" else "per_layer")
    assert trainer._dp_engine.mask_verified_length == 12
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, steps, 4))


# ----------------------------------------------------------------------------------------- hooks and shared params


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hooks_refuse_learned_position_embeddings(tmp_path, kind):
    """Position embeddings looked up with (1, T) position ids are applied to the whole batch: Opacus returns one grad
    sample for the batch, which used to be clipped as if it were one example (sensitivity 2C). Refused; vmap and
    loop handle them."""
    model = tiny_model(kind)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("wpe.weight") or n.endswith("position_embeddings.weight"))
    assert len(trainable_parameters(model)) == 1 and len(_steps(16, 4, 1)[0]) >= 2
    dataset = TinyTokenDataset(n=16, kind="lm" if kind == "gpt2" else "cls")
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                        dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="hooks", sampler_seed=0))
    with pytest.raises(NotPrivatizableError, match="hooks.*cannot privatise"):
        trainer.train()


@pytest.mark.parametrize("method", ["auto", "hooks"])
def test_tied_output_matrix_is_not_privatised_by_hooks(tmp_path, method):
    """Opacus hooks missed the direct use of the embedding matrix as output layer and trained on a wrong per-example
    gradient. Explicit hooks are refused; auto falls back to the exact loop (the update equals the brute force)."""
    from test_dp_core import TiedOutputLM

    torch.manual_seed(0)
    model = TiedOutputLM()
    dataset = TinyTokenDataset(n=24, seed=1)
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                        dp_config=_exact(method, loss_type="causal_lm"))
    if method == "hooks":
        with pytest.raises(NotPrivatizableError, match="do not sum to its gradient"):
            trainer.train()
        return
    trainer.train()
    assert trainer.dp_method_used == "loop"
    _assert_trained_like_reference(trainer, _causal_reference(reference_model, dataset, _steps(24, 4, 1), 4))


def _causal_reference(model64, dataset, steps, batch):
    """:func:`_reference_sgd` for a model that returns no loss: shifted cross-entropy written out here."""

    class WithLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels):
            logits = self.inner(input_ids=input_ids)["logits"]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            return {"loss": loss}

    _reference_sgd(WithLoss(model64), dataset, steps, batch)
    return {n: p.detach() for n, p in trainable_parameters(model64).items()}


# ------------------------------------------------------------------------------------------ padding, either side


def _sequence_classifier(kind: str, pad_token_id: int | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                            pad_token_id=pad_token_id)
        model = tf.GPT2ForSequenceClassification(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             num_labels=2, pad_token_id=pad_token_id)
        model = tf.LlamaForSequenceClassification(cfg)
    _hookable_trainable(model)
    return _no_dropout(model)


def _hookable_trainable(model: torch.nn.Module) -> None:
    """Train the head and layers Opacus can hook (GPT-2's MLP is transformers' Conv1D, which it cannot)."""
    gpt2 = isinstance(model, tf.GPT2PreTrainedModel)
    for n, p in model.named_parameters():
        layer = n.endswith(("ln_f.weight", ".1.ln_2.weight", ".1.ln_2.bias")) if gpt2 else ".1.mlp." in n
        p.requires_grad_(n.startswith("score") or layer)


CLS = dict(n=24, seed=1, min_len=4, max_len=16, kind="cls")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_sequence_classifier_without_pad_token_refused(tmp_path, kind, method):
    """Without config.pad_token_id, GPT2/LlamaForSequenceClassification pool the last position of the row: padding
    whose value depends on the batch's longest example. HF refuses batches > 1, but vmap (and the loop, which kept
    the padding) ran every example as a batch of one, so it trained silently; now refused on the first padded batch,
    naming the fix."""
    dataset = TinyTokenDataset(**CLS)
    assert len({len(dataset[i]["input_ids"]) for i in _steps(24, 4, 1)[0]}) > 1  # right-padded
    trainer = DPTrainer(model=_sequence_classifier(kind, None), args=_args(tmp_path), train_dataset=dataset,
                        data_collator=pad_collate, dp_config=_exact(method))
    with pytest.raises(ValueError, match=r"pad_token_id is None.*model\.config\.pad_token_id = tokenizer"):
        trainer.train()
    assert trainer.accountant.steps == 0


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["auto", "vmap", "hooks", "loop"])
def test_sequence_classifier_with_pad_token_matches_each_example_alone(tmp_path, kind, method):
    dataset = TinyTokenDataset(**CLS)
    model = _sequence_classifier(kind, 0)
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=pad_collate,
                        dp_config=_exact(method))
    trainer.train()
    assert method == "auto" or trainer.dp_method_used == method
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, _steps(24, 4, 1), 4))


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_model_ignoring_the_attention_mask_refused(tmp_path, method):
    """A model that mean-pools over the padded row was "ambiguous" for the mask check, fell to the loop (which kept
    the padding) and trained silently on gradients depending on the other examples' lengths."""
    from test_dp_core import MeanPoolIgnoringMask

    torch.manual_seed(0)
    trainer = DPTrainer(model=MeanPoolIgnoringMask(), args=_args(tmp_path), train_dataset=TinyTokenDataset(**CLS),
                        data_collator=pad_collate, dp_config=_exact(method))
    with pytest.raises(ValueError, match="ignores attention_mask"):
        trainer.train()


class BatchOfOneShortcut(tf.GPT2ForSequenceClassification):
    """Pools the last position when it sees one row (as HF does without pad_token_id, since it cannot check a batch
    of one), the last real token otherwise: right for the batch and for each example alone, wrong only for a padded
    example run as a batch of one, which is what vmap does."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if input_ids is not None and input_ids.shape[0] == 1:
            pad, self.config.pad_token_id = self.config.pad_token_id, None
            try:
                return super().forward(**kwargs)
            finally:
                self.config.pad_token_id = pad
        return super().forward(**kwargs)


def _batch_of_one_first_seed(n: int, batch: int) -> int:
    """A sampler seed whose first Poisson batch holds one example and whose second holds several of different
    lengths (with TinyTokenDataset(**CLS))."""
    lengths = [len(x["input_ids"]) for x in TinyTokenDataset(**CLS).items]
    for seed in range(200):
        first, second = _steps(n, batch, 2, seed=seed)
        if len(first) == 1 and len({lengths[i] for i in second}) > 2:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_vmap_verified_against_each_example_alone_on_padded_batches(tmp_path, method):
    """The method was settled on a first batch of one (nothing padded to compare) and vmap then trained padded
    examples through the batch-of-one shortcut. Now nothing is settled on a batch of one, and on the first padded
    batch vmap's outputs and per-example gradients are compared with each example alone: auto falls back to hooks
    (the updates equal the brute force), explicit vmap is refused."""
    seed = _batch_of_one_first_seed(24, 4)
    dataset = TinyTokenDataset(**CLS)
    torch.manual_seed(0)
    model = BatchOfOneShortcut(_sequence_classifier("gpt2", 0).config)
    _hookable_trainable(model)
    _no_dropout(model)
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=dataset,
                        data_collator=pad_collate, dp_config=_exact(method, sampler_seed=seed))
    if method == "vmap":
        with pytest.raises(ValueError, match="per_sample_method='vmap' does not reproduce each example alone"):
            trainer.train()
        assert trainer.state.global_step == 1  # the batch of one trained (exactly, by the loop)
        return
    with pytest.warns(UserWarning, match="'vmap' is not exact for this model on padded batches"):
        trainer.train()
    assert trainer.dp_method_used == "hooks"
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, _steps(24, 4, 2, seed=seed), 4))


def test_collator_position_ids_counted_over_the_padded_row_refused(tmp_path):
    """position_ids = arange(T) for every row under left padding skipped the left-padding fix (it only ran without
    position_ids): GPT-2's example gradients depended on the longest example. Refused; position_ids counted from
    each row's own first token train exactly like each example alone."""
    dataset = TinyTokenDataset(n=24, seed=1, min_len=4, max_len=16)

    def arange_positions(batch):
        out = left_pad_collate(batch)
        out["position_ids"] = torch.arange(out["input_ids"].shape[1]).expand_as(out["input_ids"]).clone()
        return out

    def own_positions(batch):
        out = left_pad_collate(batch)
        out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return out

    model = _no_dropout(_lora_b_nonzero(tiny_lora_model("gpt2")))
    trainer = DPTrainer(model=copy.deepcopy(model), args=_args(tmp_path), train_dataset=dataset,
                        data_collator=arange_positions, dp_config=_exact("vmap"))
    with pytest.raises(ValueError, match="position_ids of row .* start at"):
        trainer.train()
    reference_model = copy.deepcopy(model).double()
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=dataset, data_collator=own_positions,
                        dp_config=_exact("vmap"))
    trainer.train()
    _assert_trained_like_reference(trainer, _reference_sgd(reference_model, dataset, _steps(24, 4, 1), 4))


class MeanOfSequenceMeansLM(PlainCausalLM):
    """A causal LM whose own loss is the unweighted mean of per-sequence means: DP-SGD's objective itself."""

    def can_generate(self) -> bool:  # what makes it a causal LM for loss_type="auto"
        return True

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = super().forward(input_ids)
        if labels is not None:
            logits, targets = out["logits"][:, :-1], labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                                   ignore_index=-100)
            valid = (targets != -100).sum(-1)
            out["loss"] = (ce.sum(-1)[valid > 0] / valid[valid > 0]).mean()
        return out


def test_first_batch_loss_check_accepts_a_mean_of_sequence_means(tmp_path):
    """The check only accepted HF's token-weighted mean and refused a model computing DP's own objective."""
    dataset = TinyTokenDataset(n=16)
    torch.manual_seed(0)
    trainer = DPTrainer(model=MeanOfSequenceMeansLM(), args=_args(tmp_path), train_dataset=dataset,
                        data_collator=pad_collate,
                        dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="loop", sampler_seed=0))
    trainer.train()
    assert trainer.dp_loss_type == "causal_lm" and trainer._dp_engine.loss_verified


def test_loss_check_message_gives_both_means(tmp_path):
    torch.manual_seed(0)
    trainer = DPTrainer(model=PlainCausalLM(), args=_args(tmp_path), train_dataset=TinyTokenDataset(n=16),
                        data_collator=pad_collate,
                        dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="loop", sampler_seed=0))
    with pytest.raises(ValueError, match=r"model's loss [\d.]+; .* average to [\d.]+ weighted .*, [\d.]+ unweighted"):
        trainer.train()
