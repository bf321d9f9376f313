"""EVA settings, validated on construction (before any model or data is touched)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STATISTICS = ("auto", "exact", "sketch")


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
        statistics: what each distinct layer input (``d = in_features``, ``k = r_max``) keeps between batches.

            - ``"exact"``: float64 count, column sums and ``d x d`` Gram matrix: ``8 (d^2 + d + 1)`` bytes. The
              directions equal a float64 PCA of every row read.
            - ``"sketch"``: a Frequent Directions sketch (the parameterised variant that shrinks only the lower half
              of its rows) of ``l = ceil(sketch_factor * k)`` rows, with the exact count, mean and total variance:
              ``b l d + 8 (d + 3)`` bytes, ``b`` = 4 (float32 products) or 8. With ``C`` the centred scatter of every
              row read and ``S`` the sketch, ``0 <= C - S^T S <= Delta I`` with
              ``Delta <= sum_{i>j} lambda_i(C) / (ceil(l / 2) + 1 - j)`` for every ``j <= ceil(l / 2)``: the top-``j``
              directions of the sketch capture at least ``sum_{i<=j} lambda_i(C) - j Delta`` of the variance.
            - ``"auto"`` (default): exact where ``d <= 2 l`` (the Gram is then small and the faster choice), the
              sketch above. At 7B (hidden 4096, intermediate 11008, r=16, rho=2: k=32, l=128) that is 0.38 GB of
              statistics for all 128 distinct inputs, where exact Gram matrices would take 44 GB.
        sketch_factor: sketch rows per estimated component (``l = ceil(sketch_factor * r_max)``, at most ``d``);
            at least 2, so that the error bound above covers all ``r_max`` components.
        product_dtype: dtype of the activation products, EVA's main cost: ``"float32"`` (default, about twice as
            fast; rows are centred first, so precision is relative to the activations' spread) or ``"float64"``.
            Running sums, means and eigen-solves are float64 either way; the sketch is stored in this dtype.
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
    statistics: str = "auto"
    sketch_factor: float = 4.0
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
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS} ('auto' picks per layer width), "
                             f"got {self.statistics!r}")
        if not isinstance(self.sketch_factor, (int, float)) or self.sketch_factor < 2:
            raise ValueError(f"sketch_factor must be a number >= 2 (sketch rows per estimated component), "
                             f"got {self.sketch_factor!r}")
        if self.min_batches > self.max_batches:
            raise ValueError(f"min_batches={self.min_batches} exceeds max_batches={self.max_batches}; raise max_batches")

    def max_components(self, r: int) -> int:
        """``r_max = round(rho * r)``: components estimated and ranks a module may receive."""
        return max(r, int(round(self.rho * r)))

    def sketch_rows(self, dim: int, components: int) -> int:
        """``l = ceil(sketch_factor * components)`` rows of a sketched stream of width ``dim`` (at most ``dim``)."""
        return max(1, min(dim, math.ceil(self.sketch_factor * components)))

    def uses_sketch(self, dim: int, components: int) -> bool:
        """Whether a stream of width ``dim`` estimating ``components`` directions keeps a sketch (else exact)."""
        if self.statistics != "auto":
            return self.statistics == "sketch"
        return dim > 2 * self.sketch_rows(dim, components)

    def to_dict(self) -> dict:
        return asdict(self)
