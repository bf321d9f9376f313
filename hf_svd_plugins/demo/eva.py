"""Step 1: EVA vs PEFT's default LoRA init on packaged MiniLM, Rotten Tomatoes (loss curves, ranks per layer), in the
setting ``benchmarks/eva_seeds.py`` measured over seeds, whose result the step cites next to its own one-seed run."""

from __future__ import annotations

import re

from hf_svd_plugins.demo.common import (
    PROBE_SENTENCES,
    DemoContext,
    StepResult,
    bar_callback,
    fmt,
    pyplot,
    save_figure,
)

TITLE = "EVA vs default LoRA init (all-MiniLM-L6-v2 + LoRA r=8, Rotten Tomatoes)"
R = 8
# What benchmarks/eva_seeds.py measured in the setting this step runs (MiniLM + LoRA r=8, batch 16, constant lr chosen
# per init on validation; docs/eva.md, runs in benchmarks/results/eva_seeds.jsonl): EVA rho 2 (what EvaCallback()
# does) minus the default init, paired over the final seeds, (mean, sd). tests/test_demo.py recomputes it from the runs.
BENCHMARK = {"steps": 60, "lr": {"default": 1e-3, "eva": 3e-4}, "seeds": 5, "test_accuracy": (-0.0634, 0.0750),
             "first_quarter_loss": (-0.0003, 0.0007), "last_quarter_loss": (-0.0051, 0.0270)}


def _short(module: str) -> str:
    """``...encoder.layer.3.attention.self.query`` -> ``3.query``."""
    match = re.search(r"layer\.(\d+)\.(.*)$", module)
    if not match:
        return module
    kind = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
            "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"}
    return f"{match.group(1)}.{kind.get(match.group(2), match.group(2))}"


def _plot(results: dict, ranks: dict[str, int], path: str) -> str:
    plt = pyplot()
    fig, (ax_loss, ax_rank) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    for init, res in results.items():
        steps = [h["step"] for h in res.trainer.state.log_history if "loss" in h]
        ax_loss.plot(steps, res.losses, marker="o", ms=3, label=f"{init} (test acc {res.accuracy:.3f})")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (logged mean)")
    ax_loss.legend(fontsize=8)
    names = list(ranks)
    ax_rank.bar(range(len(names)), [ranks[n] for n in names], color="tab:orange")
    ax_rank.axhline(R, color="gray", ls="--", lw=1, label=f"default: r={R} everywhere")
    ax_rank.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
    ax_rank.set_ylabel("EVA rank")
    ax_rank.set_xlabel("layer.module")
    ax_rank.legend(fontsize=8)
    return save_figure(fig, path, "EVA vs default LoRA init: loss curves and EVA's rank per module")


def _check_reload(trainer, adapter_dir: str, tokenizer) -> float:
    """Reload the saved adapter on a fresh base with PEFT and return the largest logit difference."""
    import torch
    from peft import PeftModel

    from hf_svd_plugins.examples import minilm_lora_classifier

    base, _ = minilm_lora_classifier(R)
    reloaded = PeftModel.from_pretrained(base.get_base_model(), adapter_dir).eval()
    batch = tokenizer(PROBE_SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (trainer.model.eval()(**batch).logits - reloaded(**batch).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"the reloaded EVA adapter changes the logits by {diff:.2e}")
    return diff


def run(ctx: DemoContext) -> StepResult:
    from hf_svd_plugins.eva import EvaCallback
    from hf_svd_plugins.examples import finetune_sentiment

    steps = 30 if ctx.quick else BENCHMARK["steps"]
    results = {}
    with ctx.bar(2 * steps, "EVA vs default") as bar:
        for init in ("default", "eva"):
            results[init] = finetune_sentiment(init, steps=steps, r=R, seed=ctx.seed, lr=BENCHMARK["lr"][init],
                                               output_dir=ctx.path("eva", f"run_{init}"),
                                               logging_steps=max(1, steps // 15), callbacks=[bar_callback(bar)])
    trainer = results["eva"].trainer
    eva_cb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EvaCallback))
    ranks = eva_cb.ranks
    adapter_dir = ctx.path("eva", "eva_adapter", "")
    trainer.save_model(adapter_dir)
    diff = _check_reload(trainer, adapter_dir, trainer.processing_class or _tokenizer())
    ctx.shared["finetuned_classifier"] = trainer.model

    rows = []
    for init, res in results.items():
        rows.append([init, fmt(res.losses[0]), fmt(res.losses[-1]), fmt(sum(res.losses) / len(res.losses)),
                     fmt(res.accuracy), f"{res.seconds:.0f} s"])
    delta = results["eva"].accuracy - results["default"].accuracy
    by_kind: dict[str, int] = {}
    for name, r in ranks.items():
        kind = _short(name).split(".", 1)[-1]
        by_kind[kind] = by_kind.get(kind, 0) + r
    notes = [
        f"EVA read {eva_cb.result.batches_used} batches ({eva_cb.result.seconds:.1f} s) and redistributed "
        f"{sum(ranks.values())} ranks over {len(ranks)} modules: min {min(ranks.values())}, max {max(ranks.values())}; "
        "per module type " + ", ".join(f"{k} {v}" for k, v in by_kind.items()),
        f"this run: EVA {'above' if delta > 0 else 'below' if delta < 0 else 'equal to'} the default init by "
        f"{abs(delta) * 100:.1f} accuracy points on {steps} steps, one seed ({ctx.seed}), lr "
        f"{BENCHMARK['lr']['eva']:g} (EVA) and {BENCHMARK['lr']['default']:g} (default), each init's lr chosen on "
        "validation by the benchmark",
        benchmark_note(),
        f"adapter reloaded with PeftModel.from_pretrained: logits within {diff:.1e}",
    ]
    png = _plot(results, ranks, ctx.path("eva.png"))
    return StepResult(["init", "first loss", "last loss", "mean loss", "test accuracy", "train time"], rows, png,
                      {"EVA adapter (PEFT, rank_pattern)": adapter_dir}, notes)


def benchmark_note() -> str:
    """The benchmark's measured effect, labelled as such (it is not this run's)."""
    b = BENCHMARK

    def pm(key: str, scale: float = 1.0, digits: int = 3) -> str:
        mean, sd = b[key]
        return f"{mean * scale:+.{digits}f} ± {sd * scale:.{digits}f}"

    return (f"from the benchmark, not this run (benchmarks/eva_seeds.py, {b['seeds']} seeds of this setting, "
            f"{b['steps']} steps at each init's validation-chosen lr; EVA minus default, paired by seed, mean ± sd): "
            f"test accuracy {pm('test_accuracy', 100, 1)} points, training loss over the first quarter "
            f"{pm('first_quarter_loss', digits=4)}, over the last quarter {pm('last_quarter_loss', digits=4)}")


def _tokenizer():
    from transformers import AutoTokenizer

    from hf_svd_plugins.examples import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())
