"""Run by tests/test_eva_distributed.py under `accelerate launch` (2 processes): EVA in a real Trainer.

Each rank records the batches EVA read and, after training, writes its full LoRA weights (gathered under ZeRO-3)
and EVA's ranks to OUT/rank{r}.pt, so the test can compare ranks and replay EVA in one process.
Arguments: OUT, the number of EVA batches, and EvaConfig.statistics ("auto" keeps these narrow layers exact;
"sketch" forces l = 2 r_max = 16 sketch rows, below every width).
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from tiny import TinyTokenDataset, pad_collate, tiny_lora_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_svd_plugins import EvaCallback  # noqa: E402
from hf_svd_plugins.distributed import process_rank  # noqa: E402
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights  # noqa: E402


class RecordingEvaCallback(EvaCallback):
    """Keeps a copy of every batch EVA reads on this rank."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.seen = []
        outer = self

        class Recorder:
            def __iter__(self):
                for batch in train_dataloader:
                    outer.seen.append({k: v.clone().cpu() for k, v in batch.items()})
                    yield batch

        result = super().on_train_begin(args, state, control, train_dataloader=Recorder(), **kwargs)
        self.initial = read_lora_weights(find_lora_pairs(kwargs["model"]))
        return result


def main(out: str, n_eva_batches: int, statistics: str = "auto") -> None:
    model = tiny_lora_model("llama", r=4, spectral_decay=0.7)
    sketch = {"statistics": "sketch", "sketch_factor": 2} if statistics == "sketch" else {}
    callback = RecordingEvaCallback(rho=2.0, tau=1.0, min_batches=n_eva_batches, max_batches=n_eva_batches,
                                    show_progress_bar=False, **sketch)
    args = TrainingArguments(out, per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TinyTokenDataset(n=64), data_collator=pad_collate,
                      callbacks=[callback])
    trainer.train()
    weights = read_lora_weights(find_lora_pairs(trainer.model))
    trainer.save_model(os.path.join(out, "final"))
    from tiny import tiny_batches

    batch = tiny_batches(1, seed=9)[0]
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits  # every rank runs the forward (ZeRO-3 gathers collectively)
    torch.save({"weights": weights, "ranks": callback.ranks, "seen": callback.seen, "initial": callback.initial,
                "statistics": callback.result.statistics, "communication": callback.result.communication,
                "steps": trainer.state.global_step, "logits": logits, "batch": batch,
                "world": int(os.environ.get("WORLD_SIZE", "1"))}, os.path.join(out, f"rank{process_rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
