"""FWSVD vs plain SVD vs activation whitening (SVD-LLM), side by side on real weights and real text, offline.

1. The FWSVD paper's setting in miniature: the packaged all-MiniLM-L6-v2 (mean-pooled sentence encoder + linear head,
   LoRA r=8) fine-tuned on the Rotten Tomatoes snippets (``rotten_tomatoes(seed=0, full=True)``: 10,246 train / 2,562
   test), LoRA merged, then its 36 encoder Linears compressed to 50% and 33% of their weights, no re-training: test
   accuracy. Fisher from ``FisherCallback(mode="train")`` (the last 64 training batches); whitening calibrated on 64
   training batches.
2. An LLM: SmolLM2-135M-Instruct (packaged GGUF, dequantized to float32) perplexity on the last part of Hamlet,
   calibrated on its first part; 20% and 40% fewer decoder-Linear weights, uniform ratio vs global budget (the same
   number of weights), then a short LoRA healing run (LoRA on the factor Linears) at 40%.
3. Seconds to compress, and forward time of the compressed models vs dense at the same batch (ratios of runs
   alternated in one process).

    nice -n 10 python benchmarks/fwsvd.py --out outputs/fwsvd_benchmark          # everything, resumable
    nice -n 10 python benchmarks/fwsvd.py --parts smollm --heal-steps 0            # one part

Results are appended to ``--out/results.json`` as each row finishes and the tables are rewritten to
``--out/results.md``; a rerun skips rows already there (``--fresh`` recomputes).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings

import torch

from hf_svd_plugins import FisherCallback, fwsvd_compress
from hf_svd_plugins.examples import classifier_accuracy
from hf_svd_plugins.fwsvd import estimate_fisher

METHODS = ("svd", "fisher", "whiten")


# --------------------------------------------------------------------------------------------- bookkeeping


class Results:
    def __init__(self, out: str, fresh: bool):
        self.path = os.path.join(out, "results.json")
        self.rows = {} if fresh or not os.path.exists(self.path) else json.load(open(self.path))

    def has(self, key: str) -> bool:
        return key in self.rows

    def add(self, key: str, row: dict) -> None:
        self.rows[key] = row
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.rows, f, indent=1)
        os.replace(self.path + ".tmp", self.path)
        print(f"  {key}: {row}", flush=True)
        with open(os.path.join(os.path.dirname(self.path), "results.md"), "w") as f:
            f.write(tables(self.rows))


def tables(rows: dict) -> str:
    out = []
    mini = {k: v for k, v in rows.items() if v.get("part") == "minilm"}
    if mini:
        out += ["## MiniLM on Rotten Tomatoes (no re-training)", "",
                "| method | allocation | targeted weights kept | whole model kept | test accuracy | compress s |",
                "|---|---|---|---|---|---|"]
        for r in sorted(mini.values(), key=lambda r: (-r["target_share"], r["allocation"], r["method"])):
            out.append(f"| {r['method']} | {r['allocation']} | {r['target_share']:.1%} | {r['model_share']:.1%} | "
                       f"{r['accuracy']:.4f} | {r.get('seconds', 0):.1f} |")
        out.append("")
    llm = {k: v for k, v in rows.items() if v.get("part") == "smollm"}
    if llm:
        dense = next((r["ppl"] for r in llm.values() if r["method"] == "dense"), None)
        out += ["## SmolLM2-135M perplexity on held-out Hamlet", "",
                "| method | allocation | targeted weights kept | whole model kept | perplexity | vs dense | "
                "compress s |", "|---|---|---|---|---|---|---|"]
        for r in sorted(llm.values(), key=lambda r: (-r["target_share"], r["allocation"], r["method"])):
            ratio = f"{r['ppl'] / dense:.2f}x" if dense else ""
            out.append(f"| {r['method']} | {r['allocation']} | {r['target_share']:.1%} | {r['model_share']:.1%} | "
                       f"{r['ppl']:.2f} | {ratio} | {r.get('seconds', 0):.1f} |")
        out.append("")
    speed = {k: v for k, v in rows.items() if v.get("part") == "speed"}
    if speed:
        out += ["## Forward time, compressed / dense (same batch, alternated, best of repeats)", "",
                "| model | compressed | batch | dense ms | compressed ms | ratio |", "|---|---|---|---|---|---|"]
        for r in speed.values():
            out.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['dense_ms']:.1f} | "
                       f"{r['compressed_ms']:.1f} | {r['compressed_ms'] / r['dense_ms']:.2f} |")
        out.append("")
    return "\n".join(out)


def size_row(report, **fields) -> dict:
    return {"target_share": report.targeted_share, "model_share": report.model_share, "seconds": report.seconds,
            "layers": len(report.layers), "factorized": len(report.ranks), **fields}


def weight_params(report) -> int:
    return sum(r.rank * (r.d_in + r.d_out) if r.rank else r.d_in * r.d_out for r in report.layers)


@torch.no_grad()
def forward_ms(models: dict, batch: dict, repeats: int) -> dict:
    """Best-of-``repeats`` forward time per model, the models alternated so that load changes hit all alike."""
    best = {name: math.inf for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            best[name] = min(best[name], 1000 * (time.perf_counter() - start))
    return best


# --------------------------------------------------------------------------------------------- part 1: MiniLM


def minilm_data(args):
    from hf_svd_plugins.examples import TokenizedClassification, minilm_mean_pool_classifier, rotten_tomatoes

    train, test = rotten_tomatoes(seed=0, full=True)
    _, tokenizer = minilm_mean_pool_classifier(r=None)
    return (TokenizedClassification(train, tokenizer, args.max_length),
            TokenizedClassification(test, tokenizer, args.max_length), tokenizer)


def minilm_finetuned(args, train, tokenizer):
    """The fine-tuned, merged classifier and the Fisher its training run collected (cached in --out)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_svd_plugins.examples import minilm_mean_pool_classifier

    path = os.path.join(args.out, "minilm_finetuned.pt")
    if os.path.exists(path) and not args.fresh:
        saved = torch.load(path, weights_only=False)
        model, _ = minilm_mean_pool_classifier(r=None)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["fisher"], saved["seconds"]
    model, _ = minilm_mean_pool_classifier(r=8, seed=0)
    fisher_cb = FisherCallback(mode="train", max_batches=args.minilm_calibration_batches)
    targs = TrainingArguments(os.path.join(args.out, "minilm_run"), per_device_train_batch_size=args.minilm_batch,
                              max_steps=args.minilm_steps, learning_rate=5e-4, lr_scheduler_type="constant",
                              logging_steps=50, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                              seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[fisher_cb])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    merged = model.merge_and_unload().eval()
    torch.save({"state": merged.state_dict(), "fisher": fisher_cb.fisher, "seconds": seconds}, path)
    return merged, fisher_cb.fisher, seconds


def part_minilm(args, results: Results) -> None:
    from transformers import DataCollatorWithPadding

    print("== MiniLM on Rotten Tomatoes", flush=True)
    train, test, tokenizer = minilm_data(args)
    model, fisher, train_seconds = minilm_finetuned(args, train, tokenizer)
    collate = DataCollatorWithPadding(tokenizer)
    calibration = [collate([train[j] for j in range(i * args.minilm_batch, (i + 1) * args.minilm_batch)])
                   for i in range(args.minilm_calibration_batches)]
    if not results.has("minilm/dense"):
        results.add("minilm/dense", {"part": "minilm", "method": "dense", "allocation": "-", "target_share": 1.0,
                                     "model_share": 1.0, "accuracy": classifier_accuracy(model, test, tokenizer),
                                     "train_seconds": train_seconds})
    for ratio in args.minilm_ratios:
        for allocation in args.allocations:
            for method in args.methods:
                key = f"minilm/{method}/{allocation}/{ratio}"
                if results.has(key):
                    continue
                compressed = copy.deepcopy(model)
                size = _size(args, model, method, fisher, calibration, ratio, allocation)
                report = fwsvd_compress(compressed, method, importance=fisher if method == "fisher" else None,
                                        calibration=calibration if method == "whiten" else None, progress=False,
                                        **size)
                results.add(key, size_row(report, part="minilm", method=method, allocation=allocation, ratio=ratio,
                                          accuracy=classifier_accuracy(compressed, test, tokenizer)))


def _size(args, model, method, fisher, calibration, ratio, allocation) -> dict:
    """``ratio=`` for uniform; for global, the budget of the uniform run's exact weight count."""
    if allocation == "uniform":
        return {"ratio": ratio}
    probe = fwsvd_compress(copy.deepcopy(model), "svd", ratio=ratio, progress=False)
    return {"param_budget": weight_params(probe)}


# --------------------------------------------------------------------------------------------- part 2: SmolLM2


def smollm_data(args, tokenizer):
    """Calibration / healing blocks from the first 70% of Hamlet's tokens, evaluation blocks from the last 20%."""
    from hf_svd_plugins.examples import hamlet_text

    ids = torch.tensor(tokenizer(hamlet_text())["input_ids"])
    cut, eval_start = int(0.7 * len(ids)), int(0.8 * len(ids))
    length = args.smollm_length

    def blocks(t):
        n = len(t) // length
        return t[: n * length].view(n, length)

    train_blocks, eval_blocks = blocks(ids[:cut]), blocks(ids[eval_start:])[: args.smollm_eval_blocks]

    def batches(x, size):
        return [{"input_ids": x[i:i + size], "attention_mask": torch.ones_like(x[i:i + size]),
                 "labels": x[i:i + size].clone()} for i in range(0, len(x), size)]

    calibration = batches(train_blocks[: args.smollm_calibration_blocks], args.smollm_batch)
    return calibration, batches(eval_blocks, args.smollm_batch), train_blocks


@torch.no_grad()
def perplexity(model, batches) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = int(batch["labels"][:, 1:].numel())
        total += float(model(**batch).loss) * tokens  # the model shifts the labels itself
        count += tokens
    return math.exp(total / count)


def load_smollm():
    from transformers import AutoModelForCausalLM

    from hf_svd_plugins.examples import smollm2_float32_path

    return AutoModelForCausalLM.from_pretrained(smollm2_float32_path(), dtype=torch.float32).eval()


def part_smollm(args, results: Results) -> None:
    from transformers import AutoTokenizer

    from hf_svd_plugins.examples import smollm2_float32_path

    print("== SmolLM2-135M on Hamlet", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_float32_path())
    calibration, evaluation, train_blocks = smollm_data(args, tokenizer)
    print(f"  calibration {sum(b['input_ids'].numel() for b in calibration)} tokens, evaluation "
          f"{sum(b['input_ids'].numel() for b in evaluation)} tokens", flush=True)
    if not results.has("smollm/dense"):
        results.add("smollm/dense", {"part": "smollm", "method": "dense", "allocation": "-", "target_share": 1.0,
                                     "model_share": 1.0, "ppl": perplexity(load_smollm(), evaluation)})
    fisher_path = os.path.join(args.out, "smollm_fisher.pt")
    fisher, fisher_seconds = None, None
    if "fisher" not in args.methods:
        pass
    elif os.path.exists(fisher_path) and not args.fresh:
        fisher, fisher_seconds = torch.load(fisher_path, weights_only=False)
    else:
        start = time.perf_counter()
        fisher = estimate_fisher(load_smollm(), calibration, progress=True)
        fisher_seconds = time.perf_counter() - start
        torch.save((fisher, fisher_seconds), fisher_path)
    for reduction in args.smollm_reductions:
        ratio = round(1 - reduction, 6)
        budget = None
        for allocation in args.allocations:
            for method in args.methods:
                key = f"smollm/{method}/{allocation}/{reduction}"
                if results.has(key):
                    continue
                model = load_smollm()
                if allocation == "global" and budget is None:
                    budget = weight_params(fwsvd_compress(load_smollm(), "svd", ratio=ratio, progress=False))
                size = {"ratio": ratio} if allocation == "uniform" else {"param_budget": budget}
                report = fwsvd_compress(model, method, importance=fisher if method == "fisher" else None,
                                        calibration=calibration if method == "whiten" else None, progress=False,
                                        damping=args.damping, **size)
                extra = {"fisher_seconds": fisher_seconds} if method == "fisher" else {}
                results.add(key, size_row(report, part="smollm", method=method, allocation=allocation,
                                          reduction=reduction, ppl=perplexity(model, evaluation), **extra))
                if args.heal_steps and reduction == max(args.smollm_reductions) and allocation == "uniform" and \
                        method in args.heal_methods and not results.has(key + "/healed"):
                    results.add(key + "/healed", heal(args, model, report, train_blocks, evaluation, method))


def heal(args, model, report, train_blocks, evaluation, method) -> dict:
    """LoRA (r=8) on every factor Linear, a short run on the calibration part of the text; perplexity after."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_blocks)

        def __getitem__(self, i):
            x = train_blocks[i][: args.heal_length]
            return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["down", "up"], lora_dropout=0.0))
    targs = TrainingArguments(os.path.join(args.out, "heal_run"), per_device_train_batch_size=args.smollm_batch,
                              max_steps=args.heal_steps, learning_rate=args.heal_lr, lr_scheduler_type="constant",
                              logging_steps=10, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                              seed=0)
    start = time.perf_counter()
    Trainer(model=peft_model, args=targs, train_dataset=Blocks()).train()
    return {"part": "smollm", "method": f"{method} + LoRA heal ({args.heal_steps} steps)", "allocation": "uniform",
            "target_share": report.targeted_share, "model_share": report.model_share,
            "ppl": perplexity(peft_model, evaluation), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------- part 3: speed


def part_speed(args, results: Results) -> None:
    print("== forward time", flush=True)
    from hf_svd_plugins.examples import minilm_mean_pool_classifier

    if not results.has("speed/minilm"):
        dense, tokenizer = minilm_mean_pool_classifier(r=None)
        dense.eval()
        half = copy.deepcopy(dense)
        fwsvd_compress(half, "svd", ratio=0.5, progress=False)
        third = copy.deepcopy(dense)
        fwsvd_compress(third, "svd", ratio=0.33, progress=False)
        batch = dict(tokenizer(["a thoroughly enjoyable and witty film about nothing much"] * 128, padding="max_length",
                               max_length=args.max_length, return_tensors="pt"))
        ms = forward_ms({"dense": dense, "50%": half, "33%": third}, batch, args.speed_repeats)
        for variant in ("50%", "33%"):
            results.add(f"speed/minilm/{variant}", {"part": "speed", "model": "MiniLM", "variant": variant,
                                                    "batch": f"128 x {args.max_length}", "dense_ms": ms["dense"],
                                                    "compressed_ms": ms[variant]})
        results.add("speed/minilm", {"part": "-"})
    if not results.has("speed/smollm"):
        dense = load_smollm()
        variants = {"dense": dense}
        for reduction in args.smollm_reductions:
            model = load_smollm()
            fwsvd_compress(model, "svd", ratio=round(1 - reduction, 6), progress=False)
            variants[f"-{reduction:.0%}"] = model
        x = torch.randint(0, dense.config.vocab_size, (args.smollm_batch, args.smollm_length), generator=torch.Generator().manual_seed(0))
        ms = forward_ms(variants, {"input_ids": x}, args.speed_repeats)
        for variant in variants:
            if variant != "dense":
                results.add(f"speed/smollm/{variant}", {"part": "speed", "model": "SmolLM2-135M", "variant": variant,
                                                         "batch": f"{args.smollm_batch} x {args.smollm_length}",
                                                         "dense_ms": ms["dense"], "compressed_ms": ms[variant]})
        results.add("speed/smollm", {"part": "-"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/fwsvd_benchmark")
    p.add_argument("--parts", nargs="+", default=["minilm", "smollm", "speed"], choices=["minilm", "smollm", "speed"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"], choices=["uniform", "global"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; more threads than free cores slow LAPACK down)")
    p.add_argument("--max-length", type=int, default=64, help="MiniLM tokens per snippet")
    p.add_argument("--minilm-steps", type=int, default=200)
    p.add_argument("--minilm-batch", type=int, default=32)
    p.add_argument("--minilm-calibration-batches", type=int, default=64)
    p.add_argument("--minilm-ratios", nargs="+", type=float, default=[0.5, 0.33])
    p.add_argument("--smollm-length", type=int, default=256, help="tokens per SmolLM2 block")
    p.add_argument("--smollm-batch", type=int, default=4)
    p.add_argument("--smollm-calibration-blocks", type=int, default=16)
    p.add_argument("--smollm-eval-blocks", type=int, default=32)
    p.add_argument("--smollm-reductions", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--damping", type=float, default=0.01, help="whitening damping (relative to trace(G)/d_in)")
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--heal-length", type=int, default=128)
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--heal-methods", nargs="+", default=["whiten"], choices=METHODS)
    p.add_argument("--speed-repeats", type=int, default=5)
    p.add_argument("--fresh", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = Results(args.out, args.fresh)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for part in args.parts:
        {"minilm": part_minilm, "smollm": part_smollm, "speed": part_speed}[part](args, results)
    print(tables(results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
