"""Single-node FedSVD: FFA-LoRA (train only B, A frozen) refactorized by SVD every ``--every`` steps (FedSVDCallback).

Default: all-MiniLM-L6-v2 + LoRA on the packaged Rotten Tomatoes snippets, offline. Every ``--every`` optimizer
steps each LoRA pair's ``B @ A`` is refactorized (new orthonormal A = top right singular vectors, B = left ones
times the singular values; the adapter's function is unchanged) and B's Adam moments are reset. The callback logs
``fedsvd/refactorizations`` (and with ``--log-singular-values N`` the top N singular values per module) through the Trainer's log (TensorBoard with
``--report-to tensorboard``). ``--every 0`` trains plain FFA-LoRA (no refactorization) for comparison.

    python recipes/fedsvd_single_node.py
    accelerate launch --config_file accelerate_configs/cpu_ddp_2proc.yaml recipes/fedsvd_single_node.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/fedsvd_single_node.py

Runs under a single process and every config in ``accelerate_configs/`` (DDP, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 +
CPU-offloaded optimizer: DeepSpeed's CPU Adam, and FSDP2 on GPUs).
"""

from __future__ import annotations

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single", "cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset="packaged:rotten_tomatoes", output_dir="outputs/fedsvd_single_node",
                      max_steps=100, batch_size=16, lr=5e-3, max_length=64, model_help="packaged all-MiniLM-L6-v2")
    p.add_argument("--label-column", default="label")
    p.add_argument("--every", type=int, default=10, help="refactorize every N optimizer steps (0: never)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--log-singular-values", type=int, default=0,
                   help="log the top N singular values of every module at each refactorization (0: counters only)")
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "rank"))
    if args.log_singular_values < 0:
        p.error(f"--log-singular-values must be >= 0, got {args.log_singular_values}")
    if args.every < 0:
        p.error(f"--every must be >= 0 (0 disables the refactorization), got {args.every}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train; returns ``{"eval_accuracy", "refactorizations", "output_dir"}``."""
    args = parse_args(argv)
    common.require_launch_config("FedSVDCallback", SUPPORTED)

    import os

    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_svd_plugins import FedSVDCallback
    from hf_svd_plugins.examples import TokenizedClassification
    from hf_svd_plugins.fedsvd import accuracy_metrics, freeze_lora_A, save_full_adapter

    train, test = common.load_labelled(args.dataset, args.text_column, args.label_column, args.seed, args.limit)
    model, tokenizer = common.lora_classifier(args.model, max(train.label) + 1, args.rank, args.seed)
    callbacks = [FedSVDCallback(every_n_steps=args.every,
                                 log_top_singular_values=args.log_singular_values)] if args.every else []
    if not args.every:
        freeze_lora_A(model)  # FFA-LoRA without refactorization, the baseline
    trainer = Trainer(
        model=model, args=TrainingArguments(args.output_dir, per_device_eval_batch_size=64, **common.training_kwargs(args)),
        train_dataset=TokenizedClassification(train, tokenizer, args.max_length),
        eval_dataset=TokenizedClassification(test, tokenizer, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy_metrics, callbacks=callbacks,
    )
    trainer.train()
    result = {"eval_accuracy": trainer.evaluate()["eval_accuracy"],
              "refactorizations": callbacks[0].n_refactorizations if callbacks else 0}
    final = os.path.join(args.output_dir, "final")
    # trainer.save_model, but with the whole adapter: A is frozen yet refactorized, and transformers' ZeRO-3 save
    # drops frozen parameters
    save_full_adapter(trainer, final)
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, DeepSpeed's ZeRO wrapper, ...
        optimizer = optimizer.optimizer
    if trainer.is_world_process_zero():
        print(f"eval_accuracy={result['eval_accuracy']:.4f} after {args.max_steps} steps, "
              f"{result['refactorizations']} refactorizations (optimizer {type(optimizer).__name__})", flush=True)
    common.saved("the LoRA adapter", final)
    return {**result, "output_dir": final}


if __name__ == "__main__":
    main()
