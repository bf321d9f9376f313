"""EVA and the user's adapters: several adapters per model, the user's LoraConfig left untouched."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import TARGETS, TinyTokenDataset, pad_collate, tiny_batches, tiny_model
from transformers import Trainer, TrainingArguments

from hf_svd_plugins import EvaCallback, EvaConfig, eva_init
from hf_svd_plugins.eva import EvaResult, compute_eva
from hf_svd_plugins.eva.allocation import eva_pairs
from hf_svd_plugins.eva.layout import apply_resized
from hf_svd_plugins.lora import find_lora_pairs

DECAY = 0.7


def lora_config(r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS["llama"], lora_dropout=0.0, task_type="CAUSAL_LM")


def train_with_eva(out, model, max_steps=4, **eva_kwargs):
    callback = EvaCallback(rho=2.0, max_batches=4, show_progress_bar=False, **eva_kwargs)
    args = TrainingArguments(str(out), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=5e-3,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TinyTokenDataset(n=32), data_collator=pad_collate,
                      callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, callback


def widths(model, adapter=None):
    return sorted({p.A.shape[0] for p in find_lora_pairs(model, adapter)})


def test_reusing_one_lora_config_for_a_second_model_gives_the_configured_rank(tmp_path):
    config = lora_config(r=4)
    before = copy.deepcopy(config.to_dict())
    first = get_peft_model(tiny_model("llama", spectral_decay=DECAY), config)
    result = eva_init(first, tiny_batches(4), rho=2.0, max_batches=4, show_progress_bar=False)
    assert len(set(result.ranks.values())) > 1, "EVA should redistribute ranks here"
    train_with_eva(tmp_path, get_peft_model(tiny_model("llama", spectral_decay=DECAY), config))
    assert config.to_dict() == before
    second = get_peft_model(tiny_model("llama", spectral_decay=DECAY), config)
    assert widths(second) == [4]
    # the EVA model itself saves its ranks (in its private copy of the config)
    first.save_pretrained(str(tmp_path / "first"))
    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=DECAY), str(tmp_path / "first"))
    assert {p.name: p.r for p in find_lora_pairs(loaded)} == {k: v for k, v in result.ranks.items() if v}


def test_eva_callback_on_a_second_adapter_of_an_eva_model(tmp_path):
    model = get_peft_model(tiny_model("llama", spectral_decay=DECAY), lora_config(4))
    _, first = train_with_eva(tmp_path / "a", model)
    model.add_adapter("second", lora_config(2))
    model.set_adapter("second")
    trainer, second = train_with_eva(tmp_path / "b", model, adapter_name="second")
    assert widths(model, "second") == [4] and widths(model, "default") == [8]
    assert sum(second.ranks.values()) == 2 * len(second.ranks)
    for pair in find_lora_pairs(model, "second"):
        r_m = second.ranks[pair.name]
        assert torch.count_nonzero(pair.A[r_m:]) == 0 and torch.count_nonzero(pair.B[:, :r_m]) > 0
    # each adapter saves truncated to its own EVA ranks
    model.save_pretrained(str(tmp_path / "both"), selected_adapters=["default", "second"])
    for adapter, callback in (("default", first), ("second", second)):
        sub = tmp_path / "both" if adapter == "default" else tmp_path / "both" / adapter
        loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=DECAY), str(sub))
        assert {p.name: p.r for p in find_lora_pairs(loaded)} == {k: v for k, v in callback.ranks.items() if v}


def test_a_rank_zero_module_of_one_adapter_keeps_the_other_adapter():
    """eva_init on a second adapter drops only that adapter where its rank is 0 (forced here)."""
    model = get_peft_model(tiny_model("llama", spectral_decay=DECAY), lora_config(4))
    with torch.no_grad():
        for p in find_lora_pairs(model):
            p.B.normal_()
    model.add_adapter("second", lora_config(4))
    model.set_adapter("second")
    config = EvaConfig(rho=2.0, max_batches=3, adapter_name="second", show_progress_bar=False)
    pairs = eva_pairs(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compute_eva(model, tiny_batches(3), config, pairs)
    starved = pairs[3].name
    ranks = {**result.ranks, starved: 0, pairs[0].name: result.ranks[pairs[0].name] + result.ranks[starved]}
    forced = EvaResult(ranks=ranks, alphas={k: 2.0 * r for k, r in ranks.items()}, scalings=result.scalings,
                       matrices={p.name: torch.linalg.qr(torch.randn(p.in_features, 8, dtype=torch.float64))[0].T[
                           : ranks[p.name]] for p in pairs},
                       batches_used=result.batches_used, converged=result.converged, seconds=result.seconds)
    batch = tiny_batches(1, seed=7)[0]
    model.set_adapter("default")
    with torch.no_grad():
        before = model(**batch).logits
    model.set_adapter("second")
    apply_resized(model, pairs, forced)
    layer = model.get_submodule("base_model.model." + starved)
    assert "default" in layer.lora_A and "second" not in layer.lora_A
    assert layer.active_adapters == ["second"], "the other adapter must not become active here"
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)


def test_rslora_scales_are_kept_and_saved_adapters_reproduce_them(tmp_path):
    """With use_rslora the scale is alpha / sqrt(r): EVA keeps it (alpha_m = s sqrt(r_m)), PEFT's rebuilt layers
    agree, and the saved adapter reloads to the same logits."""
    import math

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], lora_dropout=0.0, task_type="CAUSAL_LM",
                        use_rslora=True)
    model = get_peft_model(tiny_model("llama", spectral_decay=DECAY), config)
    result = eva_init(model, tiny_batches(4), rho=2.0, max_batches=4, show_progress_bar=False)
    for pair in find_lora_pairs(model):
        r_m = result.ranks[pair.name]
        assert result.scalings[pair.name] == pytest.approx(8 / math.sqrt(4))
        assert result.alphas[pair.name] == pytest.approx(8 / math.sqrt(4) * math.sqrt(r_m))
        assert pair.scaling == pytest.approx(result.scalings[pair.name])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=DECAY), str(tmp_path)).eval()
    batch = tiny_batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)
