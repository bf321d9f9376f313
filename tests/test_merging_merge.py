"""merge_models' input checks and mixing, and the diagnostics against closed forms and plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from test_merging_specs import family_model, permuted_copy
from tiny import tiny_batches, tiny_lora_model, tiny_model
from torch import nn

import hf_svd_plugins.merging.matching as matching
from hf_svd_plugins.merging import merge_models
from hf_svd_plugins.merging.diagnostics import (
    InterpolationPath,
    alignment_r,
    interpolation_path,
    l2_distance,
    layer_report,
    plot_interpolation,
    summarize_layers,
    unaligned_level,
)
from hf_svd_plugins.merging.evaluation import evaluate


@pytest.fixture
def no_search(monkeypatch):
    """Fail if any search starts: bad input must be refused before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("a search started before the input was checked")
    monkeypatch.setattr(matching, "match_states", refuse)
    import hf_svd_plugins.merging.merge as merge_module

    monkeypatch.setattr(merge_module, "match_states", refuse)
    monkeypatch.setattr(merge_module, "merge_many_states", refuse)


def test_bad_input_is_refused_before_any_work(no_search):
    llama, other = family_model("llama"), family_model("llama", seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        merge_models([llama])
    with pytest.raises(TypeError, match="list of models"):
        merge_models(llama)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        merge_models([llama, family_model("gpt2")])
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(**{**llama.config.to_dict(), "intermediate_size": 64}))
    with pytest.raises(ValueError, match="intermediate_size"):
        merge_models([llama, wider])
    with pytest.raises(ValueError, match="parameters"):
        merge_models([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                      nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2))])
    with pytest.raises(ValueError, match="3 values for 2 models"):
        merge_models([llama, other], weights=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        merge_models([llama, other], weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="merge_and_unload"):
        merge_models([llama, tiny_lora_model("llama")])
    with pytest.raises(ValueError, match="method"):
        merge_models([llama, other], method="procrustes")
    with pytest.raises(ValueError, match="needs data"):
        merge_models([llama, other], method="ste")
    with pytest.raises(ValueError, match="reference"):
        merge_models([llama, other], reference=2)
    with pytest.raises(ValueError, match="'gpt_neox'"):
        cfg = tf.GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=48)
        merge_models([tf.GPTNeoXForCausalLM(cfg), tf.GPTNeoXForCausalLM(cfg)])


def test_mixing_weights_and_naive_average():
    a, b = family_model("llama"), family_model("llama", seed=1)
    only_a = merge_models([a, b], method="naive", weights=[1.0, 0.0])
    assert all(torch.equal(p, q) for p, q in zip(only_a.parameters(), a.parameters(), strict=True))
    naive = merge_models([a, b], method="naive", weights=[3, 1])  # normalised to 0.75 / 0.25
    for p, q, m in zip(a.parameters(), b.parameters(), naive.parameters(), strict=True):
        torch.testing.assert_close(m, 0.75 * p + 0.25 * q)
    assert all(p is not q for p, q in zip(naive.parameters(), a.parameters(), strict=True))


def test_merge_keeps_dtype_ties_and_leaves_inputs_untouched():
    a = family_model("gpt2").to(torch.bfloat16)
    spec, _, b = permuted_copy(a, 3)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    merged = merge_models([a, b])
    assert merged.transformer.wte.weight.dtype == torch.bfloat16
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert all(torch.equal(p, q) for p, q in zip(merged.parameters(), a.parameters(), strict=True))
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_l2_distance_matches_numpy():
    a, b = family_model("mlp", seed=0), family_model("mlp", seed=1)
    expected = np.sqrt(sum(((p.detach().numpy().astype(np.float64) - q.detach().numpy()) ** 2).sum()
                           for p, q in zip(a.parameters(), b.parameters(), strict=True)))
    assert l2_distance(a, b) == pytest.approx(expected, rel=1e-12)
    spec, _, copy = permuted_copy(a, 2)
    assert l2_distance(a, merge_models([a, copy], return_alignment=True)[1].aligned_states([a, copy])[1]) < 1e-6


def test_alignment_r_closed_forms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=g, dtype=torch.float64)
    assert alignment_r(w, w) == pytest.approx(1.0)
    assert alignment_r(w, -w) == pytest.approx(1.0)  # singular vectors are defined up to sign
    rows = torch.randperm(20, generator=g)
    assert alignment_r(w, w[rows]) < 0.5  # same singular values, rotated left singular vectors
    torch.testing.assert_close(torch.linalg.svdvals(w[rows]), torch.linalg.svdvals(w))
    # unrelated matrices sit near the random-vector level 2 / (pi sqrt(m n))
    levels = [alignment_r(torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)) for _ in range(20)]
    assert np.mean(levels) == pytest.approx(unaligned_level(64, 64), rel=0.35)


def test_layer_report_of_a_permuted_copy():
    a = family_model("llama")
    spec, _, b = permuted_copy(a, 4)
    reports = layer_report(a, b)
    assert len(reports) == 2 + 7 * 2  # embeddings, lm_head, 7 projections per layer
    summary = summarize_layers(reports)
    assert summary["max_singular_value_change"] < 1e-10
    aligned = merge_models([a, b], return_alignment=True)[1].aligned_states([a, b])[1]
    assert summarize_layers(layer_report(a, aligned))["mean_r"] == pytest.approx(1.0)
    assert summary["mean_r"] < 0.6


def test_barrier_formula():
    path = InterpolationPath([0.0, 0.25, 0.5, 0.75, 1.0], [1.0, 1.6, 2.5, 2.2, 2.0], [0.9, 0.7, 0.5, 0.6, 0.8])
    assert path.barrier == pytest.approx(2.5 - 1.5)
    assert path.accuracy_barrier == pytest.approx(0.85 - 0.5)
    assert InterpolationPath([0, 0.5, 1], [1.0, 1.2, 2.0], [1, 1, 1]).barrier == 0.0  # below the chord


def test_interpolation_endpoints_are_the_models(tmp_path):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    batches = tiny_batches(2, 4)
    path = interpolation_path(a, b, batches, num_points=5)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # one working copy, not the model
    assert path.lambdas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert path.losses[0] == pytest.approx(evaluate(a, batches).loss, rel=1e-6)
    assert path.losses[-1] == pytest.approx(evaluate(b, batches).loss, rel=1e-6)
    # the model's own loss, weighted by the tokens each batch scores, equals a loss over all tokens at once
    logits = torch.cat([torch.nn.functional.pad(a(**{k: v for k, v in x.items() if k != "labels"}).logits,
                                                (0, 0, 0, 16 - x["input_ids"].shape[1])) for x in batches])
    labels = torch.cat([torch.nn.functional.pad(x["labels"], (0, 16 - x["labels"].shape[1]), value=-100)
                        for x in batches])
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert path.losses[0] == pytest.approx(float(flat), rel=1e-5)
    png = plot_interpolation({"naive": path}, str(tmp_path / "curve.png"), title="t")
    assert (tmp_path / "curve.png").stat().st_size > 1000 and png.endswith("curve.png")
