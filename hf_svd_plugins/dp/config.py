"""Configuration of differentially private training (DP-SGD with per-example clipping)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

PER_SAMPLE_METHODS = ("auto", "vmap", "hooks", "loop")
LOSS_TYPES = ("auto", "causal_lm", "token", "sequence")


@dataclass
class DPConfig:
    """What DP-SGD does at every optimizer step, and which privacy guarantee it must meet.

    Per optimizer step, on a Poisson-sampled logical batch (each example in with probability ``q``):
    ``g = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / (q N)``. The privacy unit is one example (one sequence).

    Attributes:
        max_grad_norm: ``C``, the bound on every example's gradient norm (over all trainable parameters together).
            Must be > 0. The Trainer's own ``TrainingArguments.max_grad_norm`` is disabled under DP.
        noise_multiplier: ``sigma``; the Gaussian noise std is ``sigma * C``. Give exactly one of ``noise_multiplier``
            and ``target_epsilon``. ``0`` means no noise (no privacy: epsilon is infinite), useful for debugging.
        target_epsilon: calibrate ``sigma`` so that the whole planned run (``max_steps`` or ``num_train_epochs``)
            spends exactly this epsilon at ``target_delta``, with the same accountant that reports epsilon.
        total_steps: the number of optimizer steps the privacy budget covers, when one budget spans several Trainer
            runs that share an accountant history (federated rounds: ``rounds x local_steps``, counting every round
            a client may take part in). ``target_epsilon`` is calibrated, and ``max_epsilon`` checked, over this many
            steps instead of this Trainer's ``max_steps``/epochs. ``None``: this Trainer's planned run.
        target_delta: the ``delta`` of ``(epsilon, delta)``-DP. Default ``min(1e-5, 1 / (10 N))`` with ``N`` the
            training set size; refused if ``>= 1 / N`` (that would allow leaking a whole example).
        accountant: ``"prv"`` (default, tight) or ``"rdp"`` (classic, looser); see
            :data:`hf_svd_plugins.dp.accounting.ACCOUNTANTS`.
        max_epsilon: hard budget. Training refuses to start when the planned run would exceed it, and stops before
            an optimizer step that would exceed it (e.g. when resumed with more steps). Defaults to ``target_epsilon``
            when that is given, otherwise no hard limit.
        poisson_sampling: sample each logical batch by including every example independently with probability
            ``q = expected_batch / N`` (what the accountants' amplification by subsampling analyses). ``False`` uses
            the Trainer's shuffled fixed-size batches, whose order follows the public ``TrainingArguments.seed``: no
            amplification holds, so the epsilon reported (and calibrated, and budgeted) is then the Gaussian
            mechanism composed once per epoch begun.
        per_sample_method: how per-example gradients are computed. ``"vmap"``: ``torch.func`` (exact, fast);
            ``"hooks"``: Opacus ``GradSampleModule`` hooks (exact for the layers Opacus supports); ``"loop"``: one
            backward per example (exact, slow, works for any model); ``"auto"``: ``vmap`` when its attention-mask handling is
            verified exact for the model on the first batch (and it runs), else ``hooks`` when Opacus supports every
            trainable layer, else ``loop``; ``loop`` whenever activation checkpointing is on.
        loss_type: how an example's loss is computed from logits. ``"causal_lm"``: mean over the example's own valid
            next-token targets (labels shifted by one, ``-100`` ignored); ``"token"``: same without the shift (token
            classification, masked LM); ``"sequence"``: one label per example (cross-entropy, MSE if one output,
            BCE for float multi-label targets); ``"auto"``: decided from the label shape and the model's class
            hierarchy (causal-LM classes, or ``can_generate()`` and not encoder-decoder). On the first batch with
            targets, the per-example losses must average to the model's own loss (``ValueError`` under ``"auto"``,
            a warning for an explicit type).
        max_physical_batch_size: compute per-example gradients in chunks of at most this many examples (bounds
            memory; the math is unchanged), and run the first-batch padding checks on at most this many. ``None``:
            the whole micro-batch at once.
        noise_seed: seed of the noise generator. ``None`` (required for real privacy) draws 62 bits from
            ``secrets`` on rank 0 and broadcasts them, and fresh ones when resuming from a checkpoint (restoring the
            generator would draw the same noise again for whatever the resumed run computes). An explicit seed warns:
            whoever knows it can regenerate the noise, and runs with the same seed add the same noise; its state is
            restored on resume, so a resumed run continues the same stream.
        sampler_seed: seed of the Poisson sampler, the same way: ``None`` is secret (never ``TrainingArguments.seed``,
            which is public) and fresh on every resume; an explicit seed warns and is restored on resume. Each
            further ``train()`` call draws a new sample.
        eps_error: accuracy of the PRV accountant's epsilon (ignored by RDP).
        epsilon_tolerance: accuracy of the sigma calibration from ``target_epsilon``.

    Recommended for a small data set (thousands of examples; measured on 9,222 Rotten Tomatoes snippets with
    all-MiniLM-L6-v2, docs/dp.md "Getting private LoRA to learn"; ``examples.minilm_dp_lora_setup`` builds it).
    The per-step noise norm is ``sigma * C * sqrt(d) / B`` for ``d`` trainable parameters and expected batch ``B``;
    keep it near the norm of the clipped mean gradient, which was 0.09-0.15 ``C`` over the first steps of every run
    measured:

    - train few parameters: LoRA ``r=4`` on ``query``/``value`` of the top 2 layers plus a zero-initialised head
      (13,058 parameters) on the encoder used as it was trained (mean-pooled sentence embedding);
    - an expected logical batch of about ``N / 9`` through ``gradient_accumulation_steps`` (1,024 of 9,222:
      ``q = 0.11``) and about 10 epochs (90 steps; epsilon 8 then affords ``sigma = 0.96``);
    - ``max_grad_norm=0.1`` (median per-example norms start at 1.2-2, so at first every example is clipped);
    - AdamW with linear decay at about 20x the non-private learning rate (``2e-2`` against ``1e-3``).

    With these, epsilon 8 and 3 reached 0.79 validation accuracy against 0.81 non-private (seed 0); the earlier
    recipe (LoRA ``r=8`` on every layer, 74,498 parameters, ``C=1``, ``B=512`` of 3,892) had a noise norm 3.2-4.2x
    its signal per step and stayed at chance.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    total_steps: int | None = None
    accountant: str = "prv"
    max_epsilon: float | None = None
    poisson_sampling: bool = True
    per_sample_method: str = "auto"
    loss_type: str = "auto"
    max_physical_batch_size: int | None = None
    noise_seed: int | None = None
    sampler_seed: int | None = None
    eps_error: float = 0.01
    epsilon_tolerance: float = 0.01

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError`` (wrong type) or ``ValueError`` (wrong value) naming the bad field and the fix. Called on
        construction (and by ``dataclasses.replace``)."""
        from hf_svd_plugins.dp.accounting import ACCOUNTANTS

        _require(self, "max_grad_norm", _is_real, "a number")
        for name in ("noise_multiplier", "target_epsilon", "target_delta", "max_epsilon"):
            _require(self, name, _is_real, "a number or None", optional=True)
        for name in ("total_steps", "max_physical_batch_size", "noise_seed", "sampler_seed"):
            _require(self, name, _is_int, "an int or None", optional=True)
        for name in ("accountant", "per_sample_method", "loss_type"):
            _require(self, name, lambda v: isinstance(v, str), "a str")
        _require(self, "poisson_sampling", lambda v: isinstance(v, bool), "True or False")
        for name in ("eps_error", "epsilon_tolerance"):
            _require(self, name, _is_real, "a number")
        if not _finite(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r}: the clipping bound C must be a finite number > 0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "give exactly one of noise_multiplier (sigma) or target_epsilon (sigma is then calibrated); got "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}"
            )
        if self.noise_multiplier is not None and (not _finite(self.noise_multiplier) or self.noise_multiplier < 0):
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r}: sigma must be a finite number >= 0")
        if self.target_epsilon is not None and (not _finite(self.target_epsilon) or self.target_epsilon <= 0):
            raise ValueError(f"target_epsilon={self.target_epsilon!r}: must be a finite number > 0")
        if self.target_delta is not None and not (0 < self.target_delta < 1):
            raise ValueError(f"target_delta={self.target_delta!r}: delta must be in (0, 1), typically << 1/N")
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(
                f"total_steps={self.total_steps!r}: must be >= 1 (e.g. rounds x local_steps), or None for this "
                "Trainer's own run"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant={self.accountant!r}: choose one of {sorted(ACCOUNTANTS)}")
        if self.max_epsilon is not None and (not _finite(self.max_epsilon) or self.max_epsilon <= 0):
            raise ValueError(f"max_epsilon={self.max_epsilon!r}: must be a finite number > 0, or None for no limit")
        if self.per_sample_method not in PER_SAMPLE_METHODS:
            raise ValueError(f"per_sample_method={self.per_sample_method!r}: choose one of {PER_SAMPLE_METHODS}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: choose one of {LOSS_TYPES}")
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size={self.max_physical_batch_size!r}: must be >= 1 or None")
        for name in ("noise_seed", "sampler_seed"):
            seed = getattr(self, name)
            if seed is not None and not 0 <= seed < 2**63:
                raise ValueError(f"{name}={seed!r}: a seed must be in [0, 2**63), or None for a secret one")
        if not _finite(self.eps_error) or self.eps_error <= 0:
            raise ValueError(f"eps_error={self.eps_error!r}: must be > 0")
        if not _finite(self.epsilon_tolerance) or self.epsilon_tolerance <= 0:
            raise ValueError(f"epsilon_tolerance={self.epsilon_tolerance!r}: must be > 0")

    @property
    def epsilon_limit(self) -> float | None:
        """The hard budget: ``max_epsilon``, else ``target_epsilon``, else None."""
        return self.max_epsilon if self.max_epsilon is not None else self.target_epsilon

    def resolve_delta(self, num_examples: int) -> float:
        """``target_delta`` or its default ``min(1e-5, 1 / (10 N))``; ``ValueError`` if ``delta >= 1 / N``."""
        if num_examples < 1:
            raise ValueError(f"the training set is empty (N={num_examples}); DP training needs at least one example")
        if self.target_delta is None:
            return min(1e-5, 1.0 / (10 * num_examples))
        if self.target_delta >= 1.0 / num_examples:
            raise ValueError(
                f"target_delta={self.target_delta!r} >= 1/N = {1.0 / num_examples:.3g} (N={num_examples}): such a delta "
                "allows leaking a whole example; use a smaller delta, e.g. 1/(10 N), or leave it None for the default"
            )
        return float(self.target_delta)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _finite(x: object) -> bool:
    return _is_real(x) and math.isfinite(x)


def _require(config: DPConfig, name: str, ok, what: str, optional: bool = False) -> None:
    value = getattr(config, name)
    if (optional and value is None) or ok(value):
        return
    raise TypeError(f"DPConfig.{name}={value!r} ({type(value).__name__}): must be {what}")
