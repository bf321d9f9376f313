"""Run by tests/test_fedsvd_distributed.py under `accelerate launch` (2 processes, DeepSpeed): FedSVDCallback resumed.

``python fedsvd_resume.py OUT full``: 4 steps, FedSVDCallback(every_n_steps=2) with A frozen (the default), a checkpoint
every 2 steps; OUT/full_rank{r}.pt holds the LoRA weights after step 2 (after its refactorization) and at the end.
``python fedsvd_resume.py OUT resume``: the same Trainer resumed from OUT/checkpoint-2 to step 4; OUT/resume_rank{r}.pt
holds the LoRA weights at ``on_train_begin`` (after FedSVDCallback's) and at the end. ``best``: like ``full`` in OUT/best,
with an evaluation at every checkpoint and ``load_best_model_at_end`` (the highest eval loss wins: step 2's).
All save the final adapter with ``save_full_adapter(trainer, <output_dir>/final_<mode>)``.
"""

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from tiny import TinyTokenDataset, pad_collate, tiny_lora_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_svd_plugins.fedsvd import FedSVDCallback, save_full_adapter  # noqa: E402
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights  # noqa: E402


class Record(TrainerCallback):
    """LoRA weights at train begin and after every step (placed after FedSVDCallback: sees its writes)."""

    def __init__(self):
        self.weights = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights["begin"] = read_lora_weights(find_lora_pairs(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = read_lora_weights(find_lora_pairs(model))


def main(out: str, mode: str) -> None:
    model = tiny_lora_model("llama", r=4)
    record = Record()
    best = {}
    if mode == "best":  # evaluate at every checkpoint; the *highest* eval loss is "best", i.e. step 2's
        out = os.path.join(out, "best")
        best = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss",
                    greater_is_better=True, per_device_eval_batch_size=4)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=2e-2, use_cpu=True, report_to=[],
        save_strategy="steps", save_steps=2, logging_steps=2, disable_tqdm=True, seed=0, **best,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=TinyTokenDataset(n=32), data_collator=pad_collate,
        eval_dataset=TinyTokenDataset(n=8, seed=1) if best else None, callbacks=[FedSVDCallback(every_n_steps=2), record],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2") if mode == "resume" else None)
    save_full_adapter(trainer, os.path.join(out, f"final_{mode}"))
    torch.save(
        {
            "weights": record.weights,
            "final": read_lora_weights(find_lora_pairs(model)),
            "fedsvd_warnings": [str(w.message) for w in caught if "FedSVDCallback" in str(w.message)],
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
        },
        os.path.join(out, f"{mode}_rank{trainer.args.process_index}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
