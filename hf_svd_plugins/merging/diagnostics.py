"""The seed paper's diagnostics: distances, singular values and vectors, interpolation paths and barriers.

* :func:`l2_distance`: ``||A - pi(B)||`` over all parameters.
* :func:`layer_report`: per 2-D weight, singular values of A and pi(B) (a permutation leaves them unchanged) and the
  alignment ``R = sum_i s_i |<u_i, u'_i>| |<v_i, v'_i>| / sum_i s_i`` of their top singular vectors (1 = aligned;
  two unrelated bases give about :func:`unaligned_level`).
* :func:`interpolation_path`: loss and accuracy of ``(1 - l) A + l pi(B)`` for evenly spaced ``l``, and its barrier
  ``max_l [L(l) - ((1 - l) L(0) + l L(1))]``; :func:`plot_interpolation` draws the curves (PNG, matplotlib).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_svd_plugins.merging.evaluation import LossFn, evaluate
from hf_svd_plugins.merging.inputs import model_state
from hf_svd_plugins.merging.merge import load_state_into

__all__ = [
    "InterpolationPath",
    "LayerReport",
    "alignment_r",
    "interpolation_path",
    "l2_distance",
    "layer_report",
    "plot_interpolation",
    "summarize_layers",
    "unaligned_level",
]


def _state(x: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_state(x) if isinstance(x, nn.Module) else x


def l2_distance(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor]) -> float:
    """``sqrt(sum over parameters ||a - b||^2)`` in float64."""
    a, b = _state(a), _state(b)
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def _svd_alignment(a: torch.Tensor, b: torch.Tensor, top_k: int | None):
    """``(s_a, s_b, R, |<u_1, u'_1>|, |<v_1, v'_1>|)`` in float64."""
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(b.double(), full_matrices=False)
    k = min(top_k or s.numel(), s.numel())
    cos_u = (u[:, :k] * u2[:, :k]).sum(0).abs()
    cos_v = (vh[:k] * vh2[:k]).sum(1).abs()
    r = float((s[:k] * cos_u * cos_v).sum() / s[:k].sum())
    return s, s2, r, float(cos_u[0]), float(cos_v[0])


def alignment_r(a: torch.Tensor, b: torch.Tensor, top_k: int | None = None) -> float:
    """The seed paper's ``R`` for two matrices of one shape: ``sum_i s_i |<u_i, u'_i>| |<v_i, v'_i>| / sum_i s_i``
    over the ``top_k`` largest singular values of ``a`` (default all), float64."""
    return _svd_alignment(a, b, top_k)[2]


def unaligned_level(rows: int, cols: int) -> float:
    """``R`` expected for unrelated bases: ``E|<u, u'>| E|<v, v'>|`` for random unit vectors, ``2 / (pi sqrt(m n))``."""
    return 2.0 / (math.pi * math.sqrt(rows * cols))


@dataclass
class LayerReport:
    """One 2-D weight: its singular values in A and pi(B), the alignment ``r`` and the top-1 vector cosines."""

    name: str
    shape: tuple[int, int]
    singular_values_a: torch.Tensor
    singular_values_b: torch.Tensor
    r: float
    top_cosine_u: float
    top_cosine_v: float


def layer_report(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor],
                 top_k: int | None = None, names: Iterable[str] | None = None) -> list[LayerReport]:
    """Per 2-D parameter (or the given ``names``): singular values of ``a`` and ``b`` and their alignment."""
    a, b = _state(a), _state(b)
    out = []
    for name in names if names is not None else a:
        if a[name].dim() != 2:
            continue
        out.append(LayerReport(name, tuple(a[name].shape), *_svd_alignment(a[name], b[name], top_k)))
    return out


@dataclass
class InterpolationPath:
    """Loss and accuracy along ``(1 - l) A + l B`` (``B`` aligned or not)."""

    lambdas: list[float]
    losses: list[float]
    accuracies: list[float]

    @property
    def barrier(self) -> float:
        """``max_l [L(l) - ((1 - l) L(0) + l L(1))]`` (0 if the path never rises above the chord)."""
        first, last = self.losses[0], self.losses[-1]
        return max(0.0, max(loss - ((1 - t) * first + t * last) for t, loss in zip(self.lambdas, self.losses,
                                                                                   strict=True)))

    @property
    def accuracy_barrier(self) -> float:
        """``max_l [((1 - l) acc(0) + l acc(1)) - acc(l)]``: the accuracy lost below the chord."""
        first, last = self.accuracies[0], self.accuracies[-1]
        return max(0.0, max(((1 - t) * first + t * last) - acc for t, acc in zip(self.lambdas, self.accuracies,
                                                                                 strict=True)))

    @property
    def midpoint_loss(self) -> float:
        return self.losses[min(range(len(self.lambdas)), key=lambda i: abs(self.lambdas[i] - 0.5))]


def interpolation_path(model_a: nn.Module, b: nn.Module | Mapping[str, torch.Tensor], batches: Iterable,
                       num_points: int = 11, loss_fn: LossFn | None = None) -> InterpolationPath:
    """Evaluate ``(1 - l) A + l B`` at ``num_points`` evenly spaced ``l`` in ``[0, 1]`` on ``batches``.

    ``b`` is a model or a state (e.g. ``Alignment.aligned_states(models)[1]``) with ``model_a``'s parameter names.
    One working copy of ``model_a`` is reused for every point.
    """
    if num_points < 3:
        raise ValueError(f"num_points must be >= 3 to show a barrier, got {num_points}")
    batches = list(batches)
    state_a, state_b = model_state(model_a), _state(b)
    work = copy.deepcopy(model_a)
    lambdas = [i / (num_points - 1) for i in range(num_points)]
    losses, accuracies = [], []
    for t in lambdas:
        load_state_into(work, {k: (1 - t) * state_a[k].float() + t * state_b[k].float() for k in state_a})
        res = evaluate(work, batches, loss_fn)
        losses.append(res.loss)
        accuracies.append(res.accuracy)
    return InterpolationPath(lambdas, losses, accuracies)


def plot_interpolation(paths: Mapping[str, InterpolationPath], path: str, title: str = "",
                       ylabel: str = "loss (nats)") -> str:
    """Write loss and accuracy along each path (one curve per label, barrier in the legend) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, p in paths.items():
        ax_loss.plot(p.lambdas, p.losses, marker="o", ms=3, label=f"{label} (barrier {p.barrier:.3f})")
        ax_acc.plot(p.lambdas, p.accuracies, marker="o", ms=3, label=label)
    ax_loss.set_xlabel("lambda  ((1 - l) A + l pi(B))")
    ax_loss.set_ylabel(ylabel)
    ax_acc.set_xlabel("lambda")
    ax_acc.set_ylabel("accuracy")
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize_layers(reports: Sequence[LayerReport]) -> dict[str, float]:
    """Mean ``R`` and top-1 cosines over layers, and the largest relative singular-value change."""
    if not reports:
        return {}
    sv_change = max(float((r.singular_values_a - r.singular_values_b).abs().max()
                           / r.singular_values_a.abs().max().clamp_min(1e-30)) for r in reports)
    return {
        "mean_r": sum(r.r for r in reports) / len(reports),
        "mean_top_cosine_u": sum(r.top_cosine_u for r in reports) / len(reports),
        "mean_top_cosine_v": sum(r.top_cosine_v for r in reports) / len(reports),
        "max_singular_value_change": sv_change,
    }
