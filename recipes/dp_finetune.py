"""DP-SGD LoRA fine-tuning to a target epsilon: ``DPTrainer`` (classification) or ``DPSFTTrainer`` (TRL SFT).

Defaults run offline on packaged real data: ``--task classify`` fine-tunes all-MiniLM-L6-v2 + LoRA on the Rotten
Tomatoes snippets; ``--task sft`` fine-tunes SmolLM2-135M-Instruct + LoRA on Hamlet. The noise multiplier is
calibrated so the planned ``--max-steps`` spend exactly ``--target-epsilon`` at ``--delta`` (PRV accountant); the
Poisson sampler's seed and the noise seed are secret. Metrics (loss, epsilon, eval accuracy) go through the
Trainer's log, so ``--report-to tensorboard`` (the default when tensorboard is installed) shows them:
``tensorboard --logdir <output-dir>/runs``.

    python recipes/dp_finetune.py                                        # MiniLM, epsilon 8
    python recipes/dp_finetune.py --task sft --max-steps 20              # SmolLM2 on Hamlet
    accelerate launch --config_file accelerate_configs/cpu_ddp_2proc.yaml recipes/dp_finetune.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml recipes/dp_finetune.py

Runs under a single process, ``cpu_ddp_2proc`` (DDP) and ``deepspeed_zero2``; ZeRO-3 and FSDP are refused
(per-example gradients need the full weights on every rank).
"""

from __future__ import annotations

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single", "cpu_ddp_2proc", "deepspeed_zero2")
DEFAULT_DATASET = {"classify": "packaged:rotten_tomatoes", "sft": "packaged:hamlet"}


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset=None, output_dir="outputs/dp_finetune", max_steps=100, batch_size=32,
                      lr=5e-3, max_length=64, model_help="packaged all-MiniLM-L6-v2 (classify) or SmolLM2 (sft)")
    p.add_argument("--task", choices=("classify", "sft"), default="classify")
    p.add_argument("--label-column", default="label", help="integer or string labels (classify)")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=None, help="default min(1e-5, 1/(10 N))")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping bound C")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "rank"))
    if args.dataset is None:
        args.dataset = DEFAULT_DATASET[args.task]
    if not args.target_epsilon > 0:
        p.error(f"--target-epsilon must be > 0, got {args.target_epsilon}")
    if not args.max_grad_norm > 0:
        p.error(f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    if args.delta is not None and not 0 < args.delta < 1:
        p.error(f"--delta must be in (0, 1), got {args.delta}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train; returns ``{"epsilon", "noise_multiplier", "eval_accuracy" (classify), "output_dir"}``."""
    args = parse_args(argv)
    common.require_launch_config("DPTrainer", SUPPORTED)

    import os

    from transformers import DataCollatorWithPadding, TrainingArguments

    from hf_svd_plugins import DPConfig
    from hf_svd_plugins.examples import TokenizedClassification
    from hf_svd_plugins.fedsvd import accuracy_metrics

    dp_config = DPConfig(max_grad_norm=args.max_grad_norm, target_epsilon=args.target_epsilon,
                         target_delta=args.delta, accountant=args.accountant)
    shared = common.training_kwargs(args, max_grad_norm=0.0)  # DP clips per example; the Trainer's batch clipping is off
    result: dict = {}
    if args.task == "classify":
        from hf_svd_plugins import DPTrainer

        train, test = common.load_labelled(args.dataset, args.text_column, args.label_column, args.seed, args.limit)
        model, tokenizer = common.lora_classifier(args.model, max(train.label) + 1, args.rank, args.seed)
        trainer = DPTrainer(
            model=model, args=TrainingArguments(args.output_dir, per_device_eval_batch_size=64, **shared),
            train_dataset=TokenizedClassification(train, tokenizer, args.max_length),
            eval_dataset=TokenizedClassification(test, tokenizer, args.max_length),
            data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy_metrics, dp_config=dp_config,
        )
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig

        from hf_svd_plugins.dp import DPSFTTrainer

        model, tokenizer = common.causal_lm(args.model)
        peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules="all-linear")
        trainer = DPSFTTrainer(
            # TRL's defaults (activation checkpointing, bf16 autocast) push DP off vmap to slower per-example methods
            model=model, args=SFTConfig(args.output_dir, max_length=args.max_length, packing=False,
                                        gradient_checkpointing=False, bf16=False, **shared),
            train_dataset=Dataset.from_dict({"text": common.load_texts(args.dataset, args.text_column, args.limit)}),
            processing_class=tokenizer, peft_config=peft_config, dp_config=dp_config,
        )
    trainer.train()
    result.update(epsilon=trainer.get_epsilon(), noise_multiplier=trainer.noise_multiplier, delta=trainer.target_delta)
    if args.task == "classify":
        result["eval_accuracy"] = trainer.evaluate()["eval_accuracy"]
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    if trainer.is_world_process_zero():
        print(", ".join(f"{k}={v:.4g}" for k, v in result.items()), flush=True)
    common.saved("the DP LoRA adapter", final)
    return {**result, "output_dir": final}


if __name__ == "__main__":
    main()
