"""PermutationMergeCallback inside a real Trainer, and the `hf-svd merge` CLI on save_pretrained checkpoints."""

from __future__ import annotations

import pytest
import transformers as tf
from test_merging_specs import permuted_copy
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model, tiny_model, tiny_tokenizer

from hf_svd_plugins import PermutationMergeCallback
from hf_svd_plugins.cli import main
from hf_svd_plugins.merging.inputs import model_state


def _max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(model_state(a).values(), model_state(b).values(),
                                                         strict=True))


def _trainer(model, tmp_path, callback, eval_dataset=True):
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, learning_rate=0.0,
                                per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=1,
                                save_strategy="no", disable_tqdm=True)
    return tf.Trainer(model=model, args=args, train_dataset=TinyTokenDataset(16),
                      eval_dataset=TinyTokenDataset(8, seed=1) if eval_dataset else None,
                      data_collator=pad_collate, callbacks=[callback])


def test_callback_merges_evaluates_logs_and_saves(tmp_path):
    model = tiny_model("llama")
    _, _, copy = permuted_copy(model, 5)
    _, _, third = permuted_copy(model, 6)
    copy.save_pretrained(tmp_path / "copy")
    callback = PermutationMergeCallback(others=[tmp_path / "copy", third], output_dir=tmp_path / "merged")
    trainer = _trainer(model, tmp_path, callback)
    trainer.train()  # learning rate 0: the trained model is the model the copies were permuted from
    assert _max_diff(callback.merged_model, model) < 1e-6
    logged = next(h for h in trainer.state.log_history if "merge/eval_loss" in h)
    assert logged["merge/models"] == 3
    assert logged["merge/eval_loss"] == pytest.approx(logged["merge/eval_loss_trained"], rel=1e-5)
    reloaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert _max_diff(reloaded, model) < 1e-6
    assert trainer.model is model  # the Trainer's model is left as trained


def test_callback_activation_matching_reads_train_batches(tmp_path):
    model = tiny_model("gpt2")
    _, _, copy = permuted_copy(model, 7)
    callback = PermutationMergeCallback(others=[copy], method="activation", num_batches=2)
    assert callback.reads_train_data
    assert not PermutationMergeCallback(others=[copy]).reads_train_data
    trainer = _trainer(model, tmp_path, callback, eval_dataset=False)
    trainer.train()
    assert _max_diff(callback.merged_model, model) < 1e-6
    assert not any("merge/eval_loss" in h for h in trainer.state.log_history)
    assert any("merge/seconds" in h for h in trainer.state.log_history)


def test_callback_refuses_bad_input_early(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        PermutationMergeCallback(others=[tmp_path / "missing"])
    with pytest.raises(ValueError, match="non-empty list"):
        PermutationMergeCallback(others=[])
    with pytest.raises(ValueError, match="method"):
        PermutationMergeCallback(others=[tiny_model("llama")], method="average")
    with pytest.raises(ValueError, match="3 values for 2 models"):
        PermutationMergeCallback(others=[tiny_model("llama")], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="merge_and_unload"):
        PermutationMergeCallback(others=[tiny_lora_model("llama")])
    gpt2_dir = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2_dir)
    trainer = _trainer(tiny_model("llama"), tmp_path, PermutationMergeCallback(others=[gpt2_dir]))
    with pytest.raises(ValueError, match="'gpt2' model"):
        trainer.train()
    trainer = _trainer(tiny_lora_model("llama"), tmp_path, PermutationMergeCallback(others=[tiny_model("llama")]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        trainer.train()


def _checkpoint(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_cli_merges_checkpoints_and_reports_the_barrier(tmp_path, capsys):
    model = tiny_model("llama")
    _, _, copy = permuted_copy(model, 5)
    a, b = _checkpoint(model, tmp_path / "a"), _checkpoint(copy, tmp_path / "b")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(i * 7) % 95 + 2}" for i in range(400)))
    out, png = tmp_path / "merged", tmp_path / "curve.png"
    code = main(["merge", a, b, "--out", str(out), "--eval-data", str(text), "--block-size", "16", "--points", "3",
                 "--eval-batches", "2", "--batch-size", "4", "--plot", str(png), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "objective per pass" in printed and "| 0-1 |" in printed and png.stat().st_size > 1000
    after = float(printed.split("| 0-1 |")[1].split("|")[1])
    assert after == pytest.approx(0.0, abs=1e-5)  # aligned copy of the same model: flat path
    merged = tf.LlamaForCausalLM.from_pretrained(out)
    assert _max_diff(merged, model) < 1e-6
    assert (out / "tokenizer.json").exists()


def test_cli_refuses_bad_input(tmp_path, capsys):
    a = _checkpoint(tiny_model("llama"), tmp_path / "a")
    g = _checkpoint(tiny_model("gpt2"), tmp_path / "g")
    wide_cfg = tf.LlamaConfig(**{**tiny_model("llama").config.to_dict(), "intermediate_size": 64})
    w = _checkpoint(tf.LlamaForCausalLM(wide_cfg), tmp_path / "w")
    out = str(tmp_path / "out")
    cases = [([a], "at least 2"), ([a, str(tmp_path / "nope")], "no config.json"), ([a, g], "different config"),
             ([a, w], "intermediate_size"), ([a, a, "--weights", "1"], "--weights has 1 values"),
             ([a, a, "--method", "ste"], "needs --calib-data")]
    for extra, message in cases:
        assert main(["merge", *extra, "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
