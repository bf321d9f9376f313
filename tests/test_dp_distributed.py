"""DP across processes.

- Every collective of the DP code goes through ``hf_svd_plugins.distributed`` (so tensors land on the process
  group's device: NCCL needs CUDA tensors), checked statically and with a stand-in process group in one process;
  a failure on one rank is raised on every rank at the step instead of leaving the others in the all-reduce.
- Real 2-process CPU runs under `accelerate launch` (DDP, DeepSpeed ZeRO-1 and ZeRO-2, ZeRO-2 with gradient
  accumulation 2): both ranks end with identical parameters, the noise is added once (the run equals one process
  with the same logical batch), and epsilon is the same; DeepSpeed's own clipping is off in the engine while the
  user's DeepSpeed config is left as it was; under DDP a run resumed (explicit seeds: the same streams) from a step-2
  checkpoint copied into a new directory ends as the uninterrupted one. Secret seeds are the same
  on both ranks; empty micro-batches on one rank (batch 1, accumulation 2) neither crash nor hang; a planted
  failure on rank 1 stops both ranks with an error.
"""

from __future__ import annotations

import ast
import glob
import os
import textwrap
import types

import pytest
import torch
from launch import DDP_FLAGS, REPO, accelerate_launch, config_flags
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
from transformers import TrainingArguments

from hf_svd_plugins import distributed as hd
from hf_svd_plugins.dp import DPConfig, DPTrainer
from hf_svd_plugins.dp.per_sample import trainable_parameters
from hf_svd_plugins.dp.release import RankFailedError

pytestmark = pytest.mark.filterwarnings("ignore:DPConfig\\((noise|sampler)_seed")
COLLECTIVES = {"broadcast", "all_reduce", "all_gather", "all_gather_object", "reduce", "gather", "scatter", "barrier",
               "broadcast_object_list", "reduce_scatter", "all_to_all", "send", "recv"}


def test_dp_code_has_no_collective_outside_the_helper():
    """No module of hf_svd_plugins/dp imports torch.distributed (or accelerate's gather helpers) or calls a
    collective by name: they all go through hf_svd_plugins.distributed."""
    offenders = []
    for path in sorted(glob.glob(os.path.join(REPO, "hf_svd_plugins", "dp", "*.py"))):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                names = [f"<call>.{node.attr}"]
            else:
                continue
            bad = [n for n in names if n.startswith(("torch.distributed", "accelerate.utils.operations", "<call>"))]
            offenders += [f"{os.path.basename(path)}:{node.lineno} {n}" for n in bad]
    assert offenders == []


class _Handed(Exception):
    pass


def _tiny_dp(tmp_path, **dp_kw) -> DPTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.05,
                             optim="sgd", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             max_grad_norm=0.0)
    return DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                     data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0, **dp_kw))


class FakeGroup:
    """A stand-in for a 2-process group, as seen through ``hf_svd_plugins.distributed``: rank 0 broadcasts ``1000 +
    k`` for its k-th broadcast; the peer's all-reduce contribution is ``peer(tensor)`` (default: zeros)."""

    ReduceOp = types.SimpleNamespace(SUM="sum")

    def __init__(self, peer=None) -> None:
        self.calls: list[tuple] = []
        self.peer = peer or torch.zeros_like

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def get_rank(self, group=None):
        return 0

    def get_backend(self, group=None):
        return "gloo"

    def broadcast(self, tensor, src=0, group=None):
        self.calls.append(("broadcast", tensor.device, tensor.dtype, tensor.numel()))
        tensor.fill_(1000 + sum(c[0] == "broadcast" for c in self.calls))

    def all_reduce(self, tensor, op=None, group=None):
        self.calls.append(("all_reduce", tensor.device, tensor.dtype, tensor.numel(), float(tensor[-1])))
        tensor += self.peer(tensor)


def test_dp_collectives_use_the_helper_and_its_group_device(tmp_path, monkeypatch):
    """With a stand-in group: the three secret seeds (noise, stream id, sampler) come from rank 0's broadcasts; each
    optimizer step runs exactly one all-reduce of every accumulator plus the failure flag; and with a group device
    other than the tensors' own (meta here, CUDA under NCCL), what reaches the collective is on that device."""
    group = FakeGroup()
    monkeypatch.setattr(hd, "dist", group)
    trainer = _tiny_dp(tmp_path)
    assert [c[:3] for c in group.calls] == [("broadcast", torch.device("cpu"), torch.int64)] * 3
    assert trainer._dp_sampler_seed == 1003 and trainer._dp_lineage == 1002
    assert torch.equal(trainer._dp_release.generator.get_state(), torch.Generator().manual_seed(1001).get_state())
    group.calls.clear()
    trainer.train()
    numel = sum(p.numel() for p in trainable_parameters(trainer.model).values())
    assert group.calls == [("all_reduce", torch.device("cpu"), torch.float32, numel + 1, 0.0)] * 2

    def handed(tensor, *args, **kwargs):
        group.calls.append(tensor.device)
        raise _Handed

    monkeypatch.setattr(hd, "collective_device", lambda group=None: torch.device("meta"))
    for name in ("broadcast", "all_reduce"):
        monkeypatch.setattr(group, name, handed)
    group.calls.clear()
    with pytest.raises(_Handed):
        _tiny_dp(tmp_path)  # the first seed broadcast
    with pytest.raises(_Handed):
        trainer.train()  # the first step's all-reduce
    assert group.calls == [torch.device("meta")] * 2


def test_a_failure_on_any_rank_stops_every_rank_at_the_step(tmp_path, monkeypatch):
    """A rank that fails records the failure and sends it with the all-reduce (its flag is 1); a rank whose peer
    failed raises RankFailedError at that step, instead of waiting for a peer that never comes."""
    peer_failed = FakeGroup(peer=lambda t: torch.cat([torch.zeros(t.numel() - 1), torch.ones(1)]))
    monkeypatch.setattr(hd, "dist", peer_failed)
    trainer = _tiny_dp(tmp_path, sampler_seed=0)
    with pytest.raises(RankFailedError, match="another rank failed"):
        trainer.train()
    assert trainer.state.global_step == 0 and trainer.accountant.steps == 0

    own = FakeGroup()
    monkeypatch.setattr(hd, "dist", own)
    trainer = _tiny_dp(tmp_path, sampler_seed=0)

    def planted(*args, **kwargs):
        raise ValueError("planted failure")

    monkeypatch.setattr(trainer._dp_engine, "compute", planted)
    with pytest.raises(ValueError, match="planted failure"):
        trainer.train()
    assert own.calls[-1][0] == "all_reduce" and own.calls[-1][-1] == 1.0  # the flag went out before raising

SCRIPT = textwrap.dedent(
    """
    import copy, os, shutil, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests_dir!r})
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
    from transformers import TrainingArguments
    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.dp.checkpoint import private_state_path
    from hf_svd_plugins.dp.per_sample import trainable_parameters

    out_dir, per_device, ga, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "resume"
    for method in sys.argv[4].split(","):
        # the first run also saves checkpoint-2 (and -3); with `resume`, a fresh trainer resumes from checkpoint-2
        # ("<method>_resumed") copied alone with its private DP state into a new directory. The explicit seeds
        # restore both streams, so it is the uninterrupted run (with secret seeds a resume draws fresh ones; next to
        # checkpoint-3 of the same run, resuming an explicit noise seed from checkpoint-2 would be refused)
        for run in [method] + ([method + "_resumed"] if resume else []):
            run_dir = os.path.join(out_dir, run)
            if run != method:
                if trainer.args.process_index == 0:
                    source = os.path.join(out_dir, method, "checkpoint-2")
                    shutil.copytree(source, os.path.join(run_dir, "checkpoint-2"))
                    target = private_state_path(os.path.join(run_dir, "checkpoint-2"))
                    os.makedirs(os.path.dirname(target))
                    shutil.copy(private_state_path(source), target)
                trainer.accelerator.wait_for_everyone()
            args = TrainingArguments(
                output_dir=run_dir, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=ga, max_steps=3, learning_rate=0.05, optim="sgd",
                lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="steps" if resume else "no",
                save_steps=2, logging_steps=100, disable_tqdm=True, seed=0, max_grad_norm=0.0,
            )
            dp = DPConfig(noise_multiplier=1.0, max_grad_norm=0.5, noise_seed=0, sampler_seed=0, per_sample_method=method)
            user_plugin = args.deepspeed_plugin
            user_config = copy.deepcopy(user_plugin.deepspeed_config) if user_plugin is not None else None
            trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                                data_collator=pad_collate, dp_config=dp)
            # DP switches DeepSpeed's own clipping off on its copy only
            user_untouched = user_plugin is None or user_plugin.deepspeed_config == user_config
            trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2") if run != method else None)
            params = {{n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}}
            plugin = trainer.accelerator.state.deepspeed_plugin
            engine_clip = trainer.model_wrapped.gradient_clipping() if plugin is not None else None
            torch.save({{"params": params, "epsilon": trainer.get_epsilon(), "world": args.world_size,
                         "zero_stage": plugin.zero_stage if plugin is not None else None,
                         "user_untouched": user_untouched, "engine_clip": engine_clip,
                         "ga": plugin.deepspeed_config["gradient_accumulation_steps"] if plugin is not None else ga,
                         "history": trainer.accountant.history, "noise_state": trainer._dp_release.generator.get_state()}},
                       os.path.join(out_dir, f"rank{{args.process_index}}_{{run}}.pt"))
    """
)


def _deepspeed_flags(stage: int, ga: int) -> list[str]:
    return ["--use_deepspeed", "--zero_stage", str(stage), "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--gradient_accumulation_steps", str(ga), "--offload_optimizer_device", "none",
            "--offload_param_device", "none", "--zero3_init_flag", "false"]


LAUNCH = {"ddp": DDP_FLAGS, "zero2": config_flags("deepspeed_zero2"), "zero1": _deepspeed_flags(1, 1),
          "zero2_ga2": _deepspeed_flags(2, 2)}
# (per-device batch, gradient accumulation, per-sample methods): 2 x 2 x 2 ranks = 8 = 4 x 2 x 1 process. The
# shipped ZeRO-2 config fixes gradient accumulation to 1 (4 x 1 x 2 = 8 x 1 x 1), so accumulation under DeepSpeed
# runs with flags (zero2_ga2: 2 x 2 x 2); Opacus hooks are refused under DeepSpeed.
SETUPS = {"ddp": (2, 2, ("vmap", "hooks")), "zero2": (4, 1, ("vmap",)), "zero1": (4, 1, ("vmap", "loop")),
          "zero2_ga2": (2, 2, ("vmap",))}
ZERO_STAGE = {"ddp": None, "zero2": 2, "zero1": 1, "zero2_ga2": 2}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero1", "zero2_ga2"])
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
        assert r0["zero_stage"] == ZERO_STAGE[mode] and r0["ga"] == ga
        assert r0["user_untouched"] and r0["engine_clip"] in (None, 0.0)
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
    args = TrainingArguments(
        output_dir=str(tmp_path / "single"), per_device_train_batch_size=2 * per_device, gradient_accumulation_steps=ga,
        max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0, max_grad_norm=0.0,
    )
    single = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=32),
                       data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=0.5,
                                                                     noise_seed=0, sampler_seed=0))
    single.train()
    for r0, _ in runs.values():
        assert single.accountant.history == r0["history"] == [(1.0, 0.25, 3)]
        assert single.get_epsilon() == pytest.approx(r0["epsilon"], rel=1e-12)
        assert torch.equal(single._dp_release.generator.get_state(), r0["noise_state"])
        for n, p in trainable_parameters(single.model).items():
            torch.testing.assert_close(p.detach(), r0["params"][n], rtol=1e-5, atol=1e-6, msg=n)


EDGE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests_dir!r})
    from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
    from transformers import TrainingArguments
    import hf_svd_plugins.dp.trainer as dp_trainer
    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.dp.per_sample import trainable_parameters

    out_dir = sys.argv[1]
    empty = [0]
    is_empty = dp_trainer.is_empty_batch

    def counting(inputs):
        found = is_empty(inputs)
        empty[0] += int(found)
        return found

    dp_trainer.is_empty_batch = counting
    result = {{}}
    # batch 1 x accumulation 2 x 2 ranks = 4 of 64 examples: most micro-batches hold 0 or 1 example, independently
    # on each rank; default (secret) seeds
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=6, learning_rate=0.05, optim="sgd", report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, max_grad_norm=0.0, ddp_timeout=120,
                             include_num_input_tokens_seen="all")
    trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=64),
                        data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0))
    trainer.train()
    result.update(params={{n: p.detach().clone() for n, p in trainable_parameters(trainer.model).items()}},
                  sampler_seed=trainer._dp_sampler_seed, noise_state=trainer._dp_release.generator.get_state(),
                  steps=trainer.accountant.steps, empty=empty[0], world=args.world_size)
    # a failure planted on rank 1 only, in its first micro-batch with examples
    trainer = DPTrainer(model=tiny_lora_model("llama"), args=args, train_dataset=TinyTokenDataset(n=64),
                        data_collator=pad_collate, dp_config=DPConfig(noise_multiplier=1.0))
    if args.process_index == 1:
        def planted(*a, **k):
            raise ValueError("planted failure on rank 1")
        trainer._dp_engine.compute = planted
    try:
        trainer.train()
        result["failure"] = None
    except Exception as exc:
        result["failure"] = type(exc).__name__ + ": " + str(exc)
    torch.save(result, os.path.join(out_dir, f"rank{{args.process_index}}.pt"))
    """
)


@pytest.mark.distributed
def test_two_processes_secret_seeds_empty_micro_batches_and_a_failing_rank(tmp_path):
    script = tmp_path / "dp_edges.py"
    script.write_text(EDGE_SCRIPT.format(tests_dir=os.path.join(REPO, "tests")))
    accelerate_launch(DDP_FLAGS, script, tmp_path, timeout=600)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["sampler_seed"] == r1["sampler_seed"] and torch.equal(r0["noise_state"], r1["noise_state"])
    assert r0["steps"] == r1["steps"] == 6
    assert r0["empty"] + r1["empty"] > 0  # some micro-batches were empty, on one rank or both
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n
    assert r1["failure"] == "ValueError: planted failure on rank 1"
    assert r0["failure"].startswith("RankFailedError")
