"""Why does weight matching cut the language models' barrier so much less than the MLP's? Measurements on the
models ``benchmarks/merging.py`` trained (``--out`` of that run, pair of seeds 0 and 1):

* ``planted``: the trained model A against a planted random permutation of itself: logits unchanged, the planted
  alignment recovered bit for bit, zero barrier (a spec or permutation bug would show here).
* ``variants``: the objective per weight (identity -> WM; layer-norm gains are a near-constant term), and WM with
  every weight scaled to unit Frobenius norm, with the norm gains left out, without the warm start, with other seeds.
* ``anchor`` (GPT-2): the rank of the warm start's residual cost (``wte`` and ``wpe`` rows only), and WM from a
  data-free start that sees every residual weight (rows compared as sorted multisets, invariant to the order of
  the weight's other axis).
* ``search``: is coordinate descent stuck? WM from activation matching's and STE's permutations, and from random
  restarts: objective vs held-out barrier.

    nice -n 10 python benchmarks/merging_diagnosis.py --out /tmp/mbench --family gpt2 --checks planted variants search
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from merging import CharData  # noqa: E402

from hf_svd_plugins.merging import (  # noqa: E402
    align_models,
    apply_permutations,
    match_states,
    permutation_spec,
    random_permutations,
)
from hf_svd_plugins.merging.diagnostics import interpolation_path  # noqa: E402
from hf_svd_plugins.merging.inputs import model_state  # noqa: E402
from hf_svd_plugins.merging.matching import MatchResult, _Matcher, factor_matrix  # noqa: E402
from hf_svd_plugins.merging.permute import check_permutations, entry_view, permute_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the --out directory of a benchmarks/merging.py run")
    parser.add_argument("--family", choices=["gpt2", "llama"], required=True)
    parser.add_argument("--checks", nargs="+", default=["planted", "variants", "search"])
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    import transformers as tf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    data = CharData(64, 32)
    ev, calib = data.val_batches(args.eval_batches), data.calib_batches(8)
    cls = tf.GPT2LMHeadModel if args.family == "gpt2" else tf.LlamaForCausalLM
    a, b = (cls.from_pretrained(os.path.join(args.out, "models", f"{args.family}_seed{s}")).eval() for s in (0, 1))
    spec = permutation_spec(a)
    sa, sb = model_state(a), model_state(b)

    def barrier(state) -> float:
        return interpolation_path(a, state, ev, 11).barrier

    def objective(perms) -> tuple[float, dict]:
        aligned = permute_state(sb, spec, perms)
        return sum(float((sa[k].double() * aligned[k].double()).sum()) for k in sa), aligned

    def report(label: str, perms) -> tuple[float, float]:
        value, aligned = objective(perms)
        bar = barrier(aligned)
        print(f"  {label:40s} objective {value:9.2f}  held-out barrier {bar:.4f}", flush=True)
        return value, bar

    print(f"{args.family} from {args.out}: d_model {a.config.hidden_size}, permutations "
          f"{ {n: spec.perm_shape(n) for n in spec.perms} }")
    wm = match_states(sa, sb, spec)
    if "planted" in args.checks:
        planted = random_permutations(spec, torch.Generator().manual_seed(3))
        copy = apply_permutations(a, planted, spec, inplace=False)
        with torch.no_grad():
            x = ev[0]["input_ids"][:4]
            drift = float((a(input_ids=x).logits - copy(input_ids=x).logits).abs().max())
        found = match_states(sa, model_state(copy), spec)
        back = permute_state(model_state(copy), spec, found.perms)
        error = max(float((sa[k] - back[k]).abs().max()) for k in back)
        print(f"  planted: logits max |diff| {drift:.2e}; max |A - pi(copy)| after WM {error}; "
              f"barrier {barrier(back):.4f}; passes {found.passes}")
    if "variants" in args.checks:
        _, aligned = objective(wm.perms)
        print("  objective per weight, identity -> WM (and <A, A>):")
        for k in sa:
            print(f"    {k:48s} {float((sa[k] * sb[k]).sum()):9.2f} -> {float((sa[k] * aligned[k]).sum()):9.2f}"
                  f"   ({float((sa[k] ** 2).sum()):.2f})")
        report("naive (identity)", {n: torch.arange(spec.perm_shape(n)[-1]).expand(spec.perm_shape(n)).clone()
                                    for n in spec.perms})
        print(f"  WM default: objective per pass {[round(v, 2) for v in wm.objective]}")
        again = match_states(sa, sb, spec, init=wm.perms, compute_dtype=torch.float64)
        same = all(torch.equal(wm.perms[n], again.perms[n]) for n in spec.perms)
        print(f"  WM restarted in float64 at its result: passes {again.passes}, same permutations {same}")
        report("WM default", wm.perms)
        norm = ("ln_", "norm")
        for label, scale in (("WM, every weight at unit norm", lambda k, t: t / t.norm()),
                             ("WM, norm gains left out", lambda k, t: t * 0 if any(s in k for s in norm) else t)):
            scaled_a = {k: scale(k, v) for k, v in sa.items()}
            scaled_b = {k: scale(k, v) for k, v in sb.items()}
            report(label, match_states(scaled_a, scaled_b, spec).perms)
        report("WM without warm start", match_states(sa, sb, spec, warm_start=False).perms)
        for seed in (1, 2):
            report(f"WM seed {seed}", match_states(sa, sb, spec, seed=seed).perms)
    if "anchor" in args.checks and args.family == "gpt2":
        anchor_a = torch.cat([a.transformer.wte.weight, a.transformer.wpe.weight]).detach().double()
        anchor_b = torch.cat([b.transformer.wte.weight, b.transformer.wpe.weight]).detach().double()
        singular = torch.linalg.svdvals(anchor_a.T @ anchor_b)
        print(f"  warm-start residual cost: {anchor_a.shape[0]} embedding rows, rank "
              f"{int((singular > singular[0] * 1e-10).sum())} of {singular.numel()}")
        report("WM default", wm.perms)
        report("WM from the sorted-row start", sorted_row_start(sa, sb, spec))
    if "search" in args.checks:
        for method in ("activation", "ste"):
            perms = align_models([a, b], method=method, data=calib, seed=0).perms[1]
            report(method, perms)
            report(f"WM started from {method}", match_states(sa, sb, spec, init=perms).perms)
        rows = [report(f"WM from random start {k}", match_states(
            sa, sb, spec, init=random_permutations(spec, torch.Generator().manual_seed(100 + k)), seed=k).perms)
            for k in range(args.restarts)]
        values, bars = np.array(rows).T
        print(f"  random starts: barrier at the best objective {bars[values.argmax()]:.4f}, lowest {bars.min():.4f}, "
              f"corr(objective, barrier) {np.corrcoef(values, bars)[0, 1]:.2f}")


def sorted_row_start(sa, sb, spec):
    """Residual stream from every weight touching it (rows as sorted multisets where the other axis is permuted),
    then each other top-level permutation given it, then coordinate descent."""
    from scipy.optimize import linear_sum_assignment

    size = spec.perms["res"].size
    cost = torch.zeros(size, size, dtype=torch.float64)
    for index, axis, factor in spec.touching("res"):
        entry = spec.entries[index]
        rows_a = factor_matrix(entry_view(sa[entry.param], entry), entry, axis, factor, spec).double()
        rows_b = factor_matrix(entry_view(sb[entry.param], entry), entry, axis, factor, spec).double()
        if any(p is not None for k, ax in enumerate(entry.axes) if k != axis for p, _ in ax):
            rows_a, rows_b = rows_a.sort(dim=1).values, rows_b.sort(dim=1).values
        cost += rows_a @ rows_b.T
    res = torch.from_numpy(linear_sum_assignment(cost.numpy(), maximize=True)[1]).long()
    matcher = _Matcher(sa, sb, spec, check_permutations(spec, {}), torch.float32, torch.device("cpu"))
    matcher._reindex("res", res)
    for name in spec.perms:
        if name != "res" and spec.perms[name].parent is None:
            matcher.step(name, 1e-6, MatchResult(perms={}))
    return match_states(sa, sb, spec, init=matcher.perms).perms


if __name__ == "__main__":
    main()
