"""The runs of the private-LoRA study (benchmarks/dp_lora.py): the diagnosis ladder, the validation search, the final
configuration. Every configuration evaluated on validation is listed here, so the search is counted from this file
and the results file (``python benchmarks/dp_lora.py table``)."""

from __future__ import annotations

import statistics

from dp_lora import Run

QV = ("query", "value")
SMALL_DATA = 3892 / 9222  # the 3,892-snippet train split of the earlier runs, as a share of today's 9,222

# From the recipe that stayed at chance to one that learns, one lever at a time (epsilon 8, validation, seed 0).
LADDER = [
    Run(pooling="cls", r=8, targets=QV, lora_layers=None, head_init="random", max_grad_norm=1.0, batch=512,
        epochs=6, lr=5e-3, train_fraction=SMALL_DATA, tag="ladder 0: earlier recipe (CLS pooler)"),
    Run(r=8, targets=QV, lora_layers=None, head_init="random", max_grad_norm=1.0, batch=512, epochs=6, lr=5e-3,
        train_fraction=SMALL_DATA, tag="ladder 1: mean pooling, no dropout"),
    Run(r=8, targets=QV, lora_layers=None, head_init="random", max_grad_norm=1.0, batch=512, epochs=6, lr=5e-3,
        tag="ladder 2: + all 9,222 train snippets"),
    Run(r=8, targets=QV, lora_layers=2, head_init="random", max_grad_norm=1.0, batch=512, epochs=6, lr=5e-3,
        tag="ladder 3: + LoRA on the top 2 layers only"),
    Run(r=8, targets=QV, lora_layers=2, head_init="zero", max_grad_norm=1.0, batch=512, epochs=6, lr=5e-3,
        tag="ladder 4: + zero head"),
]


def search_runs() -> list[Run]:
    """Validation search, seed 0, in the order it was run."""
    runs = [
        Run(r=4, targets=QV, lora_layers=2, batch=1024, epochs=10, lr=5e-3, tag="screen"),
        Run(r=4, targets=QV, lora_layers=2, batch=1024, epochs=10, lr=2e-2, tag="screen"),
    ]
    # head only (the reference), on cached final features: cheap
    runs += [Run(r=None, batch=1024, epochs=e, lr=lr, tag="head") for e in (10, 20) for lr in (2e-2, 5e-2)]
    # non-private LoRA, same adapter: learning rate and epochs
    runs += [Run(epsilon=None, r=4, targets=QV, lora_layers=2, batch=32, epochs=e, lr=lr, tag="non-private")
             for e in (3,) for lr in (3e-4, 1e-3, 3e-3)]
    # DP LoRA: the learning rate was the first lever (0.759 at 5e-3 -> 0.794 at 2e-2); epsilon 8 and 3
    runs += [Run(r=4, targets=QV, lora_layers=2, batch=1024, epochs=10, lr=5e-2, tag="screen")]
    runs += [Run(epsilon=3.0, r=4, targets=QV, lora_layers=2, batch=1024, epochs=10, lr=lr, tag="screen")
             for lr in (2e-2, 5e-2)]
    return runs


FINAL: dict = {}


def final_runs(seeds: list[int]) -> list[Run]:
    raise SystemExit("the final configuration is not chosen yet")


def print_final(records: list[dict]) -> None:
    rows: dict[str, list[dict]] = {}
    for rec in records:
        rows.setdefault(rec.get("tag", ""), []).append(rec)
    print("\n| run | seeds | test accuracy (mean +- std) | epsilon | s per run |")
    print("|---|---|---|---|---|")
    for tag, recs in rows.items():
        accs = [r["accuracy"] for r in recs]
        std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        eps = recs[0].get("epsilon", float("inf"))
        print(f"| {tag} | {len(recs)} | {statistics.mean(accs):.4f} +- {std:.4f} | {eps:.3g} | "
              f"{statistics.mean(r['seconds'] for r in recs):.0f} |")
