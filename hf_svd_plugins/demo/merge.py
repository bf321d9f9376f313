"""Step 5: two MLPs trained on digits from different seeds, merged naively and by weight matching.

The digits MLP is the setting where ``benchmarks/merging.py`` shows weight matching working (barrier cut ~99%); on the
tiny character LMs trained on Hamlet it cut the barrier only 22-26% (docs/merging.md), too little to show in a demo.
"""

from __future__ import annotations

from hf_svd_plugins.demo.common import DemoContext, StepResult, fmt

TITLE = "Permutation merging (two 64-128-128-128-10 MLPs on scikit-learn digits, seeds 0 and 1)"
WIDTH = 128


def _check_reload(merged, path: str, x) -> float:
    import torch
    from safetensors.torch import load_file

    from hf_svd_plugins.examples import digits_mlp

    reloaded = digits_mlp(WIDTH)
    reloaded.load_state_dict(load_file(path))
    with torch.no_grad():
        diff = (merged(x) - reloaded.eval()(x)).abs().max().item()
    if diff > 1e-6:
        raise RuntimeError(f"the reloaded merged model changes the logits by {diff:.2e}")
    return diff


def run(ctx: DemoContext) -> StepResult:
    from safetensors.torch import save_file

    from hf_svd_plugins.examples import digits_mlp, digits_splits, train_digits_mlp
    from hf_svd_plugins.merging import align_models, merge_models
    from hf_svd_plugins.merging.diagnostics import interpolation_path, l2_distance, plot_interpolation
    from hf_svd_plugins.merging.merge import load_state_into

    epochs = 10 if ctx.quick else 40
    points = 7 if ctx.quick else 11
    train, test = digits_splits()
    with ctx.bar(2 * epochs + 2 * points, "train 2 MLPs, interpolate") as bar:
        a, b = (train_digits_mlp(ctx.seed + k, train, WIDTH, epochs, on_epoch=lambda: bar.update(1))
                for k in range(2))
        alignment = align_models([a, b], method="weight_matching", seed=ctx.seed)
        _, b_aligned = alignment.aligned_states([a, b])
        paths = {}
        for label, other in (("naive", b), ("weight matching", b_aligned)):
            paths[label] = interpolation_path(a, other, [test], num_points=points)
            bar.update(points)
    merged = merge_models([a, b], method="weight_matching", seed=ctx.seed)
    path = ctx.path("merge", "merged_mlp.safetensors")
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, path)
    diff = _check_reload(merged, path, test[0])

    rows = []
    for label, p in paths.items():
        mid = len(p.lambdas) // 2
        rows.append([label, fmt(p.losses[0]), fmt(p.losses[-1]), fmt(p.losses[mid]), fmt(p.accuracies[mid]),
                     fmt(p.barrier), fmt(p.accuracy_barrier)])
    naive, matched = paths["naive"].barrier, paths["weight matching"].barrier
    cut = (1 - matched / naive) * 100 if naive > 0 else 0.0
    notes = [
        f"weight matching cuts the loss barrier from {naive:.3f} to {matched:.3f} nats ({cut:.0f}% lower); "
        f"L2 distance A-B {l2_distance(a, b):.1f} before alignment, {l2_distance(a, load_state_into(digits_mlp(WIDTH), b_aligned)):.1f} after",
        f"merged model (A + pi(B)) / 2 saved as safetensors and reloaded into a fresh MLP: logits within {diff:.1e}",
    ]
    png = plot_interpolation(paths, ctx.path("merge.png"), title="digits MLP: (1 - l) A + l B, naive vs weight matching",
                             ylabel="test loss (nats)")
    headers = ["B as", "loss A", "loss B", "loss at l=0.5", "acc at l=0.5", "loss barrier", "acc barrier"]
    return StepResult(headers, rows, png, {"merged MLP": path}, notes)
