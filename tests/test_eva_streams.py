"""EVA's collection pass: one statistic per distinct input tensor, empty batches, sketches end to end, what the forward
computes, and offloaded base models. References are an independent float64 numpy PCA of the same activations."""

import warnings

import numpy as np
import pytest
import torch
from test_eva_model import independent_activations
from tiny import TARGETS, tiny_batches, tiny_lora_model, tiny_model

from hf_svd_plugins.eva import EvaConfig, compute_eva
from hf_svd_plugins.eva.batches import eva_forward_kwargs

DECAY = 0.7


def quiet_eva(model, batches, **kwargs):
    config = EvaConfig(**{"rho": 2.0, "show_progress_bar": False, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_eva(model, batches, config)


def captured_ratio(a: np.ndarray, x: np.ndarray) -> float:
    xc = x - x.mean(0)
    scatter = xc.T @ xc
    q, _ = np.linalg.qr(a.T)
    optimal = np.sort(np.linalg.eigvalsh(scatter))[::-1][: a.shape[0]].sum()
    return float(np.trace(q.T @ scatter @ q) / optimal)


def masked_batch(batch: dict) -> dict:
    """The same batch with every label masked: no token counts for EVA."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def test_layers_are_grouped_by_input_tensor_before_any_statistic_is_formed(monkeypatch):
    """The tiny Llama has 7 LoRA layers per block but 4 distinct inputs (q/k/v, o, gate/up, down): exactly 4
    statistics per block may ever be formed, on the first batch too (a 7B model would otherwise spike by a Gram per
    layer)."""
    from hf_svd_plugins.eva import core

    formed = []
    original = core.ActivationStats.of.__func__

    def counting(cls, x, product_dtype=torch.float64):
        formed.append(x.shape)
        return original(cls, x, product_dtype)

    monkeypatch.setattr(core.ActivationStats, "of", classmethod(counting))
    batches = tiny_batches(3)
    quiet_eva(tiny_lora_model("llama", r=4, spectral_decay=DECAY), batches[:1] * 2, tau=1.0, max_batches=2)
    assert len(formed) == 2 * 4 * 2  # 2 blocks x 4 inputs x 2 batches


def test_a_fully_label_masked_first_batch_is_skipped_and_changes_nothing():
    batches = tiny_batches(4, batch_size=8, seed=2)
    n = len(batches)
    expected = quiet_eva(tiny_lora_model("llama", r=4, spectral_decay=DECAY), batches, tau=1.0, min_batches=n,
                         max_batches=n, product_dtype="float64")
    result = quiet_eva(tiny_lora_model("llama", r=4, spectral_decay=DECAY), [masked_batch(batches[0]), *batches],
                       tau=1.0, min_batches=n, max_batches=n, product_dtype="float64")
    assert result.batches_used == n
    assert result.ranks == expected.ranks
    for name, a in expected.matrices.items():
        assert torch.allclose(result.matrices[name].abs(), a.abs(), atol=1e-10), name
    # o_proj has its own inputs: its directions are not q_proj's even though both are 32 wide
    acts = independent_activations("llama", batches, DECAY)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"):
        _, _, vt = np.linalg.svd(acts[name] - acts[name].mean(0), full_matrices=False)
        r_m = result.ranks[name]
        assert np.abs(np.sum(result.matrices[name].numpy() * vt[:r_m], axis=1)).min() > 1 - 1e-6, name


def test_an_empty_batch_between_two_never_counts_as_convergence():
    """An empty batch adds nothing, so previous and current directions would be equal; it must be skipped."""
    batches = tiny_batches(3, batch_size=8, seed=4)
    result = quiet_eva(tiny_lora_model("llama", r=4, spectral_decay=DECAY),
                       [batches[0], masked_batch(batches[1]), masked_batch(batches[2]), batches[1]], tau=1.0,
                       min_batches=2, max_batches=2)
    assert result.batches_used == 2 and not any(result.converged.values())


def test_only_masked_tokens_is_a_clear_error():
    batches = [masked_batch(b) for b in tiny_batches(2)]
    with pytest.raises(ValueError, match="no tokens to read"):
        quiet_eva(tiny_lora_model("llama", r=4), batches)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_sketched_statistics_capture_the_variance_of_the_exact_subspace(kind):
    """statistics="sketch" with l = 2 r_max = 16 rows, below every width (32, 48, 96/128): the A rows of every
    module capture >= 0.99 of the variance of the optimal subspace of the same size (float64 numpy PCA)."""
    data = "cls" if kind == "bert" else "lm"
    batches = tiny_batches(6, batch_size=8, kind=data, seed=2)
    n = len(batches)
    result = quiet_eva(tiny_lora_model(kind, r=4, spectral_decay=DECAY), batches, tau=1.0, min_batches=n,
                       max_batches=n, statistics="sketch", sketch_factor=2)
    assert set(result.statistics.values()) == {"sketch"}
    acts = independent_activations(kind, batches, DECAY)
    worst = min(captured_ratio(a.numpy(), acts[name]) for name, a in result.matrices.items() if a.shape[0])
    assert worst >= 0.99
    assert all(0 < b <= 1 for b in result.variance_bounds.values())


def test_auto_statistics_are_exact_where_narrow_and_sketched_where_wide():
    """auto: exact where d <= 2 l, with l = ceil(sketch_factor * r_max). r=2, rho=2: r_max = 4. At factor 4 (l = 16)
    the 32-wide inputs stay exact and only the 48-wide down_proj input is sketched; at factor 2 (l = 8) all are."""
    batches = tiny_batches(3)
    default = quiet_eva(tiny_lora_model("llama", r=2, spectral_decay=DECAY), batches, max_batches=3)
    assert {n for n, k in default.statistics.items() if k == "sketch"} == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    narrow = quiet_eva(tiny_lora_model("llama", r=2, spectral_decay=DECAY), batches, max_batches=3, sketch_factor=2)
    assert set(narrow.statistics.values()) == {"sketch"}
    exact = quiet_eva(tiny_lora_model("llama", r=2, spectral_decay=DECAY), batches, max_batches=3, statistics="exact")
    assert set(exact.statistics.values()) == {"exact"}
    assert set(exact.variance_bounds.values()) == {1.0}
    # at 7B widths (r=16, rho=2: r_max=32, l=128) every input is sketched
    assert EvaConfig().uses_sketch(4096, 32) and EvaConfig().uses_sketch(11008, 32)


def test_the_forward_skips_labels_cache_and_full_logits():
    """EVA needs layer inputs only: no loss, no KV cache, and logits for one position instead of tokens x vocab."""
    batch = tiny_batches(1)[0]
    llama = tiny_lora_model("llama")
    kwargs = eva_forward_kwargs(llama, batch)
    assert "labels" not in kwargs and kwargs["use_cache"] is False and kwargs["logits_to_keep"] == 1
    with torch.no_grad():
        out = llama(**kwargs)
    assert out.logits.shape[1] == 1 and out.loss is None
    bert = tiny_lora_model("bert")
    cls_batch = tiny_batches(1, kind="cls")[0]
    assert set(eva_forward_kwargs(bert, cls_batch)) == {"input_ids", "attention_mask"}


def _offloaded(tmp_path, device_map):
    from accelerate import dispatch_model
    from peft import LoraConfig, get_peft_model

    base = dispatch_model(tiny_model("llama", spectral_decay=DECAY), device_map=device_map, offload_dir=str(tmp_path))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], task_type="CAUSAL_LM"))


def test_offloaded_embeddings_on_meta_still_run_on_the_execution_device(tmp_path):
    """The first parameter lives on `meta` (disk-offloaded embeddings); batches go where the other weights are."""
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    model = _offloaded(tmp_path, device_map)
    assert next(model.parameters()).device.type == "meta"
    batches = tiny_batches(3)
    result = quiet_eva(model, batches, tau=1.0, min_batches=3, max_batches=3)
    expected = quiet_eva(tiny_lora_model("llama", r=4, spectral_decay=DECAY), batches, tau=1.0, min_batches=3,
                         max_batches=3)
    assert result.ranks == expected.ranks
    for name, a in expected.matrices.items():
        assert torch.allclose(result.matrices[name], a, atol=1e-6), name


def test_offloaded_lora_targets_are_refused_before_any_forward(tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="offloaded.*model.layers.1.self_attn.q_proj"):
        quiet_eva(_offloaded(tmp_path, device_map), tiny_batches(2))


class SharedInputs(torch.nn.Module):
    """``a`` and ``b`` read one tensor; ``c`` reads the same object after an in-place change, twice per forward."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(97, 16)
        self.a, self.b, self.c = (torch.nn.Linear(16, 16) for _ in range(3))
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(97, 16, generator=gen) * torch.logspace(0, -2, 16))

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.emb(input_ids)
        out = self.a(x) + self.b(x)
        x.mul_(-1.0).add_(torch.sin(3 * x))  # same object, other values: c must not share a/b's statistics
        return out + self.c(x) + self.c(x)


def test_grouping_needs_the_same_unmodified_tensor_and_repeated_calls_all_count():
    from peft import LoraConfig, get_peft_model

    from hf_svd_plugins.eva.allocation import eva_pairs
    from hf_svd_plugins.eva.collection import collect

    model = get_peft_model(SharedInputs(), LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c"]))
    batches = tiny_batches(3)
    config = EvaConfig(rho=2.0, tau=1.0, min_batches=3, max_batches=3, product_dtype="float64",
                       show_progress_bar=False)
    pairs = eva_pairs(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = collect(model, batches, config, pairs, {p.name: 4 for p in pairs}, budget=6)
    assert found.members == {"a": ["a", "b"], "c": ["c"]}
    rows = []
    with torch.no_grad():
        for batch in batches:
            x = model.get_base_model().emb(batch["input_ids"])
            x = -x + torch.sin(-3 * x)
            rows.append(x[batch["attention_mask"].bool() & (batch["labels"] != -100)].double().numpy())
    x = np.concatenate(rows * 2)  # c runs twice per forward: each call's rows count
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    comps = found.components["c"]
    np.testing.assert_allclose(comps.singular_values.numpy(), s[:4], rtol=1e-8)
    assert np.abs(np.sum(comps.vectors.numpy() * vt[:4], axis=1)).min() > 1 - 1e-8


@pytest.mark.parametrize("kind, route", [("exact", "all_reduce_statistics"), ("exact", "all_gather_rows"),
                                         ("sketch", "all_gather_rows"), ("sketch", "all_gather_sketches")])
def test_a_ranks_contribution_accumulates_over_calls_within_one_forward(kind, route):
    """Under data parallelism a layer called twice per forward adds both calls' rows to the pending contribution
    (one process here: the collectives are identities, so combining must equal adding all rows at once)."""
    from hf_svd_plugins.eva.collection import _ExactStream, _SketchStream

    config = EvaConfig(product_dtype="float64")
    make = (lambda: _ExactStream(12, config, route, torch.device("cpu"))) if kind == "exact" else (
        lambda: _SketchStream(12, 12, config, route, torch.device("cpu")))
    first, second = torch.randn(20, 12, dtype=torch.float64), torch.randn(30, 12, dtype=torch.float64) + 1
    pending, direct = make(), make()
    assert pending.combine(pending.local_part(second, pending.local_part(first))) == 50
    direct.add_rows(torch.cat([first, second]))
    a, b = pending.components(4, None, final=True), direct.components(4, None, final=True)
    torch.testing.assert_close(a.singular_values, b.singular_values, rtol=1e-9, atol=1e-12)
