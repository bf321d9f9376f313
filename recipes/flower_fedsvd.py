"""Federated LoRA (FedSVD, FFA-LoRA or FedAvg-LoRA) under Flower's simulation engine, optionally with DP clients.

Packaged all-MiniLM-L6-v2 + LoRA (``hf_svd_plugins.examples``) learns binary sentiment on the Rotten Tomatoes
snippets (offline, from package data). The training snippets are split into Dirichlet(alpha) non-IID client shards by
label; every round Flower samples ``--fraction`` of the clients, each trains ``--local-steps`` steps of LoRA B (A too
for ``fedavg_lora``) with an HF Trainer, and the server aggregates and evaluates the global adapter on the test
snippets. With ``--dp-noise-multiplier`` clients train with ``DPTrainer`` (DP-SGD); each client's accountant lives
in its Flower ``context.state``, so its epsilon and ``--max-epsilon`` cover every round it took part in.

    python recipes/flower_fedsvd.py                                   # non-private FedSVD, a few minutes on 2 CPUs
    python recipes/flower_fedsvd.py --method ffa_lora --fraction 0.5 --rounds 8   # 2 of 4 clients per round
    python recipes/flower_fedsvd.py --dp-noise-multiplier 1.0 --max-epsilon 8

Writes ``final.safetensors`` (the global adapter and classifier head) and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

METHODS = ("fedsvd", "ffa_lora", "fedavg_lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (``parser.error`` names the bad option)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="fedsvd", choices=METHODS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=4, help="Flower supernodes, one data shard each")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the clients trained per round")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the label split")
    p.add_argument("--batch-size", type=int, default=16, help="per-client batch (the expected batch under DP)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-length", type=int, default=48, help="tokens per snippet")
    p.add_argument("--train-size", type=int, default=1600, help="training snippets split among the clients")
    p.add_argument("--test-size", type=int, default=400, help="test snippets for the server's evaluation")
    p.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="DP-SGD noise multiplier sigma; enables DPTrainer clients (per-example clipping to "
                        "--max-grad-norm)")
    p.add_argument("--max-epsilon", type=float, default=None,
                   help="a DP client stops when one more step would exceed this epsilon (over all its rounds)")
    p.add_argument("--delta", type=float, default=None, help="DP delta (default min(1e-5, 1/(10 N)) per client)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP clipping bound C")
    p.add_argument("--num-cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPUs Ray may use")
    p.add_argument("--threads", type=int, default=1, help="torch threads per client / server process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/flower_fedsvd")
    args = p.parse_args(argv)

    for name in ("rounds", "clients", "local_steps", "batch_size", "rank", "max_length", "num_cpus", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if int(args.clients * args.fraction) < 1:
        p.error(f"--fraction {args.fraction} of --clients {args.clients} selects int({args.clients} x {args.fraction}) = 0 clients "
                f"per round; use --fraction >= {1 / args.clients:.3g}")
    if args.alpha <= 0:
        p.error(f"--alpha must be > 0, got {args.alpha}")
    if args.train_size < 2 * args.clients or args.test_size < 1:
        p.error(f"--train-size must be >= 2 x --clients ({2 * args.clients}) and --test-size >= 1")
    if args.dp_noise_multiplier is None and (args.max_epsilon is not None or args.delta is not None):
        p.error("--max-epsilon and --delta need --dp-noise-multiplier (DP clients)")
    if args.dp_noise_multiplier is not None and args.dp_noise_multiplier < 0:
        p.error(f"--dp-noise-multiplier must be >= 0, got {args.dp_noise_multiplier}")
    if args.max_epsilon is not None and args.max_epsilon <= 0:
        p.error(f"--max-epsilon must be > 0, got {args.max_epsilon}")
    return args


def client_shards(args: argparse.Namespace):
    """``(tokenizer, [client datasets], test dataset)``: Dirichlet(alpha) shards of the training snippets."""
    import torch
    from transformers import AutoTokenizer

    from hf_svd_plugins.examples import LabelledText, TokenizedClassification, minilm_path, rotten_tomatoes
    from hf_svd_plugins.fedsvd import partition_dirichlet

    train, test = rotten_tomatoes(seed=args.seed)
    train = LabelledText(train.text[: args.train_size], train.label[: args.train_size])
    test = LabelledText(test.text[: args.test_size], test.label[: args.test_size])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train_ds = TokenizedClassification(train, tokenizer, args.max_length)
    shards = partition_dirichlet(train.label, args.clients, args.alpha, seed=args.seed)
    return tokenizer, [torch.utils.data.Subset(train_ds, s) for s in shards], TokenizedClassification(
        test, tokenizer, args.max_length
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the federation; returns the server's ``metrics.json`` content."""
    args = parse_args(argv)

    import logging

    import torch
    from flwr.simulation import run_simulation
    from transformers import DataCollatorWithPadding

    from hf_svd_plugins.examples import minilm_lora_classifier
    from hf_svd_plugins.fedsvd import accuracy_metrics
    from hf_svd_plugins.fedsvd.flower import make_client_app, make_evaluate_fn, make_server_app

    # Opacus calls logging.basicConfig on import; without this every Flower log line is printed twice.
    logging.getLogger("flwr").propagate = False
    torch.set_num_threads(args.threads)
    tokenizer, shards, test_ds = client_shards(args)
    collator = DataCollatorWithPadding(tokenizer)
    print(f"{args.method}: {args.clients} clients (Dirichlet({args.alpha}) shard sizes {[len(s) for s in shards]}), "
          f"{args.fraction:g} of them per round, {args.rounds} rounds x {args.local_steps} local steps", flush=True)

    def model_fn() -> torch.nn.Module:
        torch.set_num_threads(args.threads)  # also in every Ray worker that builds a model
        return minilm_lora_classifier(args.rank, seed=args.seed)[0]

    def dataset_fn(partition_id: int, num_partitions: int) -> torch.utils.data.Dataset:
        return shards[partition_id]

    training_args = {"per_device_train_batch_size": args.batch_size, "learning_rate": args.lr,
                     "lr_scheduler_type": "constant", "use_cpu": True, "dataloader_num_workers": 0}
    trainer_cls, trainer_kwargs = None, None
    if args.dp_noise_multiplier is not None:
        from hf_svd_plugins.dp import DPConfig, DPTrainer

        trainer_cls = DPTrainer
        trainer_kwargs = {"dp_config": DPConfig(noise_multiplier=args.dp_noise_multiplier,
                                                max_grad_norm=args.max_grad_norm, max_epsilon=args.max_epsilon,
                                                target_delta=args.delta)}
        training_args["max_grad_norm"] = 0.0  # DP clips per example; the Trainer's batch clipping is off
        print(f"DP clients: sigma={args.dp_noise_multiplier}, C={args.max_grad_norm}, "
              f"max_epsilon={args.max_epsilon}", flush=True)

    evaluate_fn = make_evaluate_fn(
        model_fn, test_ds, data_collator=collator, compute_metrics=accuracy_metrics,
        training_args={"per_device_eval_batch_size": 64, "use_cpu": True, "dataloader_num_workers": 0},
        output_dir=os.path.join(args.out, "eval"),
    )
    server = make_server_app(
        model_fn, method=args.method, num_rounds=args.rounds, fraction_train=args.fraction,
        min_available_nodes=args.clients, evaluate_fn=evaluate_fn, output_dir=args.out,
    )
    client = make_client_app(
        model_fn, dataset_fn, local_steps=args.local_steps, seed=args.seed, training_args=training_args,
        data_collator=collator, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs,
        output_dir=os.path.join(args.out, "clients"),
    )
    run_simulation(
        server_app=server, client_app=client, num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.num_cpus}},
    )

    path = os.path.join(args.out, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"the Flower run did not finish ({path} is missing); see the log above")
    with open(path) as f:
        metrics = json.load(f)
    print("\nround  accuracy  eval_loss  train_loss  epsilon_max")
    for rnd, ev in sorted(metrics["server_eval"].items(), key=lambda kv: int(kv[0])):
        train = metrics["train"].get(rnd, {})
        eps = train.get("epsilon-max")
        print(f"{int(rnd):5d}  {ev['eval_accuracy']:8.4f}  {ev['eval_loss']:9.4f}  "
              f"{train.get('train-loss', float('nan')):10.4f}  {'-' if eps is None else f'{eps:.3f}':>11s}")
    print(f"\nfinal adapter: {os.path.join(args.out, 'final.safetensors')}; metrics: {path}")
    return metrics


if __name__ == "__main__":
    main()
