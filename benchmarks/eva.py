"""EVA benchmark on real text, side by side with PEFT's EVA. Two parts, two sub-commands:

``init``: initialisation cost and accuracy, our ``compute_eva`` vs ``peft.get_eva_state_dict`` on the same batches.
    Each (model, method, repeat) runs in a fresh subprocess, methods alternated; wall time and peak RSS growth of the
    call (VmHWM is reset just before it). Accuracy is measured afterwards by an independent float64 reference (plain
    forward hooks on the model without PEFT): for every module, the variance its A rows capture divided by the
    variance of the optimal subspace of the same size (top-``r_m`` eigenvectors of the centred scatter), over the
    batches that method read and over all prepared batches. Models:

    - ``wide``: a Llama built from a config (hidden 1024, intermediate 4096, 2 layers, SmolLM2's tokenizer and
      vocabulary, random init), LoRA on all 7 projections;
    - ``smollm``: SmolLM2-135M-Instruct (``examples.smollm2_float32_path()``, a plain float32 copy of the packaged GGUF),
      all 7 projections of its 30 layers;
    - ``minilm``: all-MiniLM-L6-v2 as a classifier (BERT's pooler left out: PEFT's EVA cannot handle it).

    Results go to ``--out`` as JSON, one file per run (the command resumes where it stopped); the table is printed
    after every run. ``--estimate-7b`` prints the statistics' memory at 7B from the formulas in ``EvaConfig``.

``finetune``: training loss and test accuracy for MiniLM + LoRA initialised by EVA (``EvaCallback``), PEFT's default
    init and PiSSA, same seed, data and hyper-parameters.

    nice -n 10 python benchmarks/eva.py init --models wide smollm --repeats 2
    python benchmarks/eva.py init --estimate-7b
    python benchmarks/eva.py finetune --steps 150

Fine-tuning over seeds (EVA rho 1/2, PEFT's EVA, default, PiSSA, OLoRA; MiniLM and SmolLM2): benchmarks/eva_seeds.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

TARGETS_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS_BERT = ["query", "key", "value", "output.dense", "intermediate.dense"]
SHARES_INPUT_WITH = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "key": "query", "value": "query"}
METHODS = ("ours", "peft", "exact")
LABELS = {"ours": "hf_svd_plugins `compute_eva`", "peft": "peft `get_eva_state_dict`",
          "exact": "hf_svd_plugins, statistics=\"exact\""}


# ============================================================================================ part 1: initialisation


def build_base(model_name: str):
    """``(model, tokenizer, target_modules, task_type)`` with fixed seeds, no LoRA yet."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_svd_plugins import examples

    torch.manual_seed(0)
    if model_name == "minilm":
        model, tok = examples.minilm_lora_classifier(8, True)
        return model.get_base_model(), tok, TARGETS_BERT, "SEQ_CLS"
    tok = AutoTokenizer.from_pretrained(examples.smollm2_float32_path())
    tok.pad_token = tok.pad_token or tok.eos_token
    if model_name == "smollm":
        model = AutoModelForCausalLM.from_pretrained(examples.smollm2_float32_path(), dtype=torch.float32)
    elif model_name == "wide":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                             num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                             tie_word_embeddings=True)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown model {model_name!r}; use wide, smollm or minilm")
    return model.eval(), tok, TARGETS_LLAMA, "CAUSAL_LM"


def build_lora(model_name: str, r: int):
    """The model both methods initialise: a LoRA adapter marked for EVA (PEFT's API needs ``init_lora_weights="eva"``)."""
    from peft import EvaConfig as PeftEvaConfig
    from peft import LoraConfig, get_peft_model

    base, tok, targets, task = build_base(model_name)
    config = LoraConfig(r=r, lora_alpha=2 * r, task_type=task, lora_dropout=0.0, init_lora_weights="eva",
                        target_modules=targets, eva_config=PeftEvaConfig(rho=2.0, tau=0.99))
    return get_peft_model(base, config, low_cpu_mem_usage=True), tok


def eva_batches(tok, n_batches: int, batch_size: int, max_length: int) -> list[dict]:
    from hf_svd_plugins import examples

    train, _ = examples.rotten_tomatoes()
    return [dict(tok(train.text[b * batch_size : (b + 1) * batch_size], truncation=True, max_length=max_length,
                     padding=True, return_tensors="pt")) for b in range(n_batches)]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _run_ours(model, batches, statistics: str):
    from hf_svd_plugins.eva import EvaConfig, compute_eva

    config = EvaConfig(rho=2.0, tau=0.99, max_batches=len(batches), statistics=statistics, show_progress_bar=False)
    result = compute_eva(model, batches, config)
    extra = {"sketched": sum(k == "sketch" for k in result.statistics.values()),
             "min_variance_bound": min(result.variance_bounds[m] for m, r in result.ranks.items() if r)}
    return result.matrices, result.batches_read, extra


def _run_peft(model, batches, forwards: list[int]):
    from peft import get_eva_state_dict
    from peft.tuners.lora import eva as peft_eva

    read: dict[str, list[int]] = {}
    svd_hook = peft_eva.SVDHook.__call__

    def recording(hook, module, inputs, output):  # PEFT removes a layer's hook once it converged
        read.setdefault(hook.name.removeprefix("base_model.model."), []).append((forwards[0] - 2) % len(batches))
        return svd_hook(hook, module, inputs, output)

    peft_eva.SVDHook.__call__ = recording  # the first forward fingerprints inputs, then it cycles from batch 0
    try:
        state = get_eva_state_dict(model, batches, show_progress_bar=False)
    finally:
        peft_eva.SVDHook.__call__ = svd_hook
    matrices = {k.removeprefix("base_model.model."): v.double() for k, v in state.items()}
    for name in matrices:  # layers sharing an input with an earlier one run no hook of their own in PEFT
        if name not in read:
            prefix, leaf = name.rsplit(".", 1)
            read[name] = read[f"{prefix}.{SHARES_INPUT_WITH[leaf]}"]
    return matrices, read, {}


def _init_worker(method: str, model_name: str, args: dict, path: str) -> None:
    import torch

    torch.set_num_threads(args["threads"])
    model, tok = build_lora(model_name, args["r"])
    batches = eva_batches(tok, args["batches"], args["batch_size"], args["max_length"])
    with torch.no_grad():  # page in weights loaded by memory map, so they do not count as the method's memory
        for p in model.parameters():
            p.sum()
    forwards = [0]
    model.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    load = os.getloadavg()[0]
    _reset_peak_rss()
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    if method == "peft":
        matrices, read, extra = _run_peft(model, batches, forwards)
        n_batches = forwards[0] - 1  # the first forward only fingerprints inputs
    else:
        matrices, read, extra = _run_ours(model, batches, "exact" if method == "exact" else "auto")
        n_batches = forwards[0]  # one forward per batch read
    seconds = time.perf_counter() - start
    peak_mb = (_status_kb("VmHWM") - base_kb) / 1024
    torch.save(matrices, path + ".pt")
    with open(path, "w") as f:
        json.dump({"method": method, "model": model_name, "seconds": seconds, "peak_mb": peak_mb,
                   "batches": n_batches, "ranks": {k: int(v.shape[0]) for k, v in matrices.items()},
                   "read": read, "load_before": load, "threads": args["threads"], **extra}, f)


def _reference_worker(model_name: str, args: dict, runs: list[dict], path: str) -> None:
    """Independent float64 statistics of every target module's inputs (plain hooks on the model without PEFT), and
    for every run and module the variance its A rows capture over (a) the batches that module read and (b) all
    batches, divided by the variance of the optimal subspace of the same size over the same rows."""
    import torch

    torch.set_num_threads(args["threads"])
    model, tok, targets, _ = build_base(model_name)
    batches = eva_batches(tok, args["batches"], args["batch_size"], args["max_length"])
    everything = tuple(range(len(batches)))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in targets)]
    # every distinct set of batches some run's module read, per module (a module read batch b `count` times)
    wanted: dict[str, set[tuple[int, ...]]] = {n: {everything} for n in names}
    for run in runs:
        for name, batch_list in run["read"].items():
            wanted[name].add(tuple(sorted(batch_list)))
    sums: dict[tuple[str, tuple[int, ...]], list] = {}  # (module, batches) -> [count, column sums, Gram]
    state = {"mask": None, "batch": -1}

    def hook(name, inputs):
        x = inputs[0]
        rows = (x[state["mask"]] if x.dim() == 3 else x).double()
        count, total, gram = rows.shape[0], rows.sum(0), rows.T @ rows
        for key in wanted[name]:
            times = key.count(state["batch"])
            if times:
                entry = sums.setdefault((name, key), [0, 0.0, 0.0])
                entry[0] += times * count
                entry[1] = entry[1] + times * total
                entry[2] = entry[2] + times * gram

    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: hook(name, i))
    with torch.no_grad():
        for b, batch in enumerate(batches):
            state.update(mask=batch["attention_mask"].bool(), batch=b)
            model(**batch)
    spectra: dict = {}

    def captured(name: str, key: tuple[int, ...], a: torch.Tensor) -> float:
        count, total, gram = sums[(name, key)]
        scatter = gram - torch.outer(total, total) / count
        if (name, key) not in spectra:
            spectra[(name, key)] = torch.linalg.eigvalsh(scatter).flip(0)
        q = torch.linalg.qr(a.double().T)[0]  # an orthonormal basis of the span of A's rows
        return float(torch.trace(q.T @ scatter @ q) / spectra[(name, key)][: a.shape[0]].sum())

    results = {}
    for run in runs:
        own, every = {}, {}
        for name, a in torch.load(run["file"] + ".pt").items():
            if a.shape[0]:
                own[name] = captured(name, tuple(sorted(run["read"][name])), a)
                every[name] = captured(name, everything, a)
        results[run["file"]] = {"own": min(own.values()), "all": min(every.values()),
                                "own_mean": sum(own.values()) / len(own), "all_mean": sum(every.values()) / len(every),
                                "worst_own": min(own, key=own.get)}
    with open(path, "w") as f:
        json.dump(results, f)


def _spawn(target, *args) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__}{args[:2]} failed with exit code {p.exitcode}")


def run_init(model_name: str, args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    settings = {"r": args.r, "batch_size": args.batch_size, "max_length": args.max_length, "batches": args.batches,
                "threads": args.threads}
    for repeat in range(args.repeats):
        for method in args.methods if repeat % 2 == 0 else args.methods[::-1]:  # alternate who goes first
            path = os.path.join(args.out, f"{model_name}-{method}-{repeat}.json")
            if os.path.exists(path):
                continue
            _spawn(_init_worker, method, model_name, settings, path)
            print_init_table(model_name, args)
    runs = _load_runs(model_name, args)
    reference = os.path.join(args.out, f"{model_name}-reference.json")
    if runs and not (os.path.exists(reference) and set(json.load(open(reference))) >= {r["file"] for r in runs}):
        _spawn(_reference_worker, model_name, settings, runs, reference)
    print_init_table(model_name, args)


def _load_runs(model_name: str, args: argparse.Namespace) -> list[dict]:
    runs = []
    for repeat in range(args.repeats):
        for method in args.methods:
            path = os.path.join(args.out, f"{model_name}-{method}-{repeat}.json")
            if os.path.exists(path):
                runs.append({**json.load(open(path)), "file": path})
    return runs


def print_init_table(model_name: str, args: argparse.Namespace) -> None:
    runs = _load_runs(model_name, args)
    reference_path = os.path.join(args.out, f"{model_name}-reference.json")
    captured = json.load(open(reference_path)) if os.path.exists(reference_path) else {}
    print(f"\n## EVA initialisation, {model_name}: r={args.r}, rho=2, tau=0.99, {args.batches} batches of "
          f"{args.batch_size} x <= {args.max_length} tokens, {args.threads} thread(s)")
    print("| method | run | seconds | peak RSS growth (MB) | batches read | captured variance, min (mean) over modules: "
          "batches each module read | same, all batches | load avg before |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        c = captured.get(run["file"])
        own, every = (f"{c[k]:.4f} ({c[k + '_mean']:.4f})" if c else "-" for k in ("own", "all"))
        print(f"| {LABELS[run['method']]} | {os.path.basename(run['file']).split('-')[-1][:-5]} | "
              f"{run['seconds']:.2f} | {run['peak_mb']:.0f} | {run['batches']} | {own} | {every} | "
              f"{run['load_before']:.1f} |")
    for repeat in range(args.repeats):
        pair = {r["method"]: r for r in runs if r["file"].endswith(f"-{repeat}.json")}
        if "ours" in pair and "peft" in pair:
            same = sum(pair["ours"]["ranks"].get(k) == v for k, v in pair["peft"]["ranks"].items())
            print(f"run {repeat}: ours/PEFT time {pair['ours']['seconds'] / pair['peft']['seconds']:.2f}, peak memory "
                  f"{pair['ours']['peak_mb'] / max(pair['peft']['peak_mb'], 1e-9):.2f}; identical rank for "
                  f"{same}/{len(pair['peft']['ranks'])} modules", flush=True)


def estimate_7b(layers: int = 32, hidden: int = 4096, intermediate: int = 11008, ranks_per_gpu: int = 8,
                tokens_per_rank: int = 4096) -> None:
    """Memory and traffic of the statistics at 7B from the formulas the code uses (not measured: no 7B model here)."""
    from hf_svd_plugins.eva import EvaConfig
    from hf_svd_plugins.eva.collection import route_bytes
    from hf_svd_plugins.eva.sketch import exact_bytes, sketch_bytes

    streams = [hidden, hidden, hidden, intermediate]  # q/k/v, o, gate/up, down: 4 distinct inputs per layer
    w, n = ranks_per_gpu, tokens_per_rank
    for r in (8, 16):
        for statistics in ("auto", "exact"):
            config = EvaConfig(rho=2.0, statistics=statistics)
            k = config.max_components(r)
            memory = sent = 0
            for d in streams:
                sketched, rows = config.uses_sketch(d, k), config.sketch_rows(d, k)
                memory += sketch_bytes(d, rows) if sketched else exact_bytes(d)
                sent += min(route_bytes("sketch" if sketched else "exact", d, rows, n, w, 4).values())
            print(f"7B ({layers} x {hidden}/{intermediate}), r={r}, rho=2, statistics={statistics!r}: "
                  f"{layers * memory / 1e9:.2f} GB of persistent statistics ({layers * len(streams)} inputs, "
                  f"sketch rows l={config.sketch_rows(hidden, k)}); under DDP with {w} ranks x {n} tokens: "
                  f"{layers * sent / 1e9:.1f} GB received per rank per batch while no input has converged")
        peft = layers * sum(4 * (k * d + 3 * d) for d in streams)  # components_, mean_, var_ (float32)
        peft_rows = layers * sum(w * n * d * 4 for d in streams)  # PEFT all-gathers every layer input
        print(f"  PEFT's IncrementalPCA state at r={r}: {peft / 1e6:.0f} MB; its all-gather of inputs under DDP: "
              f"{peft_rows / 1e9:.0f} GB per rank per batch")


# ============================================================================================ part 2: fine-tuning


def run_finetune(args: argparse.Namespace) -> None:
    from hf_svd_plugins.examples import finetune_sentiment

    print(f"\n## Fine-tuning MiniLM + LoRA r={args.r} on Rotten Tomatoes, {args.steps} steps, batch {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}")
    results = [finetune_sentiment(init, args.steps, args.r, args.batch_size, args.lr, args.seed) for init in args.inits]
    n = min(len(r.losses) for r in results)
    marks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    print("| init | " + " | ".join(f"loss @ step {10 * (i + 1)}" for i in marks)
          + " | mean train loss | test accuracy | train seconds |")
    print("|---|" + "---|" * (len(marks) + 3))
    for r in results:
        mean = sum(r.losses[:n]) / n
        print(f"| {r.init} | " + " | ".join(f"{r.losses[i]:.4f}" for i in marks)
              + f" | {mean:.4f} | {r.accuracy:.3f} | {r.seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    init = sub.add_parser("init", help="initialisation cost and accuracy vs PEFT's EVA")
    init.add_argument("--models", nargs="+", default=["wide", "smollm"], choices=["wide", "smollm", "minilm"])
    init.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    init.add_argument("--r", type=int, default=8)
    init.add_argument("--batch-size", type=int, default=16)
    init.add_argument("--max-length", type=int, default=64)
    init.add_argument("--batches", type=int, default=64)
    init.add_argument("--repeats", type=int, default=2)
    init.add_argument("--threads", type=int, default=1)
    init.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_svd_plugins", "bench-eva"))
    init.add_argument("--estimate-7b", action="store_true", help="only print the 7B memory estimate")
    finetune = sub.add_parser("finetune", help="fine-tuning MiniLM: EVA vs default init vs PiSSA")
    finetune.add_argument("--steps", type=int, default=150)
    finetune.add_argument("--r", type=int, default=8)
    finetune.add_argument("--batch-size", type=int, default=16)
    finetune.add_argument("--lr", type=float, default=5e-4)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--inits", nargs="+", default=["default", "pissa", "eva"], choices=["default", "pissa", "eva"])
    args = parser.parse_args()
    if args.part == "finetune":
        run_finetune(args)
    elif args.estimate_7b:
        estimate_7b()
    else:
        for model_name in args.models:
            run_init(model_name, args)


if __name__ == "__main__":
    main()
