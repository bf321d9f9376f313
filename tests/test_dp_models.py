"""DPTrainer on model quirks that used to break per-example sensitivity or mis-train silently, each checked against a
reference DP code did not write: every example's gradient of the model's own loss, computed alone and unpadded in
float64 (a brute-force loop), or the model's own loss.

- left padding with learned positions (GPT-2 ``wpe``) under all three per-example methods; RoPE (Llama) too;
- causal-LM detection for a subclass and a remote-code style model, and the first-batch loss check;
- sliding-window attention (Mistral, Qwen2 with mixed layer types) when the first batch is shorter than the window;
- Opacus hooks on parameters applied to the whole batch (learned position embeddings): refused.
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
    return DPConfig(noise_multiplier=0.0, max_grad_norm=1e9, per_sample_method=method, sampler_seed=0, noise_seed=0,
                    **kw)


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


def _steps(n: int, batch: int, steps: int, ga: int = 1) -> list[list[int]]:
    """The indices of every optimizer step's Poisson batch (expected size ``batch``) with sampler_seed=0: what
    DPTrainer draws in its first epoch."""
    micro = list(PoissonBatchSampler(n, batch / n, n // batch, ga, seed=0))
    return [[i for mb in micro[s * ga : (s + 1) * ga] for i in mb] for s in range(steps)]


def _reference_sgd(model64: torch.nn.Module, dataset, steps: list[list[int]], batch: int) -> dict[str, torch.Tensor]:
    """Brute-force DP-SGD with sigma = 0, no clipping, lr = 1: every step moves by -sum_i g_i / B, where g_i is the
    gradient of the model's own loss on example i alone, unpadded, in float64."""
    params = trainable_parameters(model64)
    for indices in steps:
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for i in indices:
            item = dataset[i]
            loss = model64(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
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
