"""DP-SGD core: per-example gradients vs a float64 brute-force loop, clipping, noise, sampling, config validation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import VOCAB, TinyTokenDataset, pad_collate, tiny_lora_model

from hf_svd_plugins.dp import DPConfig
from hf_svd_plugins.dp.clipping import clip_and_sum, clip_factors, per_sample_norms, privatize
from hf_svd_plugins.dp.per_sample import (
    detect_mask_kind,
    hooks_per_sample_grads,
    loop_per_sample_grads,
    per_example_loss,
    trainable_parameters,
    vmap_per_sample_grads,
)
from hf_svd_plugins.dp.sampling import PoissonBatchSampler, poisson_sample, split_logical_batch


def _model64(kind: str, **kw) -> torch.nn.Module:
    """Tiny LoRA model in float64, train mode (Opacus hooks only capture in train mode) without dropout, and with
    non-zero LoRA B so that A's gradients are non-zero too."""
    model = tiny_lora_model(kind, **kw).double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _batch(kind: str, n: int = 5) -> dict:
    ds = TinyTokenDataset(n=n, kind="lm" if kind != "bert" else "cls", seed=3)
    batch = pad_collate([ds[i] for i in range(n)])
    if kind != "bert":  # one example without any valid target: its loss and gradient must be exactly zero
        batch["labels"][1] = -100
    return batch


def _brute_force(model: torch.nn.Module, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reference: every example alone, unpadded, no attention mask, float64 cross-entropy written out here (HF's own
    loss upcasts to float32 only)."""
    params = trainable_parameters(model)
    grads = {n: [] for n in params}
    losses = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :length]
        labels = batch["labels"][i : i + 1] if batch["labels"].dim() == 1 else batch["labels"][i : i + 1, :length]
        if labels.dim() == 2 and (labels[:, 1:] != -100).sum() == 0:
            loss = torch.zeros((), dtype=torch.float64)
            g = [torch.zeros_like(p) for p in params.values()]
        else:
            logits = model(input_ids=ids).logits
            if labels.dim() == 2:  # causal LM: position t predicts token t + 1
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
            g = torch.autograd.grad(loss, list(params.values()))
        for n, gi in zip(params, g, strict=True):
            grads[n].append(gi.detach())
        losses.append(loss.detach())
    return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(losses)


@pytest.mark.parametrize("method", ["vmap", "hooks", "loop"])
def test_per_sample_grads_match_brute_force(kind, method):
    torch.manual_seed(0)
    model = _model64(kind)
    batch = _batch(kind)
    loss_type = "sequence" if kind == "bert" else "causal_lm"
    params = trainable_parameters(model)
    if method == "vmap":
        mask_kind = detect_mask_kind(model, batch)
        assert mask_kind == ("bidirectional" if kind == "bert" else "causal")
        grads, losses = vmap_per_sample_grads(model, params, batch, loss_type, mask_kind)
    elif method == "loop":
        grads, losses = loop_per_sample_grads(model, params, batch, loss_type)
    else:
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            grads, losses = hooks_per_sample_grads(gsm, params, batch, loss_type)
        finally:
            gsm._close()
    ref_grads, ref_losses = _brute_force(model, batch)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-9, atol=1e-10)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert ref_grads[n].abs().max() > 0 or "lora" not in n
        torch.testing.assert_close(grads[n].double(), ref_grads[n], rtol=1e-7, atol=1e-10, msg=n)


def test_b_only_lora_grads_only_for_b():
    model = _model64("llama")
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    params = trainable_parameters(model)
    assert params and all("lora_B" in n for n in params)
    batch = _batch("llama", 4)
    grads, _ = vmap_per_sample_grads(model, params, batch, "causal_lm", "causal")
    ref, _ = _brute_force(model, batch)
    for n in params:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-7, atol=1e-10)


def test_per_example_loss_is_independent_of_other_examples():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 6))
    labels[0, :4] = -100
    full = per_example_loss(logits, labels, "causal_lm")
    alone = per_example_loss(logits[:1], labels[:1], "causal_lm")
    ref = torch.nn.functional.cross_entropy(logits[0, 3:5], labels[0, 4:6])  # shift: position t predicts t+1
    torch.testing.assert_close(full[0], alone[0])
    torch.testing.assert_close(full[0], ref)


def test_clipped_norms_bounded_and_sum_matches_manual():
    torch.manual_seed(0)
    grads = [torch.randn(16, 4, 3, dtype=torch.float64) * 3, torch.randn(16, 5, dtype=torch.float64) * 0.05]
    c = 1.5
    norms = per_sample_norms(grads)
    manual = torch.sqrt(sum(g.reshape(16, -1).pow(2).sum(1) for g in grads))
    torch.testing.assert_close(norms, manual)
    f = clip_factors(norms, c)
    clipped_norms = norms * f
    assert (clipped_norms <= c * (1 + 1e-9)).all()
    assert (f[norms < c] == 1).all() and (f[norms > c] < 1).any()
    sums, _ = clip_and_sum(grads, c)
    for g, s in zip(grads, sums, strict=True):
        ref = sum(g[i] * min(1.0, c / (float(norms[i]) + 1e-6)) for i in range(16))
        torch.testing.assert_close(s, ref)


def test_sigma_zero_huge_c_is_plain_mean_over_expected_batch():
    torch.manual_seed(0)
    model = _model64("gpt2")
    batch = _batch("gpt2", 6)
    params = trainable_parameters(model)
    grads, _ = vmap_per_sample_grads(model, params, batch, "causal_lm", "causal")
    sums, _ = clip_and_sum(list(grads.values()), max_norm=1e9)
    expected_batch = 8.0  # Poisson: divide by q N, not by the realised 6
    out = privatize(sums, noise_multiplier=0.0, max_norm=1e9, expected_batch_size=expected_batch)
    ref, _ = _brute_force(model, batch)
    for o, n in zip(out, params, strict=True):
        torch.testing.assert_close(o, ref[n].sum(0) / expected_batch, rtol=1e-9, atol=1e-12)


def test_noise_std_matches_sigma_c_over_b():
    sigma, c, b = 1.3, 0.7, 8.0
    zeros = [torch.zeros(300, 300), torch.zeros(1000)]
    gen = torch.Generator().manual_seed(0)
    out = privatize(zeros, sigma, c, b, generator=gen)
    flat = torch.cat([o.flatten() for o in out])
    expected = sigma * c / b
    assert abs(flat.std().item() / expected - 1) < 0.01
    assert abs(flat.mean().item()) < 3 * expected / math.sqrt(flat.numel())
    # same generator state -> same noise (resume relies on this)
    again = privatize(zeros, sigma, c, b, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(out, again, strict=True))


def test_poisson_sampler_shares_and_determinism():
    n, q, ga, world = 200, 0.1, 3, 2
    samplers = [PoissonBatchSampler(n, q, steps_per_epoch=10, gradient_accumulation_steps=ga, world_size=world, rank=r,
                                    seed=7) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(b) == 10 * ga for b in per_rank)
    gen = torch.Generator().manual_seed(7 * 1_000_003)
    sizes = []
    for step in range(10):
        logical = poisson_sample(n, q, gen).tolist()
        got = [i for r in range(world) for mb in per_rank[r][step * ga : (step + 1) * ga] for i in mb]
        assert sorted(got) == logical  # every rank's micro-batches together are exactly one logical batch
        sizes.append(len(logical))
    assert 10 <= sum(sizes) / len(sizes) <= 30
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]
    samplers[0].set_epoch(0)
    assert list(samplers[0]) == per_rank[0]
    assert split_logical_batch(torch.tensor([], dtype=torch.long), 2, 2, 1) == [[], []]


def test_poisson_sample_rate_statistics():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([len(poisson_sample(1000, 0.02, gen)) for _ in range(500)], dtype=torch.float64)
    assert abs(sizes.mean().item() - 20) < 1.0
    assert abs(sizes.var().item() - 1000 * 0.02 * 0.98) < 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_grad_norm": 0, "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"max_grad_norm": -1, "noise_multiplier": 1.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({}, "exactly one"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "target_delta": 1.5}, "target_delta"),
        ({"noise_multiplier": 1.0, "target_delta": 0.0}, "target_delta"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
        ({"noise_multiplier": 1.0, "per_sample_method": "ghost"}, "per_sample_method"),
        ({"noise_multiplier": 1.0, "max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"target_epsilon": 3.0, "total_steps": 0}, "total_steps"),
        ({"noise_multiplier": 1.0, "noise_seed": -1}, "noise_seed"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_physical_batch_size", 2.5), ("max_physical_batch_size", True), ("sampler_seed", 1.5),
        ("noise_seed", "1"), ("noise_seed", True), ("poisson_sampling", "no"), ("poisson_sampling", 1),
        ("total_steps", 2.5), ("accountant", 3), ("per_sample_method", None), ("loss_type", 1),
        ("max_grad_norm", "1.0"), ("target_delta", "1e-5"), ("max_epsilon", True), ("eps_error", None),
    ],
)
def test_config_type_errors_name_the_field(field, value):
    """Wrong types were accepted and failed mid-training (max_physical_batch_size=2.5: TypeError in range()), were
    silently truncated (sampler_seed=1.5) or read as truthy (poisson_sampling="no"): TypeError naming the field."""
    with pytest.raises(TypeError, match=rf"DPConfig\.{field}="):
        DPConfig(**{"noise_multiplier": 1.0, field: value})


def test_config_accepts_numpy_scalars():
    import numpy as np

    cfg = DPConfig(noise_multiplier=np.float64(1.0), max_physical_batch_size=np.int64(2), sampler_seed=np.int64(3))
    assert cfg.max_physical_batch_size == 2


class MeanPoolIgnoringMask(torch.nn.Module):
    """Mean over every position of the row, padding included: its output depends on the padded length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"logits": self.head(torch.tanh(self.embed(input_ids)).mean(dim=1))}


def test_loop_strips_each_examples_padding():
    """The loop used to keep the batch's padding (and 2D mask) for every example, so a model that does not honour
    the mask gave gradients depending on the batch's longest example. Each example now runs alone, unpadded."""
    torch.manual_seed(0)
    model = MeanPoolIgnoringMask().double()
    ds = TinyTokenDataset(n=4, kind="cls", min_len=3, max_len=12, seed=1)
    batch = pad_collate([ds[i] for i in range(4)])
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1
    params = trainable_parameters(model)
    grads, losses = loop_per_sample_grads(model, params, batch, "sequence")
    for i in range(4):
        length = int(batch["attention_mask"][i].sum())
        loss = torch.nn.functional.cross_entropy(model(batch["input_ids"][i : i + 1, :length])["logits"],
                                                 batch["labels"][i : i + 1])
        ref = torch.autograd.grad(loss, list(params.values()))
        torch.testing.assert_close(losses[i], loss.detach())
        for n, g in zip(params, ref, strict=True):
            torch.testing.assert_close(grads[n][i], g, rtol=1e-10, atol=1e-12, msg=n)


class TiedOutputLM(torch.nn.Module):
    """The embedding matrix is also the output layer, used directly (``F.linear(h, embed.weight)``): Opacus' hooks
    only see its use through ``nn.Embedding``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.mix = torch.nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask=None, labels=None):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("this model takes a 2D attention_mask only")
        hidden = torch.tanh(self.mix(self.embed(input_ids)))
        return {"logits": torch.nn.functional.linear(hidden, self.embed.weight)}


def test_hooks_refuse_a_parameter_used_outside_its_module():
    """Opacus returned only the nn.Embedding part of the tied matrix's per-example gradient (0.17 off the exact
    loop): the grad samples are now checked to sum to the gradient of the same backward."""
    from opacus import GradSampleModule

    from hf_svd_plugins.dp.per_sample import NotPrivatizableError

    torch.manual_seed(0)
    model = TiedOutputLM().double().train()
    batch = pad_collate([TinyTokenDataset(n=4)[i] for i in range(4)])
    params = trainable_parameters(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        with pytest.raises(NotPrivatizableError, match=r"embed\.weight .*do not sum to its gradient"):
            hooks_per_sample_grads(gsm, params, batch, "causal_lm")
    finally:
        gsm._close()


def test_delta_default_and_refusal():
    cfg = DPConfig(noise_multiplier=1.0)
    assert cfg.resolve_delta(1000) == pytest.approx(1e-5)
    assert cfg.resolve_delta(50) == pytest.approx(1e-5)
    assert cfg.resolve_delta(10**6) == pytest.approx(1e-7)
    with pytest.raises(ValueError, match="target_delta"):
        DPConfig(noise_multiplier=1.0, target_delta=0.01).resolve_delta(100)


def test_sequence_losses_match_hf_per_example():
    """Multi-label (float targets) against BERT's own loss on each example alone; regression against MSE."""
    model = _model64("bert").eval()
    batch = _batch("bert", 4)
    targets = torch.rand(4, 2, dtype=torch.float64)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = per_example_loss(logits, targets, "sequence")
    for i in range(4):
        length = int(batch["attention_mask"][i].sum())
        ref = model(input_ids=batch["input_ids"][i : i + 1, :length], labels=targets[i : i + 1]).loss
        torch.testing.assert_close(ours[i], ref)
    reg = per_example_loss(logits[:, :1], targets[:, 0], "sequence")
    torch.testing.assert_close(reg, (logits[:, 0] - targets[:, 0]) ** 2)
    assert model.config.problem_type == "multi_label_classification"


def test_detect_mask_kind_ambiguous_on_single_tokens():
    model = _model64("bert")
    batch = {"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    assert detect_mask_kind(model, batch) == "ambiguous"
    assert detect_mask_kind(model, {k: v for k, v in batch.items() if k != "attention_mask"}) == "none"


def test_example_alone_cuts_per_token_features_to_the_real_tokens():
    """Precomputed hidden states ``(B, T, H)`` (a frozen prefix computed once) are cut with the attention mask, like
    ``input_ids``; pixel-like ``(B, C, H, W)`` tensors and ``(B, C)`` float targets are only sliced by row."""
    from hf_svd_plugins.dp.padding import example_alone

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    pixels, targets = torch.randn(2, 4, 5, 5), torch.randn(2, 4)
    batch = {"hidden_states": hidden, "attention_mask": mask, "pixel_values": pixels, "multi_labels": targets}
    for row in range(2):
        alone = example_alone(batch, row, 2)
        real = mask[row].bool()
        assert torch.equal(alone["hidden_states"], hidden[row : row + 1, real])
        assert torch.equal(alone["attention_mask"], torch.ones(1, int(real.sum()), dtype=mask.dtype))
        assert torch.equal(alone["pixel_values"], pixels[row : row + 1])
        assert torch.equal(alone["multi_labels"], targets[row : row + 1])
