"""Permutation merging: align independently trained models by weight matching (Git Re-Basin) and merge them.

``from hf_svd_plugins.merging import weight_matching, apply_permutations, merge_models, permutation_spec``;
the Trainer hook is :class:`PermutationMergeCallback`, the CLI verb ``hf-svd merge``.
"""

from hf_svd_plugins.merging.activation import activation_matching
from hf_svd_plugins.merging.matching import MatchResult, match_states, merge_many_states, weight_matching
from hf_svd_plugins.merging.merge import METHODS, Alignment, align_models, merge_models
from hf_svd_plugins.merging.orthogonal import orthogonal_alignment
from hf_svd_plugins.merging.permute import apply_permutations, identity_permutations, random_permutations
from hf_svd_plugins.merging.specs import (
    SPEC_BUILDERS,
    Perm,
    PermutationSpec,
    WeightEntry,
    permutation_spec,
    register_spec_builder,
)
from hf_svd_plugins.merging.ste import ste_matching

__all__ = [
    "METHODS",
    "SPEC_BUILDERS",
    "Alignment",
    "MatchResult",
    "Perm",
    "PermutationSpec",
    "WeightEntry",
    "activation_matching",
    "align_models",
    "apply_permutations",
    "identity_permutations",
    "match_states",
    "merge_many_states",
    "merge_models",
    "orthogonal_alignment",
    "permutation_spec",
    "random_permutations",
    "register_spec_builder",
    "ste_matching",
    "weight_matching",
]
