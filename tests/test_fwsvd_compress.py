"""``fwsvd_compress``: factors against the core and a numpy optimum, the low-rank checkpoint through plain
``from_pretrained``, fine-tuning and LoRA healing of a loaded compressed model, and bad input."""

import warnings

import numpy as np
import pytest
import torch
import transformers
from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model, tiny_model

import hf_svd_plugins  # noqa: F401 - registers the checkpoint format, as a user's import would
from hf_svd_plugins import fwsvd_compress, load_compressed
from hf_svd_plugins.fwsvd import LowRankLinear, estimate_fisher, select_targets, weighted_low_rank
from hf_svd_plugins.fwsvd.lowrank import dense_weight

AUTO = {"llama": transformers.AutoModelForCausalLM, "gpt2": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModelForSequenceClassification}


def data(kind, n=3, seed=3):
    return tiny_batches(n, batch_size=4, kind="lm" if kind != "bert" else "cls", seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_fisher_factors_are_the_core_solution_on_the_estimated_importance(kind):
    model = tiny_model(kind, spectral_decay=0.8)
    batches = data(kind)
    importance = estimate_fisher(model, batches)
    dense = {t.name: dense_weight(t.layer).detach().clone() for t in select_targets(model)}
    report = fwsvd_compress(model, "fisher", calibration=batches, ratio=0.5, progress=False)
    assert report.model is model and len(report.ranks) == len(dense)
    for name, w in dense.items():
        module = model.get_submodule(name)
        assert isinstance(module, LowRankLinear) and module.rank == report.ranks[name]
        down, up = weighted_low_rank(w, importance[name], module.rank)
        torch.testing.assert_close(module.up.weight @ module.down.weight, up @ down, atol=1e-5, rtol=1e-4)
    assert report.targeted_share <= 0.5 + 1e-9 and report.model_share > report.targeted_share
    assert report.model_params_after == n_params(model) < report.model_params_before
    assert all(0 < r.weighted_error < 1 and 0 < r.plain_error < 1 for r in report.layers)


def test_whitening_reaches_the_numpy_optimum_on_the_calibration_inputs_in_any_memory_chunking():
    model = tiny_model("llama", spectral_decay=0.8)
    batches = data("llama", n=2)
    inputs = {}  # every targeted layer's non-padding input rows, read independently of the library
    hooks = [t.layer.register_forward_hook(
        lambda m, a, o, name=t.name: inputs.setdefault(name, []).append(a[0].detach())) for t in select_targets(model)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    x = {n: torch.cat([v[m] for v, m in zip(vs, masks, strict=True)]).double().numpy() for n, vs in inputs.items()}
    dense = {t.name: dense_weight(t.layer).detach().double().numpy() for t in select_targets(model)}
    results = []
    for memory_gb in (4.0, 1e-9):  # all Grams at once, or one stream per pass (early-stopped passes)
        copy = tiny_model("llama", spectral_decay=0.8)
        report = fwsvd_compress(copy, "whiten", calibration=batches, ratio=0.5, damping=0.0, memory_gb=memory_gb,
                                progress=False)
        results.append({n: (copy.get_submodule(n).up.weight @ copy.get_submodule(n).down.weight).detach().double()
                        for n in report.ranks})
        for name, k in report.ranks.items():
            approx = results[-1][name].numpy()
            error = np.linalg.norm((dense[name] - approx) @ x[name].T) ** 2
            optimum = (np.linalg.svd(dense[name] @ x[name].T, compute_uv=False)[k:] ** 2).sum()
            np.testing.assert_allclose(error, optimum, rtol=1e-4)
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name])


@pytest.mark.parametrize("method", ["svd", "fisher", "whiten"])
def test_round_trip_through_plain_from_pretrained(kind, method, tmp_path):
    model = tiny_model(kind, spectral_decay=0.8)
    batches = data(kind)
    report = fwsvd_compress(model, method, calibration=None if method == "svd" else batches, ratio=0.5, progress=False)
    model.save_pretrained(tmp_path)
    for loaded in (AUTO[kind].from_pretrained(tmp_path), load_compressed(tmp_path)):
        assert type(loaded) is type(model)
        assert n_params(loaded) == n_params(model) == report.model_params_after
        assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == report.ranks
        assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))
    assert loaded.config.quantization_config.method == method


def test_loading_options_and_saving_a_loaded_model(tmp_path):
    model = tiny_model("llama", spectral_decay=0.8)
    batch = data("llama")[0]
    fwsvd_compress(model, "svd", ratio=0.5, progress=False)
    model.save_pretrained(tmp_path / "a")
    half = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.bfloat16, device_map="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in half.parameters())
    torch.testing.assert_close(logits(half, batch).float(), logits(model, batch), atol=0.1, rtol=0.05)
    base = transformers.AutoModel.from_pretrained(tmp_path / "a")  # the headless class: names lose "model."
    assert isinstance(base.layers[0].self_attn.q_proj, LowRankLinear)
    loaded = load_compressed(tmp_path / "a")
    loaded.half().float()  # ordinary float weights: casting works as for any model
    loaded = load_compressed(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    again = load_compressed(tmp_path / "b")
    assert torch.equal(logits(again, batch), logits(model, batch))
    with pytest.raises(ValueError, match="not a compressed checkpoint"):
        tiny_model("llama").save_pretrained(tmp_path / "dense")
        load_compressed(tmp_path / "dense")


def test_a_peft_model_is_merged_before_compression():
    peft_model = tiny_lora_model("llama", spectral_decay=0.8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = data("llama")[0]
    expected = logits(peft_model, batch)
    report = fwsvd_compress(peft_model, "svd", ranks={"model.layers.0.mlp.down_proj": 16}, progress=False)
    assert isinstance(report.model, transformers.LlamaForCausalLM)
    assert isinstance(report.model.model.layers[0].mlp.down_proj, LowRankLinear)
    assert not any("lora" in n for n, _ in report.model.named_parameters())
    assert (logits(report.model, batch) - expected).abs().max() < 0.5  # merged, one layer at rank 16 of 32


def trainer_for(model, tmp_path, steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    return Trainer(model=model, args=args, train_dataset=TinyTokenDataset(n=32), data_collator=pad_collate)


def test_a_loaded_compressed_model_fine_tunes_and_heals_with_lora_on_its_factors(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_model("llama", spectral_decay=0.8)
    batch = data("llama")[0]
    fwsvd_compress(model, "svd", ratio=0.5, progress=False)
    model.save_pretrained(tmp_path / "compressed")

    full = load_compressed(tmp_path / "compressed")  # full fine-tuning
    before = full.model.layers[0].self_attn.q_proj.down.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(full, tmp_path / "full").train()
    assert not torch.equal(before, full.model.layers[0].self_attn.q_proj.down.weight)

    base = load_compressed(tmp_path / "compressed")
    healed = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["down", "up"], lora_dropout=0.0))
    assert len([n for n, _ in healed.named_modules() if n.endswith(".down") or n.endswith(".up")]) == 28
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(healed, tmp_path / "heal").train()
    healed.save_pretrained(tmp_path / "adapter")
    expected = logits(healed, batch)
    assert not torch.allclose(expected, logits(model, batch))
    reloaded = PeftModel.from_pretrained(load_compressed(tmp_path / "compressed"), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, batch), expected)


def test_global_budget_is_respected_and_recorded(tmp_path):
    model = tiny_model("gpt2", spectral_decay=0.8)
    batches = data("gpt2")
    report = fwsvd_compress(model, "whiten", calibration=batches, param_budget=12_000, progress=False)
    weights = sum(r.rank * (r.d_in + r.d_out) if r.rank else r.d_in * r.d_out for r in report.layers)
    assert weights <= 12_000
    assert len(set(report.ranks.values())) > 1, "a global budget should give the layers different ranks"
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(load_compressed(tmp_path), batches[0]), logits(model, batches[0]))


def test_bad_input_fails_before_any_work():
    model = tiny_model("llama")
    batches = data("llama")
    fisher = estimate_fisher(model, batches)
    reference = {n: p.clone() for n, p in model.named_parameters()}
    cases = [
        (dict(method="svd", ratio=0.0), "ratio must be in"),
        (dict(method="svd", ratio=1.5), "ratio must be in"),
        (dict(method="svd"), "exactly one of"),
        (dict(method="svd", ratio=0.5, param_budget=100), "exactly one of"),
        (dict(method="svd", param_budget=10**9), "dense weight size"),
        (dict(method="svd", param_budget=10), "rank 8 per layer"),
        (dict(method="svd", ratio=0.5, targets=["post_attention_layernorm"]), "not nn.Linear"),
        (dict(method="fisher", ratio=0.5, importance={}), "no entry"),
        (dict(method="fisher", ratio=0.5, importance={**fisher, "model.layers.0.self_attn.q_proj": torch.ones(5)}),
         "expected \\(32,\\)"),
        (dict(method="fisher", ratio=0.5), "needs importance"),
        (dict(method="whiten", ratio=0.5), "needs calibration"),
        (dict(method="whiten", ratio=0.5, calibration=[]), "calibration is empty"),
        (dict(method="nope", ratio=0.5), "method must be"),
        (dict(method="svd", ranks={"model.layers.0.self_attn.q_proj": 99}), "must be an int in"),
        (dict(method="svd", ranks={"model.layers.9.self_attn.q_proj": 4}), "matches no module"),
        (dict(method="svd", ratio=0.5, rank_multiple=0), "rank_multiple"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fwsvd_compress(model, progress=False, **kwargs)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="tied"):
        fwsvd_compress(gpt2, "svd", ratio=0.5, targets=["lm_head"], progress=False)
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_features_without_importance_are_warned_about_once():
    model = tiny_model("llama", spectral_decay=0.8)
    fisher = estimate_fisher(model, data("llama"))
    fisher["model.layers.0.mlp.down_proj"][:5] = 0
    with pytest.warns(UserWarning, match="5 input features have zero Fisher importance"):
        report = fwsvd_compress(model, "fisher", importance=fisher, ratio=0.5, progress=False)
    assert np.isfinite([r.weighted_error for r in report.layers]).all()


def test_compressing_twice_only_touches_what_is_still_dense(tmp_path):
    model = tiny_model("llama", spectral_decay=0.8)
    fwsvd_compress(model, "svd", ratio=0.5, targets=["q_proj", "k_proj"], progress=False)
    report = fwsvd_compress(model, "svd", ratio=0.5, progress=False)
    assert not any(n.endswith((".down", ".up")) for n in report.ranks) and len(report.ranks) == 10
    model.save_pretrained(tmp_path)
    assert len(load_compressed(tmp_path).config.quantization_config.ranks) == 14
    batch = data("llama")[0]
    assert torch.equal(logits(load_compressed(tmp_path), batch), logits(model, batch))
