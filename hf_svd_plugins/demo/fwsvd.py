"""Step 4: the fine-tuned MiniLM classifier compressed to 50% of its encoder Linear weights, svd / fisher / whiten.

The model is step 1's EVA fine-tune when that step ran, else a fresh default-LoRA fine-tune. ``fwsvd_compress``
merges the LoRA adapter, then factorizes every encoder Linear; Fisher and whitening read the same calibration batches
(training snippets with labels).
"""

from __future__ import annotations

import copy

from hf_svd_plugins.demo.common import (
    PROBE_SENTENCES,
    DemoContext,
    StepResult,
    bar_callback,
    fmt,
    pyplot,
    rotten_tomatoes_tokenized,
    save_figure,
)
from hf_svd_plugins.examples import classifier_accuracy

TITLE = "FWSVD: the fine-tuned MiniLM classifier at 50% of its encoder Linear weights (svd / fisher / whiten)"
METHODS = ("svd", "fisher", "whiten")
RATIO = 0.5


def _check_reload(model, path: str, tokenizer) -> float:
    import torch

    from hf_svd_plugins.fwsvd import load_compressed

    reloaded = load_compressed(path).eval()
    batch = tokenizer(PROBE_SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (model.eval()(**batch).logits - reloaded(**batch).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"the reloaded compressed model changes the logits by {diff:.2e}")
    return diff


def run(ctx: DemoContext) -> StepResult:
    from transformers import DataCollatorWithPadding

    from hf_svd_plugins.examples import finetune_sentiment, minilm_lora_classifier
    from hf_svd_plugins.fwsvd import fwsvd_compress

    _, tokenizer = minilm_lora_classifier(8)
    data = rotten_tomatoes_tokenized(tokenizer, ctx.seed, max_length=64, test_size=300 if ctx.quick else None)
    calibration_batches, batch_size = (4, 16) if ctx.quick else (16, 32)
    collate = DataCollatorWithPadding(tokenizer)
    calibration = [collate([data.train[j] for j in range(i * batch_size, (i + 1) * batch_size)])
                   for i in range(calibration_batches)]
    model = ctx.shared.get("finetuned_classifier")
    source = "step 1's EVA fine-tune"
    train_steps = 0 if model is not None else (30 if ctx.quick else 150)
    with ctx.bar(train_steps + len(METHODS) + 1, "fine-tune, compress, evaluate") as bar:
        if model is None:
            source = f"a default-LoRA fine-tune ({train_steps} steps)"
            model = finetune_sentiment("default", steps=train_steps, seed=ctx.seed,
                                       output_dir=ctx.path("fwsvd", "run", ""), callbacks=[bar_callback(bar)]).trainer.model
        dense = copy.deepcopy(model).merge_and_unload()
        rows = [["dense (LoRA merged)", "100.0%", f"{sum(p.numel() for p in dense.parameters()):,}",
                 fmt(classifier_accuracy(dense, data.test, tokenizer)), "-"]]
        bar.update(1)
        reports, accs = {}, {"dense": float(rows[0][3])}
        for method in METHODS:
            report = fwsvd_compress(copy.deepcopy(model), method, calibration=calibration if method != "svd" else None,
                                    ratio=RATIO, progress=False)
            reports[method] = report
            accs[method] = classifier_accuracy(report.model, data.test, tokenizer)
            rows.append([method, f"{report.targeted_share:.1%}", f"{report.model_params_after:,}", fmt(accs[method]),
                         f"{report.seconds:.1f} s"])
            bar.update(1)
    out = ctx.path("fwsvd", "compressed_fisher", "")
    reports["fisher"].model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    diff = _check_reload(reports["fisher"].model, out, tokenizer)
    best = max(METHODS, key=accs.get)
    notes = [f"model: {source}; Fisher and whitening from {calibration_batches} batches of {batch_size} training "
             f"snippets; accuracy on {len(data.test)} test snippets",
             f"best at {RATIO:.0%}: {best} ({accs[best]:.3f} vs dense {accs['dense']:.3f}); embeddings stay dense, so "
             f"the whole model keeps {reports['fisher'].model_share:.0%} of its parameters",
             f"fisher-compressed model saved with save_pretrained and reloaded with load_compressed: logits within "
             f"{diff:.1e}"]
    png = _plot(accs, ctx.path("fwsvd.png"))
    return StepResult(["model", "encoder Linear weights kept", "parameters", "test accuracy", "compress time"], rows,
                      png, {"FWSVD-compressed classifier (from_pretrained)": out}, notes)


def _plot(accs: dict[str, float], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(accs)
    ax.bar(range(len(names)), [accs[n] for n in names], color=["gray", "tab:blue", "tab:orange", "tab:green"])
    for i, n in enumerate(names):
        ax.text(i, accs[n] + 0.01, f"{accs[n]:.3f}", ha="center", fontsize=9)
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    return save_figure(fig, path, f"MiniLM classifier, encoder Linears at {RATIO:.0%}")
