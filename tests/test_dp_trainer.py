"""DPTrainer / DPMixin / DPSFTTrainer in one process: the update it releases, noise once per step, Poisson batches,
epsilon in the logs, checkpoint/resume, and refusals before training."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
from transformers import TrainerCallback, TrainingArguments

from hf_svd_plugins.dp import DPConfig, DPTrainer
from hf_svd_plugins.dp.accounting import compute_epsilon
from hf_svd_plugins.dp.checkpoint import LEGACY_STATE_NAME as DP_STATE_NAME
from hf_svd_plugins.dp.checkpoint import private_state_path
from hf_svd_plugins.dp.per_sample import trainable_parameters
from hf_svd_plugins.dp.sampling import PoissonBatchSampler


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1, learning_rate=1.0,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, max_grad_norm=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(tmp_path, model=None, dataset=None, dp=None, **kw) -> DPTrainer:
    return DPTrainer(
        model=model if model is not None else tiny_lora_model("llama"),
        args=_args(tmp_path, **kw),
        train_dataset=dataset if dataset is not None else TinyTokenDataset(n=32),
        data_collator=pad_collate,
        dp_config=dp if dp is not None else DPConfig(noise_multiplier=1.0, noise_seed=0),
    )


def _lora_b_nonzero(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize(("ga", "method", "physical"), [(1, "vmap", None), (2, "hooks", None), (2, "loop", 1)])
def test_sigma_zero_update_equals_mean_of_per_example_grads(tmp_path, ga, method, physical):
    """One SGD step (lr=1) with sigma=0 and a huge C moves params by exactly -sum_i g_i / (q N) over the Poisson
    batch, where g_i is example i's own gradient (float64 brute force, each example alone and unpadded)."""
    dataset = TinyTokenDataset(n=24, seed=1)
    model = _lora_b_nonzero(tiny_lora_model("gpt2"))
    for m in model.modules():  # GPT-2 has dropout; the reference has none
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref_model = copy.deepcopy(model).double()
    before = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    trainer = _trainer(tmp_path, model=model, dataset=dataset, max_steps=1, per_device_train_batch_size=4 // ga,
                       gradient_accumulation_steps=ga, dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e9,
                                                                   per_sample_method=method, sampler_seed=0,
                                                                   max_physical_batch_size=physical))
    trainer.train()
    assert trainer.dp_method_used == method
    sampled = [i for mb in list(PoissonBatchSampler(24, 4 / 24, 6, ga, seed=0))[:ga] for i in mb]
    assert len(sampled) > 0
    params = trainable_parameters(ref_model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in sampled:
        item = dataset[i]
        logits = ref_model(input_ids=item["input_ids"][None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1].double(), item["labels"][1:], ignore_index=-100)
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            total[n] += g
    for n, p in trainable_parameters(model).items():
        torch.testing.assert_close((before[n] - p.detach()).double(), total[n] / 4, rtol=1e-4, atol=1e-6, msg=n)


def test_noise_added_once_per_step_with_gradient_accumulation(tmp_path):
    """C -> 0 and sigma*C = 1: the update is pure noise with std 1/B; per-micro-batch noise would give sqrt(ga)/B."""
    model = tiny_lora_model("llama")
    before = torch.cat([p.detach().flatten().clone() for p in trainable_parameters(model).values()])
    trainer = _trainer(tmp_path, model=model, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                       dp=DPConfig(noise_multiplier=1e9, max_grad_norm=1e-9, noise_seed=3))
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainable_parameters(model).values()])
    std = (after - before).std().item()
    assert before.numel() > 3000
    assert abs(std * 8 - 1) < 0.05, std * 8


def test_trains_logs_epsilon_and_matches_accountant(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, logging_steps=2, learning_rate=0.05, gradient_accumulation_steps=2,
                       per_device_train_batch_size=2)
    out = trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("epsilon" in entry for entry in logs)
    assert logs[0]["epsilon"] < logs[1]["epsilon"]
    q = 4 / 32
    assert trainer.sample_rate == q and trainer.target_delta == pytest.approx(1e-5)
    expected = compute_epsilon(1.0, q, 4, 1e-5, "prv")
    assert out.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert trainer.get_epsilon() == pytest.approx(expected, rel=1e-9)
    assert trainer.args.max_grad_norm == 0


def test_trainer_max_grad_norm_disabled_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="max_grad_norm=2.0"):
        trainer = _trainer(tmp_path, max_grad_norm=2.0)
    assert trainer.args.max_grad_norm == 0


def test_deepspeed_clipping_off_on_a_copy_of_the_users_config(tmp_path):
    """copy.copy of the arguments shared the DeepSpeed plugin and its config dict with the user's object, and DP set
    gradient_clipping = 0 in it (the user's next, non-private Trainer then trained unclipped). The real engine is
    checked in test_dp_distributed.py; here the copy itself, with a stand-in plugin of accelerate's attributes."""
    from types import SimpleNamespace

    from hf_svd_plugins.dp.arguments import private_arguments

    config = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    hf_ds_config = SimpleNamespace(config=config)
    plugin = SimpleNamespace(deepspeed_config=config, hf_ds_config=hf_ds_config, gradient_clipping=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    args.deepspeed_plugin, args.hf_deepspeed_config = plugin, hf_ds_config
    own = private_arguments(args, 0.5)
    assert config == {"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    assert args.deepspeed_plugin is plugin and plugin.gradient_clipping == 1.0 and args.max_grad_norm == 1.0
    assert own.max_grad_norm == 0.0 and own.deepspeed_plugin.gradient_clipping == 0.0
    assert own.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0
    assert own.hf_deepspeed_config.config is own.deepspeed_plugin.deepspeed_config


def test_default_path_prints_no_warning_of_its_own(tmp_path):
    """The default configuration printed 9 warnings: 6x Opacus' "Optimal order is the largest alpha" (from the PRV
    accountant's internal RDP bound), a FutureWarning from evaluating the deprecated is_gradient_checkpointing
    eagerly, and "max_grad_norm=1.0 is disabled" for TrainingArguments' own default."""
    import warnings

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    model = tiny_lora_model("llama")  # (PEFT's get_peft_model reads is_gradient_checkpointing itself)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DPTrainer(model=model, args=args, train_dataset=TinyTokenDataset(n=32),
                            data_collator=pad_collate, dp_config=DPConfig(target_epsilon=8.0))
        trainer.train()
        trainer.get_epsilon(1e-6)
    ours = [f"{w.category.__name__}: {w.message}" for w in caught
            if "Optimal order" in str(w.message) or "is_gradient_checkpointing" in str(w.message)
            or "max_grad_norm" in str(w.message) or "hf_svd_plugins" in w.filename]
    assert ours == []
    assert args.max_grad_norm == 1.0 and trainer.args.max_grad_norm == 0.0


def test_empty_poisson_batches(tmp_path):
    """q = 1/32: about a third of the logical batches are empty; they still count as steps (and in epsilon)."""
    model = tiny_lora_model("llama")
    trainer = _trainer(tmp_path, model=model, per_device_train_batch_size=1, max_steps=12, learning_rate=0.01,
                       dp=DPConfig(noise_multiplier=2.0, noise_seed=0, sampler_seed=0))
    sizes = [len(b) for b in PoissonBatchSampler(32, 1 / 32, 32, 1, seed=0)][:12]
    assert 0 in sizes
    trainer.train()
    assert trainer.accountant.history == [(2.0, 1 / 32, 12)]
    assert all(torch.isfinite(p).all() for p in trainable_parameters(model).values())


def test_target_epsilon_calibrates_and_bert_classification(tmp_path):
    dataset = TinyTokenDataset(n=32, kind="cls")
    trainer = _trainer(tmp_path, model=tiny_lora_model("bert"), dataset=dataset, max_steps=4, learning_rate=0.05,
                       dp=DPConfig(target_epsilon=2.0, accountant="rdp", noise_seed=0))
    assert trainer.noise_multiplier > 0
    trainer.train()
    assert trainer.dp_loss_type == "sequence" and trainer.dp_method_used in ("vmap", "hooks")
    assert 1.95 <= trainer.get_epsilon() <= 2.0


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_keeps_epsilon_and_noise_stream(tmp_path):
    """With the same (explicit) seeds, a run stopped at a checkpoint and resumed is the uninterrupted run: the secret
    state restored from the private DP state (noise generator, sampler seed) continues the same streams."""
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=0.05, gradient_accumulation_steps=2,
              per_device_train_batch_size=2, logging_steps=100,
              dp=DPConfig(noise_multiplier=1.0, noise_seed=0, sampler_seed=0))
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    params_full = {n: p.detach().clone() for n, p in trainable_parameters(full.model).items()}

    first = _trainer(tmp_path / "split", **kw)
    first.add_callback(_StopAt(3))
    first.train()
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert os.path.isfile(private_state_path(str(ckpt))) and not (ckpt / DP_STATE_NAME).exists()
    assert first.get_epsilon() < full.get_epsilon()

    resumed = _trainer(tmp_path / "split", **kw)
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir: checkpoint-3
    assert resumed.accountant.history == full.accountant.history == [(1.0, 4 / 32, 6)]
    assert resumed.get_epsilon() == pytest.approx(full.get_epsilon(), rel=1e-12)
    for n, p in trainable_parameters(resumed.model).items():
        torch.testing.assert_close(p.detach(), params_full[n], rtol=1e-5, atol=1e-6, msg=n)


def test_resume_from_non_dp_checkpoint_refused(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    os.remove(private_state_path(str(tmp_path / "checkpoint-2")))
    again = _trainer(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match="privacy"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_hard_budget_stops_training(tmp_path):
    """Resumed with more steps than the budget allows: stops before exceeding max_epsilon."""
    dp = DPConfig(noise_multiplier=1.0, max_epsilon=10.0, noise_seed=0, accountant="rdp")  # RDP: fast bisection
    trainer = _trainer(tmp_path, max_steps=3, dp=dp)
    limit = compute_epsilon(1.0, 4 / 32, 3, 1e-5, accountant="rdp")
    trainer.dp_config.max_epsilon = limit  # budget = exactly 3 steps
    trainer.args.max_steps = 5
    trainer.train()
    assert trainer.accountant.steps == 3
    assert trainer.get_epsilon() <= limit


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda t: _trainer(t, dp=DPConfig(noise_multiplier=1.0, target_delta=0.05)), "target_delta"),
        (lambda t: _trainer(t, dp=DPConfig(target_epsilon=1e-3, accountant="rdp"), max_steps=2000), "target_epsilon"),
        (lambda t: _trainer(t, dp=DPConfig(noise_multiplier=0.5, max_epsilon=1.0), max_steps=50), "max_epsilon"),
        (lambda t: _trainer(t, model=tiny_lora_model("llama").requires_grad_(False)), "trainable"),
        (lambda t: _trainer(t, per_device_train_batch_size=64), "exceeds"),
        (lambda t: _trainer(t, dp=None).__class__(model=tiny_lora_model("llama"), args=_args(t)), "dp_config"),
    ],
)
def test_bad_setup_refused_before_training(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path)


def test_hooks_method_refuses_unsupported_layers(tmp_path):
    model = tiny_lora_model("llama")
    for n, p in model.named_parameters():
        if n.endswith("model.norm.weight"):
            p.requires_grad_(True)  # LlamaRMSNorm has no Opacus grad sampler
    with pytest.raises(ValueError, match="grad sampler"):
        _trainer(tmp_path, model=model, dp=DPConfig(noise_multiplier=1.0, per_sample_method="hooks"))


def test_dp_sft_trainer(tmp_path):
    """`DPSFTTrainer(DPMixin, trl.SFTTrainer)` trains on a pre-tokenized set with a local tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    from hf_svd_plugins.dp import DPSFTTrainer

    vocab = {"[PAD]": 0, "[EOS]": 2, "[UNK]": 3, **{f"t{i}": i for i in range(4, 97)}}
    vocab["[BOS]"] = 1
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                  pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]", unk_token="[UNK]")
    from datasets import Dataset

    data = TinyTokenDataset(n=32)
    ds = Dataset.from_list([{"input_ids": x["input_ids"].tolist()} for x in data.items])
    with pytest.raises(ValueError, match="packing"):
        DPSFTTrainer(model=tiny_lora_model("llama"), args=SFTConfig(output_dir=str(tmp_path), packing=True,
                     use_cpu=True, report_to=[]), train_dataset=ds, processing_class=tok,
                     dp_config=DPConfig(noise_multiplier=1.0))
    # DFT reweights every token by its probability in SFTTrainer.compute_loss, which DP does not call: it used to
    # train plain NLL silently
    with pytest.raises(ValueError, match="loss_type='dft'"):
        DPSFTTrainer(model=tiny_lora_model("llama"), args=SFTConfig(output_dir=str(tmp_path), loss_type="dft",
                     use_cpu=True, report_to=[]), train_dataset=ds, processing_class=tok,
                     dp_config=DPConfig(noise_multiplier=1.0))
    # SFTConfig turns activation checkpointing on by default; Opacus hooks and torch.func are not exact with it
    with pytest.raises(ValueError, match="checkpointing"):
        DPSFTTrainer(model=tiny_lora_model("llama"), args=SFTConfig(output_dir=str(tmp_path), use_cpu=True,
                     report_to=[]), train_dataset=ds, processing_class=tok,
                     dp_config=DPConfig(noise_multiplier=1.0, per_sample_method="hooks"))
    cfg = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32,
                    learning_rate=0.05, activation_checkpointing=False, gradient_checkpointing=False)
    trainer = DPSFTTrainer(model=tiny_lora_model("llama"), args=cfg, train_dataset=ds, processing_class=tok,
                           dp_config=DPConfig(noise_multiplier=1.0, noise_seed=0))
    trainer.train()
    assert trainer.dp_loss_type == "causal_lm" and trainer.dp_method_used in ("vmap", "hooks")
    assert "epsilon" in trainer.state.log_history[-1]
    assert trainer.get_epsilon() == pytest.approx(compute_epsilon(1.0, 4 / 32, 2, 1e-5), rel=1e-9)


def test_hooks_with_checkpointing_would_be_wrong_so_auto_uses_loop(tmp_path):
    """Why checkpointing is refused: Opacus hooks see the recomputed forward and return wrong per-example grads."""
    from opacus import GradSampleModule

    from hf_svd_plugins.dp.per_sample import NotPrivatizableError, hooks_per_sample_grads, loop_per_sample_grads

    model = _lora_b_nonzero(tiny_lora_model("llama")).double().train()
    batch = pad_collate([TinyTokenDataset(n=4)[i] for i in range(4)])
    params = trainable_parameters(model)
    ref, _ = loop_per_sample_grads(model, params, batch, "causal_lm")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    # the hooks miss the recomputed forward: parameters get a gradient but no per-example one, which is refused
    with pytest.raises(NotPrivatizableError, match="no per-example gradient"):
        hooks_per_sample_grads(gsm, params, batch, "causal_lm")
    gsm._close()
    looped, _ = loop_per_sample_grads(model, params, batch, "causal_lm")  # the loop stays exact
    for n in params:
        torch.testing.assert_close(looped[n], ref[n])
    with pytest.warns(UserWarning, match="checkpointing"):
        trainer = _trainer(tmp_path, max_steps=1, gradient_checkpointing=True, activation_checkpointing=True)
        trainer.train()
    assert trainer.dp_method_used == "loop"


def test_shuffled_fixed_batches_without_poisson(tmp_path):
    """poisson_sampling=False: the Trainer's own shuffled batches of exactly B; accounting uses q = B / N."""
    with pytest.warns(UserWarning, match="NOT what the accountants' amplification by subsampling analyses"):
        trainer = _trainer(tmp_path, max_steps=2, learning_rate=0.05,
                           dp=DPConfig(noise_multiplier=1.0, poisson_sampling=False, noise_seed=0))
    assert not isinstance(trainer.get_train_dataloader().batch_sampler, PoissonBatchSampler)
    trainer.train()
    assert trainer.accountant.history == [(1.0, 4 / 32, 2)]


def test_shuffled_batches_plan_the_trainers_own_step_count(tmp_path):
    """28 examples, batch 4, accumulation 2, one epoch: the Trainer takes ceil(7 / 2) = 4 steps. Sigma must be
    calibrated for those 4 (the plan said floor = 3, and the budget guard then skipped the last step silently), and
    the warning gives the epsilon that holds without amplification."""
    from transformers import Trainer

    kw = dict(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    dataset = TinyTokenDataset(n=28)
    plain = Trainer(model=tiny_lora_model("llama"), args=_args(tmp_path / "plain", **kw), train_dataset=dataset,
                    data_collator=pad_collate)
    plain.train()
    assert plain.state.global_step == 4
    with pytest.warns(UserWarning, match=r"each example in 1 of the 4 steps\): epsilon = "):
        trainer = _trainer(tmp_path, dataset=dataset, dp=DPConfig(target_epsilon=4.0, poisson_sampling=False,
                                                                  accountant="rdp"), **kw)
    assert trainer.planned_steps == 4
    trainer.train()
    assert trainer.state.global_step == trainer.accountant.steps == 4
    assert trainer.get_epsilon() <= 4.0


def test_empty_micro_batch_with_gradient_accumulation(tmp_path):
    """Per-device batch 1, accumulation 2: a step whose first micro-batch has an example and whose second is empty
    crashed in the Trainer's num_items_in_batch counting (KeyError: 'labels'); under DDP the other rank then hung."""
    micro = list(PoissonBatchSampler(16, 2 / 16, 8, 2, seed=0))
    assert any(first and not second for first, second in zip(micro[::2], micro[1::2], strict=True))
    trainer = _trainer(tmp_path, dataset=TinyTokenDataset(n=16), per_device_train_batch_size=1,
                       gradient_accumulation_steps=2, max_steps=8, include_num_input_tokens_seen="all",
                       dp=DPConfig(noise_multiplier=1.0, noise_seed=0, sampler_seed=0))
    trainer.train()
    assert trainer.state.global_step == 8 and trainer.accountant.history == [(1.0, 2 / 16, 8)]
    lengths = [len(x["input_ids"]) for x in TinyTokenDataset(n=16).items]
    assert trainer.state.num_input_tokens_seen == sum(len(mb) * max(lengths[i] for i in mb) for mb in micro if mb)


def test_dp_sft_completion_only_loss_is_honoured(tmp_path):
    """TRL folds completion_only_loss into the labels (-100 on the prompt), and each example's DP loss is the mean
    over its own targets: one SGD step (sigma 0, no clipping) equals the brute force over completion tokens only,
    prompt lengths counted with the tokenizer here."""
    from datasets import Dataset
    from tiny import tiny_tokenizer
    from trl import SFTConfig

    from hf_svd_plugins.dp import DPSFTTrainer

    tok = tiny_tokenizer()
    words = [f"w{i}" for i in range(2, 97)]
    prompts = [" ".join(words[i : i + 3 + i % 4]) for i in range(24)]
    completions = [" " + " ".join(words[i + 10 : i + 12 + i % 3]) for i in range(24)]
    data = Dataset.from_dict({"prompt": prompts, "completion": completions})
    model = _lora_b_nonzero(tiny_lora_model("llama"))
    reference_model = copy.deepcopy(model).double()
    cfg = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1.0,
                    optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True,
                    save_strategy="no", disable_tqdm=True, bf16=False, completion_only_loss=True,
                    activation_checkpointing=False, gradient_checkpointing=False, max_grad_norm=0.0)
    trainer = DPSFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                           dp_config=DPConfig(noise_multiplier=0.0, max_grad_norm=1e9, sampler_seed=0, noise_seed=0))
    before = {n: p.detach().clone().double() for n, p in trainable_parameters(model).items()}
    trainer.train()
    sampled = list(PoissonBatchSampler(24, 4 / 24, 6, 1, seed=0))[0]
    assert len(sampled) > 1
    params = trainable_parameters(reference_model)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in sampled:
        ids = torch.tensor(trainer.train_dataset[i]["input_ids"])
        labels = ids.clone()
        labels[: len(tok(prompts[i])["input_ids"])] = -100
        loss = reference_model(input_ids=ids[None], labels=labels[None]).loss
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            total[n] += g
    for n, p in trainable_parameters(model).items():
        torch.testing.assert_close(before[n] - p.detach().double(), total[n] / 4, rtol=1e-4, atol=1e-6, msg=n)


def _gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """The exact (epsilon, delta) of a mu-GDP Gaussian mechanism (Balle & Wang 2018):
    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2), solved for eps."""
    import math

    from scipy.optimize import brentq
    from scipy.stats import norm

    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 1e-6, 200)


def test_shuffled_batches_report_the_epsilon_that_holds(tmp_path):
    """poisson_sampling=False logged the amplified (Poisson) epsilon while the warning said another one holds. The
    logged epsilon, the final metrics and get_epsilon() are now the Gaussian mechanism composed once per epoch:
    10 steps of 8 per epoch = 2 participations, mu = sqrt(2) / sigma."""
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        trainer = _trainer(tmp_path, max_steps=10, logging_steps=5, learning_rate=0.05,
                           dp=DPConfig(noise_multiplier=1.5, poisson_sampling=False, noise_seed=0))
    out = trainer.train()
    exact = _gaussian_mechanism_epsilon(2**0.5 / 1.5, 1e-5)
    logged = [entry["epsilon"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(_gaussian_mechanism_epsilon(1 / 1.5, 1e-5), rel=0.02)  # 5 steps: epoch 1
    assert out.metrics["epsilon"] == trainer.get_epsilon() == logged[1]
    assert trainer.get_epsilon() == pytest.approx(exact, rel=0.02)
    assert trainer.accountant.get_epsilon(1e-5) < 0.5 * exact  # what amplification would (wrongly) report


def test_shuffled_batches_hard_budget_counts_epochs(tmp_path):
    """max_epsilon = one participation's epsilon: the 8 steps of epoch 1 run, epoch 2 would be a second one."""
    limit = compute_epsilon(1.5, 1.0, 1, 1e-5) * (1 + 1e-6)
    assert limit == pytest.approx(_gaussian_mechanism_epsilon(1 / 1.5, 1e-5), rel=0.02)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        trainer = _trainer(tmp_path, max_steps=12, learning_rate=0.05,
                           dp=DPConfig(noise_multiplier=1.5, poisson_sampling=False, noise_seed=0,
                                       max_epsilon=limit * 10))
    trainer.dp_config.max_epsilon = limit  # the plan (2 epochs) would be refused at construction
    trainer.train()
    assert trainer.accountant.steps == 8 and trainer.accountant.unamplified == [(1.5, 1.0, 1)]
    assert trainer.get_epsilon() <= limit


class _Interrupt(TrainerCallback):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def on_step_end(self, args, state, control, **kwargs):
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_hooks_run_leaves_no_hooks_on_the_model(tmp_path, exc):
    """A hooks run that failed mid-train left Opacus' hooks on the user's model, and the next DPTrainer on it
    failed with "Trying to add hooks twice"."""
    model = tiny_lora_model("llama")
    dp = DPConfig(noise_multiplier=1.0, per_sample_method="hooks", noise_seed=0, sampler_seed=0)
    trainer = _trainer(tmp_path, model=model, max_steps=3, dp=dp)
    trainer.add_callback(_Interrupt(exc))
    with pytest.raises(type(exc)):
        trainer.train()
    assert trainer.state.global_step == 1 and not hasattr(model, "autograd_grad_sample_hooks")
    again = _trainer(tmp_path, model=model, max_steps=2, dp=dp)
    again.train()
    assert again.dp_method_used == "hooks"
