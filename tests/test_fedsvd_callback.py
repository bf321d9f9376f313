"""FedSVDCallback inside real Trainers on tiny models: function unchanged, optimizer state reset, logs, resume, TRL.

The checkpoint A file (resume under DeepSpeed, run ids, the final adapter) is tested in test_fedsvd_checkpoints.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.fedsvd import FedSVDCallback, freeze_lora_A, refactorize_lora_model
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(tmp_path, max_steps=4, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=max_steps,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Probe(TrainerCallback):
    """Records logits on a fixed batch, LoRA weights and B's optimizer state at every ``on_step_end``."""

    def __init__(self, batch: dict):
        self.batch = batch
        self.records: list[dict] = []

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        was_training = model.training
        model.eval()
        logits = model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits.double()
        model.train(was_training)
        pairs = find_lora_pairs(model)
        opt_state = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p.B, {}).items()} for p in pairs
        ]
        self.records.append(
            {"step": state.global_step, "logits": logits, "weights": read_lora_weights(pairs), "opt_b": opt_state}
        )


class StopAt(TrainerCallback):
    """Stops training after optimizer step ``step`` (after that step's checkpoint, if it has one): a killed run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_callback_keeps_logits_and_resets_optimizer_state(tmp_path, kind):
    model = tiny_lora_model(kind, r=4)
    batch = tiny_batches(1, 4)[0]
    before, after = Probe(batch), type("ProbeAfter", (Probe,), {})(batch)
    cb = FedSVDCallback(every_n_steps=2, optimizer_state="reset", log_top_singular_values=2)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=4),
        train_dataset=TinyTokenDataset(n=32),
        data_collator=pad_collate,
        callbacks=[before, cb, after],
    )
    pairs = find_lora_pairs(model)
    a0 = {p.name: p.A.detach().clone() for p in pairs}
    assert not any(p.A.requires_grad for p in pairs) and all(p.B.requires_grad for p in pairs)
    trainer.train()

    assert cb.n_refactorizations == 2 and cb.last_step == 4
    for rb, ra in zip(before.records, after.records, strict=True):
        step = rb["step"]
        # the model's function is unchanged by the refactorization (to float32 round-off)
        scale = float(rb["logits"].abs().max())
        assert float((rb["logits"] - ra["logits"]).abs().max()) < 1e-5 * max(1.0, scale), step
        for name in rb["weights"]:
            (a_b, b_b), (a_a, b_a) = rb["weights"][name], ra["weights"][name]
            np.testing.assert_allclose(
                (b_a.double() @ a_a.double()).numpy(), (b_b.double() @ a_b.double()).numpy(), atol=1e-6
            )
            if step % 2 == 0:
                # A has orthonormal rows after a refactorization, and it differs from the frozen initial A
                gram = (a_a.double() @ a_a.double().T).numpy()
                np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-5)
                assert not torch.allclose(a_a, a0[name])
            else:
                # odd steps: nothing happens, and A is frozen
                assert torch.equal(a_a, a_b) and torch.equal(b_a, b_b)
        # B had Adam moments before; they are gone right after a refactorization, untouched otherwise
        assert all("exp_avg" in s for s in rb["opt_b"])
        if step % 2 == 0:
            assert all(s == {} for s in ra["opt_b"])
        else:
            assert all("exp_avg" in s for s in ra["opt_b"])
    # the step after a reset restarts Adam's step count
    assert all(int(s["step"]) == 1 for s in before.records[2]["opt_b"])

    # the spectrum goes to the Trainer's logs (state.log_history) at the refactorization steps
    logged = [h for h in trainer.state.log_history if "fedsvd/refactorizations" in h]
    assert [h["step"] for h in logged] == [2, 4]
    name = pairs[0].name
    assert f"fedsvd/{name}/sigma_0" in logged[-1] and f"fedsvd/{name}/sigma_1" in logged[-1]
    assert f"fedsvd/{name}/sigma_2" not in logged[-1]
    assert logged[-1][f"fedsvd/{name}/sigma_0"] >= logged[-1][f"fedsvd/{name}/sigma_1"] > 0


def test_callback_keep_optimizer_state_policy_and_unfrozen_a(tmp_path):
    model = tiny_lora_model("llama", r=4)
    batch = tiny_batches(1, 4)[0]
    after = Probe(batch)
    cb = FedSVDCallback(every_n_steps=1, optimizer_state="keep", freeze_a=False, log_top_singular_values=0)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=TinyTokenDataset(n=16),
        data_collator=pad_collate,
        callbacks=[cb, after],
    )
    assert all(p.A.requires_grad for p in find_lora_pairs(model))
    trainer.train()
    assert all("exp_avg" in s for rec in after.records for s in rec["opt_b"])
    logged = [h for h in trainer.state.log_history if "fedsvd/refactorizations" in h]
    assert len(logged) == 2 and not any(k.endswith("sigma_0") for k in logged[-1])


def test_refactorize_lora_model_bert_and_zero_b():
    model = tiny_lora_model("bert", r=4).eval()
    batch = tiny_batches(1, 4, kind="cls")[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    pairs = find_lora_pairs(model)
    # fresh LoRA: B == 0 everywhere, A must be kept
    a0 = {p.name: p.A.detach().clone() for p in pairs}
    spectrum = refactorize_lora_model(model)
    assert all(torch.equal(p.A, a0[p.name]) for p in pairs)
    assert all(float(s.abs().max()) == 0 for s in spectrum.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pairs:
            p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.1)
        ref = model(**inputs).logits.double()
    spectrum = refactorize_lora_model(model)
    with torch.no_grad():
        out = model(**inputs).logits.double()
    assert float((out - ref).abs().max()) < 1e-5
    assert set(spectrum) == {p.name for p in pairs}
    for p in pairs:
        gram = p.A.double() @ p.A.double().T
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)


def test_freeze_lora_a_and_bad_arguments():
    model = tiny_lora_model("gpt2", r=2)
    n = len(find_lora_pairs(model))
    assert freeze_lora_A(model) == n and freeze_lora_A(model) == 0
    with pytest.raises(ValueError, match="no LoRA adapter"):
        freeze_lora_A(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every_n_steps"):
        FedSVDCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="log_top_singular_values"):
        FedSVDCallback(log_top_singular_values=-1)
    with pytest.raises(ValueError, match="reset_optimizer_state"):
        FedSVDCallback(reset_optimizer_state="sometimes")
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        FedSVDCallback(optimizer_state="rotate")
    with pytest.warns(FutureWarning, match="deprecated"):
        assert FedSVDCallback(reset_optimizer_state=True).optimizer_state == "reset"


def test_callback_resume_equals_uninterrupted(tmp_path):
    """Refactorize every 2 steps, checkpoint at step 3, resume: same final weights as one uninterrupted run."""

    def run(out, kill_at=None, resume=None):
        model = tiny_lora_model("llama", r=4)
        callbacks = [FedSVDCallback(every_n_steps=2)] + ([StopAt(kill_at)] if kill_at else [])
        trainer = Trainer(
            model=model,
            args=_args(out, max_steps=5, save_strategy="steps", save_steps=3, logging_steps=2),
            train_dataset=TinyTokenDataset(n=48),
            data_collator=pad_collate,
            callbacks=callbacks,
        )
        trainer.train(resume_from_checkpoint=resume)
        cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, FedSVDCallback))
        return read_lora_weights(find_lora_pairs(model)), cb

    full, cb_full = run(tmp_path / "full")
    run(tmp_path / "part", kill_at=3)  # "killed" right after the step-3 checkpoint
    resumed, cb_res = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-3"))
    assert cb_full.n_refactorizations == cb_res.n_refactorizations == 2
    assert cb_full.last_step == cb_res.last_step == 4
    for name, (a, b) in full.items():
        torch.testing.assert_close(resumed[name][0], a, atol=1e-6, rtol=0)
        torch.testing.assert_close(resumed[name][1], b, atol=1e-6, rtol=0)


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz .,")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_callback_with_trl_sft_trainer(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = _char_tokenizer()
    texts = [f"the cat sat on mat number {w}." for w in ["one", "two", "three", "four", "five", "six"]] * 4
    model = tiny_lora_model("llama", r=4)
    cb = FedSVDCallback(every_n_steps=2)
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=40,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[cb],
    )
    pairs = find_lora_pairs(model)
    assert not any(p.A.requires_grad for p in pairs)
    batch = tokenizer(["the cat sat on mat"], return_tensors="pt")
    trainer.train()
    assert cb.n_refactorizations == 2
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits.double()
        refactorize_lora_model(model)  # already in SVD form: a second pass changes nothing
        out = model(**batch).logits.double()
    assert float((out - ref).abs().max()) < 1e-5
    for p in pairs:
        gram = p.A.double() @ p.A.double().T
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert any("fedsvd/refactorizations" in h for h in trainer.state.log_history)


def test_callback_with_dp_trainer(tmp_path):
    dp = pytest.importorskip("hf_svd_plugins.dp")
    model = tiny_lora_model("bert", r=4)
    batch = tiny_batches(1, 4, kind="cls")[0]
    before, after = Probe(batch), type("ProbeAfter", (Probe,), {})(batch)
    cb = FedSVDCallback(every_n_steps=2, optimizer_state="reset")
    trainer = dp.DPTrainer(
        model=model,
        args=_args(tmp_path, max_steps=4, max_grad_norm=0.0),
        train_dataset=TinyTokenDataset(n=32, kind="cls"),
        data_collator=pad_collate,
        callbacks=[before, cb, after],
        dp_config=dp.DPConfig(
            noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-3, noise_seed=0, per_sample_method="vmap"
        ),
    )
    pairs = find_lora_pairs(model)
    assert not any(p.A.requires_grad for p in pairs)  # frozen before DP collected the trainable parameters
    trainer.train()
    assert cb.n_refactorizations == 2
    for rb, ra in zip(before.records, after.records, strict=True):
        assert float((rb["logits"] - ra["logits"]).abs().max()) < 1e-5
        if rb["step"] % 2 == 0:
            assert all(s == {} for s in ra["opt_b"])
    for p in pairs:
        gram = p.A.double() @ p.A.double().T
        torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert trainer.accountant.steps == 4 and trainer.get_epsilon() > 0


def test_callback_logs_do_not_swallow_the_trainers_loss_log(tmp_path):
    """Trainer.log from inside on_step_end used to clear control.should_log: the step's loss entry vanished."""
    trainer = Trainer(
        model=tiny_lora_model("llama", r=4),
        args=_args(tmp_path, max_steps=4, logging_steps=1),
        train_dataset=TinyTokenDataset(n=32),
        data_collator=pad_collate,
        callbacks=[FedSVDCallback(every_n_steps=2)],
    )
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in trainer.state.log_history if "fedsvd/refactorizations" in h] == [2, 4]


def test_a_callback_reused_for_a_second_train_starts_its_schedule_again(tmp_path):
    """The same FedSVDCallback in a second train() from step 0 (e.g. hyperparameter-search trials): it refactorizes
    at steps 2 and 4 again and counts from 0, instead of skipping the previous run's last step."""
    callback = FedSVDCallback(every_n_steps=2)
    logged = []
    for run in range(2):
        trainer = Trainer(
            model=tiny_lora_model("llama", r=4),
            args=_args(tmp_path / str(run), max_steps=4, logging_steps=1),
            train_dataset=TinyTokenDataset(n=32),
            data_collator=pad_collate,
            callbacks=[callback],
        )
        trainer.train()
        logged.append([(h["step"], h["fedsvd/refactorizations"]) for h in trainer.state.log_history
                       if "fedsvd/refactorizations" in h])
    assert logged == [[(2, 1.0), (4, 2.0)], [(2, 1.0), (4, 2.0)]]
    assert callback.n_refactorizations == 2 and callback.last_step == 4


def test_refactorize_in_chunks_equals_all_at_once(monkeypatch):
    """Pairs are gathered and refactorized in bounded chunks; one pair per chunk gives the same weights."""
    import hf_svd_plugins.fedsvd.callback as callback

    whole, chunked = tiny_lora_model("llama", r=4), tiny_lora_model("llama", r=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p, q in zip(find_lora_pairs(whole), find_lora_pairs(chunked), strict=True):
            q.B.copy_(p.B.copy_(torch.randn(p.B.shape, generator=g)))
    refactorize_lora_model(whole)
    monkeypatch.setattr(callback, "_CHUNK_NUMEL", 1)
    assert len(callback._chunks(find_lora_pairs(chunked))) == len(find_lora_pairs(chunked))
    refactorize_lora_model(chunked)
    a, b = read_lora_weights(find_lora_pairs(whole)), read_lora_weights(find_lora_pairs(chunked))
    assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
