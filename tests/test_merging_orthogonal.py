"""Orthogonal residual alignment: the symmetry it relies on, proven on logits, and a planted rotation recovered."""

from __future__ import annotations

import copy

import pytest
import torch
from test_merging_specs import family_model, outputs

from hf_svd_plugins.merging import merge_models, permutation_spec, random_permutations
from hf_svd_plugins.merging.inputs import model_state
from hf_svd_plugins.merging.merge import load_state_into
from hf_svd_plugins.merging.orthogonal import fold_norm_gains, orthogonal_alignment, rotate_residual
from hf_svd_plugins.merging.permute import permute_state


def _random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_gains_and_any_rotation_of_the_stream_keep_the_logits(family):
    model = family_model(family)
    spec = permutation_spec(model)
    folded_state, folded = fold_norm_gains(model_state(model))
    assert folded and all(torch.equal(folded_state[n], torch.ones_like(folded_state[n])) for n in folded)
    folded_model = load_state_into(copy.deepcopy(model), folded_state)
    torch.testing.assert_close(outputs(folded_model), outputs(model), atol=2e-5, rtol=1e-5)
    d = model.config.hidden_size
    rotated = load_state_into(copy.deepcopy(model), rotate_residual(folded_state, _random_rotation(d, 1), spec, folded))
    torch.testing.assert_close(outputs(rotated), outputs(model), atol=5e-5, rtol=1e-4)
    # without folding, a rotation is not a symmetry: the gains (left in place) do not commute with it
    unfolded = load_state_into(copy.deepcopy(model), rotate_residual(model_state(model), _random_rotation(d, 1),
                                                                     spec, folded))
    assert (outputs(unfolded) - outputs(model)).abs().max() > 1e-3


def test_planted_rotation_and_permutation_are_recovered():
    model = family_model("llama")
    spec = permutation_spec(model)
    state, folded = fold_norm_gains(model_state(model))
    planted = rotate_residual(permute_state(state, spec, random_permutations(spec, torch.Generator().manual_seed(2))),
                              _random_rotation(model.config.hidden_size, 3), spec, folded)
    other = load_state_into(copy.deepcopy(model), planted)
    result = orthogonal_alignment(model, other)
    assert max(float((result.state_b[k] - state[k]).abs().max()) for k in state) < 1e-5
    assert all(y >= x - 1e-9 * abs(x) for x, y in zip(result.objective, result.objective[1:], strict=False))
    merged = merge_models([model, other], method="orthogonal")
    torch.testing.assert_close(outputs(merged), outputs(model), atol=5e-5, rtol=1e-4)


def test_orthogonal_beats_permutations_on_the_objective_of_unrelated_models():
    a, b = family_model("llama", seed=0), family_model("llama", seed=1)
    result = orthogonal_alignment(a, b)
    folded_wm = merge_models([a, b], return_alignment=True)[1]
    state_b = fold_norm_gains(folded_wm.aligned_states([a, b])[1])[0]
    wm_objective = sum(float((result.state_a[k].double() * state_b[k].double()).sum()) for k in state_b)
    assert result.objective[-1] > wm_objective  # permutations are orthogonal maps: the search starts there


def test_orthogonal_refuses_what_it_cannot_handle():
    with pytest.raises(ValueError, match="pre-norm RMSNorm"):
        merge_models([family_model("gpt2"), family_model("gpt2", seed=1)], method="orthogonal")
    with pytest.raises(ValueError, match="untied"):
        merge_models([family_model("llama_gqa3_tied"), family_model("llama_gqa3_tied", seed=1)], method="orthogonal")
