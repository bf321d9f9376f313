"""Fisher importances against a brute-force loop of per-example ``loss.backward()``, and ``FisherCallback`` inside a
real Trainer (gradient accumulation, loss scaling, the last batches only, mode 'end', checkpoint/resume)."""

import copy
import warnings

import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model, tiny_model
from transformers import Trainer, TrainingArguments

from hf_svd_plugins import FisherCallback
from hf_svd_plugins.fwsvd import estimate_fisher, select_targets
from hf_svd_plugins.fwsvd.lowrank import is_conv1d
from hf_svd_plugins.trainer_utils import reads_train_data


def one_example(batch: dict, n: int) -> dict:
    """Example ``n`` of a right-padded batch, without its padding."""
    length = int(batch["attention_mask"][n].sum())
    return {k: (v[n:n + 1, :length] if v.dim() == 2 else v[n:n + 1]) for k, v in batch.items()}


def brute_force_fisher(model, batches, per_example=True) -> dict:
    """Unfreeze a copy and call ``loss.backward()`` on each example's own loss (or the batch's mean of them)."""
    model = copy.deepcopy(model).eval()
    model.requires_grad_(True)
    layers = select_targets(model)
    out = {t.name: torch.zeros(t.shape[1], dtype=torch.float64) for t in layers}

    def add():
        for t in layers:
            grad = t.layer.weight.grad.double()
            out[t.name] += (grad ** 2).sum(1 if is_conv1d(t.layer) else 0)  # Conv1D stores (in, out)

    for batch in batches:
        size = batch["input_ids"].shape[0]
        if per_example:
            for n in range(size):
                model.zero_grad()
                model(**one_example(batch, n)).loss.backward()
                add()
        else:
            model.zero_grad()
            (sum(model(**one_example(batch, n)).loss for n in range(size)) / size).backward()
            add()
    return out


def examples_of(batches) -> list[tuple]:
    return sorted(tuple(one_example(b, n)["input_ids"][0].tolist()) for b in batches for n in range(len(b["input_ids"])))


def assert_fisher_close(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=rtol * float(scale), msg=name)


def frozen(model):
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("per_example", [True, False])
def test_estimate_fisher_equals_per_example_backward_with_padding(kind, per_example):
    model = frozen(tiny_model(kind, spectral_decay=0.8))
    batches = tiny_batches(2, batch_size=4, kind="lm" if kind != "bert" else "cls", seed=3)
    assert (batches[0]["attention_mask"] == 0).any(), "the batches must contain padding"
    fisher = estimate_fisher(model, batches, per_example=per_example)
    assert all(p.grad is None for p in model.parameters()), "estimate_fisher must not touch .grad"
    assert_fisher_close(fisher, brute_force_fisher(model, batches, per_example))


def test_fisher_of_lora_merged_frozen_weights_and_of_the_unmerged_adapter():
    peft_model = tiny_lora_model("llama", spectral_decay=0.8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained adapter, so merging changes the weights
    batches = tiny_batches(2, batch_size=4, seed=5)
    unmerged = estimate_fisher(peft_model, batches)
    merged = frozen(copy.deepcopy(peft_model).merge_and_unload())
    fisher = estimate_fisher(merged, batches)
    reference = brute_force_fisher(merged, batches)
    assert_fisher_close(fisher, reference)
    assert_fisher_close(unmerged, reference)  # read at the LoRA layer: the gradient of the merged weight
    plain = estimate_fisher(frozen(tiny_model("llama", spectral_decay=0.8)), batches)
    assert not torch.allclose(plain["model.layers.1.mlp.down_proj"], fisher["model.layers.1.mlp.down_proj"])


def test_estimate_fisher_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        estimate_fisher(model, [])
    with pytest.raises(ValueError, match="labels"):
        estimate_fisher(model, [{k: v for k, v in tiny_batches(1)[0].items() if k != "labels"}])
    with pytest.raises(ValueError, match="not nn.Linear"):
        estimate_fisher(model, tiny_batches(1), targets=["input_layernorm"])
    with pytest.raises(ValueError, match="matches no module"):
        estimate_fisher(model, tiny_batches(1), targets=["nothing_like_this"])
    with pytest.raises(ValueError, match="max_batches"):
        estimate_fisher(model, tiny_batches(1), max_batches=0)


# --------------------------------------------------------------------------------------------- FisherCallback


def train(callback, tmp_path, ga=1, batch_size=4, max_steps=4, loss_scale=1.0, lr=0.0, resume=None, save_steps=None,
          model=None, **arg_kwargs):
    """A tiny LoRA Llama in a real Trainer; returns (trainer, training batches, end-mode batches)."""
    model = model if model is not None else tiny_lora_model("llama", spectral_decay=0.8)
    train_batches, end_batches = [], []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            batch = {k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")}
            (train_batches if module.training else end_batches).append(batch)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)

    class ScaledLossTrainer(Trainer):  # what a loss scaler or a custom trainer does to the loss before backward
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs) * loss_scale

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=ga,
                             max_steps=max_steps, learning_rate=lr, report_to=[], use_cpu=True, disable_tqdm=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0,
                             lr_scheduler_type="constant", **arg_kwargs)
    trainer = ScaledLossTrainer(model=model, args=args, train_dataset=TinyTokenDataset(n=64),
                                data_collator=pad_collate, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    handle.remove()
    return trainer, train_batches, end_batches


def test_train_mode_is_exact_under_gradient_accumulation_and_loss_scaling(tmp_path):
    plain = FisherCallback(mode="train")
    trainer, seen, _ = train(plain, tmp_path / "a", ga=1, batch_size=4)
    reference = estimate_fisher(trainer.model, seen)  # lr=0: the weights never moved
    assert plain.batches == 4 and plain.examples == 16
    assert_fisher_close(plain.fisher, reference)
    accumulated = FisherCallback(mode="train")
    trainer2, seen2, _ = train(accumulated, tmp_path / "b", ga=2, batch_size=2, loss_scale=37.0)
    assert accumulated.batches == 8 and accumulated.examples == 16
    assert examples_of(seen2) == examples_of(seen)  # the same 16 examples, in micro-batches of 2
    assert_fisher_close(accumulated.fisher, reference)


def test_train_mode_reads_only_the_last_batches(tmp_path):
    callback = FisherCallback(mode="train", max_batches=2)
    trainer, seen, _ = train(callback, tmp_path, max_steps=5)
    assert callback.batches == 2
    assert_fisher_close(callback.fisher, estimate_fisher(trainer.model, seen[-2:]))


def test_end_mode_reads_the_train_dataloader_on_the_final_weights(tmp_path):
    callback = FisherCallback(mode="end", max_batches=3, targets=["q_proj", "down_proj"])
    trainer, _, end = train(callback, tmp_path, lr=5e-3)
    assert len(end) == 3 and callback.batches == 3
    assert set(callback.fisher) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert_fisher_close(callback.fisher, estimate_fisher(trainer.model, end, targets=["q_proj", "down_proj"]))


def test_fisher_sums_survive_checkpoint_and_resume(tmp_path):
    full = FisherCallback(mode="train")
    train(full, tmp_path / "full", max_steps=4, lr=5e-3)
    first = FisherCallback(mode="train")
    train(first, tmp_path / "run", max_steps=2, lr=5e-3, save_steps=2)
    resumed = FisherCallback(mode="train")
    train(resumed, tmp_path / "run2", max_steps=4, lr=5e-3, save_steps=2,
          resume=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.batches == full.batches == 4
    assert_fisher_close(resumed.fisher, full.fisher, rtol=1e-6)
    assert not torch.allclose(first.fisher["model.layers.0.self_attn.q_proj"], full.fisher["model.layers.0.self_attn.q_proj"])


def test_callback_declares_it_reads_training_data_and_checks_its_arguments(tmp_path):
    assert reads_train_data(FisherCallback())
    with pytest.raises(ValueError, match="mode"):
        FisherCallback(mode="during")
    with pytest.raises(ValueError, match="output_dir"):
        FisherCallback(compress_ratio=0.5)
    with pytest.raises(ValueError, match="compress_ratio"):
        FisherCallback(compress_ratio=1.5, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_batches"):
        FisherCallback(max_batches=0)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        train(FisherCallback(mode="train"), tmp_path, gradient_checkpointing=True)



def test_fsdp1_flattened_weights_are_refused_before_training(tmp_path):
    """FSDP1's FlatParameters cannot be read layer by layer: FisherCallback(compress_ratio=...) refuses them at
    on_train_begin (before the first step), fwsvd_compress before any work. FSDP2's DTensors are tested for real in
    tests/test_fwsvd_distributed.py."""
    from hf_svd_plugins import fwsvd_compress

    model = tiny_lora_model("llama", spectral_decay=0.8)
    next(model.parameters())._fsdp_flattened = True  # what FSDP1 marks its flattened parameters with
    reference = {n: p.clone() for n, p in model.named_parameters()}
    callback = FisherCallback(mode="end", compress_ratio=0.5, output_dir=str(tmp_path / "compressed"))
    with pytest.raises(ValueError, match="FSDP1.*FSDP2"):
        train(callback, tmp_path, model=model, lr=1e-2)
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version: 2"):
        fwsvd_compress(model, "svd", ratio=0.5, progress=False)
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())  # no step taken, nothing merged
    assert not (tmp_path / "compressed").exists()
