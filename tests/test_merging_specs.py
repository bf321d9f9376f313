"""Permutation specs are proven by the function they preserve: a random valid permutation leaves the logits unchanged,
and the moves the specs forbid (a query head out of its GQA group, Q/K dimensions under RoPE) change them."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny import VOCAB, tiny_lora_model, tiny_model
from torch import nn

from hf_svd_plugins.merging import PermutationSpec, apply_permutations, permutation_spec, random_permutations
from hf_svd_plugins.merging.permute import check_permutations


def _llama_like(cls, config_cls, heads: int, kv: int, hidden: int = 48, tie: bool = False, **extra):
    cfg = config_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                     tie_word_embeddings=tie, **extra)
    return cls(cfg)


def family_model(name: str, seed: int = 0) -> nn.Module:
    """Tiny models of every supported family, biases and norm gains perturbed so they carry information."""
    torch.manual_seed(seed)
    builders = {
        "llama": lambda: tiny_model("llama", seed=seed),  # 4 query heads, 2 key/value heads
        "llama_mha": lambda: _llama_like(tf.LlamaForCausalLM, tf.LlamaConfig, 4, 4, hidden=32),
        "llama_gqa3_tied": lambda: _llama_like(tf.LlamaForCausalLM, tf.LlamaConfig, 6, 2, tie=True),
        "llama_mqa": lambda: _llama_like(tf.LlamaForCausalLM, tf.LlamaConfig, 4, 1, hidden=32),
        "mistral": lambda: _llama_like(tf.MistralForCausalLM, tf.MistralConfig, 6, 3),
        "qwen2": lambda: _llama_like(tf.Qwen2ForCausalLM, tf.Qwen2Config, 6, 2),
        "qwen3": lambda: _llama_like(tf.Qwen3ForCausalLM, tf.Qwen3Config, 6, 2, head_dim=8),
        "llama_cls": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_labels=3, pad_token_id=0)),
        "gpt2": lambda: tiny_model("gpt2", seed=seed),
        "gpt2_cls": lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0)),
        "bert": lambda: tiny_model("bert", seed=seed),
        "bert_mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)),
        "bert_base": lambda: tf.BertModel(tf.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)),
        "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.GELU(),
                                     nn.Linear(10, 5)),
    }
    model = builders[name]()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


FAMILIES = ["llama", "llama_mha", "llama_gqa3_tied", "llama_mqa", "mistral", "qwen2", "qwen3", "llama_cls", "gpt2",
            "gpt2_cls", "bert", "bert_mlm", "mlp"]


def model_inputs(model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.Sequential):
        return (torch.randn(5, 3, 4, generator=g),), {}
    ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding exercised
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type == "bert":
        kwargs["token_type_ids"] = (torch.arange(12) >= 6).long().expand(3, 12)
    return (), kwargs


@torch.no_grad()
def outputs(model: nn.Module, seed: int = 0) -> torch.Tensor:
    args, kwargs = model_inputs(model, seed)
    out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.pooler_output


def permuted_copy(model: nn.Module, seed: int):
    """``(spec, planted perms, pi(model))`` for a random valid permutation."""
    spec = permutation_spec(model)
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    return spec, perms, apply_permutations(model, perms, spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_permutation_leaves_logits_unchanged(family):
    model = family_model(family)
    spec, perms, permuted = permuted_copy(model, 1)
    moved = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), permuted.parameters(), strict=True))
    assert moved >= len(list(model.parameters())) // 2  # the test must actually permute most weights
    torch.testing.assert_close(outputs(permuted), outputs(model), atol=2e-5, rtol=1e-5)


def test_bare_bert_keeps_pooler_output_and_permutes_hidden_states_by_res():
    model = family_model("bert_base")
    spec = permutation_spec(model)
    assert "pooler" not in spec.perms
    perms = random_permutations(spec, torch.Generator().manual_seed(2))
    permuted = apply_permutations(model, perms, spec)
    args, kwargs = model_inputs(model)
    with torch.no_grad():
        a, b = model(**kwargs), permuted(**kwargs)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state[..., perms["res"]], atol=2e-5, rtol=1e-5)


def test_gqa_spec_structure():
    spec = permutation_spec(family_model("llama_gqa3_tied"))  # 6 query heads in 2 groups of 3, head_dim 8
    assert spec.perm_shape("kv.0") == (2,)
    assert spec.perm_shape("q.0") == (2, 3) and spec.perms["q.0"].parent == "kv.0"
    assert spec.perm_shape("vo.0") == (2, 8) and spec.perms["vo.0"].parent == "kv.0"
    assert not any(p.startswith(("qk.", "head.")) for p in spec.perms)  # no Q/K permutation under RoPE


def _swap_query_heads(model, layer: int, h1: int, h2: int, head_dim: int):
    """Swap two query heads (q_proj rows and the o_proj columns that read them): valid only inside one GQA group."""
    attn = model.model.layers[layer].self_attn
    rows = torch.arange(attn.q_proj.out_features)
    r1, r2 = rows[h1 * head_dim:(h1 + 1) * head_dim].clone(), rows[h2 * head_dim:(h2 + 1) * head_dim].clone()
    rows[h1 * head_dim:(h1 + 1) * head_dim], rows[h2 * head_dim:(h2 + 1) * head_dim] = r2, r1
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[rows])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows])


def test_query_head_moved_out_of_its_group_changes_logits():
    model = family_model("llama_gqa3_tied")  # heads 0,1,2 read key/value head 0; heads 3,4,5 read head 1
    reference = outputs(model)
    inside, across = family_model("llama_gqa3_tied"), family_model("llama_gqa3_tied")
    _swap_query_heads(inside, 0, 0, 2, 8)
    _swap_query_heads(across, 0, 0, 3, 8)
    torch.testing.assert_close(outputs(inside), reference, atol=2e-5, rtol=1e-5)  # positive control
    assert (outputs(across) - reference).abs().max() > 1e-3


def _permute_qk_dims_in_head(q: nn.Module, k: nn.Module, head: int, kv_head: int, head_dim: int, order):
    with torch.no_grad():
        for proj, h in ((q, head), (k, kv_head)):
            w = proj.weight.view(-1, head_dim, proj.weight.shape[1])
            w[h] = w[h][order].clone()


def test_qk_dims_permuted_inside_a_head_change_logits_under_rope_only():
    order = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])  # swap two dimensions: different RoPE frequencies
    model = family_model("llama_mha")  # head_dim 8, no GQA: query head 0 reads key head 0
    reference = outputs(model)
    attn = model.model.layers[0].self_attn
    _permute_qk_dims_in_head(attn.q_proj, attn.k_proj, 0, 0, 8, order)
    assert (outputs(model) - reference).abs().max() > 1e-3
    gpt2 = family_model("gpt2")  # the same move without RoPE keeps q . k
    reference = outputs(gpt2)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    d = gpt2.config.n_embd
    cols = torch.arange(3 * d)
    cols[:8], cols[d:d + 8] = order, d + order  # query and key dims 0 and 1 of head 0, swapped together
    with torch.no_grad():
        c_attn.weight.copy_(c_attn.weight[:, cols])
        c_attn.bias.copy_(c_attn.bias[cols])
    torch.testing.assert_close(outputs(gpt2), reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "mlp"])
def test_permutation_leaves_singular_values_unchanged(family):
    model = family_model(family)
    spec = permutation_spec(model)
    permuted = apply_permutations(model, random_permutations(spec, torch.Generator().manual_seed(3)), spec)
    checked = 0
    for p, q in zip(model.parameters(), permuted.parameters(), strict=True):
        if p.dim() == 2:
            torch.testing.assert_close(torch.linalg.svdvals(q.double()), torch.linalg.svdvals(p.double()))
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("family", ["gpt2", "bert_mlm", "llama_gqa3_tied"])
def test_tied_weights_stay_tied(family):
    model = family_model(family)
    permuted = apply_permutations(model, random_permutations(permutation_spec(model)))
    out, inp = permuted.get_output_embeddings().weight, permuted.get_input_embeddings().weight
    assert out is inp
    assert not torch.equal(inp, model.get_input_embeddings().weight)


def test_apply_permutations_copies_unless_inplace():
    model = family_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perms = random_permutations(permutation_spec(model), torch.Generator().manual_seed(4))
    apply_permutations(model, perms)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert apply_permutations(model, perms, inplace=True) is model
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_model_type_is_named():
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=48)
    with pytest.raises(ValueError, match="'gpt_neox'"):
        permutation_spec(tf.GPTNeoXForCausalLM(cfg))


def test_unsupported_layers_are_refused():
    with pytest.raises(ValueError, match="BatchNorm1d"):
        permutation_spec(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    model = family_model("llama")
    model.model.layers[0].extra_scale = nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match="unsupported layer.*extra_scale"):
        permutation_spec(model)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True))
    with pytest.raises(ValueError, match="crossattention"):
        permutation_spec(gpt2)


def test_peft_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="merge_and_unload"):
        permutation_spec(tiny_lora_model("llama"))


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def test_user_written_spec():
    model = _TwoLayer().eval()
    axes = {"fc1.weight": ("h1", None), "fc1.bias": ("h1",), "fc2.weight": ("h2", "h1"), "fc2.bias": ("h2",),
            "head.weight": (None, "h2"), "head.bias": (None,)}
    spec = PermutationSpec.from_axes(model, axes)
    with pytest.raises(ValueError, match="no built-in permutation spec"):
        permutation_spec(model)
    permuted = apply_permutations(model, random_permutations(spec, torch.Generator().manual_seed(5)), spec)
    x = torch.randn(4, 6)
    torch.testing.assert_close(permuted(x), model(x))
    with pytest.raises(ValueError, match="head.bias"):
        PermutationSpec.from_axes(model, {k: v for k, v in axes.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="size"):
        PermutationSpec.from_axes(model, {**axes, "fc1.weight": ("h1", "h2")})  # h2 has 10 units, fc1 reads 6


def test_bad_permutations_are_refused():
    spec = permutation_spec(family_model("llama"))
    with pytest.raises(ValueError, match="unknown"):
        check_permutations(spec, {"nope": torch.arange(3)})
    with pytest.raises(ValueError, match="shape"):
        check_permutations(spec, {"res": torch.arange(31)})
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutations(spec, {"res": torch.zeros(32, dtype=torch.long)})
