"""EVA on tiny models: against an independent float64 numpy PCA, against PEFT's own EVA, and input validation."""

import warnings

import numpy as np
import pytest
import torch
from peft import EvaConfig as PeftEvaConfig
from peft import LoraConfig, PeftModel, get_eva_state_dict, get_peft_model
from tiny import TARGETS, tiny_batches, tiny_lora_model, tiny_model

from hf_svd_plugins import EvaConfig, eva_init
from hf_svd_plugins.eva import EvaResult, compute_eva

# PEFT's EVA crashes on BERT's pooler (its input is one row per sequence, not per token), so the PEFT comparison
# leaves it out; our own tests keep it.
PEFT_TARGETS = {**TARGETS, "bert": ["query", "key", "value", "output.dense", "intermediate.dense"]}


def data_kind(kind: str) -> str:
    return "cls" if kind == "bert" else "lm"


def independent_activations(kind: str, batches, decay: float) -> dict[str, np.ndarray]:
    """Inputs of every targeted Linear of the plain (non-PEFT) model, non-padding non-label-masked tokens only."""
    model = tiny_model(kind, spectral_decay=decay).eval()
    targets = TARGETS[kind]
    rows: dict[str, list[np.ndarray]] = {}
    current = {}

    def hook(name, module, args, output):
        x = args[0]
        if x.dim() == 3:
            x = x[current["mask"]]
        rows.setdefault(name, []).append(x.double().numpy())

    for name, module in model.named_modules():
        if name.split(".")[-1] in targets:
            module.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o))
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].bool()
            if batch["labels"].shape == mask.shape:
                mask &= batch["labels"] != -100
            current["mask"] = mask
            model(**batch)
    return {k: np.concatenate(v) for k, v in rows.items()}


def principal_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


@pytest.mark.parametrize("center", [True, False])
def test_directions_equal_float64_numpy_pca_of_the_same_activations(kind, center):
    """With product_dtype=float64 EVA is a float64 PCA of everything read; the float32 default is checked below."""
    n_batches = 5
    batches = tiny_batches(n_batches, batch_size=8, kind=data_kind(kind), seed=2)
    model = tiny_lora_model(kind, r=4, spectral_decay=0.7)
    # tau=1 never declares convergence and min_batches=max_batches reads exactly these batches once.
    config = EvaConfig(rho=2.0, tau=1.0, min_batches=n_batches, max_batches=n_batches, center=center,
                       product_dtype="float64", show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compute_eva(model, batches, config)
    assert result.batches_used == n_batches
    acts = independent_activations(kind, batches, 0.7)
    ratios = {}
    for name, a in result.matrices.items():
        x = acts[name]
        xc = x - x.mean(0) if center else x
        _, s, vt = np.linalg.svd(xc, full_matrices=False)
        ratios[name] = (s**2 / (s**2).sum())[:8]
        r_m = result.ranks[name]
        cos = np.abs(np.sum(a.numpy() * vt[:r_m], axis=1))
        assert cos.min() > 1 - 1e-6, (name, cos)
    # the rank allocation is the global top-R of these ratios (R = 4 per module); q/k/v share inputs, hence tie
    budget = 4 * len(ratios)
    threshold = np.sort(np.concatenate(list(ratios.values())))[::-1][budget - 1]
    for name, v in ratios.items():
        tied = np.isclose(v, threshold, rtol=1e-9)
        assert (v > threshold).sum() - tied.sum() <= result.ranks[name] <= (v >= threshold).sum() + tied.sum()
    assert sum(result.ranks.values()) == budget


def test_float32_products_agree_with_float64():
    batches = tiny_batches(4, batch_size=8, seed=3)
    results = {}
    for dtype in ("float32", "float64"):
        config = EvaConfig(rho=2.0, tau=1.0, min_batches=4, max_batches=4, product_dtype=dtype,
                           show_progress_bar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[dtype] = compute_eva(tiny_lora_model("llama", r=4, spectral_decay=0.7), batches, config)
    assert results["float32"].ranks == results["float64"].ranks
    for name, a in results["float64"].matrices.items():
        cos = (a * results["float32"].matrices[name]).sum(1).abs()
        assert cos.min() > 1 - 1e-6, name


def run_peft_eva(kind: str, batches, rho: float, decay: float) -> dict[str, torch.Tensor]:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=PEFT_TARGETS[kind], init_lora_weights="eva",
        eva_config=PeftEvaConfig(rho=rho, tau=0.99), fan_in_fan_out=(kind == "gpt2"),
        task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM",
    )
    model = get_peft_model(tiny_model(kind, spectral_decay=decay), config, low_cpu_mem_usage=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = get_eva_state_dict(model, batches, show_progress_bar=False)
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


def test_rank_allocation_and_subspaces_match_peft_eva(kind):
    """Same batches, rho=2. The stopping rules differ (we stop when the span a module needs settles, PEFT when every
    vector does), so the two read different numbers of batches; a component tied at the budget boundary may then go to
    a neighbouring module. We allow at most one such swap, and compare the directions both kept."""
    decay, batches = 0.5, tiny_batches(16, batch_size=16, kind=data_kind(kind), seed=1)
    peft_state = run_peft_eva(kind, batches, rho=2.0, decay=decay)
    model = tiny_lora_model(kind, r=4, spectral_decay=decay, target_modules=PEFT_TARGETS[kind])
    result = compute_eva(model, batches, EvaConfig(rho=2.0, tau=0.99, show_progress_bar=False))
    peft_ranks = {k: v.shape[0] for k, v in peft_state.items()}
    assert result.ranks.keys() == peft_ranks.keys()
    assert sum(abs(result.ranks[k] - peft_ranks[k]) for k in peft_ranks) <= 2, (result.ranks, peft_ranks)
    for name, u in peft_state.items():
        n = min(u.shape[0], result.ranks[name])
        if n:
            assert principal_cosines(result.matrices[name][:n].numpy(), u[:n].double().numpy()).min() >= 0.99, name


def test_rho_1_leading_directions_match_peft_eva(kind):
    """At rho=1 PEFT's incremental PCA keeps only r components between batches, and that truncation biases its
    trailing directions when the spectrum decays slowly (our statistics are exact: see the numpy test above). At
    rho=2 it keeps 2r and we agree on every direction (previous test). So at rho=1 we check the leading r/2."""
    decay, batches = 0.5, tiny_batches(16, batch_size=16, kind=data_kind(kind), seed=1)
    peft_state = run_peft_eva(kind, batches, rho=1.0, decay=decay)
    model = tiny_lora_model(kind, r=4, spectral_decay=decay, target_modules=PEFT_TARGETS[kind])
    result = compute_eva(model, batches, EvaConfig(rho=1.0, tau=0.99, show_progress_bar=False))
    assert all(r == 4 for r in result.ranks.values())
    for name, u in peft_state.items():
        assert principal_cosines(result.matrices[name][:2].numpy(), u[:2].double().numpy()).min() >= 0.98, name


def assert_peft_round_trip(model, directory, batch):
    """Perturb the trainable weights (so the adapter is not a no-op), save, reload with PEFT's own loader onto a
    fresh base model, and require the same logits. Returns the reloaded model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=0.5), directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)
    return loaded


def test_eva_init_resizes_and_saves_a_standard_adapter(tmp_path):
    batches = tiny_batches(8, kind="lm")
    model = tiny_lora_model("llama", r=4, spectral_decay=0.5)
    result = eva_init(model, batches, rho=2.0, show_progress_bar=False)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            assert module.lora_A["default"].weight.shape[0] == result.ranks[key]
            a = module.lora_A["default"].weight.double()
            assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=a.dtype), atol=1e-5)
            assert torch.count_nonzero(module.lora_B["default"].weight) == 0
    assert_peft_round_trip(model, tmp_path, batches[0])


def test_rank_zero_modules_lose_their_adapter_and_still_load(tmp_path):
    """Real activations rarely starve a module on tiny models, so the decision is edited to force r_m = 0."""
    from hf_svd_plugins.eva.allocation import eva_pairs
    from hf_svd_plugins.eva.layout import apply_resized

    batches = tiny_batches(4, kind="lm")
    model = tiny_lora_model("llama", r=4, spectral_decay=0.5)
    config = EvaConfig(rho=2.0, max_batches=4, show_progress_bar=False)
    pairs = eva_pairs(model, config)
    result = compute_eva(model, batches, config, pairs)
    starved, rich = pairs[3].name, pairs[0].name
    result.ranks[rich] += result.ranks[starved]
    result.ranks[starved] = 0
    result = EvaResult(
        ranks=result.ranks, alphas={k: 2.0 * r for k, r in result.ranks.items()}, scalings=result.scalings,
        matrices={p.name: torch.linalg.qr(torch.randn(p.in_features, 8, dtype=torch.float64))[0].T[: result.ranks[p.name]]
                  for p in pairs},
        batches_used=result.batches_used, converged=result.converged, seconds=result.seconds)
    apply_resized(model, pairs, result)
    assert not hasattr(model.get_submodule("base_model.model." + starved), "lora_A")
    loaded = assert_peft_round_trip(model, tmp_path, batches[0])
    assert not hasattr(loaded.get_submodule("base_model.model." + starved), "lora_A")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0.5}, "rho must be"),
        ({"tau": 0.0}, "tau must be in"),
        ({"tau": 1.5}, "tau must be in"),
        ({"max_batches": 0}, "max_batches"),
        ({"min_batches": 5, "max_batches": 3}, "exceeds max_batches"),
        ({"statistics": "approximate"}, "statistics must be one of"),
        ({"sketch_factor": 1.5}, "sketch_factor must be a number >= 2"),
        ({"product_dtype": "bfloat16"}, "product_dtype must be"),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvaConfig(**kwargs)


def test_bad_models_and_data_fail_clearly():
    with pytest.raises(ValueError, match="no LoRA adapter"):
        eva_init(tiny_model("llama"), tiny_batches(2))
    with pytest.raises(ValueError, match="rank 40 exceeds in_features 32 of model.layers.0.self_attn.q_proj"):
        eva_init(tiny_lora_model("llama", r=40), tiny_batches(2))
    with pytest.raises(ValueError, match="dataloader is empty"):
        eva_init(tiny_lora_model("llama"), [], show_progress_bar=False)
    embedding_only = tiny_lora_model("llama", target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="no LoRA Linear layers"):
        eva_init(embedding_only, tiny_batches(2))
    with pytest.raises(TypeError, match="dict-like batches"):
        eva_init(tiny_lora_model("llama"), [torch.ones(2, 3, dtype=torch.long)], show_progress_bar=False)


def test_batch_encoding_batches_are_accepted():
    from transformers import BatchEncoding

    batches = [BatchEncoding(dict(b)) for b in tiny_batches(3)]
    result = eva_init(tiny_lora_model("llama", spectral_decay=0.5), batches, rho=1.0, max_batches=3,
                      show_progress_bar=False)
    assert result.batches_used >= 2
