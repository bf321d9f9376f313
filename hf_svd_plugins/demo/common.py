"""What every demo step shares: its context, its result, a progress bar fed by the Trainer, quiet Trainers, plots."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DemoContext:
    """Run-wide settings handed to every step.

    Attributes:
        output_dir: the demo's folder; a step writes its PNG and artefacts there.
        quick: shorter runs (about a minute or two for the whole demo).
        seed: seeds data splits, initialisations and Trainers.
        shared: results one step leaves for a later one (the fine-tuned classifier for FWSVD).
    """

    output_dir: str
    quick: bool = False
    seed: int = 0
    shared: dict[str, Any] = field(default_factory=dict)

    def bar(self, total: int, desc: str):
        """The step's tqdm progress bar (on stderr, so stdout keeps only the tables)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"  {desc}", unit="step", leave=True, dynamic_ncols=True)

    def path(self, *parts: str) -> str:
        path = os.path.join(self.output_dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path


@dataclass
class StepResult:
    """One step's table (``headers`` and ``rows`` of already formatted cells), plot, saved artefacts and notes."""

    headers: list[str]
    rows: list[list[str]]
    png: str | None = None
    artefacts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def console_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(("  " + text).rstrip() for text in [line, rule, *body])


def bar_callback(bar):
    """A ``TrainerCallback`` that advances the tqdm ``bar`` by one per optimizer step."""
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bar.update(1)

    return _Bar()


def quiet_args(output_dir: str, **kwargs):
    """``TrainingArguments`` for a demo run: CPU, no bars or prints of its own, no checkpoints, no reporting."""
    from transformers import TrainingArguments

    defaults = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=10,
                    per_device_eval_batch_size=64, lr_scheduler_type="constant")
    return TrainingArguments(output_dir, **{**defaults, **kwargs})


def quiet(trainer):
    """Drop the Trainer's console printer (it prints raw log dicts when ``disable_tqdm``) and its progress bar."""
    from hf_svd_plugins.fedsvd.federation import quiet_trainer

    quiet_trainer(trainer)
    return trainer


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, title: str | None = None) -> str:
    """Write ``fig`` (with ``title`` on top) to the PNG ``path``, free it, return ``path``."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


@dataclass
class Split:
    """Tokenized Rotten Tomatoes train and test sets and their tokenizer."""

    train: Any
    test: Any
    tokenizer: Any


def rotten_tomatoes_tokenized(tokenizer, seed: int, max_length: int, train_size: int | None = None,
                              test_size: int | None = None) -> Split:
    """The packaged Rotten Tomatoes snippets (train 3,892 / test 974 by default), tokenized, optionally cut."""
    from hf_svd_plugins.examples import LabelledText, TokenizedClassification, rotten_tomatoes

    def cut(data: LabelledText, n: int | None) -> LabelledText:
        return data if n is None else LabelledText(data.text[:n], data.label[:n])

    train, test = rotten_tomatoes(seed=seed)
    return Split(TokenizedClassification(cut(train, train_size), tokenizer, max_length),
                 TokenizedClassification(cut(test, test_size), tokenizer, max_length), tokenizer)


PROBE_SENTENCES = ["a warm, funny, engaging film", "a dull and tedious mess", "neither good nor bad, just long"]
