"""Private LoRA that learns: the study behind docs/dp.md "Getting private LoRA to learn".

MiniLM (packaged all-MiniLM-L6-v2) mean-pooled, LoRA on its top layers and a linear head, on all 12,808 Rotten
Tomatoes snippets (``examples.rotten_tomatoes_splits(seed, 0.1, 0.2, full=True)``: 9,222 train / 1,024 validation /
2,562 test). The frozen layers below the lowest adapted one are computed once per example
(``examples.minilm_frozen_prefix``: the same logits and per-example gradients as the full model, tested), the data
are sorted by length so that Poisson batches cut into micro-batches of similar length, and per-example gradients use
vmap. Every run appends one JSON line to ``--out`` as it finishes; a rerun skips the runs already there.

    python benchmarks/dp_lora.py diagnose                 # noise-to-signal, clipped fraction, budget table
    python benchmarks/dp_lora.py probe                    # the same, first steps only (runs too slow to finish)
    python benchmarks/dp_lora.py search                   # the validation search (seed 0), counted
    python benchmarks/dp_lora.py final                    # 3 seeds x {non-private, DP eps 8, DP eps 3, head only}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "dp_lora.jsonl")
VALIDATION_FRACTION, TEST_FRACTION, MAX_LENGTH = 0.1, 0.2, 64


@dataclass(frozen=True)
class Run:
    """One training run. ``epsilon=None`` is the non-private Trainer; ``r=None`` trains the head only.
    ``pooling="cls"`` is the earlier recipe that stayed at chance: ``AutoModelForSequenceClassification`` (BERT's CLS
    pooler and its dropout, a random head, ``examples.minilm_lora_classifier``), run as a whole model on token ids
    (``lora_layers`` and ``head_init`` do not apply)."""

    epsilon: float | None = 8.0
    r: int | None = 4
    targets: tuple[str, ...] = ("value",)
    lora_layers: int | None = 2
    train_lora_a: bool = True
    head_init: str = "zero"
    batch: int = 1024
    epochs: float = 20.0
    lr: float = 5e-3
    max_grad_norm: float = 0.1
    scheduler: str = "linear"
    seed: int = 0
    split: str = "validation"
    train_fraction: float = 1.0
    micro_batch: int = 64
    pooling: str = "mean"
    head_lr: float | None = None
    tag: str = field(default="", compare=False)

    def key(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("tag")
        for name, default in (("pooling", "mean"), ("head_lr", None)):  # absent from keys written before them
            if d[name] == default:
                d.pop(name)
        d["targets"] = list(d["targets"])
        for name in ("epsilon", "epochs", "lr", "max_grad_norm", "train_fraction", "head_lr"):
            if isinstance(d.get(name), int):  # 8 and 8.0 are the same run
                d[name] = float(d[name])
        return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------------------------------------- data, models


_DATA: dict = {}


def build_model(run: Run):
    from hf_svd_plugins.examples import minilm_dp_lora_classifier, minilm_lora_classifier

    if run.pooling == "cls":
        return minilm_lora_classifier(run.r, seed=run.seed, target_modules=list(run.targets))
    return minilm_dp_lora_classifier(run.r, list(run.targets), run.lora_layers, run.train_lora_a, run.head_init,
                                     seed=run.seed)


def datasets_for(run: Run, prefix, first_layer: int, limit: int | None = None):
    """``(train, validation, test)`` prefix states for this run's seed and frozen prefix (cached per process);
    ``limit`` keeps only the first ``limit`` snippets of each split (smoke tests)."""
    from hf_svd_plugins.examples import (
        HiddenStateClassification,
        LabelledText,
        TokenizedClassification,
        minilm_path,
        rotten_tomatoes_splits,
    )

    key = (run.seed, first_layer, limit)
    if key not in _DATA:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(minilm_path())
        splits = rotten_tomatoes_splits(run.seed, VALIDATION_FRACTION, TEST_FRACTION, full=True)
        if limit is not None:
            splits = [LabelledText(s.text[:limit], s.label[:limit]) for s in splits]
        start = time.perf_counter()
        _DATA.clear()  # one prefix level in memory at a time (about 0.5 GB each)
        _DATA[key] = [HiddenStateClassification(TokenizedClassification(s, tok, MAX_LENGTH), prefix) for s in splits]
        print(f"[data] seed {run.seed}, prefix of {first_layer} layers: {time.perf_counter() - start:.0f} s", flush=True)
    train, validation, test = _DATA[key]
    if run.train_fraction < 1.0:
        import random

        keep = sorted(random.Random(run.seed).sample(range(len(train)), int(len(train) * run.train_fraction)))
        subset = HiddenStateClassification.__new__(HiddenStateClassification)
        subset.items = [train.items[i] for i in keep]
        subset.order = [train.order[i] for i in keep]
        train = subset
    return train, validation, test


def _group_of(name: str) -> str:
    """``lora_A``, ``lora_B`` or ``head`` (everything else that trains)."""
    return "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "head"


def token_datasets_for(run: Run):
    """``(train, validation, test)`` token ids for the whole-model (``pooling="cls"``) runs, train sorted by length."""
    from transformers import AutoTokenizer

    from hf_svd_plugins.examples import TokenizedClassification, minilm_path, rotten_tomatoes_splits

    tok = AutoTokenizer.from_pretrained(minilm_path())
    splits = rotten_tomatoes_splits(run.seed, VALIDATION_FRACTION, TEST_FRACTION, full=True)
    train, validation, test = (TokenizedClassification(s, tok, MAX_LENGTH) for s in splits)
    items = train.items
    if run.train_fraction < 1.0:
        import random

        keep = sorted(random.Random(run.seed).sample(range(len(items)), int(len(items) * run.train_fraction)))
        items = [items[i] for i in keep]
    train.items = sorted(items, key=lambda x: len(x["input_ids"]))
    return train, validation, test


def collate_tokens(items: list[dict]) -> dict:
    import torch

    longest = max(len(x["input_ids"]) for x in items)
    out = {k: torch.tensor([list(x[k]) + [0] * (longest - len(x[k])) for x in items])
           for k in ("input_ids", "attention_mask")}
    out["labels"] = torch.tensor([x["labels"] for x in items])
    return out


# ------------------------------------------------------------------------------------------------------ training


GROUPS = ("head", "lora_A", "lora_B")


def make_dp_trainer_class(sink: list | None = None):
    """DPTrainer that also records, per optimizer step, the fraction of examples clipped, the norm of the clipped
    mean gradient (read from the trainer's accumulators right before the noise) and, per parameter group
    (``head``, ``lora_A``, ``lora_B``, ``all``), the mean, median and max of the examples' gradient norms before
    clipping (measurement only: the per-example gradients are read, never changed). Records go to the trainer's
    ``bench_log`` and, when given, are also appended to ``sink`` (a list shared by many trainers, e.g. the clients of
    a federation)."""
    import torch

    from hf_svd_plugins.dp import DPTrainer
    from hf_svd_plugins.dp.clipping import per_sample_norms

    class MeasuredDPTrainer(DPTrainer):
        def _dp_setup(self):
            super()._dp_setup()
            compute = self._dp_engine.compute

            def measured(module, params, inputs):
                grads, losses = compute(module, params, inputs)
                self._bench_observe(grads, losses)
                return grads, losses

            self._dp_engine.compute = measured

        def _bench_observe(self, grads: dict, losses) -> None:
            names = list(grads)
            norms = per_sample_norms([grads[n] for n in names])
            stats = self.__dict__.setdefault("_bench_step", _empty_step())
            stats["loss"] += float(losses.sum())
            stats["clipped"] += int((norms > self.dp_config.max_grad_norm).sum())
            stats["seen"] += int(norms.numel())
            stats["norms"].append(float(norms.median()))
            stats["group_norms"].setdefault("all", []).append(norms.detach().double())
            for group in GROUPS:
                idx = [n for n in names if _group_of(n) == group]
                if idx:
                    stats["group_norms"].setdefault(group, []).append(per_sample_norms([grads[n] for n in idx]).double())

        def _dp_release_gradient(self, params):
            acc = self._dp_release.sums  # the clipped sums of this step, before the all-reduce and the noise
            stats = self.__dict__.pop("_bench_step", _empty_step())
            if acc is not None:
                record = {"step": self.state.global_step, "clipped": stats["clipped"] / max(1, stats["seen"]),
                          "batch": stats["seen"], "loss": stats["loss"] / max(1, stats["seen"]),
                          "median_norm": statistics.median(stats["norms"]) if stats["norms"] else float("nan")}
                for group, parts in stats["group_norms"].items():
                    norms = torch.cat(parts)
                    record[f"norm_{group}_mean"] = float(norms.mean())
                    record[f"norm_{group}_median"] = float(norms.median())
                    record[f"norm_{group}_max"] = float(norms.max())
                scale = self.noise_multiplier * self.dp_config.max_grad_norm / self.expected_batch_size
                groups = {"all": range(len(acc))}
                for group in GROUPS:
                    idx = [i for i, n in enumerate(self._dp_param_names) if _group_of(n) == group]
                    if idx:
                        groups[group] = idx
                for group, idx in groups.items():
                    sq = sum(float(acc[i].double().pow(2).sum()) for i in idx)
                    record[f"signal_{group}"] = math.sqrt(sq) / self.expected_batch_size
                    record[f"noise_{group}"] = scale * math.sqrt(sum(acc[i].numel() for i in idx))
                record["signal"], record["noise"] = record["signal_all"], record["noise_all"]
                self.__dict__.setdefault("bench_log", []).append(record)
                if sink is not None:
                    sink.append(record)
            with torch.no_grad():
                return super()._dp_release_gradient(params)

    return MeasuredDPTrainer


def _empty_step() -> dict:
    """The per-step accumulator of :func:`make_dp_trainer_class`: examples seen and clipped, summed loss, the
    per-micro-batch median norms, and per group the micro-batches' per-example norms."""
    return {"clipped": 0, "seen": 0, "norms": [], "loss": 0.0, "group_norms": {}}


def collate(items):
    from hf_svd_plugins.examples import collate_hidden_states

    return collate_hidden_states(items)


def train_and_evaluate(run: Run, threads: int = 1, probe_steps: int | None = None) -> dict:
    """Train and evaluate ``run``. ``probe_steps``: only its first ``probe_steps`` optimizer steps, with sigma
    calibrated over the whole planned run (``DPConfig.total_steps``), to measure noise/signal and the clipped fraction
    of a run too slow to finish; nothing is evaluated (accuracy ``None``)."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_svd_plugins.dp import DPConfig
    from hf_svd_plugins.examples import first_adapted_layer, minilm_frozen_prefix

    torch.set_num_threads(threads)
    model, _ = build_model(run)
    if run.pooling == "cls":
        top, data_collator = model, collate_tokens
        train, validation, test = token_datasets_for(run)
    else:
        prefix, top = minilm_frozen_prefix(model)
        data_collator = collate
        train, validation, test = datasets_for(run, prefix, first_adapted_layer(model))
    evaluated = validation if run.split == "validation" else test
    private = run.epsilon is not None
    micro = min(run.micro_batch, run.batch)
    if run.batch % micro:
        raise ValueError(f"batch {run.batch} must be a multiple of micro_batch {micro}")
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="dp_lora_"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=run.batch // micro, per_device_eval_batch_size=256, num_train_epochs=run.epochs,
        learning_rate=run.lr, lr_scheduler_type=run.scheduler, weight_decay=0.0, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=10**6, disable_tqdm=True, max_grad_norm=0.0 if private else 1.0,
        seed=run.seed, dataloader_num_workers=0, max_steps=probe_steps or -1,
    )
    kw = dict(model=top, args=args, train_dataset=train, data_collator=data_collator)
    if run.head_lr is not None:  # AdamW with the head in its own group; the Trainer's schedule scales both groups
        params = [(n, p) for n, p in top.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if _group_of(n) != "head"], "lr": run.lr},
                  {"params": [p for n, p in params if _group_of(n) == "head"], "lr": run.head_lr}]
        kw["optimizers"] = (torch.optim.AdamW([g for g in groups if g["params"]], lr=run.lr, weight_decay=0.0), None)
    if private:
        planned = max(1, math.ceil(run.epochs * max(1, len(train) // run.batch))) if probe_steps else None
        dp = DPConfig(target_epsilon=run.epsilon, max_grad_norm=run.max_grad_norm, per_sample_method="vmap",
                      noise_seed=run.seed, sampler_seed=run.seed, total_steps=planned)
        trainer = make_dp_trainer_class()(**kw, dp_config=dp)
    else:
        trainer = Trainer(**kw)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    accuracy = None
    if probe_steps is None:
        pred = trainer.predict(evaluated)
        accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    out = {"key": run.key(), "run": {**dataclasses.asdict(run), "targets": list(run.targets)},
           "accuracy": accuracy, "n_train": len(train), "n_eval": len(evaluated),
           "steps": trainer.state.global_step, "seconds": round(seconds, 1),
           "n_params": sum(p.numel() for p in top.parameters() if p.requires_grad),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0]}
    out.update(parameter_norms(top))
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    out["train_loss"] = losses[-1] if losses else None
    if private:
        out.update(epsilon=trainer.get_epsilon(), sigma=trainer.noise_multiplier, delta=trainer.target_delta,
                   q=trainer.sample_rate)
        log = getattr(trainer, "bench_log", [])
        if log:
            out["per_step"] = log
            out["noise_to_signal_mean"] = statistics.mean(x["noise"] / max(x["signal"], 1e-12) for x in log)
            out["clipped_mean"] = statistics.mean(x["clipped"] for x in log)
    return out


def parameter_norms(top) -> dict:
    """How far training moved the model: the head's weight norm and the Frobenius norm of every LoRA update
    ``s B A`` summed in quadrature (both start at 0 with a zero head)."""
    import torch

    head = [p for n, p in top.named_parameters() if p.requires_grad and _group_of(n) == "head" and p.dim() == 2]
    delta_sq = 0.0
    with torch.no_grad():
        for module in top.modules():
            if hasattr(module, "lora_A") and hasattr(module, "scaling") and "default" in getattr(module, "lora_A", {}):
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                delta_sq += float(delta.pow(2).sum())
    return {"head_norm": float(head[0].norm()) if head else None, "lora_delta_norm": delta_sq**0.5}


# ----------------------------------------------------------------------------------------------------- bookkeeping


def read_records(path: str) -> list[dict]:
    """The JSON lines of a results file, in order ([] if it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_results(path: str) -> dict[str, dict]:
    done = {}
    for rec in read_records(path):
        fields = {k: v for k, v in rec["run"].items() if k in Run.__dataclass_fields__}
        done[Run(**{**fields, "targets": tuple(fields["targets"])}).key()] = rec
    return done


def run_all(runs: list[Run], out: str, threads: int = 1, probe_steps: int | None = None) -> list[dict]:
    """Run what is not in ``out`` yet (appending each result as it finishes); return all records in order.
    ``probe_steps``: only the first steps of each run (:func:`train_and_evaluate`); keep those in their own file."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    done = load_results(out)
    records = []
    for i, run in enumerate(runs):
        if run.key() in done:
            records.append(done[run.key()])
            continue
        print(f"[run {i + 1}/{len(runs)}] {describe(run)}", flush=True)
        rec = train_and_evaluate(run, threads, probe_steps)
        rec["tag"] = run.tag
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[run.key()] = rec
        records.append(rec)
        print(f"    -> {run.split} accuracy {rec['accuracy'] or float('nan'):.4f}, eps {rec.get('epsilon', float('inf')):.3g}, "
              f"{rec['steps']} steps, {rec['seconds']:.0f} s" + (
                  f", noise/signal {rec['noise_to_signal_mean']:.2f}, clipped {rec['clipped_mean']:.2f}"
                  if "noise_to_signal_mean" in rec else ""), flush=True)
    return records


def describe(run: Run) -> str:
    what = "head" if run.r is None else (f"LoRA r={run.r} {'+'.join(run.targets)} top {run.lora_layers or 6}"
                                         f"{'' if run.train_lora_a else ' B-only'}")
    eps = "non-private" if run.epsilon is None else f"eps {run.epsilon:g}"
    return (f"{eps}, {what}, head {run.head_init}, B {run.batch}, {run.epochs:g} ep, lr {run.lr:g}, "
            f"C {run.max_grad_norm:g}, seed {run.seed}, {run.split}"
            + (f", head lr {run.head_lr:g}" if run.head_lr is not None else "")
            + (f", {run.train_fraction:g} of train" if run.train_fraction < 1 else ""))


def summarize(rec: dict) -> dict:
    """The per-step measurements of a DP run condensed: noise/signal (all trainable, and per group) over the first
    and the last tenth of the steps, the clipped fraction, the median per-example gradient norm."""
    log = rec.get("per_step") or []
    if not log:
        return {}
    k = max(1, len(log) // 10)
    out = {}
    for part, rows in (("early", log[:k]), ("late", log[-k:])):
        for group in ("all", "head", "lora_A", "lora_B"):
            if f"signal_{group}" in rows[0]:  # ratio of the window's means (the signal of B is 0 at a zero head)
                signal = statistics.mean(x[f"signal_{group}"] for x in rows)
                out[f"{part}_{group}"] = statistics.mean(x[f"noise_{group}"] for x in rows) / max(signal, 1e-12)
        out[f"{part}_clipped"] = statistics.mean(x["clipped"] for x in rows)
        out[f"{part}_norm"] = statistics.mean(x["median_norm"] for x in rows)
    return out


def _early_late(summary: dict, group: str) -> str:
    if f"early_{group}" not in summary:
        return "-"
    return f"{summary['early_' + group]:.2f} -> {summary['late_' + group]:.2f}"


def print_runs(records: list[dict], title: str) -> None:
    print(f"\n{title}")
    print("| run | n params | steps | sigma | val/test acc | noise/signal early -> late (all; head; B) | "
          "clipped early -> late | median norm | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rec in records:
        run = Run(**{**rec["run"], "targets": tuple(rec["run"]["targets"])})
        sm = summarize(rec)

        ratios = "; ".join(_early_late(sm, g) for g in ("all", "head", "lora_B")) if sm else "-"
        clipped = f"{sm['early_clipped']:.2f} -> {sm['late_clipped']:.2f}" if sm else "-"
        norm = f"{sm['early_norm']:.2g} -> {sm['late_norm']:.2g}" if sm else "-"
        sigma = f"{rec['sigma']:.3f}" if "sigma" in rec else "-"
        acc = "-" if rec["accuracy"] is None else f"{rec['accuracy']:.4f}"
        print(f"| {describe(run)} | {rec['n_params']} | {rec['steps']} | {sigma} | {acc} | {ratios} | "
              f"{clipped} | {norm} | {rec['seconds']:.0f} |")


def budget_table(n: int, path: str) -> list[dict]:
    """sigma that epsilon 8 and 3 afford for logical batch B and epochs E on ``n`` examples (PRV, delta 1e-5, the
    same calibration DPTrainer runs), and the noise std per coordinate of the *average* update over the run,
    ``sigma / (B sqrt(T))`` (in units of C): the smaller, the more signal survives."""
    rows = json.load(open(path)) if os.path.exists(path) else []
    have = {(r["epsilon"], r["batch"], r["epochs"]) for r in rows}
    from hf_svd_plugins.dp.accounting import calibrate_noise_multiplier

    for eps in (8.0, 3.0):
        for batch in (256, 512, 1024, 2048):
            for epochs in (5, 10, 20, 40):
                if (eps, batch, epochs) in have:
                    continue
                steps = epochs * (n // batch)
                sigma = calibrate_noise_multiplier(eps, 1e-5, batch / n, steps, "prv", 0.01, 0.01)
                rows.append({"epsilon": eps, "batch": batch, "epochs": epochs, "steps": steps, "sigma": sigma,
                             "noise_of_mean_update": sigma / (batch * math.sqrt(steps))})
                json.dump(rows, open(path, "w"), indent=1)
    print(f"\nBudget (N = {n}, delta = 1e-5, PRV): sigma, steps T, and 1e4 x sigma / (B sqrt(T))")
    print("| epsilon | B | " + " | ".join(f"{e} epochs" for e in (5, 10, 20, 40)) + " |")
    print("|---|---|" + "---|" * 4)
    for eps in (8.0, 3.0):
        for batch in (256, 512, 1024, 2048):
            cells = []
            for epochs in (5, 10, 20, 40):
                r = next(r for r in rows if (r["epsilon"], r["batch"], r["epochs"]) == (eps, batch, epochs))
                cells.append(f"{r['sigma']:.2f}, T={r['steps']}, {1e4 * r['noise_of_mean_update']:.2f}")
            print(f"| {eps:g} | {batch} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["diagnose", "probe", "search", "final", "table"])
    parser.add_argument("--out", default=DEFAULT_OUT, help="results (JSON lines, appended as runs finish)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = parser.parse_args(argv)
    import dp_lora_plan as plan

    if a.mode in ("diagnose", "table"):
        budget_table(9222, os.path.join(os.path.dirname(a.out), "dp_lora_budget.json"))
    if a.mode == "diagnose":
        print_runs(run_all(plan.LADDER, a.out, a.threads), "Diagnosis ladder (validation, seed 0)")
    if a.mode == "probe":
        out = os.path.join(os.path.dirname(a.out), "dp_lora_probe.jsonl")
        print_runs(run_all(plan.PROBES, out, a.threads, plan.PROBE_STEPS),
                   f"First {plan.PROBE_STEPS} steps, sigma of the whole planned run (training data, seed 0)")
    if a.mode == "search":
        print_runs(run_all(plan.search_runs(), a.out, a.threads), "Search (validation, seed 0)")
    if a.mode == "final":
        plan.print_final(run_all(plan.final_runs(a.seeds), a.out, a.threads))
    if a.mode == "table":
        done = list(load_results(a.out).values())
        print_runs([r for r in done if r["run"]["split"] == "validation"], "All validation runs")
        plan.print_final([r for r in done if r["run"]["split"] == "test"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
