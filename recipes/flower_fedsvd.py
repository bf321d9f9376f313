"""Federated LoRA (FedSVD, FFA-LoRA or FedAvg-LoRA) of MiniLM on Rotten Tomatoes under Flower's simulation engine.

The apps live in ``recipes/flower_fedsvd_app/fedsvd_app.py``, a Flower App that ``flwr run`` also deploys to a real
SuperLink and SuperNodes (docs/deploy.md); this script runs the same apps under ``flwr.simulation`` (Ray). Options:
``python recipes/flower_fedsvd.py --help``.

    python recipes/flower_fedsvd.py                                   # non-private FedSVD, a few minutes on 2 CPUs
    python recipes/flower_fedsvd.py --method ffa_lora --fraction 0.5 --rounds 8
    python recipes/flower_fedsvd.py --target-epsilon 8 --max-grad-norm 0.5   # DP clients, epsilon 8 over all rounds
    python recipes/flower_fedsvd.py --dp-noise-multiplier 1.0 --max-epsilon 8

One process drives the simulation (Ray starts the workers); ``accelerate launch`` with several processes is refused.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "flower_fedsvd_app"))

from fedsvd_app import build_apps, client_shards, parse_args  # noqa: E402

from hf_svd_plugins.recipe_args import require_launch_config, saved  # noqa: E402

__all__ = ["client_shards", "main", "parse_args", "print_metrics", "run"]


def print_metrics(metrics: dict) -> None:
    """The per-round table of a run's ``metrics.json``."""
    print("\nround  accuracy  eval_loss  train_loss  epsilon_max")
    for rnd, ev in sorted(metrics["server_eval"].items(), key=lambda kv: int(kv[0])):
        train = metrics["train"].get(rnd, {})
        eps = train.get("epsilon-max")
        print(f"{int(rnd):5d}  {ev['eval_accuracy']:8.4f}  {ev['eval_loss']:9.4f}  "
              f"{train.get('train-loss', float('nan')):10.4f}  {'-' if eps is None else f'{eps:.3f}':>11s}")


def main(argv: list[str] | None = None) -> dict:
    """Run the federation under the simulation engine; returns the server's ``metrics.json`` content."""
    return run(parse_args(argv))


def run(args) -> dict:
    """:func:`main` for parsed arguments, e.g. ``fedsvd_app.args_from_run_config(run_config)``: a Flower run config
    (the app's ``pyproject.toml`` keys) under the simulation engine."""
    require_launch_config("the Flower simulation", ("single",))
    from flwr.simulation import run_simulation

    server, client = build_apps(args)
    run_simulation(
        server_app=server, client_app=client, num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.num_cpus}},
    )
    path = os.path.join(args.out, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"the Flower run did not finish ({path} is missing); see the log above")
    with open(path) as f:
        metrics = json.load(f)
    print_metrics(metrics)
    saved(f"the final adapter (metrics: {path})", os.path.join(args.out, "final.safetensors"))
    return metrics


if __name__ == "__main__":
    main()
