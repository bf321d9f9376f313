"""Private LoRA on MiniLM that learns (docs/dp.md, "Getting private LoRA to learn"): the model, the frozen prefix
computed once, hidden-state datasets and the setup the study chose.
"""

from __future__ import annotations

from dataclasses import dataclass

from .assets import LabelledText, TokenizedClassification, rotten_tomatoes_splits
from .classifiers import minilm_mean_pool_classifier


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
