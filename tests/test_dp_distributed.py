"""Real 2-process CPU runs of DPTrainer under `accelerate launch` (DDP, DeepSpeed ZeRO-1 and ZeRO-2): both ranks end with
identical parameters, the noise is added once (the run equals one process with the same logical batch), and epsilon
is the same; under DDP a run resumed from a step-2 checkpoint ends as the uninterrupted one."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from launch import DDP_FLAGS, REPO, accelerate_launch, config_flags

SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests_dir!r})
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
    from transformers import TrainingArguments
    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.dp.per_sample import trainable_parameters

    out_dir, per_device, ga, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "resume"
    for method in sys.argv[4].split(","):
        # the first run also saves checkpoint-2; with `resume`, a fresh trainer resumes from it ("<method>_resumed")
        for run in [method] + ([method + "_resumed"] if resume else []):
            args = TrainingArguments(
                output_dir=os.path.join(out_dir, method), per_device_train_batch_size=per_device,
                gradient_accumulation_steps=ga, max_steps=3, learning_rate=0.05, optim="sgd",
                lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="steps" if resume else "no",
                save_steps=2, logging_steps=100, disable_tqdm=True, seed=0, max_grad_norm=0.0,
            )
            dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=0, per_sample_method=method)
            trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                                data_collator=pad_collate, dp_config=dp)
            trainer.train(resume_from_checkpoint=os.path.join(out_dir, method, "checkpoint-2") if run != method else None)
            params = {{n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}}
            plugin = trainer.accelerator.state.deepspeed_plugin
            torch.save({{"params": params, "epsilon": trainer.get_epsilon(), "world": args.world_size,
                         "zero_stage": plugin.zero_stage if plugin is not None else None,
                         "history": trainer.accountant.history, "noise_state": trainer._dp_noise_generator.get_state()}},
                       os.path.join(out_dir, f"rank{{args.process_index}}_{{run}}.pt"))
    """
)


LAUNCH = {
    "ddp": DDP_FLAGS,
    "zero2": config_flags("deepspeed_zero2"),
    "zero1": ["--use_deepspeed", "--zero_stage", "1", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--gradient_accumulation_steps", "1", "--offload_optimizer_device", "none",
              "--offload_param_device", "none", "--zero3_init_flag", "false"],
}  # fmt: skip
# (per-device batch, gradient accumulation, per-sample methods): 2 x 2 x 2 ranks = 8 = 4 x 2 x 1 process. The
# ZeRO-2 config fixes gradient accumulation to 1 (4 x 1 x 2 = 8 x 1 x 1); Opacus hooks are refused under DeepSpeed.
SETUPS = {"ddp": (2, 2, ("vmap", "hooks")), "zero2": (4, 1, ("vmap",)), "zero1": (4, 1, ("vmap", "loop"))}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero1"])
def test_two_processes_match_single_process(tmp_path, mode):
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
        if mode == "zero2" and not os.path.isfile(LAUNCH[mode][1]):
            pytest.skip(f"{LAUNCH[mode][1]} not found")
    per_device, ga, methods = SETUPS[mode]
    tests_dir = os.path.join(REPO, "tests")
    script = tmp_path / "dp_train.py"
    script.write_text(SCRIPT.format(tests_dir=tests_dir))
    accelerate_launch(LAUNCH[mode], script, tmp_path, per_device, ga, ",".join(methods),
                      "resume" if mode == "ddp" else "no-resume", timeout=600)
    runs = {m: [torch.load(tmp_path / f"rank{r}_{m}.pt", weights_only=False) for r in (0, 1)] for m in methods}
    for r0, r1 in runs.values():
        assert r0["world"] == r1["world"] == 2
        assert r0["zero_stage"] == {"ddp": None, "zero2": 2, "zero1": 1}[mode]
        for n in r0["params"]:
            assert torch.equal(r0["params"][n], r1["params"][n]), n
        assert r0["epsilon"] == r1["epsilon"]
        assert torch.equal(r0["noise_state"], r1["noise_state"])
    if mode == "ddp":
        # stopped at step 2 and resumed under DDP: the same privacy spent, noise stream and parameters as uninterrupted
        for m in methods:
            for r in (0, 1):
                resumed, whole = torch.load(tmp_path / f"rank{r}_{m}_resumed.pt", weights_only=False), runs[m][r]
                assert resumed["history"] == whole["history"] and resumed["epsilon"] == whole["epsilon"]
                assert torch.equal(resumed["noise_state"], whole["noise_state"])
                for n, p in whole["params"].items():
                    torch.testing.assert_close(resumed["params"][n], p, rtol=1e-6, atol=1e-7, msg=n)

    # One process, same logical batch and seeds: the same Poisson batches and the same noise, so the same parameters
    # up to float summation order, and the same epsilon.
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
    from transformers import TrainingArguments

    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.dp.per_sample import trainable_parameters

    args = TrainingArguments(
        output_dir=str(tmp_path / "single"), per_device_train_batch_size=2 * per_device, gradient_accumulation_steps=ga,
        max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0, max_grad_norm=0.0,
    )
    single = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                       data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=0.5,
                                                                     noise_seed=0))
    single.train()
    for r0, _ in runs.values():
        assert single.accountant.history == r0["history"] == [(1.0, 0.25, 3)]
        assert single.get_epsilon() == pytest.approx(r0["epsilon"], rel=1e-12)
        assert torch.equal(single._dp_noise_generator.get_state(), r0["noise_state"])
        for n, p in trainable_parameters(single.model).items():
            torch.testing.assert_close(p.detach(), r0["params"][n], rtol=1e-5, atol=1e-6, msg=n)
