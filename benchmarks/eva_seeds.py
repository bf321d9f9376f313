"""EVA's claim over seeds: does EVA fine-tune faster than other LoRA inits? Same data and steps, learning rate chosen
per init on validation.

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

Protocol, per setting: when its lr grid (``--minilm-lrs``, ``--smollm-lrs``) has more than one value, every init is
trained at every lr on ``--search-seeds`` and scored on the validation split only (test is not evaluated); each init's
lr is the one with the best mean validation metric. Final runs train each init at its chosen lr on ``--seeds``
(disjoint from the search seeds by default) and evaluate validation and test. A one-value grid skips the search.

A seed fixes the head's init, the training order and the EVA batches (the first ``--eva-batches`` batches of a
seeded shuffle of the training set, labels dropped; every EVA variant reads the same ones). The init is computed
once per (init, seed) and each lr of the grid trains a fresh copy of it. Each run is written to ``--out`` as one
JSON file named by setting, init, seed, lr and phase as it finishes, and skipped when the command is run again
(resumable; a file made with other steps or batch size is refused); the tables are reprinted after each run,
``--table`` only prints them, ``--export FILE.jsonl`` writes every run to one file.

    nice -n 10 python benchmarks/eva_seeds.py --settings minilm --search-seeds 0 --seeds 1 2 3 4 5
    nice -n 10 python benchmarks/eva_seeds.py --settings smollm --inits default eva1 eva2 peft_eva --seeds 0 1 2
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


def run_group(setting: str, init: str, seed: int, lrs: list[float], phase: str, args: argparse.Namespace):
    """Build and initialise once, then train a fresh copy of the initialised model at each of ``lrs`` (the init
    does not depend on the lr, so one EVA/PiSSA run serves the whole grid). ``phase="search"`` evaluates the
    validation split only; ``"final"`` evaluates validation and test. Yields one result dict per lr."""
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
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for lr in lrs:
        model.load_state_dict(initial_state)
        training = TrainingArguments(
            tempfile.mkdtemp(prefix=f"hf_svd_seeds_{setting}_{init}_"), per_device_train_batch_size=batch_size,
            max_steps=args.steps[setting], learning_rate=lr, lr_scheduler_type="constant",
            logging_steps=args.log_every, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
            seed=seed, weight_decay=0.0,
        )
        trainer = Trainer(model=model, args=training, train_dataset=train, data_collator=collator)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
        yield {"setting": setting, "init": init, "seed": seed, "lr": lr, "phase": phase,
               "steps": args.steps[setting], "batch_size": batch_size, "losses": losses,
               "validation": evaluate(model, setting, val, collator),
               "test": evaluate(model, setting, test, collator) if phase == "final" else None,
               "init_seconds": init_seconds, "train_seconds": train_seconds, "load_before": load_before, **decided}


# ============================================================================================ run files


def run_path(out: str, setting: str, init: str, seed: int, lr: float, phase: str) -> str:
    """One JSON per run; the lr and phase are in the name, so a run at one lr is never read as another's."""
    prefix = "search-" if phase == "search" else ""
    return os.path.join(out, f"{prefix}{setting}-{init}-{seed}-lr{lr:g}.json")


def migrate_unlabelled(out: str) -> None:
    """Runs written before the lr was in the file name (``minilm-default-0.json``): rename each to the name its own
    recorded lr gives (they evaluated test, no validation: final-phase runs)."""
    for name in sorted(os.listdir(out)):
        parts = name[: -len(".json")].split("-")
        if name.endswith(".json") and len(parts) == 3 and parts[0] in METRIC and parts[2].isdigit():
            run = json.load(open(os.path.join(out, name)))
            run.setdefault("phase", "final")
            new = run_path(out, run["setting"], run["init"], run["seed"], run["lr"], "final")
            if os.path.exists(new):
                raise FileExistsError(f"{name} and {os.path.basename(new)} both exist in {out}; move one aside")
            with open(new, "w") as f:
                json.dump(run, f)
            os.remove(os.path.join(out, name))


def load_run(path: str, args: argparse.Namespace) -> dict | None:
    """The finished run at ``path``, or None; refuses a run made with other steps or batch size."""
    if not os.path.exists(path):
        return None
    run = json.load(open(path))
    setting = run["setting"]
    if (run["steps"], run["batch_size"]) != (args.steps[setting], args.batch_size[setting]):
        raise ValueError(f"{path} ran {run['steps']} steps at batch {run['batch_size']}, not "
                         f"{args.steps[setting]} at {args.batch_size[setting]}: pass another --out")
    return run


def choose_lr(runs: list[dict], setting: str) -> float:
    """The lr with the best mean validation metric over the search seeds (ties: the smaller lr)."""
    _, higher = METRIC[setting]
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        by_lr.setdefault(run["lr"], []).append(run["validation"])
    sign = 1.0 if higher else -1.0
    return max(sorted(by_lr), key=lambda lr: sign * statistics.fmean(by_lr[lr]))


def export_jsonl(out: str, path: str) -> None:
    """Every run file in ``out`` (search and final) as one JSON line each, sorted by file name."""
    with open(path, "w") as f:
        for name in sorted(os.listdir(out)):
            if name.endswith(".json"):
                f.write(json.dumps({"file": name, **json.load(open(os.path.join(out, name)))}) + "\n")


# ============================================================================================ tables


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


def _validation(group: list[dict]) -> str:
    """Mean ± sd of the validation metric; ``(n of N)`` when some runs did not evaluate it (older runs)."""
    values = [r["validation"] for r in group if r.get("validation") is not None]
    return _spread(values) + (f" ({len(values)} of {len(group)})" if len(values) < len(group) else "")


def print_search_table(setting: str, search: dict[str, list[dict]], chosen: dict[str, float]) -> None:
    metric, _ = METRIC[setting]
    lrs = sorted({r["lr"] for runs in search.values() for r in runs})
    seeds = sorted({r["seed"] for runs in search.values() for r in runs})
    print(f"\n## {setting}: lr search, validation {metric} (mean over search seeds {seeds}; test not read); "
          "* = chosen")
    print("| init | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for init, runs in search.items():
        cells = []
        for lr in lrs:
            values = [r["validation"] for r in runs if r["lr"] == lr]
            mark = " *" if chosen.get(init) == lr else ""
            cells.append(f"{statistics.fmean(values):.4f}{mark}" if values else "-")
        print(f"| {init} | " + " | ".join(cells) + (f" | {chosen[init]:g} |" if init in chosen else " | - |"))


def print_final_table(setting: str, finals: dict[str, list[dict]]) -> None:
    metric, higher = METRIC[setting]
    first = next(r for runs in finals.values() for r in runs)
    print(f"\n## {setting}: final runs at each init's chosen lr, {first['steps']} steps, batch {first['batch_size']}, "
          "constant lr, LoRA r=8; mean ± sd over seeds")
    print(f"| init | lr | seeds | loss, first quarter | loss, last quarter | validation {metric} | test {metric} | "
          "init s | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for init, group in finals.items():
        if group:
            print(f"| {init} | {group[0]['lr']:g} | {len(group)} | {_spread([_window(r, True) for r in group])} | "
                  f"{_spread([_window(r, False) for r in group])} | "
                  f"{_validation(group)} | "
                  f"{_spread([r['test'] for r in group])} | "
                  f"{statistics.fmean(r['init_seconds'] for r in group):.1f} | "
                  f"{statistics.fmean(r['train_seconds'] for r in group):.0f} |")
    print(f"\nPaired differences over the seeds both ran (mean ± sd; loss < 0 and {metric} "
          f"{'> 0' if higher else '< 0'} favour the first):")
    print(f"| comparison | seeds | first-quarter loss | last-quarter loss | test {metric} |")
    print("|---|---|---|---|---|")
    for a, b in [("eva2", "default"), ("eva1", "default"), ("eva2", "eva1"), ("peft_eva", "default"),
                 ("eva2", "peft_eva"), ("pissa", "default"), ("olora", "default")]:
        pa, pb = ({r["seed"]: r for r in finals.get(i, [])} for i in (a, b))
        seeds = sorted(set(pa) & set(pb))
        if seeds:
            print(f"| {a} - {b} | {len(seeds)} | "
                  f"{_spread([_window(pa[s], True) - _window(pb[s], True) for s in seeds])} | "
                  f"{_spread([_window(pa[s], False) - _window(pb[s], False) for s in seeds])} | "
                  f"{_spread([pa[s]['test'] - pb[s]['test'] for s in seeds])} |")


# ============================================================================================ protocol


def run_setting(setting: str, args: argparse.Namespace, table_only: bool) -> None:
    """Search (each init at each lr of the grid on the search seeds, validation only) unless the grid has one lr,
    then final runs at each init's chosen lr on ``--seeds`` (validation and test); tables after each run."""
    lrs = args.lrs[setting]
    search: dict[str, list[dict]] = {init: [] for init in args.inits}
    chosen: dict[str, float] = {}
    finals: dict[str, list[dict]] = {init: [] for init in args.inits}

    def tables() -> None:
        if len(lrs) > 1 and any(search.values()):
            print_search_table(setting, search, chosen)
        if any(finals.values()):
            print_final_table(setting, finals)
        print(flush=True)

    def record(path: str, result: dict) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
        print(f"{setting} {result['phase']} {result['init']} seed {result['seed']} lr {result['lr']:g}: "
              f"validation {result['validation']:.4f}"
              + (f", test {result['test']:.4f}" if result["test"] is not None else "")
              + f", {result['train_seconds']:.0f} s", flush=True)

    for init in args.inits:
        if len(lrs) == 1:
            chosen[init] = lrs[0]
            continue
        for seed in args.search_seeds:
            paths = {lr: run_path(args.out, setting, init, seed, lr, "search") for lr in lrs}
            todo = [lr for lr in lrs if load_run(paths[lr], args) is None]
            if todo and not table_only:
                for result in run_group(setting, init, seed, todo, "search", args):
                    record(paths[result["lr"]], result)
            search[init] += [run for run in (load_run(paths[lr], args) for lr in lrs) if run is not None]
        if len(search[init]) == len(lrs) * len(args.search_seeds):
            chosen[init] = choose_lr(search[init], setting)
        if not table_only:
            tables()
    for seed in args.seeds:  # seeds outer: every init gets its first final seeds first
        for init in chosen:
            path = run_path(args.out, setting, init, seed, chosen[init], "final")
            run = load_run(path, args)
            if run is None and not table_only:
                run = next(run_group(setting, init, seed, [chosen[init]], "final", args))
                record(path, run)
                finals[init].append(run)
                tables()
            elif run is not None:
                finals[init].append(run)
    tables()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["minilm", "smollm"], choices=sorted(METRIC))
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seeds of the final runs")
    parser.add_argument("--search-seeds", nargs="+", type=int, default=[0], help="seeds of the lr search")
    parser.add_argument("--minilm-steps", type=int, default=60)
    parser.add_argument("--smollm-steps", type=int, default=20)
    parser.add_argument("--minilm-batch-size", type=int, default=16)
    parser.add_argument("--smollm-batch-size", type=int, default=4)
    parser.add_argument("--minilm-lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3],
                        help="lr grid; one value skips the search")
    parser.add_argument("--smollm-lrs", nargs="+", type=float, default=[3e-4])
    parser.add_argument("--block", type=int, default=64, help="tokens per packed block (smollm)")
    parser.add_argument("--eva-batches", type=int, default=16, help="batches EVA may read (it stops earlier once settled)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_svd_plugins", "bench-eva-seeds"))
    parser.add_argument("--table", action="store_true", help="only print the tables of finished runs")
    parser.add_argument("--export", help="also write every run in --out to this JSONL file")
    args = parser.parse_args()
    args.steps = {"minilm": args.minilm_steps, "smollm": args.smollm_steps}
    args.batch_size = {"minilm": args.minilm_batch_size, "smollm": args.smollm_batch_size}
    args.lrs = {"minilm": args.minilm_lrs, "smollm": args.smollm_lrs}
    overlap = sorted(set(args.seeds) & set(args.search_seeds))
    if overlap and any(len(args.lrs[s]) > 1 for s in args.settings):
        parser.error(f"--seeds and --search-seeds share {overlap}: final runs must use seeds the lr search did not")
    os.makedirs(args.out, exist_ok=True)
    migrate_unlabelled(args.out)
    for setting in args.settings:
        run_setting(setting, args, args.table)
    if args.export:
        export_jsonl(args.out, args.export)


if __name__ == "__main__":
    main()
