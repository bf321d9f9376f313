"""Tiny offline models, LoRA wrappers, data sets and a collator shared by tests and by the multi-process test scripts.

Everything is built from configs with fixed seeds: no hub, no downloads.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

VOCAB = 97

# LoRA targets per architecture: every Linear-like projection the suite supports.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}


def tiny_model(kind: str, seed: int = 0, spectral_decay: float | None = None) -> torch.nn.Module:
    """A randomly initialised model of a few thousand parameters: ``llama``, ``gpt2`` (causal LM) or ``bert``
    (sequence classification, 2 labels).

    With ``spectral_decay`` (e.g. 0.7), every 2-D weight is re-drawn with singular values ``decay**i`` (times its
    original norm scale), so activations have a clearly decaying spectrum like trained models (random init is nearly
    isotropic, which makes individual principal directions ill-defined).
    """
    model = _tiny_model(kind, seed)
    if spectral_decay is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() != 2:
                    continue
                k = min(p.shape)
                u, _ = torch.linalg.qr(torch.randn(p.shape[0], k, generator=gen))
                v, _ = torch.linalg.qr(torch.randn(p.shape[1], k, generator=gen))
                s = spectral_decay ** torch.arange(k, dtype=torch.float32)
                w = u @ torch.diag(s) @ v.T
                p.copy_(w * (p.norm() / w.norm()))
    return model


def _tiny_model(kind: str, seed: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return tf.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            num_labels=2,
        )
        return tf.BertForSequenceClassification(cfg)
    raise ValueError(f"unknown tiny model kind {kind!r}; use llama, gpt2 or bert")


def tiny_lora_model(kind: str, r: int = 4, lora_alpha: int = 8, seed: int = 0, spectral_decay: float | None = None,
                    **lora_kwargs) -> torch.nn.Module:
    """``tiny_model(kind)`` wrapped in a PEFT LoRA adapter on all of :data:`TARGETS` for that architecture."""
    model = tiny_model(kind, seed=seed, spectral_decay=spectral_decay)
    task_type = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=lora_kwargs.pop("target_modules", TARGETS[kind]),
        lora_dropout=0.0,
        task_type=task_type,
        fan_in_fan_out=(kind == "gpt2"),
        **lora_kwargs,
    )
    return get_peft_model(model, config)


class TinyTokenDataset(torch.utils.data.Dataset):
    """Variable-length token sequences with a learnable pattern (next token = token + 1 mod VOCAB, with noise).

    Each item is a dict ``input_ids``, ``attention_mask``, ``labels`` (causal LM) or ``label`` (classification).
    The first ``prompt_len`` labels of every sequence are ``-100`` so label masking is exercised.
    """

    def __init__(self, n: int = 64, min_len: int = 6, max_len: int = 16, kind: str = "lm", seed: int = 0,
                 prompt_len: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            start = int(torch.randint(1, VOCAB, (1,), generator=g))
            ids = (start + torch.arange(length)) % (VOCAB - 1) + 1
            flip = torch.rand(length, generator=g) < 0.1
            ids[flip] = torch.randint(1, VOCAB, (int(flip.sum()),), generator=g)
            item = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)}
            if kind == "lm":
                labels = ids.clone()
                labels[:prompt_len] = -100
                item["labels"] = labels
            else:
                item["labels"] = torch.tensor(int(start % 2))
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad_collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ``input_ids``/``attention_mask`` (and LM ``labels`` with -100) to the longest item."""
    longest = max(len(x["input_ids"]) for x in batch)
    out = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
        rows = []
        for x in batch:
            v = x[key]
            if v.dim() == 0:
                rows.append(v)
                continue
            rows.append(torch.cat([v, torch.full((longest - len(v),), fill, dtype=v.dtype)]))
        out[key] = torch.stack(rows)
    return out


def tiny_batches(n_batches: int = 4, batch_size: int = 8, kind: str = "lm", seed: int = 0) -> list[dict]:
    """A list of collated batches (a valid ``dataloader`` for ``eva_init``)."""
    ds = TinyTokenDataset(n=n_batches * batch_size, kind=kind, seed=seed)
    return [pad_collate([ds[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n_batches)]


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary (``w2 ... w96``, pad 0, eos 1), for TRL trainers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_text_dataset(n: int = 40, length: int = 10):
    """A ``datasets.Dataset`` with a ``text`` column of tiny-vocabulary sentences (for TRL's SFTTrainer)."""
    from datasets import Dataset

    texts = [" ".join(f"w{(s + i) % (VOCAB - 2) + 2}" for i in range(length)) for s in range(n)]
    return Dataset.from_dict({"text": texts})
