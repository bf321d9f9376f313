"""benchmarks/fedsvd_private.py: the per-client batch and the per-example gradient norms it records, against brute
force (one backward per example alone)."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_accumulation_steps_is_the_closest_batch_to_the_sampling_rate():
    from fedsvd_private import accumulation_steps

    for n in (32, 33, 196, 409, 1311, 3713):
        for q in (0.01, 0.15, 0.2, 0.5, 1.0):
            for micro in (8, 32):
                if n < micro:
                    continue
                k = accumulation_steps(n, q, micro)
                feasible = range(1, n // micro + 1)
                best = min(abs(micro * j - q * n) for j in feasible)
                assert k in feasible and abs(micro * k - q * n) == pytest.approx(best), (n, q, micro, k)
    with pytest.raises(ValueError, match="smaller than one micro-batch"):
        accumulation_steps(20, 0.5, 32)


def test_measured_dp_client_records_each_examples_gradient_norms_per_group(tmp_path):
    from dp_lora import make_dp_trainer_class
    from fedsvd_private import round_mechanism, shard_batch_trainer
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_svd_plugins.dp import DPConfig
    from hf_svd_plugins.examples import (
        HiddenStateClassification,
        LabelledText,
        TokenizedClassification,
        collate_hidden_states,
        minilm_dp_lora_classifier,
        minilm_frozen_prefix,
        rotten_tomatoes_rows,
    )

    torch.manual_seed(0)
    model, tok = minilm_dp_lora_classifier(r=2, target_modules=["query", "value"], lora_layers=2,
                                           train_lora_a=False, head_init="random")
    with torch.no_grad():  # B = 0 and a zero head would give B no gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prefix, top = minilm_frozen_prefix(model)
    rows = rotten_tomatoes_rows()
    n = 15  # odd: one median; q = 1 below puts every example in the one logical batch
    data = HiddenStateClassification(TokenizedClassification(LabelledText(rows.text[:n], rows.label[:n]), tok), prefix)

    trainable = {name: p for name, p in top.named_parameters() if p.requires_grad}
    groups = {"lora_B": [k for k in trainable if "lora_B" in k], "head": [k for k in trainable if "lora" not in k]}
    assert groups["lora_B"] and groups["head"] and len(groups["lora_B"]) + len(groups["head"]) == len(trainable)
    reference = {"lora_B": [], "head": [], "all": []}
    top.train()
    for item in data.items:  # brute force: every example alone, unpadded
        top.zero_grad()
        h = item["hidden_states"][None]
        top(hidden_states=h, attention_mask=torch.ones(h.shape[:2], dtype=torch.long),
            labels=torch.tensor([item["labels"]])).loss.backward()
        sq = {g: sum(float(trainable[k].grad.double().pow(2).sum()) for k in names) for g, names in groups.items()}
        reference["lora_B"].append(sq["lora_B"] ** 0.5)
        reference["head"].append(sq["head"] ** 0.5)
        reference["all"].append((sq["lora_B"] + sq["head"]) ** 0.5)
    top.zero_grad()
    reference = {g: np.array(v) for g, v in reference.items()}
    c = float(np.median(reference["all"]))  # about half the examples clipped

    sink: list[dict] = []
    trainer_cls = shard_batch_trainer(make_dp_trainer_class(sink), sample_rate=1.0, micro_batch=5)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=5, max_steps=1, learning_rate=0.0,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
    trainer = trainer_cls(model=top, args=args, train_dataset=data, data_collator=collate_hidden_states,
                          dp_config=DPConfig(max_grad_norm=c, noise_multiplier=1.0, per_sample_method="vmap"))
    trainer.remove_callback(PrinterCallback)
    assert trainer.args.gradient_accumulation_steps == 3 and trainer.sample_rate == 1.0
    assert args.gradient_accumulation_steps == 1  # the caller's arguments are untouched
    trainer.train()

    assert len(sink) == 1 and sink == trainer.bench_log
    rec = sink[0]
    assert rec["batch"] == n
    for group, ref in reference.items():
        np.testing.assert_allclose(rec[f"norm_{group}_mean"], ref.mean(), rtol=1e-4)
        np.testing.assert_allclose(rec[f"norm_{group}_median"], np.median(ref), rtol=1e-4)
        np.testing.assert_allclose(rec[f"norm_{group}_max"], ref.max(), rtol=1e-4)
    assert rec["clipped"] == pytest.approx(float((reference["all"] > c * (1 + 1e-6)).mean()), abs=1.5 / n)
    assert 0 < rec["clipped"] < 1
    summary = round_mechanism(sink + [dict(rec, clipped=0.0, norm_lora_B_max=99.0)])
    assert summary["clipped"] == pytest.approx(rec["clipped"] / 2)
    assert summary["b_norm_median"] == pytest.approx(rec["norm_lora_B_median"]) and summary["b_norm_max"] == 99.0


def test_run_locks_skip_a_live_holder_and_take_over_from_a_dead_one(tmp_path):
    import subprocess

    from run_locks import claim, held, lock_path

    work = str(tmp_path)
    assert claim(work, "run-a") and held(work, "run-a")
    assert not claim(work, "run-a")  # we hold it: another claimant must skip it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock_path(work, "run-b"), "w") as f:
        f.write(str(dead.pid))
    assert not held(work, "run-b")
    assert claim(work, "run-b")  # the holder died: the run is resumed by whoever claims it next
    with open(lock_path(work, "run-b")) as f:
        assert int(f.read()) == os.getpid()
