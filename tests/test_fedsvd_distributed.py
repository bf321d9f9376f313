"""FedSVDCallback under real 2-process CPU runs (accelerate launch, gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Every rank ends bitwise identical, A has orthonormal rows, logits are unchanged by each refactorization and, with
``optimizer_state="reset"``, the optimizer moments are reset (DeepSpeed: the base optimizer's flat state is zeroed).
Under DeepSpeed with bf16 weights: only the refactorized parameters' fp32 masters are written, from the masters, and
Adam's first moments are carried into the new basis through DeepSpeed's flat state.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from launch import DDP_FLAGS, REPO, accelerate_launch, config_flags

from hf_svd_plugins.lora import find_lora_pairs

TESTS = os.path.join(REPO, "tests")

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model, tiny_batches
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from hf_svd_plugins.fedsvd import FedSVDCallback
    from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights

    out = sys.argv[1]
    batch = {{k: v for k, v in tiny_batches(1, 4)[0].items() if k != "labels"}}

    class Logits(TrainerCallback):
        def __init__(self):
            self.logits = {{}}

        @torch.no_grad()
        def on_step_end(self, args, state, control, model=None, **kw):
            was = model.training
            model.eval()
            self.logits[state.global_step] = model(**batch).logits.double()
            model.train(was)

    def base_optimizer(opt):
        while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "refresh_fp32_params"):
            opt = opt.optimizer
        return opt

    class OptState(TrainerCallback):
        # whether the Adam first moments are all zero or absent (DDP: B's state popped; DeepSpeed: flat state zeroed)

        def __init__(self):
            self.empty = {{}}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            base = base_optimizer(optimizer)
            moments = [v for st in base.state.values() for k, v in st.items() if k == "exp_avg"]
            self.empty[state.global_step] = all(float(v.abs().max()) == 0 for v in moments)

    before, after, opt = Logits(), type("After", (Logits,), {{}})(), OptState()
    model = tiny_lora_model("llama", r=4)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=2e-2, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=2, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TinyTokenDataset(n=32), data_collator=pad_collate,
        callbacks=[before, FedSVDCallback(every_n_steps=2, optimizer_state="reset"), after, opt],
    )
    trainer.train()
    rank = trainer.args.process_index
    torch.save(
        {{
            "world_size": trainer.args.world_size,
            "weights": read_lora_weights(find_lora_pairs(model)),
            "logit_diff": max(float((before.logits[s] - after.logits[s]).abs().max()) for s in before.logits),
            "opt_empty": opt.empty,
            "a_trainable": any(p.A.requires_grad for p in find_lora_pairs(model)),
        }},
        os.path.join(out, f"rank{{rank}}.pt"),
    )
    """
)


LAUNCH = {"ddp": DDP_FLAGS, "zero2": config_flags("deepspeed_zero2"), "zero3": config_flags("deepspeed_zero3")}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_callback_two_processes_ranks_identical(tmp_path, mode):
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
        if not os.path.isfile(LAUNCH[mode][1]):
            pytest.skip(f"{LAUNCH[mode][1]} not found")
    script = tmp_path / "fedsvd_train.py"
    script.write_text(SCRIPT.format(tests=TESTS))
    accelerate_launch(LAUNCH[mode], script, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    for name, (a, b) in r0["weights"].items():
        assert torch.equal(r1["weights"][name][0], a) and torch.equal(r1["weights"][name][1], b), name
        gram = a.double() @ a.double().T
        torch.testing.assert_close(gram, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        assert float(b.abs().max()) > 0
    for r in (r0, r1):
        assert r["logit_diff"] < 1e-5
        assert r["opt_empty"] == {1: False, 2: True, 3: False, 4: True}
        assert not r["a_trainable"]


BF16_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from deepspeed.utils import safe_get_full_fp32_param
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from hf_svd_plugins.fedsvd import FedSVDCallback
    from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights, read_optimizer_state

    out, kind = sys.argv[1], sys.argv[2]

    class Odd(torch.nn.Module):
        # LoRA r=3 on a 5 -> 7 Linear: A and B have 15 and 21 entries, which ZeRO-3 splits unevenly over 2 ranks
        def __init__(self):
            super().__init__()
            self.lin, self.head = torch.nn.Linear(5, 7), torch.nn.Linear(7, 97)

        def forward(self, input_ids, attention_mask=None, labels=None):
            x = torch.nn.functional.one_hot(input_ids % 5, 5).to(self.lin.weight.dtype)
            logits = self.head(torch.tanh(self.lin(x)))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            return {{"loss": loss, "logits": logits}}

    def norm_weight(model):  # a trainable parameter that no refactorization touches
        suffix = "model.norm.weight" if kind == "llama" else "head.weight"
        return next(p for n, p in model.named_parameters() if n.endswith(suffix))

    class Masters(TrainerCallback):
        # fp32 masters of every B and of the (trainable, never refactorized) final norm, the 16-bit weights and
        # B's Adam moments, at on_step_end (one instance before the FedSVD callback, one after)

        def __init__(self):
            self.records = {{}}

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            pairs = find_lora_pairs(model)
            self.records[state.global_step] = {{
                "b_master": [safe_get_full_fp32_param(p.B).clone() for p in pairs],
                "norm_master": safe_get_full_fp32_param(norm_weight(model)).clone(),
                "weights": read_lora_weights(pairs),
                "opt_b": read_optimizer_state(optimizer, [p.B for p in pairs]),
            }}

    before, after = Masters(), type("After", (Masters,), {{}})()
    if kind == "llama":
        model = tiny_lora_model("llama", r=4)
    else:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(0)
        model = get_peft_model(Odd(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin"]))
    norm_weight(model).requires_grad_(True)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=2e-2, use_cpu=True, bf16=True,
        report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TinyTokenDataset(n=32), data_collator=pad_collate,
        callbacks=[before, FedSVDCallback(every_n_steps=2), after],
    )
    trainer.train()
    assert find_lora_pairs(model)[0].B.dtype == torch.bfloat16
    torch.save({{"before": before.records, "after": after.records}}, os.path.join(out, f"rank{{trainer.args.process_index}}.pt"))
    """
)


@pytest.mark.distributed
@pytest.mark.parametrize("mode,kind", [("zero2", "llama"), ("zero3", "llama"), ("zero3", "odd")])
def test_deepspeed_bf16_masters_of_only_the_refactorized_weights_are_written(tmp_path, mode, kind):
    """bf16 weights, fp32 masters: a refactorization sets B's masters to the float32 refactorization of B's *master*
    (not of its bf16 copy, not rounded to bf16), leaves every other master bitwise alone (it used to refresh them all
    from the bf16 weights), and carries B's Adam moments into the new basis through DeepSpeed's flat state. ``odd``:
    parameters that ZeRO-3 splits unevenly (DeepSpeed's full-value setter reads past the end there)."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "fedsvd_bf16.py"
    script.write_text(BF16_SCRIPT.format(tests=TESTS))
    accelerate_launch([*LAUNCH[mode], "--mixed_precision", "bf16"], script, tmp_path, kind)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for step in (2, 4):
        rb, ra = r0["before"][step], r0["after"][step]
        assert torch.equal(ra["norm_master"], rb["norm_master"])
        assert not torch.equal(rb["norm_master"], rb["norm_master"].bfloat16().float())  # it has fp32 precision
        for i, name in enumerate(rb["weights"]):
            a_old = rb["weights"][name][0].double().numpy()
            a_new = ra["weights"][name][0].double().numpy()
            b_master = rb["b_master"][i].double().numpy()
            r = a_old.shape[0]
            u, s, vt = np.linalg.svd(b_master @ a_old, full_matrices=False)
            signs = np.sign(np.sum(vt[:r] * a_new, axis=1))  # A' = V^T up to bf16 rounding and a sign per row
            np.testing.assert_allclose(ra["b_master"][i].double().numpy(), u[:, :r] * s[:r] * signs,
                                       rtol=0, atol=1e-6 * s[0])
            w = np.linalg.lstsq(a_old.T, a_new.T, rcond=None)[0]
            m_old = rb["opt_b"][i]["exp_avg"].double().numpy()
            np.testing.assert_allclose(ra["opt_b"][i]["exp_avg"].double().numpy(), m_old @ w, rtol=1e-4,
                                       atol=1e-6 * np.abs(m_old).max())
        other = r1["after"][step]
        assert torch.equal(ra["norm_master"], other["norm_master"])
        assert all(torch.equal(x, y) for x, y in zip(ra["b_master"], other["b_master"], strict=True))


RESUME_SCRIPT = os.path.join(TESTS, "distributed", "fedsvd_resume.py")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_deepspeed_resume_brings_back_the_refactorized_a(tmp_path, mode):
    """transformers' DeepSpeed checkpoint of a PEFT model leaves frozen parameters out, and under ZeRO-3 so does its
    adapter save: FedSVD's frozen but refactorized A used to come back as the *initial* A on resume (B then pairs with
    the wrong A) and to be missing from the ZeRO-3 adapter. Reference: the uninterrupted run (launch 1: 4 steps,
    refactorize every 2, checkpoint every 2); launch 2 resumes from its checkpoint-2 to step 4. On the code before the
    fix: A after resume was the initial A (B @ A jumped by 0.02, final A off by 0.69) and the ZeRO-3 adapter files
    held only lora_B."""
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny import tiny_model

    accelerate_launch(LAUNCH[mode], RESUME_SCRIPT, tmp_path, "full")
    accelerate_launch(LAUNCH[mode], RESUME_SCRIPT, tmp_path, "resume")
    full = torch.load(tmp_path / "full_rank0.pt", weights_only=False)
    resumed = [torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=False) for r in (0, 1)]
    step2 = full["weights"][2]
    for name, (a2, b2) in step2.items():
        gram = a2.double() @ a2.double().T  # step 2 refactorized A: orthonormal rows, so not the initial A
        torch.testing.assert_close(gram, torch.eye(a2.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        for r in resumed:
            a_begin, b_begin = r["weights"]["begin"][name]
            assert torch.equal(a_begin, a2), f"{name}: A after resume is not the A saved at checkpoint-2"
            torch.testing.assert_close((b_begin @ a_begin).double(), (b2 @ a2).double(), atol=1e-6, rtol=0)
            for got, want in zip(r["final"][name], full["final"][name], strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not resumed[0]["fedsvd_warnings"], resumed[0]["fedsvd_warnings"]
    saved_a = load_file(tmp_path / "checkpoint-2" / "fedsvd_lora_A.safetensors")
    assert set(saved_a) == {f"{name}.lora_A.weight" for name in step2}
    assert all(torch.equal(saved_a[f"{name}.lora_A.weight"], a2) for name, (a2, _) in step2.items())
    if mode == "zero3":  # load_best_model_at_end: the best checkpoint's B used to sit next to the last A
        accelerate_launch(LAUNCH[mode], RESUME_SCRIPT, tmp_path, "best")
        best = torch.load(tmp_path / "best" / "best_rank0.pt", weights_only=False)
        assert best["best_model_checkpoint"].endswith("checkpoint-2")
        assert not best["fedsvd_warnings"], best["fedsvd_warnings"]
        for name, (a2, b2) in step2.items():
            torch.testing.assert_close(best["final"][name][0], a2, atol=1e-6, rtol=0)
            torch.testing.assert_close(best["final"][name][1], b2, atol=1e-6, rtol=0)
    # the final adapters (and under ZeRO-3 the checkpoint's own) reload with PEFT and hold the refactorized A
    for folder in ("final_full", "final_resume", "checkpoint-4"):
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / folder))
        pairs = {p.name: p for p in find_lora_pairs(reloaded)}
        assert set(pairs) == set(full["final"]), folder
        for name, (a, b) in full["final"].items():
            torch.testing.assert_close(pairs[name].A.detach(), a, atol=1e-6, rtol=0, msg=f"{folder} {name} A")
            torch.testing.assert_close(pairs[name].B.detach(), b, atol=1e-5, rtol=1e-5, msg=f"{folder} {name} B")
            gram = pairs[name].A.detach().double() @ pairs[name].A.detach().double().T
            torch.testing.assert_close(gram, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
