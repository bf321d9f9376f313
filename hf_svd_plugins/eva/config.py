"""EVA settings, validated on construction (before any model or data is touched)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EvaConfig:
    """How EVA initialises LoRA from activations.

    Args:
        rho: rank redistribution factor (>= 1). Each module estimates ``round(rho * r)`` components and may receive up
            to that many ranks; the total stays ``r * n_modules``. ``rho=1`` keeps every module at ``r``.
        tau: cosine threshold in ``(0, 1]``; a module stops collecting activations once the span of the components
            it needs moved less than this between two batches (smallest principal-angle cosine).
        max_batches: hard cap on the number of minibatches EVA reads, converged or not (it never loops forever).
        min_batches: minimum number of minibatches before convergence is checked (at least 2: one to compare with).
        whiten: divide each A row by ``sqrt`` of its singular value (PEFT EVA's ``whiten``).
        adjust_scaling_factors: keep the LoRA scale ``s = alpha / r`` constant when a module's rank changes
            (``alpha_m = s * r_m``). If False, ``alpha`` stays and the scale becomes ``alpha / r_m``.
        use_label_mask: drop tokens whose label is ``label_mask_value`` (prompt or padding) from the activations.
        label_mask_value: the ignore index in ``labels``.
        center: estimate principal components of centred activations (incremental PCA, as PEFT's EVA does). False uses
            the uncentred SVD of the stacked inputs.
        product_dtype: dtype of the ``n x d^2`` activation products, EVA's main cost: ``"float32"`` (default, about
            twice as fast; rows are centred first, so precision is relative to the activations' spread) or
            ``"float64"`` (a float64 PCA of everything read, bit for bit). Running sums are float64 either way.
        adapter_name: the LoRA adapter to initialise (default: the active one).
        show_progress_bar: a tqdm bar on the main process.
    """

    rho: float = 2.0
    tau: float = 0.99
    max_batches: int = 64
    min_batches: int = 2
    whiten: bool = False
    adjust_scaling_factors: bool = True
    use_label_mask: bool = True
    label_mask_value: int = -100
    center: bool = True
    product_dtype: str = "float32"
    adapter_name: str | None = None
    show_progress_bar: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.rho, (int, float)) or self.rho < 1:
            raise ValueError(f"rho must be a number >= 1 (1 keeps every rank at r), got {self.rho!r}")
        if not isinstance(self.tau, (int, float)) or not 0 < self.tau <= 1:
            raise ValueError(f"tau must be in (0, 1] (0.99 is the paper's default), got {self.tau!r}")
        if not isinstance(self.max_batches, int) or self.max_batches < 1:
            raise ValueError(f"max_batches must be a positive int, got {self.max_batches!r}")
        if not isinstance(self.min_batches, int) or self.min_batches < 2:
            raise ValueError(f"min_batches must be an int >= 2 (convergence compares two batches), got {self.min_batches!r}")
        if self.product_dtype not in ("float32", "float64"):
            raise ValueError(f"product_dtype must be 'float32' or 'float64', got {self.product_dtype!r}")
        if self.min_batches > self.max_batches:
            raise ValueError(f"min_batches={self.min_batches} exceeds max_batches={self.max_batches}; raise max_batches")

    def max_components(self, r: int) -> int:
        """``r_max = round(rho * r)``: components estimated and ranks a module may receive."""
        return max(r, int(round(self.rho * r)))

    def to_dict(self) -> dict:
        return asdict(self)
