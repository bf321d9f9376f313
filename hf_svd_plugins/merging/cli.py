"""``hf-svd merge``: align ``save_pretrained`` checkpoints (weight matching by default) and save their merge.

    hf-svd merge DIR_A DIR_B [DIR_C ...] --out DIR [--method weight_matching] [--eval-data text.txt] [--plot p.png]

With ``--eval-data`` (a UTF-8 text file, cut into ``--block-size`` token blocks with DIR_A's tokenizer; causal LMs),
prints the loss of every model and of the merge, and the interpolation barrier between the reference and each other
model before (naive) and after alignment. torch is imported only inside :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "align checkpoints by weight matching (Git Re-Basin) and merge them"

METHOD_CHOICES = ("weight_matching", "naive", "ste", "activation", "orthogonal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="save_pretrained directories (safetensors), 2 or more")
    parser.add_argument("--out", required=True, help="directory for the merged model")
    parser.add_argument("--method", default="weight_matching", choices=METHOD_CHOICES)
    parser.add_argument("--weights", type=float, nargs="+", help="mixing weights, one per model (normalised)")
    parser.add_argument("--reference", type=int, default=0, help="index of the model whose basis is kept")
    parser.add_argument("--eval-data", help="UTF-8 text file to evaluate on (causal LMs)")
    parser.add_argument("--calib-data", help="text file that STE / activation matching fit on (default --eval-data)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per evaluation sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=8, help="batches read from each data file")
    parser.add_argument("--points", type=int, default=11, help="interpolation points for the barrier")
    parser.add_argument("--plot", help="write the interpolation curves to this PNG (needs --eval-data)")
    parser.add_argument("--max-passes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ste-steps", type=int, default=100)
    parser.add_argument("--ste-lr", type=float, default=1e-2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _error(message: str) -> int:
    print(f"hf-svd merge: error: {message}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    if len(args.models) < 2:
        return f"give at least 2 checkpoint directories, got {len(args.models)}"
    for path in args.models:
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{path!r} is not a save_pretrained directory (no config.json)"
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):
            return f"{path!r} has no .safetensors weights (save with save_pretrained(safe_serialization=True))"
    if args.weights is not None and len(args.weights) != len(args.models):
        return f"--weights has {len(args.weights)} values for {len(args.models)} models"
    if args.method in ("ste", "activation") and not (args.calib_data or args.eval_data):
        return f"--method {args.method} needs --calib-data or --eval-data"
    for path in (args.eval_data, args.calib_data):
        if path and not os.path.isfile(path):
            return f"data file {path!r} does not exist"
    if args.plot and not args.eval_data:
        return "--plot needs --eval-data"
    if args.points < 3 or args.block_size < 2 or args.batch_size < 1 or args.eval_batches < 1:
        return "--points must be >= 3, --block-size >= 2, --batch-size and --eval-batches >= 1"
    return None


def _load(path: str, device: str):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(path, dtype="auto").to(device).eval()


def _text_batches(path: str, tokenizer_dir: str, block_size: int, batch_size: int, max_batches: int) -> list[dict]:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(path, encoding="utf-8") as f:
        ids = tokenizer(f.read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    blocks = ids[: (len(ids) // block_size) * block_size].reshape(-1, block_size)[: batch_size * max_batches]
    if len(blocks) == 0:
        raise ValueError(f"{path!r} has fewer than --block-size={block_size} tokens")
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
            for b in blocks.split(batch_size)]


def run(args: argparse.Namespace) -> int:
    problem = _check_args(args)
    if problem:
        return _error(problem)
    import copy

    import torch
    from transformers import AutoConfig

    from hf_svd_plugins.merging.diagnostics import interpolation_path, l2_distance, plot_interpolation
    from hf_svd_plugins.merging.evaluation import evaluate, is_causal_lm
    from hf_svd_plugins.merging.inputs import check_configs, mixing_weights, model_state
    from hf_svd_plugins.merging.merge import average_states, load_state_into, merge_models

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        check_configs([AutoConfig.from_pretrained(p) for p in args.models], args.models)
        mix = mixing_weights(args.weights, len(args.models))
    except (ValueError, OSError) as exc:
        return _error(str(exc))
    models = [_load(p, args.device) for p in args.models]
    if (args.eval_data or args.calib_data) and not is_causal_lm(models[0]):
        return _error(f"text data needs a causal LM; {type(models[0]).__name__} is not one (use the Python API)")
    eval_batches = calib = None
    try:
        if args.eval_data:
            eval_batches = _text_batches(args.eval_data, args.models[0], args.block_size, args.batch_size,
                                         args.eval_batches)
        if args.calib_data or args.eval_data:
            calib = (_text_batches(args.calib_data, args.models[0], args.block_size, args.batch_size,
                                   args.eval_batches) if args.calib_data else eval_batches)
        merged, alignment = merge_models(
            models, method=args.method, weights=args.weights, reference=args.reference,
            data=calib if args.method in ("ste", "activation") else None, return_alignment=True,
            seed=args.seed, progress=not args.no_progress, max_passes=args.max_passes,
            **({"ste_steps": args.ste_steps, "ste_lr": args.ste_lr} if args.method == "ste" else {}))
    except (ValueError, TypeError, OSError) as exc:
        return _error(str(exc))
    ref = alignment.reference
    aligned = alignment.aligned_states(models)
    print(f"method {args.method}, reference model {ref} ({args.models[ref]})")
    for i, res in enumerate(alignment.results):
        if res is None:
            continue
        objective = " -> ".join(f"{v:.6g}" for v in res.objective)
        print(f"model {i}: objective per pass {objective}; {res.passes} passes, {res.seconds:.1f} s "
              f"(costs {res.cost_seconds:.1f} s, assignments {res.assignment_seconds:.1f} s)")
    for i in range(len(models)):
        if i != ref:
            print(f"model {i}: L2 distance to reference {l2_distance(models[ref], models[i]):.4f} before, "
                  f"{l2_distance(model_state(models[ref]), aligned[i]):.4f} after alignment")
    if eval_batches:
        print("\n| model | eval loss | accuracy |\n|---|---|---|")
        for i, m in enumerate(models):
            r = evaluate(m, eval_batches)
            print(f"| {i} | {r.loss:.4f} | {r.accuracy:.4f} |")
        naive = load_state_into(copy.deepcopy(models[ref]), average_states([model_state(m) for m in models], mix))
        for label, m in (("naive average", naive), (f"merged ({args.method})", merged)):
            r = evaluate(m, eval_batches)
            print(f"| {label} | {r.loss:.4f} | {r.accuracy:.4f} |")
        curves = {}
        print(f"\n| pair | barrier naive (nats) | barrier {args.method} (nats) |\n|---|---|---|")
        for i in range(len(models)):
            if i == ref:
                continue
            before = interpolation_path(models[ref], models[i], eval_batches, args.points)
            after = interpolation_path(models[ref], aligned[i], eval_batches, args.points)
            curves[f"{ref}-{i} naive"], curves[f"{ref}-{i} {args.method}"] = before, after
            print(f"| {ref}-{i} | {before.barrier:.4f} | {after.barrier:.4f} |")
        if args.plot:
            print(f"plot: {plot_interpolation(curves, args.plot, title='interpolation between checkpoints')}")
    os.makedirs(args.out, exist_ok=True)
    merged.save_pretrained(args.out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.models[ref]).save_pretrained(args.out)
    except (OSError, ValueError, TypeError):
        pass  # no tokenizer in the checkpoint: the model alone is saved
    print(f"saved the merged model to {args.out}")
    return 0
