"""FedSVD vs FFA-LoRA vs FedAvg-LoRA under DP, in the setting where private LoRA learns (benchmarks/dp_lora.py).

The model and data of the private-LoRA study: packaged all-MiniLM-L6-v2, mean-pooled, LoRA r=4 on query/value of
its top 2 layers and a zero-initialised linear head, the frozen lower 4 layers computed once per example
(``examples.minilm_frozen_prefix``), all 12,808 Rotten Tomatoes snippets (``rotten_tomatoes_splits(seed, 0.1, 0.2,
full=True)``: 9,222 train / 1,024 validation / 2,562 test). The federation: the train split in ``--clients`` shards by
Dirichlet(``--alpha``) label skew, ``--per-round`` clients sampled per round, each trains ``--local-steps`` optimizer
steps from the global adapter (B and the head for FedSVD / FFA-LoRA, A too for FedAvg-LoRA) with a fresh optimizer
(``--optim``, default plain SGD) whose learning rate decays linearly over the rounds. SGD, not AdamW: a fresh Adam
takes sign-like steps of size lr on every coordinate in its first steps, so under label skew each client moves the
whole head toward its majority class at full speed and, under DP, every noise-dominated coordinate moves by lr; the
server's average of such steps is not an average of gradients. Development runs (``search --limit 3000
--search-rounds 6 --methods ffa_lora --epsilons 6 --optim adamw_torch``) stayed at the majority class with AdamW at lr
3e-3, 1e-2 and 3e-2; a scratch simulation of the head alone on the same features (not kept) learned with SGD at lr
30-100, the grid searched here (clipping at C = 0.1 shrinks the examples' gradients, of norm about 2-3, 20-30x). A client's logical batch is a fixed share of its shard: Poisson
sampling at ``q = --sample-rate`` (the expected batch ``q n_c``, rounded to micro-batches of ``--micro-batch``).

Private runs: every client is a ``DPTrainer`` (``C = --max-grad-norm``, delta = 1e-5, PRV) calibrated with
``DPConfig(target_epsilon, total_steps=rounds x local_steps)``: a client sampled in every round would spend exactly
epsilon; each client's accountant persists across rounds, and rows report the largest epsilon any client spent. The
noise and sampler seeds are secret (DPConfig's default), so private runs are not bit-reproducible. Every private
client step also records its examples' gradient norms before clipping (B, A, head, all) and the fraction clipped.

    python benchmarks/fedsvd_private.py search              # lr per method on validation, seed 0 (short runs)
    python benchmarks/fedsvd_private.py final               # chosen lr per method, on test, test accuracy per round
    python benchmarks/fedsvd_private.py all                 # both, in priority order: per seed and epsilon in
                                                            # --epsilons order, its search (seed 0) then its finals
    python benchmarks/fedsvd_private.py table               # the tables from the results file

Several processes may run the same command at once (``all`` in two shells uses both cores): each run is claimed by
a lock file in ``--work``; a final run waits for a search another process is still running.

Every finished run appends one JSON line to ``--results``; a rerun skips the runs there and resumes an unfinished
run from its last round (the federation's server checkpoint in ``--work``). The table is rewritten as runs finish.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dp_lora import Run as _StudyRun  # noqa: E402
from dp_lora import datasets_for, make_dp_trainer_class, read_records  # noqa: E402
from fedsvd import METHODS, plot_accuracy_per_round  # noqa: E402
from run_locks import claim, held, lock_path  # noqa: E402

DEFAULT_RESULTS = os.path.join(HERE, "results", "fedsvd_private.jsonl")
DEFAULT_WORK = os.path.join("outputs", "fedsvd_private")


@dataclass(frozen=True)
class FedRun:
    """One federation. ``epsilon=None`` is non-private. ``budget_rounds``: the rounds the privacy budget is
    calibrated over (``None``: ``rounds``), so that a short search run has the noise of the full run."""

    method: str
    epsilon: float | None
    lr: float
    seed: int = 0
    split: str = "test"
    rounds: int = 12
    budget_rounds: int | None = None
    local_steps: int = 5
    sample_rate: float = 0.15
    clients: int = 6
    per_round: int = 3
    alpha: float = 0.5
    max_grad_norm: float = 0.1
    micro_batch: int = 32
    optim: str = "sgd"
    limit: int | None = None
    tag: str = field(default="", compare=False)

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("tag")
        for name in ("epsilon", "lr", "sample_rate", "alpha", "max_grad_norm"):
            if isinstance(d[name], int):
                d[name] = float(d[name])
        return json.dumps(d, sort_keys=True)

    def name(self) -> str:
        eps = "inf" if self.epsilon is None else f"{self.epsilon:g}"
        digest = hashlib.sha1(self.key().encode()).hexdigest()[:8]
        return f"{self.method}_eps{eps}_lr{self.lr:g}_seed{self.seed}_{self.split}_R{self.rounds}_{digest}"

    @property
    def total_steps(self) -> int:
        return (self.budget_rounds or self.rounds) * self.local_steps


def accumulation_steps(num_examples: int, sample_rate: float, micro_batch: int) -> int:
    """Micro-batches per logical batch for a shard of ``num_examples``: the expected batch ``micro_batch x k`` closest
    to ``sample_rate x num_examples``, at least one micro-batch and at most the shard."""
    if num_examples < micro_batch:
        raise ValueError(f"a shard of {num_examples} examples is smaller than one micro-batch of {micro_batch}")
    return max(1, min(num_examples // micro_batch, round(sample_rate * num_examples / micro_batch)))


def shard_batch_trainer(base: type, sample_rate: float, micro_batch: int) -> type:
    """``base`` (a Trainer class) whose logical batch is a share of the client's own shard: gradient accumulation set
    by :func:`accumulation_steps` from ``len(train_dataset)``, so every client samples at about the same rate ``q``
    (and a DP client's sigma is calibrated for that ``q``) whatever its shard size."""

    class ShardBatchTrainer(base):
        def __init__(self, *, args, train_dataset, **kwargs):
            args = copy.copy(args)  # the federation builds fresh arguments per client; never edit a shared object
            args.gradient_accumulation_steps = accumulation_steps(len(train_dataset), sample_rate, micro_batch)
            super().__init__(args=args, train_dataset=train_dataset, **kwargs)

    ShardBatchTrainer.__name__ = f"ShardBatch{base.__name__}"
    return ShardBatchTrainer


def round_mechanism(records: list[dict]) -> dict:
    """One round's per-step DP records (:func:`dp_lora.make_dp_trainer_class`) condensed: the fraction of examples
    clipped and, per parameter group, the per-example gradient norms before clipping (step medians and means averaged
    over the round's client steps, the largest norm seen), and noise/signal of B."""
    if not records:
        return {}
    out = {"dp_steps": len(records), "batch_mean": statistics.mean(r["batch"] for r in records),
           "clipped": statistics.mean(r["clipped"] for r in records)}
    for group, short in (("lora_B", "b"), ("lora_A", "a"), ("head", "head"), ("all", "all")):
        if f"norm_{group}_median" in records[0]:
            out[f"{short}_norm_median"] = statistics.mean(r[f"norm_{group}_median"] for r in records)
            out[f"{short}_norm_mean"] = statistics.mean(r[f"norm_{group}_mean"] for r in records)
            out[f"{short}_norm_max"] = max(r[f"norm_{group}_max"] for r in records)
    if "signal_lora_B" in records[0]:
        signal = statistics.mean(r["signal_lora_B"] for r in records)  # ratio of means: B's signal is 0 at step 1
        out["b_noise_to_signal"] = statistics.mean(r["noise_lora_B"] for r in records) / max(signal, 1e-12)
    return out


def build_federation(run: FedRun, work: str, sink: list):
    """The model (mean-pooled MiniLM, LoRA on the top 2 layers), its prefix-state data and the ``Federation`` over
    the trainable top. Returns ``(federation, seconds spent on the prefix states)``."""
    import torch
    from transformers import Trainer

    from hf_svd_plugins.dp import DPConfig
    from hf_svd_plugins.examples import (
        collate_hidden_states,
        first_adapted_layer,
        minilm_dp_lora_classifier,
        minilm_frozen_prefix,
    )
    from hf_svd_plugins.fedsvd import Federation, accuracy_metrics

    if run.method not in METHODS:
        raise ValueError(f"method={run.method!r}: choose one of {METHODS}")
    model, _ = minilm_dp_lora_classifier(4, ["query", "value"], 2, train_lora_a=run.method == "fedavg_lora",
                                         head_init="zero", seed=run.seed)
    prefix, top = minilm_frozen_prefix(model)
    top.peft_config = model.peft_config  # the top holds the PEFT LoRA layers; find_lora_pairs reads the adapter config
    start = time.perf_counter()
    train, validation, test = cached_prefix_states(run, prefix, first_adapted_layer(model), work)
    data_seconds = time.perf_counter() - start
    private = run.epsilon is not None
    base = make_dp_trainer_class(sink) if private else Trainer
    trainer_kwargs = {}
    if private:
        trainer_kwargs["dp_config"] = DPConfig(target_epsilon=run.epsilon, total_steps=run.total_steps,
                                               max_grad_norm=run.max_grad_norm, per_sample_method="vmap")
    torch.manual_seed(run.seed)
    fed = Federation(
        top, train, num_clients=run.clients, method=run.method, client_fraction=run.per_round / run.clients,
        local_steps=run.local_steps, partition="dirichlet", alpha=run.alpha,
        eval_dataset=validation if run.split == "validation" else test, data_collator=collate_hidden_states,
        compute_metrics=accuracy_metrics,
        training_args={"per_device_train_batch_size": run.micro_batch, "per_device_eval_batch_size": 256,
                       "learning_rate": run.lr, "lr_scheduler_type": "constant", "weight_decay": 0.0, "optim": run.optim,
                       "use_cpu": True, "dataloader_num_workers": 0, **({"max_grad_norm": 0.0} if private else {})},
        trainer_cls=shard_batch_trainer(base, run.sample_rate, run.micro_batch), trainer_kwargs=trainer_kwargs,
        output_dir=os.path.join(work, run.name()), seed=run.seed,
    )
    return fed, data_seconds


def cached_prefix_states(run: FedRun, prefix, first_layer: int, work: str):
    """``dp_lora.datasets_for``, saved once to ``work`` and loaded by later processes (the frozen layers are the
    packaged weights, so the states depend only on the seed's split, the prefix depth and ``limit``)."""
    import torch

    path = os.path.join(work, f"prefix_states_seed{run.seed}_layers{first_layer}_limit{run.limit}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    splits = datasets_for(_StudyRun(seed=run.seed), prefix, first_layer, run.limit)
    os.makedirs(work, exist_ok=True)
    torch.save(splits, path + f".{os.getpid()}.tmp")
    os.replace(path + f".{os.getpid()}.tmp", path)
    return splits


def round_learning_rate(run: FedRun, rnd: int) -> float:
    """Linear decay over the rounds: ``lr (R - r) / R`` in round ``r`` (0-based), constant within a round."""
    return run.lr * (run.rounds - rnd) / run.rounds


def train_federation(run: FedRun, work: str, threads: int = 1) -> dict:
    """Run (or resume) one federation to ``run.rounds`` rounds; returns its result record."""
    import torch

    torch.set_num_threads(threads)
    sink: list[dict] = []
    fed, data_seconds = build_federation(run, work, sink)
    os.makedirs(fed.output_dir, exist_ok=True)
    with open(os.path.join(fed.output_dir, "run.json"), "w") as f:
        f.write(run.key())
    if fed.load_state():
        print(f"    resumed at round {fed.round}", flush=True)
    while fed.round < run.rounds:
        fed.training_args["learning_rate"] = round_learning_rate(run, fed.round)
        sink.clear()
        row = fed.run_round()
        row["lr"] = fed.training_args["learning_rate"]
        row.update(round_mechanism(sink))
        fed.save_state()  # again, with the round's measurements
        fed.write_metrics_csv()
        if row["n_ok"] < run.per_round:
            raise RuntimeError(f"round {row['round']}: only {row['n_ok']} of {run.per_round} clients trained "
                               f"(failed: {row['failed']}); see the warnings")
        print(f"    round {row['round']}: acc {row['eval_accuracy']:.4f} loss {row['eval_loss']:.4f} "
              f"eps max {row.get('epsilon_max', float('inf')):.3f} "
              + (f"B norm {row['b_norm_median']:.3g} clipped {row['clipped']:.2f} " if "clipped" in row else "")
              + f"({row['seconds']:.0f} s)", flush=True)
    history = fed.history
    mech = {k: statistics.mean(r[k] for r in history if k in r)
            for k in ("clipped", "b_norm_median", "b_norm_mean", "a_norm_median", "head_norm_median",
                      "all_norm_median", "b_noise_to_signal", "batch_mean") if any(k in r for r in history)}
    return {"key": run.key(), "run": dataclasses.asdict(run), "name": run.name(),
            "accuracy": history[-1]["eval_accuracy"], "curve": [r["eval_accuracy"] for r in history],
            "epsilon_max": history[-1].get("epsilon_max"), "seconds": round(sum(r["seconds"] for r in history), 1),
            "data_seconds": round(data_seconds, 1), "client_sizes": fed.client_sizes, "mechanism": mech,
            "history": history, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "load": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------------- bookkeeping


def load_results(path: str) -> dict[str, dict]:
    return {rec["key"]: rec for rec in read_records(path)}


def run_all(runs, results: str, work: str, threads: int, table: str | None) -> list[dict]:
    """Run, in order, what is not in ``results`` yet, appending each record as it finishes (and rewriting
    ``table``). ``runs`` holds :class:`FedRun` or callables returning one (made when reached, e.g. once the search
    has chosen a learning rate). A run is claimed through a lock file in ``work``, so several processes can share the
    list: each skips the runs another live process holds, and a run whose process died is resumed."""
    os.makedirs(os.path.dirname(results) or ".", exist_ok=True)
    records = []
    for i, item in enumerate(runs):
        run = item if isinstance(item, FedRun) else item()
        done = load_results(results)  # re-read: another process may have finished this run meanwhile
        if run.key() in done:
            records.append(done[run.key()])
            continue
        if not claim(work, run.name()):
            print(f"[run {i + 1}/{len(runs)}] {describe(run)}: running in another process, skipped", flush=True)
            continue
        try:
            print(f"[run {i + 1}/{len(runs)}] {describe(run)}", flush=True)
            rec = train_federation(run, work, threads)
            rec["tag"] = run.tag
            with open(results, "a") as f:
                f.write(json.dumps(rec) + "\n")
        finally:
            os.remove(lock_path(work, run.name()))
        records.append(rec)
        print(f"    -> {run.split} accuracy {rec['accuracy']:.4f} in {rec['seconds']:.0f} s", flush=True)
        if table:
            write_tables(results, table, work)
    return records


def describe(run: FedRun) -> str:
    eps = "non-private" if run.epsilon is None else f"eps {run.epsilon:g}"
    return (f"{run.method}, {eps}, lr {run.lr:g}, seed {run.seed}, {run.split}, {run.rounds} rounds x "
            f"{run.local_steps} steps, q {run.sample_rate:g}" + (f", limit {run.limit}" if run.limit else ""))


def search_runs(args, epsilon: float | None) -> list[FedRun]:
    """The lr search at one privacy level: seed 0, validation, ``--search-rounds`` rounds with the privacy noise of
    the full run (sigma calibrated over ``--rounds``), the same grid for every method."""
    lrs = args.search_lrs_non_private if epsilon is None else args.search_lrs
    return [FedRun(method, epsilon, lr, seed=0, split="validation", rounds=args.search_rounds,
                   budget_rounds=args.rounds, tag="search", **common(args))
            for method in args.methods for lr in lrs]


def common(args) -> dict:
    return dict(local_steps=args.local_steps, sample_rate=args.sample_rate, clients=args.clients,
                per_round=args.per_round, alpha=args.alpha, max_grad_norm=args.max_grad_norm,
                micro_batch=args.micro_batch, optim=args.optim, limit=args.limit)


def search_level(epsilon: float | None, search_epsilons: list) -> float | None:
    """The search whose lr a final run at ``epsilon`` uses: its own level, else the first private search level."""
    if epsilon is None or epsilon in search_epsilons:
        return epsilon
    return next(e for e in search_epsilons if e is not None)


def chosen_lr(records: list[dict], method: str, level: float | None, grid: list[FedRun]) -> float:
    """The lr of the best final validation accuracy among ``method``'s search runs at ``level`` (ties: the
    smaller lr); SystemExit if a run of the search ``grid`` has no result."""
    keys = {r.key() for r in grid if r.method == method and r.epsilon == level}
    cands = [r for r in records if r["key"] in keys]
    if len(cands) < len(keys):
        raise SystemExit(f"the lr search for {method} at epsilon {_eps(level)} is not finished: run `search` first")
    return max(cands, key=lambda r: (r["accuracy"], -r["run"]["lr"]))["run"]["lr"]


def final_run(args, method: str, epsilon: float | None, seed: int, wait: bool = False) -> FedRun:
    """The final run at the lr its search chose (``wait``: poll until a search another process runs is done), or
    at ``--final-lr`` / ``--final-lr-non-private`` when given."""
    given = args.final_lr_non_private if epsilon is None else args.final_lr
    if given is not None:
        return FedRun(method, epsilon, given, seed=seed, split="test", rounds=args.rounds,
                      tag="final (lr given on the command line)", **common(args))
    level = search_level(epsilon, args.search_epsilons)
    grid = search_runs(args, level)
    while True:
        try:
            lr = chosen_lr(list(load_results(args.results).values()), method, level, grid)
            break
        except SystemExit:
            if not wait or not any(held(args.work, r.name()) for r in grid):
                raise
            time.sleep(20)
    return FedRun(method, epsilon, lr, seed=seed, split="test", rounds=args.rounds,
                  tag=f"final (lr chosen on validation at epsilon {_eps(level)})", **common(args))


def plan(args, mode: str) -> list:
    """The runs of ``mode`` in priority order: per seed, per privacy level in ``--epsilons`` order, the level's lr
    search (seed 0 only, ``search``/``all``) then its final runs (``final``/``all``)."""
    runs: list = []
    for seed in args.seeds:
        for epsilon in args.epsilons:
            if mode in ("search", "all") and seed == args.seeds[0] and epsilon in args.search_epsilons:
                runs += search_runs(args, epsilon)
            if mode in ("final", "all"):
                runs += [functools.partial(final_run, args, m, epsilon, seed, mode == "all") for m in args.methods]
    return runs


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def tables(records: list[dict]) -> str:
    """Markdown: the search, and the final runs (test accuracy, wall time, epsilon spent, the mechanism)."""
    out = ["Search (validation, seed 0; accuracy after the last round):", "",
           "| epsilon | method | lr | rounds | validation accuracy | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in sorted((r for r in records if r["run"]["split"] == "validation"),
                    key=lambda r: (r["run"]["epsilon"] is None, -(r["run"]["epsilon"] or 0), r["run"]["method"],
                                   r["run"]["lr"])):
        run = r["run"]
        out.append(f"| {_eps(run['epsilon'])} | {run['method']} | {run['lr']:g} | {run['rounds']} | "
                   f"{r['accuracy']:.4f} | {r['seconds']:.0f} |")
    finals: dict[tuple, list[dict]] = {}
    for r in records:
        if r["run"]["split"] == "test":
            finals.setdefault((r["run"]["epsilon"], r["run"]["method"], r["run"]["lr"]), []).append(r)
    out += ["", "Final runs (test accuracy after the last round; mean ± std when more than one seed):", "",
            "| epsilon | method | lr | seeds | test accuracy | per seed | wall time per run (s) | max client epsilon | "
            "B per-example grad norm (median) | fraction clipped | B noise/signal |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (epsilon, method, _), rs in sorted(finals.items(), key=lambda kv: (kv[0][0] is None, -(kv[0][0] or 0),
                                                                            METHODS.index(kv[0][1]), kv[0][2])):
        rs = sorted(rs, key=lambda r: r["run"]["seed"])
        accs = [r["accuracy"] for r in rs]
        mech = [r["mechanism"] for r in rs]

        def col(key: str, fmt: str, mech=mech) -> str:
            vals = [m[key] for m in mech if key in m]
            return format(statistics.mean(vals), fmt) if vals else "-"

        eps_spent = [r["epsilon_max"] for r in rs if r["epsilon_max"] is not None]
        cells = [_eps(epsilon), method, f"{rs[0]['run']['lr']:g}", ", ".join(str(r["run"]["seed"]) for r in rs),
                 _mean_std(accs), ", ".join(f"{a:.4f}" for a in accs), ", ".join(f"{r['seconds']:.0f}" for r in rs),
                 f"{max(eps_spent):.3f}" if eps_spent else "-", col("b_norm_median", ".3g"), col("clipped", ".2f"),
                 col("b_noise_to_signal", ".1f")]
        out.append("| " + " | ".join(cells) + " |")
    curves = ["", "Test accuracy per round (final runs):", ""]
    for (epsilon, method, lr), rs in finals.items():
        for r in sorted(rs, key=lambda r: r["run"]["seed"]):
            curves.append(f"- {_eps(epsilon)} {method} lr {lr:g} seed {r['run']['seed']}: "
                          + " ".join(f"{a:.3f}" for a in r["curve"]))
    return "\n".join(out + curves) + "\n"


def _eps(epsilon: float | None) -> str:
    return "inf" if epsilon is None else f"{epsilon:g}"


def unfinished(work: str, finished: set[str]) -> str:
    """Markdown lines for the runs in ``work`` that have checkpointed rounds but no result yet (read from their
    server checkpoints): rounds done, the accuracy per round, wall time so far, the mechanism so far."""
    lines = []
    for name in sorted(os.listdir(work)) if os.path.isdir(work) else []:
        state_file = os.path.join(work, name, "server", "state.json")
        key_file = os.path.join(work, name, "run.json")
        if not (os.path.isfile(state_file) and os.path.isfile(key_file)):
            continue
        with open(key_file) as f:
            key = f.read()
        if key in finished:
            continue
        run = json.loads(key)
        with open(state_file) as f:
            history = json.load(f)["history"]
        if not history:
            continue
        mech = {k: statistics.mean(r[k] for r in history if k in r) for k in ("b_norm_median", "clipped")
                if any(k in r for r in history)}
        lines.append(f"- {run['method']} epsilon {_eps(run['epsilon'])} lr {run['lr']:g} seed {run['seed']} "
                     f"({run['split']}): {len(history)} of {run['rounds']} rounds, "
                     + " ".join(f"{r['eval_accuracy']:.3f}" for r in history)
                     + f"; {sum(r['seconds'] for r in history):.0f} s"
                     + (f"; max client epsilon {history[-1]['epsilon_max']:.3f}" if "epsilon_max" in history[-1] else "")
                     + "".join(f"; {k} {v:.3g}" for k, v in mech.items()))
    if not lines:
        return ""
    return "\nUnfinished runs (accuracy per round so far, from their checkpoints):\n\n" + "\n".join(lines) + "\n"


def write_tables(results: str, path: str, work: str | None = None) -> None:
    records = list(load_results(results).values())
    text = tables(records) + (unfinished(work, {r["key"] for r in records}) if work else "")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    curves = {}
    chosen = {(r["run"]["epsilon"], r["run"]["method"]) for r in records if "chosen on validation" in r.get("tag", "")}
    for r in records:  # the plot: per level and method, the runs at the lr chosen on validation when there are any
        key = (r["run"]["epsilon"], r["run"]["method"])
        if r["run"]["split"] == "test" and (key not in chosen or "chosen on validation" in r.get("tag", "")):
            curves.setdefault((key[0] if key[0] is not None else math.inf, key[1]), []).append(r["curve"])
    if curves:
        first = next(iter(records))["run"]
        lengths = {len(c) for cs in curves.values() for c in cs}
        if len(lengths) == 1:  # one plot panel per privacy level needs curves of one length
            out = os.path.dirname(path) or "."
            plot_accuracy_per_round(curves, argparse.Namespace(clients=first["clients"], alpha=first["alpha"], out=out))
            png = os.path.join(out, "accuracy_per_round.png")
            if os.path.exists(png):  # named after the table, beside it
                os.replace(png, os.path.splitext(path)[0] + "_accuracy_per_round.png")


def _epsilon_arg(text: str) -> float | None:
    return None if text in ("inf", "none") else float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("mode", choices=["search", "final", "all", "table"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--epsilons", nargs="+", type=_epsilon_arg, default=[6.0, None, 3.0],
                   help="final runs, in this order: privacy levels (inf = non-private)")
    p.add_argument("--search-epsilons", nargs="+", type=_epsilon_arg, default=[6.0, None],
                   help="levels with their own lr search (other private levels use the first private one's lr)")
    p.add_argument("--search-lrs", nargs="+", type=float, default=[30.0, 100.0],
                   help="the lr grid at private levels (SGD on gradients clipped to C = 0.1)")
    p.add_argument("--search-lrs-non-private", nargs="+", type=float, default=[1.0, 3.0])
    p.add_argument("--final-lr", type=float, default=None, help="final private runs: this lr instead of the search's")
    p.add_argument("--final-lr-non-private", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--search-rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--sample-rate", type=float, default=0.15, help="q: each client's expected batch is q x its shard")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-grad-norm", type=float, default=0.1, help="DP: per-example clipping bound C")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--optim", default="sgd", help="the clients' TrainingArguments.optim (fresh every round)")
    p.add_argument("--limit", type=int, default=None, help="first LIMIT snippets of each split (smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=DEFAULT_RESULTS, help="JSON lines, one per finished run")
    p.add_argument("--work", default=DEFAULT_WORK, help="per-run federation checkpoints (resumed per round)")
    p.add_argument("--table", default=None, help="markdown tables (default: RESULTS with .md)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("hf_svd_plugins.fedsvd.federation").setLevel(logging.WARNING)  # failed or rejected clients
    warnings.filterwarnings("ignore")
    table = args.table or os.path.splitext(args.results)[0] + ".md"
    if args.mode != "table":
        run_all(plan(args, args.mode), args.results, args.work, args.threads, table)
    write_tables(args.results, table, args.work)
    print(open(table).read() if os.path.exists(table) else "no results yet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
