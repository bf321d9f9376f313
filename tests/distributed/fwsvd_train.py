"""Run by tests/test_fwsvd_distributed.py under `accelerate launch` (2 processes): FisherCallback in a real Trainer.

The Trainer is tests/distributed/fsdp_train.py's ``CpuFsdp2Trainer``: a plain Trainer under DDP and DeepSpeed, real
FSDP2 (``fully_shard``, DTensor shards) when launched with accelerate_configs/fsdp.yaml on this CPU-only machine.

Two callbacks: one in mode "train" (the Trainer's own batches, gradient accumulation 2), one in mode "end" (2 batches
of the train dataloader at on_train_end) that also compresses a copy of the model and saves it. lr=0 keeps the
weights fixed, so the test can replay every batch in one process. Each rank writes OUT/rank{r}.pt with both Fisher
sums, the batches it read, the logits of the Trainer's model on a fixed batch after training, whether FSDP2 was
active, and the logits of ``fwsvd_compress(trainer.model, "whiten", ...)`` on each rank's own calibration batches.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from fsdp_train import CpuFsdp2Trainer, Sharding  # noqa: E402
from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from hf_svd_plugins import FisherCallback, fwsvd_compress  # noqa: E402
from hf_svd_plugins.distributed import process_rank  # noqa: E402


def main(out: str) -> None:
    model = tiny_lora_model("llama", r=4, spectral_decay=0.8)
    seen = {"train": [], "end": []}

    def record(module, args, kwargs):
        if torch.is_grad_enabled():
            batch = {k: kwargs[k].detach().cpu().clone() for k in ("input_ids", "attention_mask", "labels")}
            seen["train" if module.training else "end"].append(batch)

    model.register_forward_pre_hook(record, with_kwargs=True)
    during = FisherCallback(mode="train")
    at_end = FisherCallback(mode="end", max_batches=2, compress_ratio=0.5, output_dir=os.path.join(out, "compressed"))
    args = TrainingArguments(out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                             learning_rate=0.0, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                             seed=0)
    trainer_ref: list = []
    sharding = Sharding(trainer_ref)
    trainer = CpuFsdp2Trainer(model=model, args=args, train_dataset=TinyTokenDataset(n=64), data_collator=pad_collate,
                              callbacks=[during, at_end, sharding])
    trainer_ref.append(trainer)
    trainer.train()
    batch = {k: v for k, v in tiny_batches(1, seed=9)[0].items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():  # the Trainer's model after both callbacks: intact and usable (every rank runs it)
        logits = trainer.model(**batch).logits
    # last, because under DDP/ZeRO-2 it merges the Trainer's PEFT model in place: whitening on each rank's own
    # calibration batches (Grams all-reduced); under ZeRO-3/FSDP2 rank 0 compresses a gathered copy
    calibration = tiny_batches(2, seed=10 + process_rank())
    whitened = fwsvd_compress(trainer.model, "whiten", calibration=calibration, ratio=0.5, progress=False)
    whitened_logits = None
    if whitened.model is not None:
        with torch.no_grad():
            whitened_logits = whitened.model.eval()(**batch).logits
    torch.save({"logits": logits, "calibration": calibration, "whitened_logits": whitened_logits, "train": during.fisher, "end": at_end.fisher, "seen": seen, "batches": (during.batches, at_end.batches),
                "ranks": None if at_end.report is None else at_end.report.ranks,
                "world": int(os.environ.get("WORLD_SIZE", "1")), "sharding": sharding.seen},
               os.path.join(out, f"rank{process_rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
