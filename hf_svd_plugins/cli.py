"""``hf-svd``: command-line entry point.

    hf-svd demo [--steps 150] [--output-dir hf_svd_demo]
    hf-svd compress ...   (hf_svd_plugins.fwsvd.cli)
    hf-svd merge ...      (hf_svd_plugins.merging.cli)

A method's verb lives in its own package: a module with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, listed in :data:`VERB_MODULES`. Those modules import torch only inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

#: verb -> module implementing it
VERB_MODULES = {
    "compress": "hf_svd_plugins.fwsvd.cli",
    "merge": "hf_svd_plugins.merging.cli",
}


def run_demo(steps: int, output_dir: str, r: int) -> int:
    """EVA vs PEFT's default LoRA init on real weights (packaged MiniLM) and real text (Rotten Tomatoes), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    from peft import PeftModel

    from hf_svd_plugins.eva import EvaCallback
    from hf_svd_plugins.examples import finetune_sentiment, minilm_lora_classifier

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"Fine-tuning all-MiniLM-L6-v2 + LoRA (r={r}) on Rotten Tomatoes for {steps} steps, twice:", flush=True)
    results = {}
    for init in ("default", "eva"):
        print(f"  - init={init} ...", flush=True)
        results[init] = finetune_sentiment(init, steps=steps, r=r, output_dir=os.path.join(output_dir, init))
    eva_cb = next(cb for cb in results["eva"].trainer.callback_handler.callbacks if isinstance(cb, EvaCallback))
    ranks = eva_cb.ranks
    print(f"\nEVA read {eva_cb.result.batches_used} batches in {eva_cb.result.seconds:.1f} s and redistributed "
          f"{sum(ranks.values())} ranks over {len(ranks)} modules (min {min(ranks.values())}, "
          f"max {max(ranks.values())}).")
    print("\n| init | first logged loss | last logged loss | mean loss | test accuracy |")
    print("|---|---|---|---|---|")
    for init, res in results.items():
        mean = sum(res.losses) / len(res.losses)
        print(f"| {init} | {res.losses[0]:.4f} | {res.losses[-1]:.4f} | {mean:.4f} | {res.accuracy:.3f} |")

    adapter_dir = os.path.join(output_dir, "eva_adapter")
    trainer = results["eva"].trainer
    trainer.save_model(adapter_dir)
    base, tokenizer = minilm_lora_classifier(r)
    reloaded = PeftModel.from_pretrained(base.get_base_model(), adapter_dir).eval()
    batch = tokenizer(["a warm, funny, engaging film", "a dull and tedious mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        original = trainer.model.eval()(**batch).logits
        loaded = reloaded(**batch).logits
    same = torch.allclose(original, loaded, atol=1e-5)
    print(f"\nSaved a standard PEFT adapter (rank_pattern for {len(reloaded.peft_config['default'].rank_pattern)} "
          f"modules) to {adapter_dir}; PeftModel.from_pretrained reproduces the logits: {same}")
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-svd", description="SVD-centred plugins for the Hugging Face Trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="EVA vs default LoRA init on packaged MiniLM and real reviews (offline)")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--r", type=int, default=8)
    demo.add_argument("--output-dir", default="hf_svd_demo")
    verbs = {}
    for verb, module_name in VERB_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a method not built into this version; real import errors propagate
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        module.add_arguments(sub.add_parser(verb, help=module.HELP, description=module.HELP))
        verbs[verb] = module
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        return run_demo(args.steps, args.output_dir, args.r)
    return int(verbs[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
