"""FedSVDCallback and the optimizer: what happens to Adam/SGD state across a refactorization, and bf16 adapters.

References are independent of the code under test: numpy least squares for the gradient map, a run without any
refactorization for SGD with momentum (exactly invariant under an orthogonal change of basis of B), and the float64
refactorization rounded once for bf16 adapters.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.fedsvd import FedSVDCallback, freeze_lora_A, refactorize, refactorize_lora_model
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights


def _args(tmp_path, max_steps, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=1e-2,
                logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _state(optimizer, param) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(param, {}).items()}


class OptimizerUpdates(TrainerCallback):
    """The pure optimizer update of every B (after - before ``optimizer.step()``), per step."""

    def __init__(self):
        self.updates: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = [p.B.detach().clone() for p in find_lora_pairs(model)]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.updates.append([p.B.detach() - b for p, b in zip(find_lora_pairs(model), self._before, strict=True)])


def _sign_sgd_fraction(update: list[torch.Tensor], lr: float) -> float:
    """Fraction of entries whose update is exactly +-lr (to 1e-4 relative): a freshly reset Adam's first step."""
    flat = torch.cat([u.flatten() for u in update]).double().abs()
    return float(((flat - lr).abs() < 1e-4 * lr).double().mean())


def test_default_callback_does_not_turn_adam_into_sign_sgd(tmp_path):
    """The old defaults (every step, reset) restarted AdamW after every step: every update was exactly +-lr."""
    lr = 1e-2
    every_step_default = OptimizerUpdates()
    trainer = Trainer(model=tiny_lora_model("llama", r=4), args=_args(tmp_path / "a", 6, learning_rate=lr,
                                                                       lr_scheduler_type="constant"),
                      train_dataset=TinyTokenDataset(n=64), data_collator=pad_collate,
                      callbacks=[FedSVDCallback(every_n_steps=1), every_step_default])
    trainer.train()
    fractions = [_sign_sgd_fraction(u, lr) for u in every_step_default.updates[1:]]
    assert max(fractions) < 0.2, fractions

    reset = OptimizerUpdates()
    trainer = Trainer(model=tiny_lora_model("llama", r=4), args=_args(tmp_path / "b", 6, learning_rate=lr,
                                                                       lr_scheduler_type="constant"),
                      train_dataset=TinyTokenDataset(n=64), data_collator=pad_collate,
                      callbacks=[FedSVDCallback(every_n_steps=1, optimizer_state="reset"), reset])
    trainer.train()
    assert min(_sign_sgd_fraction(u, lr) for u in reset.updates[1:]) > 0.8  # what "reset" does, by design

    cb = FedSVDCallback()
    assert (cb.every_n_steps, cb.optimizer_state, cb.freeze_a) == (50, "transform", True)


class MomentProbe(TrainerCallback):
    """A, B and B's optimizer state of every pair at ``on_step_end`` (placed before or after the FedSVD callback)."""

    def __init__(self):
        self.records: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        pairs = find_lora_pairs(model)
        self.records[state.global_step] = {
            "weights": read_lora_weights(pairs),
            "opt_b": [_state(optimizer, p.B) for p in pairs],
            "opt_a": [_state(optimizer, p.A) for p in pairs],
        }


def _gradient_map(a_old: torch.Tensor, a_new: torch.Tensor) -> np.ndarray:
    """numpy: the W with A'^T = A^T W (least squares), so that gradients G A^T of B map to G A'^T."""
    return np.linalg.lstsq(a_old.double().numpy().T, a_new.double().numpy().T, rcond=None)[0]


@pytest.mark.parametrize("freeze_a", [True, False])
def test_transform_carries_adam_moments_into_the_new_basis(tmp_path, freeze_a):
    before, after = MomentProbe(), MomentProbe()
    model = tiny_lora_model("llama", r=4)
    trainer = Trainer(model=model, args=_args(tmp_path, 4, weight_decay=0.1), train_dataset=TinyTokenDataset(n=64),
                      data_collator=pad_collate,
                      callbacks=[before, FedSVDCallback(every_n_steps=2, freeze_a=freeze_a), after])
    trainer.train()
    names = [p.name for p in find_lora_pairs(model)]
    for step in (2, 4):
        rb, ra = before.records[step], after.records[step]
        for i, name in enumerate(names):
            (a_old, b_old), (a_new, b_new) = rb["weights"][name], ra["weights"][name]
            w = _gradient_map(a_old, a_new)
            m, v = rb["opt_b"][i]["exp_avg"].double().numpy(), rb["opt_b"][i]["exp_avg_sq"].double().numpy()
            np.testing.assert_allclose(ra["opt_b"][i]["exp_avg"].double().numpy(), m @ w, rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(ra["opt_b"][i]["exp_avg_sq"].double().numpy(), v @ (w * w), rtol=1e-5,
                                       atol=1e-12)
            assert int(ra["opt_b"][i]["step"]) == int(rb["opt_b"][i]["step"]) == step  # Adam is not restarted
            if freeze_a:
                assert ra["opt_a"][i] == {}
            else:
                t = (a_old.double() @ a_new.double().T).numpy()  # B' = B T
                np.testing.assert_allclose(b_new.double().numpy(), b_old.double().numpy() @ t, atol=1e-6)
                m_a = rb["opt_a"][i]["exp_avg"].double().numpy()
                np.testing.assert_allclose(ra["opt_a"][i]["exp_avg"].double().numpy(), t.T @ m_a, rtol=1e-5,
                                           atol=1e-9)
    # after the first refactorization A has orthonormal rows, so the later maps are orthogonal
    if freeze_a:
        a2, a4 = after.records[2]["weights"][names[0]][0], after.records[4]["weights"][names[0]][0]
        w = _gradient_map(a2, a4)
        np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-5)


def _orthonormal_a(model) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pair in find_lora_pairs(model):
            q, _ = torch.linalg.qr(torch.randn(pair.A.shape[1], pair.A.shape[0], generator=gen, dtype=torch.float64))
            pair.A.copy_(q.T)


def _sgd_run(tmp_path, callbacks) -> tuple[dict, torch.Tensor]:
    model = tiny_lora_model("llama", r=4)
    _orthonormal_a(model)
    freeze_lora_A(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    trainer = Trainer(model=model, args=_args(tmp_path, 6), train_dataset=TinyTokenDataset(n=64),
                      data_collator=pad_collate, callbacks=callbacks, optimizers=(opt, None))
    trainer.train()
    model.eval()
    batch = {k: v for k, v in tiny_batches(1, 4, seed=5)[0].items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits.double()
    weights = read_lora_weights(find_lora_pairs(model))
    return {n: b.double() @ a.double() for n, (a, b) in weights.items()}, logits


def test_transform_leaves_sgd_with_momentum_unchanged(tmp_path):
    """With A orthonormal and frozen, every basis change is orthogonal and SGD with momentum is invariant under it
    once its momentum is carried along: the trained function equals a run without refactorization."""
    plain, logits = _sgd_run(tmp_path / "plain", [])
    moved, moved_logits = _sgd_run(tmp_path / "moved", [FedSVDCallback(every_n_steps=2)])
    reset, reset_logits = _sgd_run(tmp_path / "reset", [FedSVDCallback(every_n_steps=2, optimizer_state="reset")])
    for name, product in plain.items():
        torch.testing.assert_close(moved[name], product, atol=1e-6, rtol=0)
    torch.testing.assert_close(moved_logits, logits, atol=1e-5, rtol=0)
    assert max(float((reset[n] - p).abs().max()) for n, p in plain.items()) > 1e-3  # dropping momentum changes it
    assert float((reset_logits - logits).abs().max()) > 1e-4


def test_bf16_adapters_are_written_once_from_float64():
    """bf16 adapters: each factor is the float64 refactorization rounded once to bf16 (the product can change only
    by that rounding), and the logits move by a bf16 rounding of the LoRA contribution, not more."""
    model = tiny_lora_model("llama", r=4).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pair in find_lora_pairs(model):
            pair.B.copy_(torch.randn(pair.B.shape, generator=gen) * 0.3)
    batch = {k: v for k, v in tiny_batches(1, 4)[0].items() if k != "labels"}
    pairs = find_lora_pairs(model)
    old = read_lora_weights(pairs)

    def logits64(m, adapters=True):  # the forward in float64, so only the stored weights differ
        m64 = copy.deepcopy(m).double()
        with torch.no_grad(), (contextlib.nullcontext() if adapters else m64.disable_adapter()):
            return m64(**batch).logits

    ref, base = logits64(model), logits64(model, adapters=False)
    refactorize_lora_model(model)
    new = read_lora_weights(pairs)
    for name, (a, b) in old.items():
        b64, a64 = refactorize(b.double(), a.double())
        assert torch.equal(new[name][1], b64.to(torch.bfloat16)) and torch.equal(new[name][0], a64.to(torch.bfloat16))
    change = float((logits64(model) - ref).abs().max())
    lora_part = float((ref - base).abs().max())
    assert 0 < change < 4 * 2.0**-8 * lora_part, (change, lora_part)
