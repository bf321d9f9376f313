"""Single-node FedSVD (``FedSVDCallback``) side by side with plain LoRA and FFA-LoRA, to choose its defaults.

Packaged all-MiniLM-L6-v2 (real weights) with LoRA on attention and MLP (``examples.minilm_mean_pool_classifier``,
mean pooling as the checkpoint's authors use it, or ``--model cls``: ``examples.minilm_lora_classifier``), fine-tuned
on the Rotten Tomatoes snippets (``examples.rotten_tomatoes``: 3,892 train / 974 test), AdamW, constant learning rate.
Each configuration runs in a fresh model with the same data order per seed; the table reports test accuracy and the
mean training loss of the last 50 steps.

    python benchmarks/fedsvd_callback.py --out /tmp/fedsvd_callback            # all configurations, seeds 0-2
    python benchmarks/fedsvd_callback.py --configs ffa fedsvd_k1_reset --seeds 0   # a quick look

Runs are resumable: each finished run is a JSON file in ``--out``; rerunning skips them and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

# name -> (freeze A, FedSVDCallback kwargs or None)
CONFIGS: dict[str, tuple[bool, dict | None]] = {
    "lora": (False, None),
    "ffa": (True, None),
    "fedsvd_k1_reset": (True, {"every_n_steps": 1, "optimizer_state": "reset"}),
    "fedsvd_k1_keep": (True, {"every_n_steps": 1, "optimizer_state": "keep"}),
    "fedsvd_k1_transform": (True, {"every_n_steps": 1, "optimizer_state": "transform"}),
    "fedsvd_k10_reset": (True, {"every_n_steps": 10, "optimizer_state": "reset"}),
    "fedsvd_k10_transform": (True, {"every_n_steps": 10, "optimizer_state": "transform"}),
    "fedsvd_k50_reset": (True, {"every_n_steps": 50, "optimizer_state": "reset"}),
    "fedsvd_k50_transform": (True, {"every_n_steps": 50, "optimizer_state": "transform"}),
}


def run_one(args, config: str, seed: int) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_svd_plugins import examples
    from hf_svd_plugins.fedsvd import FedSVDCallback, freeze_lora_A

    freeze, callback_kwargs = CONFIGS[config]
    if args.model == "mean_pool":
        model, tokenizer = examples.minilm_mean_pool_classifier(r=args.rank, seed=seed)
    else:
        model, tokenizer = examples.minilm_lora_classifier(r=args.rank, seed=seed)
    if freeze:
        freeze_lora_A(model)
    train, test = examples.rotten_tomatoes(seed=0)
    callbacks = [FedSVDCallback(log_top_singular_values=0, **callback_kwargs)] if callback_kwargs else []
    training_args = TrainingArguments(
        os.path.join(args.out, "scratch"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=seed, per_device_eval_batch_size=64, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=examples.TokenizedClassification(train, tokenizer, max_length=args.max_length),
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    preds = trainer.predict(examples.TokenizedClassification(test, tokenizer, max_length=args.max_length))
    accuracy = float((np.argmax(preds.predictions, -1) == preds.label_ids).mean())
    return {"config": config, "seed": seed, "accuracy": accuracy, "losses": losses,
            "final_loss": float(np.mean(losses[-5:])), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--model", choices=["mean_pool", "cls"], default="mean_pool")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/fedsvd_callback")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    results: dict[str, list[dict]] = {}
    for config in args.configs:
        for seed in args.seeds:
            path = os.path.join(args.out, f"{args.model}_lr{args.lr:g}_steps{args.steps}_{config}_seed{seed}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    row = json.load(f)
            else:
                row = run_one(args, config, seed)
                with open(path + ".tmp", "w") as f:
                    json.dump(row, f)
                os.replace(path + ".tmp", path)
            results.setdefault(config, []).append(row)
            print(f"{config:22s} seed {seed}: accuracy {row['accuracy']:.4f}, last-50-step loss "
                  f"{row['final_loss']:.4f} ({row['seconds']:.0f} s)", flush=True)

    print(f"\nMiniLM ({args.model}) + LoRA r={args.rank}, {args.steps} steps, batch {args.batch_size}, AdamW lr "
          f"{args.lr:g} constant, seeds {' '.join(map(str, args.seeds))}\n")
    print("| configuration | test accuracy (mean ± std) | per seed | last-50-step train loss | seconds per run |")
    print("|---|---|---|---|---|")
    for config, rows in results.items():
        acc = np.array([r["accuracy"] for r in rows])
        print(f"| {config} | {acc.mean():.4f} ± {acc.std():.4f} | {', '.join(f'{a:.4f}' for a in acc)} | "
              f"{np.mean([r['final_loss'] for r in rows]):.4f} | {np.mean([r['seconds'] for r in rows]):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
