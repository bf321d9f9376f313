"""Weight matching, MergeMany, activation matching and STE against references they did not write: permutations
planted by hand, brute force over every permutation, and an independent float64 objective."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers as tf
from test_merging_specs import family_model, outputs, permuted_copy
from torch import nn

from hf_svd_plugins.merging import (
    activation_matching,
    apply_permutations,
    match_states,
    merge_models,
    permutation_spec,
    random_permutations,
    ste_matching,
    weight_matching,
)
from hf_svd_plugins.merging.inputs import model_state
from hf_svd_plugins.merging.permute import invert_permutation

PLANTED = ["llama", "llama_gqa3_tied", "llama_mqa", "qwen3", "gpt2", "bert", "bert_mlm", "mlp"]


def inverse_of_planted(spec, planted):
    """The alignment that undoes ``pi``: parent ``inv(q)``; nested child ``t[b] = inv(c[q[b]])``."""
    out = {}
    for name, perm in spec.perms.items():
        if perm.parent is None:
            out[name] = invert_permutation(planted[name])
        else:
            out[name] = invert_permutation(planted[name])[planted[perm.parent]]
    return out


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(model_state(a).values(), model_state(b).values(),
                                                         strict=True))


@pytest.mark.parametrize("family", PLANTED)
def test_planted_permutation_is_recovered_and_merge_returns_the_model(family):
    model = family_model(family)
    spec, planted, copy = permuted_copy(model, 7)
    result = weight_matching(model, copy, compute_dtype=torch.float64)
    expected = inverse_of_planted(spec, planted)
    wrong = [n for n in spec.perms if not torch.equal(result.perms[n], expected[n])]
    assert not wrong, f"not recovered: {wrong}"
    assert result.converged and result.cost_seconds > 0 and result.assignment_seconds > 0
    merged = merge_models([model, copy])
    assert _max_diff(merged, model) < 1e-6
    torch.testing.assert_close(outputs(merged), outputs(model), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "mlp"])
def test_matching_a_model_with_itself_is_the_identity(family):
    model = family_model(family)
    result = weight_matching(model, model)
    for name, perm in result.perms.items():
        assert torch.equal(perm, torch.arange(perm.shape[-1]).expand_as(perm)), name
    assert result.passes == 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "mlp"])
def test_objective_never_decreases_and_matches_an_independent_sum(family):
    a, b = family_model(family, seed=0), family_model(family, seed=1)  # unrelated: a real search
    result = weight_matching(a, b, seed=3, compute_dtype=torch.float64)
    assert len(result.objective) == result.passes + 1 >= 2
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(result.objective, result.objective[1:], strict=False))
    assert result.objective[-1] > _objective(a, b)  # better than no alignment
    aligned = apply_permutations(b, result.perms)
    independent = sum(float((p.double() * q.double()).sum()) for p, q in
                      zip(model_state(a).values(), model_state(aligned).values(), strict=True))
    assert result.objective[-1] == pytest.approx(independent, rel=1e-9)


def _objective(a: nn.Module, b: nn.Module) -> float:
    return sum(float((p.double() * q.double()).sum()) for p, q in zip(model_state(a).values(),
                                                                     model_state(b).values(), strict=True))


def test_one_hidden_layer_matches_brute_force_over_all_permutations():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    b = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    spec = permutation_spec(a)
    best = max(_objective(a, apply_permutations(b, {"h0": torch.tensor(p)}, spec))
               for p in itertools.permutations(range(6)))
    result = weight_matching(a, b, compute_dtype=torch.float64)
    assert result.objective[-1] == pytest.approx(best, rel=1e-12)


def _two_hidden_layers(noise: float, d_in: int = 16, d_out: int = 8):
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(d_in, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, d_out))
    spec = permutation_spec(a)
    b = apply_permutations(a, random_permutations(spec, torch.Generator().manual_seed(2)), spec)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return a, b, spec


def test_two_hidden_layers_lightly_noised_copy_finds_the_brute_force_optimum():
    a, b, spec = _two_hidden_layers(0.05)
    best = max(_objective(a, apply_permutations(b, {"h0": torch.tensor(p0), "h1": torch.tensor(p1)}, spec))
               for p0 in itertools.permutations(range(5)) for p1 in itertools.permutations(range(4)))
    result = weight_matching(a, b, compute_dtype=torch.float64)
    assert result.objective[-1] == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_result_is_a_coordinatewise_optimum_by_brute_force(seed):
    a, b, spec = _two_hidden_layers(0.3, d_in=4, d_out=2)  # narrow and noisy: seed 0 stops in a local optimum
    result = weight_matching(a, b, compute_dtype=torch.float64, seed=seed)
    for name, size in (("h0", 5), ("h1", 4)):
        best = max(_objective(a, apply_permutations(b, {**result.perms, name: torch.tensor(p)}, spec))
                   for p in itertools.permutations(range(size)))
        assert result.objective[-1] == pytest.approx(best, rel=1e-12), name


@pytest.mark.parametrize("family", ["llama_gqa3_tied", "gpt2"])
@pytest.mark.parametrize("n", [3, 4])
def test_merge_many_of_permuted_copies_returns_the_model(family, n):
    model = family_model(family)
    spec = permutation_spec(model)
    copies = [apply_permutations(model, random_permutations(spec, torch.Generator().manual_seed(10 + k)), spec)
              for k in range(n - 1)]
    merged, alignment = merge_models([model, *copies], return_alignment=True)
    assert _max_diff(merged, model) < 1e-6
    assert alignment.method == "weight_matching" and alignment.results[0] is None
    # another reference: the merge lives in that model's basis
    merged_in_1 = merge_models([model, *copies], reference=1)
    assert _max_diff(merged_in_1, copies[0]) < 1e-6


def test_noised_copy_of_gqa_llama_is_recovered():
    model = family_model("llama_gqa3_tied")
    spec, planted, copy = permuted_copy(model, 8)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.2 * p.std() * torch.randn_like(p))
    result = weight_matching(model, copy)
    expected = inverse_of_planted(spec, planted)
    assert all(torch.equal(result.perms[n], expected[n]) for n in spec.perms)


def test_match_states_checks_its_arguments():
    model = family_model("mlp")
    spec = permutation_spec(model)
    state = model_state(model)
    with pytest.raises(ValueError, match="max_passes"):
        match_states(state, state, spec, max_passes=0)
    with pytest.raises(ValueError, match="shape"):
        match_states(state, state, spec, init={"h0": torch.arange(3)})


def _lm_batches(n: int = 3, seed: int = 0):
    from tiny import tiny_batches

    return tiny_batches(n, 4, seed=seed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_matching_recovers_a_planted_permutation(family):
    model = family_model(family)
    spec, planted, copy = permuted_copy(model, 9)
    result = activation_matching(model, copy, _lm_batches(), spec, compute_dtype=torch.float64)
    expected = inverse_of_planted(spec, planted)
    assert all(torch.equal(result.perms[n], expected[n]) for n in spec.perms)


def test_activation_matching_on_mlp_pairs():
    model = family_model("mlp")
    spec, planted, copy = permuted_copy(model, 9)
    batches = [(torch.randn(16, 12), torch.randint(0, 5, (16,))) for _ in range(2)]
    result = activation_matching(model, copy, batches, spec, standardize=True)
    expected = inverse_of_planted(spec, planted)
    assert all(torch.equal(result.perms[n], expected[n]) for n in spec.perms)


def _trained_mlps(n: int = 2):
    """Small MLPs trained from different seeds on one teacher-labelled data set."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))
    with torch.no_grad():
        y = teacher(x).argmax(1)
    models = []
    for seed in range(n):
        model = family_model("mlp", seed=seed).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(150):
            idx = torch.arange(step * 32, step * 32 + 32) % 256
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    return models, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]


def test_ste_lowers_the_midpoint_loss_below_naive_averaging():
    from hf_svd_plugins.merging.diagnostics import interpolation_path

    (a, b), batches = _trained_mlps()
    spec = permutation_spec(a)
    result = ste_matching(a, b, batches, spec, steps=40, lr=1e-2)
    assert len(result.losses) == 40
    aligned = apply_permutations(b, result.perms, spec)
    naive = interpolation_path(a, b, batches, 3).losses[1]
    ste = interpolation_path(a, aligned, batches, 3).losses[1]
    assert ste < naive


def test_ste_keeps_a_planted_alignment():
    model = family_model("llama")
    spec, planted, copy = permuted_copy(model, 11)
    result = ste_matching(model, copy, _lm_batches(2), spec, steps=3, lr=1e-4)
    expected = inverse_of_planted(spec, planted)
    assert all(torch.equal(result.perms[n], expected[n]) for n in spec.perms)


def _benchmark_sized(family: str) -> nn.Module:
    """The exact shapes of ``benchmarks/merging.py``'s language models (d_model 64, 2 layers, 4 heads; Llama with
    2 key/value heads of 2 query heads each, SwiGLU 170, untied head), 1-D weights perturbed off their init."""
    torch.manual_seed(5)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=61, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                 n_inner=256))
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=170,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_benchmark_sized_planted_permutation_with_every_group_moved_is_recovered(family, noise):
    """At the benchmark's size, with every symmetry group planted away from the identity (residual stream, heads or
    key/value groups, query heads within a group, Q/K and V/O dimensions inside a head, FFN), weight matching
    recovers the planted alignment exactly, also under 0.3 x std noise; the merge with the clean copy is the model."""
    model = _benchmark_sized(family)
    spec = permutation_spec(model)
    groups = {n.split(".")[0] for n in spec.perms}
    assert groups == ({"res", "head", "qk", "vo", "ffn"} if family == "gpt2" else {"res", "kv", "q", "vo", "ffn"})
    g = torch.Generator().manual_seed(11)
    planted = random_permutations(spec, g)
    while any(torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in planted.values()):
        planted = random_permutations(spec, g)  # size-2 groups (key/value heads) are often drawn as the identity
    clean = apply_permutations(model, planted, spec, inplace=False)
    noisy = apply_permutations(model, planted, spec, inplace=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(12)
        for p in noisy.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    result = weight_matching(model, noisy)
    expected = inverse_of_planted(spec, planted)
    assert [n for n in spec.perms if not torch.equal(result.perms[n], expected[n])] == []
    merged = merge_models([model, clean])
    assert _max_diff(merged, model) < 1e-6
