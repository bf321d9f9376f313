"""Permutation specs: which named permutation acts on which axis of which weight.

A weight axis is split into *factors* ``((perm name or None, size), ...)``, outermost first, whose sizes multiply to
the axis length: the rows of a Llama ``q_proj`` are ``((kv_group, G), (query_in_group, R), (None, head_dim))``.
A :class:`Perm` may be *nested* under a parent: one permutation of ``size`` for each unit of the parent
(``perm`` tensor of shape ``(parent_size, size)``), indexed by model B's own parent units, so the inner order travels
with the unit it belongs to (a key/value head carries its query-head order and its value dimensions with it).

Convention (see :func:`hf_svd_plugins.merging.permute.permute_tensor`): ``pi(B)[i] = B[perm[i]]`` along a plain
factor; along a nested one, ``pi(B)[a, i] = B[q[a], c[q[a], i]]`` for parent ``q`` and child ``c``.

Every parameter of the model must appear in the spec (possibly with no permutation), so a layer the spec does not
know is an error instead of a silently broken merge. Built-in builders: :data:`SPEC_BUILDERS`, keyed by
``config.model_type``; any ``nn.Sequential`` of Linear and elementwise activations gets :func:`mlp_spec`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

Factor = tuple[str | None, int]
AxisSpec = tuple[Factor, ...]

__all__ = [
    "SPEC_BUILDERS",
    "Perm",
    "PermutationSpec",
    "WeightEntry",
    "check_not_peft",
    "mlp_spec",
    "named_weights",
    "permutation_spec",
    "register_spec_builder",
]


@dataclass(frozen=True)
class Perm:
    """A named permutation of ``size`` units; with ``parent``, one such permutation per unit of the parent."""

    name: str
    size: int
    parent: str | None = None


@dataclass(frozen=True)
class WeightEntry:
    """How the permutations act on one parameter (or on one slice of a fused parameter such as GPT-2's c_attn).

    ``axes[k]`` factors tensor axis ``k``; ``slice = (axis, start, stop)`` restricts the entry to that slice.
    """

    param: str
    axes: tuple[AxisSpec, ...]
    slice: tuple[int, int, int] | None = None

    @property
    def key(self) -> str:
        if self.slice is None:
            return self.param
        axis, start, stop = self.slice
        return f"{self.param}[{axis}:{start}:{stop}]"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(_axis_size(a) for a in self.axes)

    def perm_names(self) -> set[str]:
        return {p for axis in self.axes for p, _ in axis if p is not None}


def _axis_size(axis: AxisSpec) -> int:
    size = 1
    for _, n in axis:
        size *= n
    return size


@dataclass
class PermutationSpec:
    """Named permutations and, for every parameter, the factors each permutation acts on.

    Build one by hand with :meth:`from_axes`, or get a built-in one from :func:`permutation_spec`.
    """

    perms: dict[str, Perm]
    entries: tuple[WeightEntry, ...]
    model_type: str = "custom"
    _touching: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.entries = tuple(self.entries)
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError("PermutationSpec: an entry is listed twice")
        for entry_index, entry in enumerate(self.entries):
            for axis_index, axis in enumerate(entry.axes):
                seen: list[str] = []
                for factor_index, (name, size) in enumerate(axis):
                    if name is None:
                        continue
                    perm = self.perms.get(name)
                    if perm is None:
                        raise ValueError(f"{entry.key}: permutation {name!r} is not declared in perms")
                    if perm.size != size:
                        raise ValueError(f"{entry.key}: factor of size {size} but permutation {name!r} has {perm.size}")
                    if perm.parent is not None and perm.parent not in seen:
                        raise ValueError(f"{entry.key} axis {axis_index}: nested permutation {name!r} needs its "
                                         f"parent {perm.parent!r} as an earlier factor of the same axis")
                    if name in seen:
                        raise ValueError(f"{entry.key} axis {axis_index}: permutation {name!r} used twice")
                    seen.append(name)
                    self._touching.setdefault(name, []).append((entry_index, axis_index, factor_index))
        for perm in self.perms.values():
            if perm.parent is not None and (perm.parent not in self.perms or self.perms[perm.parent].parent):
                raise ValueError(f"permutation {perm.name!r}: parent {perm.parent!r} must be a declared top-level "
                                 "permutation (one level of nesting)")

    def perm_shape(self, name: str) -> tuple[int, ...]:
        """``(size,)`` or, for a nested permutation, ``(parent size, size)``."""
        perm = self.perms[name]
        if perm.parent is None:
            return (perm.size,)
        return (self.perms[perm.parent].size, perm.size)

    def touching(self, name: str) -> list[tuple[int, int, int]]:
        """``(entry index, axis, factor index)`` of every place permutation ``name`` acts."""
        return self._touching.get(name, [])

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every parameter in ``shapes`` is covered exactly once by the entries, with matching sizes."""
        covered: dict[str, list[WeightEntry]] = {}
        for entry in self.entries:
            if entry.param not in shapes:
                raise ValueError(f"PermutationSpec lists {entry.param!r}, which the model does not have")
            covered.setdefault(entry.param, []).append(entry)
        missing = [n for n in shapes if n not in covered]
        if missing:
            raise ValueError(f"unsupported layer: no permutation rule for parameter(s) {missing[:5]} of a "
                             f"{self.model_type!r} model; write a PermutationSpec for it (PermutationSpec.from_axes)")
        for name, entries in covered.items():
            shape = tuple(shapes[name])
            if len(entries) == 1 and entries[0].slice is None:
                if entries[0].shape != shape:
                    raise ValueError(f"{name}: spec shape {entries[0].shape} != parameter shape {shape}")
                continue
            axis = entries[0].slice[0] if entries[0].slice else -1
            spans = sorted((e.slice[1], e.slice[2]) for e in entries if e.slice and e.slice[0] == axis)
            if len(spans) != len(entries) or spans[0][0] != 0 or spans[-1][1] != shape[axis] or any(
                    a[1] != b[0] for a, b in zip(spans, spans[1:], strict=False)):
                raise ValueError(f"{name}: the slices of the spec must tile axis {axis} exactly")
            for e in entries:
                expected = list(shape)
                expected[axis] = e.slice[2] - e.slice[1]
                if e.shape != tuple(expected):
                    raise ValueError(f"{e.key}: spec shape {e.shape} != slice shape {tuple(expected)}")

    @classmethod
    def from_axes(cls, model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]],
                  axes: Mapping[str, tuple], parents: Mapping[str, str] | None = None,
                  model_type: str = "custom") -> PermutationSpec:
        """A spec written by hand, in git-re-basin's style.

        Args:
            model_or_shapes: the model (its parameters give the sizes) or ``{name: shape}``.
            axes: for every parameter, one item per tensor axis: ``None`` (not permuted), a permutation name, or a
                tuple of factors ``((name or None, size), ...)``. Example for a 2-layer MLP:
                ``{"0.weight": ("h0", None), "0.bias": ("h0",), "2.weight": (None, "h0"), "2.bias": (None,)}``.
            parents: ``{nested permutation: parent}`` for nested factors.

        Raises:
            ValueError: a parameter missing from ``axes``, sizes that disagree, or a nesting the axes do not show.
        """
        shapes = _shapes(model_or_shapes)
        parents = dict(parents or {})
        sizes: dict[str, int] = {}
        entries = []
        for name, spec_axes in axes.items():
            if name not in shapes:
                raise ValueError(f"from_axes: the model has no parameter {name!r}")
            shape = shapes[name]
            if len(spec_axes) != len(shape):
                raise ValueError(f"from_axes: {name} has {len(shape)} axes but {len(spec_axes)} are given")
            factored = []
            for item, n in zip(spec_axes, shape, strict=True):
                factors = ((item, n),) if item is None or isinstance(item, str) else tuple(tuple(f) for f in item)
                for p, size in factors:
                    if p is not None and sizes.setdefault(p, size) != size:
                        raise ValueError(f"from_axes: permutation {p!r} has size {sizes[p]} and {size}")
                factored.append(factors)
            entries.append(WeightEntry(name, tuple(factored)))
        perms = {p: Perm(p, n, parents.get(p)) for p, n in sizes.items()}
        spec = cls(perms, tuple(entries), model_type)
        spec.check_shapes(shapes)
        return spec


def _shapes(model_or_shapes: nn.Module | Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if isinstance(model_or_shapes, nn.Module):
        return {n: tuple(p.shape) for n, p in named_weights(model_or_shapes).items()}
    return {n: tuple(s) for n, s in model_or_shapes.items()}


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name, each tied parameter once (under its first name)."""
    return dict(model.named_parameters(remove_duplicate=True))


def check_not_peft(model: object, argument: str = "model") -> None:
    """Refuse a PEFT model: merging needs the plain weights (``model.merge_and_unload()`` first)."""
    if hasattr(model, "peft_config") or type(model).__module__.startswith("peft"):
        raise ValueError(f"{argument} is a PEFT model; merge its adapters first with "
                         f"`{argument} = {argument}.merge_and_unload()` (or load the base model with the adapter "
                         "merged) and pass the plain model")


# --------------------------------------------------------------------------- built-in families

Rule = tuple[str, Callable[[re.Match, tuple[int, ...]], list[WeightEntry]]]


class _Builder:
    """Collects perms and entries while matching parameter names against per-family rules."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type
        self.perms: dict[str, Perm] = {}
        self.entries: list[WeightEntry] = []

    def perm(self, name: str, size: int, parent: str | None = None) -> str:
        self.perms.setdefault(name, Perm(name, size, parent))
        return name

    def heads(self, layer: str, inner: str, n_heads: int, head_dim: int) -> AxisSpec:
        """Multi-head axis without GQA or RoPE: ``head.L`` with a nested ``{inner}.L`` on the head dimensions."""
        head = self.perm(f"head.{layer}", n_heads)
        return ((head, n_heads), (self.perm(f"{inner}.{layer}", head_dim, head), head_dim))

    def ffn(self, layer: str, n: int) -> AxisSpec:
        return ((self.perm(f"ffn.{layer}", n), n),)

    def build(self, shapes: dict[str, tuple[int, ...]], rules: list[Rule]) -> PermutationSpec:
        compiled = [(re.compile(pattern), fn) for pattern, fn in rules]
        for name, shape in shapes.items():
            for pattern, fn in compiled:
                match = pattern.fullmatch(name)
                if match:
                    self.entries.extend(fn(match, shape))
                    break
        spec = PermutationSpec(self.perms, tuple(self.entries), self.model_type)
        spec.check_shapes(shapes)
        return spec


def _fixed(name: str, shape: tuple[int, ...]) -> WeightEntry:
    return WeightEntry(name, tuple(((None, n),) for n in shape))


def _vec(name: str, factors: AxisSpec) -> WeightEntry:
    return WeightEntry(name, (factors,))


def _mat(name: str, rows: AxisSpec, cols: AxisSpec, sl: tuple[int, int, int] | None = None) -> WeightEntry:
    return WeightEntry(name, (rows, cols), sl)


def llama_spec(model: nn.Module) -> PermutationSpec:
    """Llama family (llama, mistral, qwen2, qwen3): RMSNorm, RoPE, GQA, SwiGLU.

    Permutations: ``res`` (residual stream); per layer ``ffn.L`` (gate/up rows, down columns); ``kv.L`` (key/value
    heads, each moving with its group of query heads); ``q.L`` nested in ``kv.L`` (query heads within their group:
    ``repeat_kv`` gives query head ``g * R + r`` the key/value head ``g``); ``vo.L`` nested in ``kv.L`` (value
    dimensions of a key/value head, also the matching ``o_proj`` columns of every query head in its group). Q/K
    dimensions inside a head stay fixed: RoPE rotates dimension pairs ``(i, i + head_dim / 2)`` at fixed frequencies.
    """
    cfg = model.config
    d_model = cfg.hidden_size
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    group = n_heads // n_kv
    b = _Builder(cfg.model_type)

    def q_rows(layer: str) -> AxisSpec:
        return ((b.perm(f"kv.{layer}", n_kv), n_kv), (b.perm(f"q.{layer}", group, f"kv.{layer}"), group),
                (None, head_dim))

    def kv_rows(layer: str, value: bool) -> AxisSpec:
        inner = (b.perm(f"vo.{layer}", head_dim, f"kv.{layer}"), head_dim) if value else (None, head_dim)
        return ((b.perm(f"kv.{layer}", n_kv), n_kv), inner)

    def o_cols(layer: str) -> AxisSpec:
        return q_rows(layer)[:2] + ((b.perm(f"vo.{layer}", head_dim, f"kv.{layer}"), head_dim),)

    def ffn(layer: str, n: int) -> AxisSpec:
        return b.ffn(layer, n)

    res = ((b.perm("res", d_model), d_model),)
    layer = r"(?:.*\.)?layers\.(\d+)\."
    rules: list[Rule] = [
        (layer + r"self_attn\.q_proj\.(weight|bias)", lambda m, s: [
            _mat(m[0], q_rows(m[1]), res) if m[2] == "weight" else _vec(m[0], q_rows(m[1]))]),
        (layer + r"self_attn\.(k|v)_proj\.(weight|bias)", lambda m, s: [
            _mat(m[0], kv_rows(m[1], m[2] == "v"), res) if m[3] == "weight" else _vec(m[0], kv_rows(m[1], m[2] == "v"))]),
        (layer + r"self_attn\.o_proj\.weight", lambda m, s: [_mat(m[0], res, o_cols(m[1]))]),
        (layer + r"self_attn\.o_proj\.bias", lambda m, s: [_vec(m[0], res)]),
        (layer + r"self_attn\.(q|k)_norm\.weight", lambda m, s: [_fixed(m[0], s)]),
        (layer + r"mlp\.(gate|up)_proj\.weight", lambda m, s: [_mat(m[0], ffn(m[1], s[0]), res)]),
        (layer + r"mlp\.(gate|up)_proj\.bias", lambda m, s: [_vec(m[0], ffn(m[1], s[0]))]),
        (layer + r"mlp\.down_proj\.weight", lambda m, s: [_mat(m[0], res, ffn(m[1], s[1]))]),
        (layer + r"mlp\.down_proj\.bias", lambda m, s: [_vec(m[0], res)]),
        (layer + r"(input_layernorm|post_attention_layernorm)\.weight", lambda m, s: [_vec(m[0], res)]),
        (r"(?:.*\.)?norm\.weight", lambda m, s: [_vec(m[0], res)]),
        (r"(?:.*\.)?embed_tokens\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"(lm_head|score|classifier|qa_outputs)\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"(lm_head|score|classifier|qa_outputs)\.bias", lambda m, s: [_fixed(m[0], s)]),
    ]
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    return b.build(_shapes(model), rules)


def gpt2_spec(model: nn.Module) -> PermutationSpec:
    """GPT-2: pre-LayerNorm, learned positions ``wpe``, ``Conv1D`` weights stored ``(in, out)``, fused ``c_attn``.

    ``c_attn`` output columns are ``[q | k | v]`` (``split(embed_dim, dim=2)``), each viewed as ``(heads, head_dim)``.
    Permutations: ``res``; per layer ``head.L``; ``qk.L`` nested in ``head.L`` (the same order on the query and key
    dimensions of a head keeps ``q . k``: no RoPE here); ``vo.L`` nested in ``head.L``; ``ffn.L``.
    """
    cfg = model.config
    d_model, n_heads = cfg.n_embd, cfg.n_head
    head_dim = d_model // n_heads
    b = _Builder(cfg.model_type)
    res = ((b.perm("res", d_model), d_model),)

    def heads(layer: str, inner: str) -> AxisSpec:
        return b.heads(layer, inner, n_heads, head_dim)

    def c_attn(m: re.Match, s: tuple[int, ...]) -> list[WeightEntry]:
        out = []
        for k, inner in enumerate(("qk", "qk", "vo")):
            cols = heads(m[1], inner)
            if m[2] == "weight":
                out.append(_mat(m[0], res, cols, (1, k * d_model, (k + 1) * d_model)))
            else:
                out.append(WeightEntry(m[0], (cols,), (0, k * d_model, (k + 1) * d_model)))
        return out

    def ffn(layer: str, n: int) -> AxisSpec:
        return b.ffn(layer, n)

    layer = r"(?:.*\.)?h\.(\d+)\."
    rules: list[Rule] = [
        (layer + r"attn\.c_attn\.(weight|bias)", c_attn),
        (layer + r"attn\.c_proj\.weight", lambda m, s: [_mat(m[0], heads(m[1], "vo"), res)]),
        (layer + r"attn\.c_proj\.bias", lambda m, s: [_vec(m[0], res)]),
        (layer + r"mlp\.c_fc\.weight", lambda m, s: [_mat(m[0], res, ffn(m[1], s[1]))]),
        (layer + r"mlp\.c_fc\.bias", lambda m, s: [_vec(m[0], ffn(m[1], s[0]))]),
        (layer + r"mlp\.c_proj\.weight", lambda m, s: [_mat(m[0], ffn(m[1], s[0]), res)]),
        (layer + r"mlp\.c_proj\.bias", lambda m, s: [_vec(m[0], res)]),
        (layer + r"ln_(1|2)\.(weight|bias)", lambda m, s: [_vec(m[0], res)]),
        (r"(?:.*\.)?ln_f\.(weight|bias)", lambda m, s: [_vec(m[0], res)]),
        (r"(?:.*\.)?(wte|wpe)\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"(lm_head|score)\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"(lm_head|score)\.bias", lambda m, s: [_fixed(m[0], s)]),
    ]
    return b.build(_shapes(model), rules)


# BERT heads that read the pooled output (the rest read the sequence output, which lives in the residual basis).
_POOLED_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining")


def bert_spec(model: nn.Module) -> PermutationSpec:
    """BERT: post-LayerNorm, absolute + token-type embeddings, pooler, tied MLM decoder.

    LayerNorm commutes with a permutation of its features, so one residual permutation ``res`` runs through the
    embeddings, every sub-layer output and every LayerNorm. Per layer ``head.L`` with nested ``qk.L`` and ``vo.L``
    (no RoPE) and ``ffn.L``. The pooler's output units get their own ``pooler`` permutation when a head reads them
    (sequence classification, multiple choice, NSP); in a bare ``BertModel`` they are an output and stay fixed. The
    MLM transform writes into the (tied) word-embedding basis, so its rows are ``res`` too.
    """
    cfg = model.config
    d_model, n_heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = d_model // n_heads
    b = _Builder(cfg.model_type)
    res = ((b.perm("res", d_model), d_model),)
    pooled = type(model).__name__.endswith(_POOLED_HEADS)
    pool = ((b.perm("pooler", d_model), d_model),) if pooled else ((None, d_model),)

    def heads(layer: str, inner: str) -> AxisSpec:
        return b.heads(layer, inner, n_heads, head_dim)

    def ffn(layer: str, n: int) -> AxisSpec:
        return b.ffn(layer, n)

    def attn_in(m: re.Match, s: tuple[int, ...]) -> list[WeightEntry]:
        rows = heads(m[1], "vo" if m[2] == "value" else "qk")
        return [_mat(m[0], rows, res) if m[3] == "weight" else _vec(m[0], rows)]

    layer = r"(?:.*\.)?encoder\.layer\.(\d+)\."
    head_in = pool if pooled else res
    rules: list[Rule] = [
        (layer + r"attention\.self\.(query|key|value)\.(weight|bias)", attn_in),
        (layer + r"attention\.output\.dense\.weight", lambda m, s: [_mat(m[0], res, heads(m[1], "vo"))]),
        (layer + r"(attention\.output\.dense\.bias|attention\.output\.LayerNorm\.(weight|bias)|output\.LayerNorm\.(weight|bias)|output\.dense\.bias)",
         lambda m, s: [_vec(m[0], res)]),
        (layer + r"intermediate\.dense\.weight", lambda m, s: [_mat(m[0], ffn(m[1], s[0]), res)]),
        (layer + r"intermediate\.dense\.bias", lambda m, s: [_vec(m[0], ffn(m[1], s[0]))]),
        (layer + r"output\.dense\.weight", lambda m, s: [_mat(m[0], res, ffn(m[1], s[1]))]),
        (r"(?:.*\.)?embeddings\.(word|position|token_type)_embeddings\.weight",
         lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"(?:.*\.)?embeddings\.LayerNorm\.(weight|bias)", lambda m, s: [_vec(m[0], res)]),
        (r"(?:.*\.)?pooler\.dense\.weight", lambda m, s: [_mat(m[0], pool, res)]),
        (r"(?:.*\.)?pooler\.dense\.bias", lambda m, s: [_vec(m[0], pool)]),
        (r"cls\.predictions\.transform\.dense\.weight", lambda m, s: [_mat(m[0], res, res)]),
        (r"cls\.predictions\.transform\.(dense\.bias|LayerNorm\.(weight|bias))", lambda m, s: [_vec(m[0], res)]),
        (r"cls\.predictions\.decoder\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), res)]),
        (r"cls\.predictions\.(decoder\.)?bias", lambda m, s: [_fixed(m[0], s)]),
        (r"cls\.seq_relationship\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), pool)]),
        (r"(classifier|qa_outputs)\.weight", lambda m, s: [_mat(m[0], ((None, s[0]),), head_in)]),
        (r"(cls\.seq_relationship|classifier|qa_outputs)\.bias", lambda m, s: [_fixed(m[0], s)]),
    ]
    return b.build(_shapes(model), rules)


_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                nn.Identity, nn.Dropout)


def mlp_spec(model: nn.Sequential) -> PermutationSpec:
    """An ``nn.Sequential`` of Linear layers and elementwise activations (an ``nn.Flatten`` may come first).

    Hidden layer ``k`` (the output of the ``k``-th Linear, not the last) gets permutation ``h{k}``: rows of that
    Linear and its bias, columns of the next Linear.
    """
    linears = []
    for index, module in enumerate(model):
        if isinstance(module, nn.Linear):
            linears.append(str(index))
        elif isinstance(module, nn.Flatten) and not linears:
            continue
        elif not isinstance(module, _ELEMENTWISE):
            raise ValueError(f"unsupported layer in nn.Sequential: module {index} is {type(module).__name__}; "
                             "mlp_spec handles Linear and elementwise activations; write a PermutationSpec "
                             "(PermutationSpec.from_axes) for other layers")
    if len(linears) < 2:
        raise ValueError("mlp_spec: an nn.Sequential needs at least two Linear layers to have a hidden layer")
    axes: dict[str, tuple] = {}
    for k, name in enumerate(linears):
        rows = f"h{k}" if k < len(linears) - 1 else None
        cols = f"h{k - 1}" if k > 0 else None
        axes[f"{name}.weight"] = (rows, cols)
        if model[int(name)].bias is not None:
            axes[f"{name}.bias"] = (rows,)
    return PermutationSpec.from_axes(model, axes, model_type="mlp")


SPEC_BUILDERS: dict[str, Callable[[nn.Module], PermutationSpec]] = {
    "llama": llama_spec,
    "mistral": llama_spec,
    "qwen2": llama_spec,
    "qwen3": llama_spec,
    "gpt2": gpt2_spec,
    "bert": bert_spec,
}


def register_spec_builder(model_type: str, builder: Callable[[nn.Module], PermutationSpec]) -> None:
    """Make :func:`permutation_spec` use ``builder(model)`` for ``config.model_type == model_type``."""
    SPEC_BUILDERS[model_type] = builder


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The built-in spec for ``model``: by ``config.model_type``, or :func:`mlp_spec` for an ``nn.Sequential``.

    Raises:
        ValueError: a PEFT model, an unsupported ``model_type`` (named), or a parameter no rule covers.
    """
    check_not_peft(model)
    if isinstance(model, nn.Sequential):
        return mlp_spec(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ValueError(f"no built-in permutation spec for {type(model).__name__} (no config.model_type and not an "
                         "nn.Sequential); pass spec=PermutationSpec.from_axes(model, {...})")
    if model_type not in SPEC_BUILDERS:
        raise ValueError(f"unsupported model_type {model_type!r} for permutation merging; supported: "
                         f"{sorted(SPEC_BUILDERS)}. Write a PermutationSpec (PermutationSpec.from_axes) or "
                         "register a builder with register_spec_builder")
    return SPEC_BUILDERS[model_type](model)
