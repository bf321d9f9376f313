"""EVA's claim over seeds: does EVA fine-tune faster than other LoRA inits? Same data, steps and learning rate.

Inits (LoRA r=8, alpha=16, the same target modules for all):

- ``eva1``, ``eva2``: ours, ``eva_init(model, loader, rho=1 | 2, tau=0.99)`` (rho 1: every module keeps rank r; rho 2:
  ranks redistributed by explained variance, same total budget);
- ``peft_eva``: PEFT's own EVA, ``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho=2, tau=0.99))`` and
  ``initialize_lora_eva_weights(model, loader)``, on the same batches as ours;
- ``default``: PEFT's default init (Kaiming A, zero B); ``pissa`` and ``olora``: PEFT's weight-driven inits.

Settings:

- ``minilm``: all-MiniLM-L6-v2 + LoRA on its attention and MLP Linears as a 2-label classifier on Rotten Tomatoes
  (``examples.rotten_tomatoes_splits(seed=0)``: 70/10/20 train/validation/test, the same split for every seed);
  metric accuracy;
- ``smollm``: SmolLM2-135M-Instruct (``examples.smollm2_float32_path()``) + LoRA on all 7 projections, trained as a
  causal LM on *Hamlet* (``examples.hamlet_text()``) packed into blocks of ``--block`` tokens; the first 80% of the
  blocks train, the next 10% validate, the last 10% test; metric perplexity (exp of the mean token loss).

A seed fixes the head's init, the training order and the EVA batches (the first ``--eva-batches`` batches of a
seeded shuffle of the training set, labels dropped; every EVA variant reads the same ones). Each run is written to
``--out`` as one JSON file as it finishes and skipped when the command is run again (resumable); the tables are
reprinted after each run, and ``--table`` only prints them.

    nice -n 10 python benchmarks/eva_seeds.py --settings minilm smollm --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

INITS = ("default", "eva1", "eva2", "peft_eva", "pissa", "olora")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METRIC = {"minilm": ("accuracy", True), "smollm": ("perplexity", False)}  # name, higher is better


# ============================================================================================ data and models


def load_data(setting: str, tokenizer, block: int):
    """``(train, validation, test)`` lists of feature dicts (no padding for ``smollm``)."""
    from hf_svd_plugins import examples

    if setting == "minilm":
        parts = examples.rotten_tomatoes_splits(seed=0, validation_fraction=0.1, test_fraction=0.2)
        return [examples.TokenizedClassification(p, tokenizer).items for p in parts]
    ids = tokenizer(examples.hamlet_text())["input_ids"]
    blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    n_train, n_val = int(0.8 * len(blocks)), int(0.1 * len(blocks))
    items = [{"input_ids": b, "attention_mask": [1] * block, "labels": b} for b in blocks]
    return items[:n_train], items[n_train : n_train + n_val], items[n_train + n_val :]


def build_model(setting: str, init: str, r: int, seed: int):
    """``(peft_model, tokenizer)``; LoRA marked for PEFT's EVA when ``init == "peft_eva"``."""
    import torch
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svd_plugins import examples

    init_lora_weights = {"default": True, "eva1": True, "eva2": True, "peft_eva": "eva", "pissa": "pissa",
                         "olora": "olora"}[init]
    eva_config = PeftEvaConfig(rho=2.0, tau=0.99) if init == "peft_eva" else None
    if setting == "minilm":
        return examples.minilm_lora_classifier(r, init_lora_weights, seed=seed, eva_config=eva_config)
    torch.manual_seed(seed)
    path = examples.smollm2_float32_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM", lora_dropout=0.0,
                        init_lora_weights=init_lora_weights, eva_config=eva_config)
    return get_peft_model(model, config, low_cpu_mem_usage=init == "peft_eva"), tokenizer


def eva_batches(train: list[dict], collator, batch_size: int, n_batches: int, seed: int) -> list[dict]:
    import torch

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for b in range(n_batches):
        batch = collator([train[i] for i in order[b * batch_size : (b + 1) * batch_size]])
        batches.append({k: v for k, v in batch.items() if k != "labels"})
    return batches


def initialise(model, init: str, batches: list[dict]) -> dict:
    """Run the data-driven init in place; returns what it decided (ranks, batches read)."""
    if init in ("eva1", "eva2"):
        from hf_svd_plugins.eva import eva_init

        result = eva_init(model, batches, rho=1.0 if init == "eva1" else 2.0, tau=0.99, max_batches=len(batches),
                          show_progress_bar=False)
        ranks = list(result.ranks.values())
        return {"ranks_min": min(ranks), "ranks_max": max(ranks), "zero_rank_modules": ranks.count(0),
                "batches_read": max(len(v) for v in result.batches_read.values())}
    if init == "peft_eva":
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        ranks = [m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in m.r]
        return {"ranks_min": min(ranks), "ranks_max": max(ranks)}
    return {}


def evaluate(model, setting: str, items: list[dict], collator, batch_size: int = 64) -> float:
    """Accuracy (``minilm``) or perplexity, exp of the mean loss over all predicted tokens (``smollm``)."""
    import torch

    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = collator(items[i : i + batch_size])
            out = model(**batch)
            if setting == "minilm":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
            else:
                logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
                loss_sum += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                    labels.reshape(-1), reduction="sum"))
                total += labels.numel()
    model.train()
    return correct / total if setting == "minilm" else math.exp(loss_sum / total)


def run_one(setting: str, init: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.set_num_threads(args.threads)
    model, tokenizer = build_model(setting, init, args.r, seed)
    train, val, test = load_data(setting, tokenizer, args.block)
    batch_size = args.batch_size[setting]
    collator = DataCollatorWithPadding(tokenizer)
    start = time.perf_counter()
    decided = initialise(model, init, eva_batches(train, collator, batch_size, args.eva_batches, seed))
    init_seconds = time.perf_counter() - start
    training = TrainingArguments(
        tempfile.mkdtemp(prefix=f"hf_svd_seeds_{setting}_{init}_"), per_device_train_batch_size=batch_size,
        max_steps=args.steps[setting], learning_rate=lr, lr_scheduler_type="constant", logging_steps=args.log_every,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=seed, weight_decay=0.0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"setting": setting, "init": init, "seed": seed, "lr": lr, "steps": args.steps[setting],
            "batch_size": batch_size, "losses": losses,
            "validation": evaluate(model, setting, val, collator) if args.validation else None,
            "test": evaluate(model, setting, test, collator), "init_seconds": init_seconds,
            "train_seconds": train_seconds, "load_before": os.getloadavg()[0], **decided}


# ============================================================================================ tables


def _runs(out: str, setting: str) -> list[dict]:
    runs = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if name.startswith(setting + "-") and name.endswith(".json"):
            runs.append(json.load(open(os.path.join(out, name))))
    return runs


def _window(run: dict, first: bool) -> float:
    """Mean logged training loss over the first (or last) quarter of the steps."""
    steps = run["steps"]
    inside = [loss for step, loss in run["losses"] if (step <= steps / 4 if first else step > 3 * steps / 4)]
    inside = inside or [run["losses"][0 if first else -1][1]]  # runs too short to have a log in the window
    return sum(inside) / len(inside)


def _spread(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def print_tables(out: str, settings: list[str]) -> None:
    for setting in settings:
        runs = _runs(out, setting)
        if not runs:
            continue
        metric, _ = METRIC[setting]
        first = runs[0]
        print(f"\n## {setting}: {first['steps']} steps, batch {first['batch_size']}, lr {first['lr']} (constant), "
              f"LoRA r=8; mean ± sd over seeds")
        print(f"| init | seeds | loss, first quarter | loss, last quarter | validation {metric} | test {metric} | "
              f"init s | train s |")
        print("|---|---|---|---|---|---|---|---|")
        by_init = {i: sorted((r for r in runs if r["init"] == i), key=lambda r: r["seed"]) for i in INITS}
        for init, group in by_init.items():
            if group:
                print(f"| {init} | {len(group)} | {_spread([_window(r, True) for r in group])} | "
                      f"{_spread([_window(r, False) for r in group])} | "
                      f"{_spread([r['validation'] for r in group if r['validation'] is not None])} | {_spread([r['test'] for r in group])} | "
                      f"{statistics.fmean(r['init_seconds'] for r in group):.1f} | "
                      f"{statistics.fmean(r['train_seconds'] for r in group):.0f} |")
        print(f"\nPaired differences over the seeds both ran (mean ± sd; loss < 0 and {metric} "
              f"{'> 0' if METRIC[setting][1] else '< 0'} favour the first):")
        print(f"| comparison | seeds | first-quarter loss | last-quarter loss | test {metric} |")
        print("|---|---|---|---|---|")
        for a, b in [("eva2", "default"), ("eva1", "default"), ("eva2", "eva1"), ("peft_eva", "default"),
                     ("eva2", "peft_eva"), ("pissa", "default"), ("olora", "default")]:
            pa, pb = {r["seed"]: r for r in by_init[a]}, {r["seed"]: r for r in by_init[b]}
            seeds = sorted(set(pa) & set(pb))
            if seeds:
                print(f"| {a} - {b} | {len(seeds)} | "
                      f"{_spread([_window(pa[s], True) - _window(pb[s], True) for s in seeds])} | "
                      f"{_spread([_window(pa[s], False) - _window(pb[s], False) for s in seeds])} | "
                      f"{_spread([pa[s]['test'] - pb[s]['test'] for s in seeds])} |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["minilm", "smollm"], choices=sorted(METRIC))
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--minilm-steps", type=int, default=60)
    parser.add_argument("--smollm-steps", type=int, default=20)
    parser.add_argument("--minilm-batch-size", type=int, default=16)
    parser.add_argument("--smollm-batch-size", type=int, default=4)
    parser.add_argument("--minilm-lr", type=float, default=1e-3)
    parser.add_argument("--smollm-lr", type=float, default=3e-4)
    parser.add_argument("--block", type=int, default=64, help="tokens per packed block (smollm)")
    parser.add_argument("--eva-batches", type=int, default=16, help="batches EVA may read (it stops earlier once settled)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_svd_plugins", "bench-eva-seeds"))
    parser.add_argument("--validation", action="store_true", help="also evaluate on the validation split")
    parser.add_argument("--table", action="store_true", help="only print the tables of finished runs")
    args = parser.parse_args()
    args.steps = {"minilm": args.minilm_steps, "smollm": args.smollm_steps}
    args.batch_size = {"minilm": args.minilm_batch_size, "smollm": args.smollm_batch_size}
    lrs = {"minilm": args.minilm_lr, "smollm": args.smollm_lr}
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for seed in args.seeds:  # seeds outermost: every setting and init gets its first seeds first
            for setting in args.settings:
                for init in args.inits:
                    path = os.path.join(args.out, f"{setting}-{init}-{seed}.json")
                    if os.path.exists(path):
                        continue
                    result = run_one(setting, init, seed, lrs[setting], args)
                    with open(path + ".tmp", "w") as f:
                        json.dump(result, f)
                    os.replace(path + ".tmp", path)
                    print(f"{setting} {init} seed {seed}: test {result['test']:.4f}, "
                          f"{result['train_seconds']:.0f} s", flush=True)
                    print_tables(args.out, args.settings)
    print_tables(args.out, args.settings)


if __name__ == "__main__":
    main()
