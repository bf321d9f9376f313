"""Run by tests/test_fsdp_callbacks.py: EvaCallback or FedSVDCallback in a real Trainer under FSDP2, or in one process.

    accelerate launch --config_file accelerate_configs/fsdp.yaml tests/distributed/fsdp_train.py OUT {eva,fedsvd}
    python tests/distributed/fsdp_train.py OUT {eva,fedsvd} --single     # the one-process reference (batch 2 x 4)

With ``--native`` the base model is sharded by transformers itself at load time (``from_pretrained(...,
distributed_config=DistributedConfig(fsdp_size=2))``, launched as plain 2-process DDP): the route transformers 5.24
supports on CPU. Base weights are then DTensors and the LoRA weights, added afterwards, plain replicated tensors
that the Trainer keeps in sync (``--single --native`` is its one-process reference, same weights).

accelerate 1.15 enables FSDP only on GPU-class devices: on a CPU machine the FSDP config of `accelerate launch` is
read into the environment but ``AcceleratorState`` stays ``MULTI_CPU`` and the Trainer wraps the model in DDP. On a
CPU, :class:`CpuFsdp2Trainer` sets the state the launcher sets on GPUs (distributed type FSDP with the plugin read
from the launcher's ``FSDP_*`` variables), so accelerate's own FSDP2 preparation (``fully_shard`` per decoder layer
and the root, on a CPU device mesh over gloo) runs exactly as it does on GPUs. On a GPU machine it is a plain Trainer.

Every rank writes OUT/rank{r}.pt (OUT/single.pt): full LoRA weights after training, EVA's ranks, logits on a fixed
batch, and what it saw of FSDP2 (DTensor LoRA weights, accelerate's FSDP2 flag); ``trainer.save_model`` writes the
adapter to OUT/final (OUT/final_single).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_svd_plugins import EvaCallback, FedSVDCallback  # noqa: E402
from hf_svd_plugins.distributed import process_rank  # noqa: E402
from hf_svd_plugins.lora import find_lora_pairs, is_dtensor, read_lora_weights  # noqa: E402

N_EVA_BATCHES = 3
STEPS = 6


class CpuFsdp2Trainer(Trainer):
    """A Trainer that, on a CPU-only machine under `accelerate launch` with an FSDP config, really uses FSDP2."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # fsdp_version etc. from the launcher's FSDP_* env
            state.distributed_type = DistributedType.FSDP
            # as AcceleratorState does on GPUs, so that later AcceleratorState() calls keep FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True


class Sharding(TrainerCallback):
    """Whether the LoRA weights are FSDP2 DTensors once training runs (the test's proof that FSDP2 was active)."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref = trainer_ref
        self.seen: dict[str, object] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            pairs = find_lora_pairs(model)
            self.seen = {"dtensor": all(is_dtensor(p.A) and is_dtensor(p.B) for p in pairs),
                         "is_fsdp2": bool(self.trainer_ref[0].accelerator.is_fsdp2),
                         "base_dtensor": all(is_dtensor(p.base_layer.weight) for p in pairs)}


def native_fsdp2_model(out: str, single: bool) -> torch.nn.Module:
    """The tiny Llama saved and reloaded, sharded by transformers over 2 ranks unless ``single``; LoRA on top."""
    from peft import LoraConfig, get_peft_model
    from tiny import TARGETS, tiny_model
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = os.path.join(out, f"base{process_rank() if not single else 's'}")
    tiny_model("llama", spectral_decay=0.7).save_pretrained(path)  # one copy per process: no race between ranks
    config = {} if single else {"distributed_config": DistributedConfig(fsdp_size=2)}
    base = AutoModelForCausalLM.from_pretrained(path, **config)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], lora_dropout=0.0))


def main(out: str, method: str, single: bool, native: bool) -> None:
    model = native_fsdp2_model(out, single) if native else tiny_lora_model("llama", r=4, spectral_decay=0.7)
    if method == "eva":
        callback = EvaCallback(rho=2.0, tau=1.0, min_batches=N_EVA_BATCHES, max_batches=N_EVA_BATCHES,
                               show_progress_bar=False)
    else:
        callback = FedSVDCallback(every_n_steps=2)
    trainer_ref: list = []
    sharding = Sharding(trainer_ref)
    args = TrainingArguments(out, per_device_train_batch_size=8 if single else 4, max_steps=STEPS,
                             learning_rate=5e-3, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=0, logging_steps=STEPS)
    trainer = CpuFsdp2Trainer(model=model, args=args, train_dataset=TinyTokenDataset(n=64), data_collator=pad_collate,
                              callbacks=[callback, sharding])
    trainer_ref.append(trainer)
    trainer.train()
    trainer.save_model(os.path.join(out, "final_single" if single else "final"))  # collective under FSDP2 (full state dict)
    pairs = find_lora_pairs(trainer.model)
    weights = read_lora_weights(pairs)
    batch = {k: v for k, v in tiny_batches(1, seed=9)[0].items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(**batch).logits  # every rank runs the forward (FSDP2 gathers collectively)
    result = {"weights": weights, "logits": logits, "steps": trainer.state.global_step, "sharding": sharding.seen,
              "world": int(os.environ.get("WORLD_SIZE", "1")), "ranks": getattr(callback, "ranks", None),
              "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    torch.save(result, os.path.join(out, "single.pt" if single else f"rank{process_rank()}.pt"))
    if not single and torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--single" in sys.argv[3:], "--native" in sys.argv[3:])
