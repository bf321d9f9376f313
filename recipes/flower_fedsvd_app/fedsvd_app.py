"""Federated LoRA (FedSVD, FFA-LoRA or FedAvg-LoRA) under Flower, optionally with DP clients: the Flower App.

This module is both the app that ``recipes/flower_fedsvd.py`` runs under Flower's simulation engine and the Flower App
(``server_app``, ``client_app``, configured by ``pyproject.toml`` next to it) that ``flwr run`` sends to a SuperLink
under the deployment engine (docs/deploy.md). Both build the same apps with :func:`build_apps`.

Packaged all-MiniLM-L6-v2 + LoRA (``hf_svd_plugins.examples``) learns binary sentiment on the Rotten Tomatoes
snippets (offline, from package data). The training snippets are split into Dirichlet(alpha) non-IID client shards by
label; every round Flower samples ``--fraction`` of the clients, each trains ``--local-steps`` steps of LoRA B (A too
for ``fedavg_lora``) with an HF Trainer, and the server aggregates and evaluates the global adapter on the test
snippets. With ``--target-epsilon`` (or a fixed ``--dp-noise-multiplier``) clients train with ``DPTrainer``
(DP-SGD, per-example clipping to ``--max-grad-norm``); each client's accountant lives in its Flower
``context.state``, so its epsilon and budget cover every round it took part in. ``--target-epsilon E`` calibrates
each client's sigma so that taking part in all ``rounds x local-steps`` steps spends exactly E at ``--delta``, and
stops a client before a step that would exceed E. In a Flower run config (``pyproject.toml``, ``--run-config``),
``target-epsilon = 0`` (the default) is non-private and ``delta = 0`` means the default delta.

    python recipes/flower_fedsvd.py                                   # non-private FedSVD, a few minutes on 2 CPUs
    python recipes/flower_fedsvd.py --method ffa_lora --fraction 0.5 --rounds 8   # 2 of 4 clients per round
    python recipes/flower_fedsvd.py --target-epsilon 8                 # DP clients, epsilon 8 each over all rounds
    python recipes/flower_fedsvd.py --dp-noise-multiplier 1.0 --max-epsilon 8
    flwr run recipes/flower_fedsvd_app local-deployment --run-config "rounds=3"   # a running SuperLink, docs/deploy.md
    flwr run recipes/flower_fedsvd_app local-deployment --run-config "target-epsilon=8 max-grad-norm=0.5"

Writes ``final.safetensors`` (the global adapter and classifier head) and ``metrics.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

METHODS = ("fedsvd", "ffa_lora", "fedavg_lora")


class _RunConfigParser(argparse.ArgumentParser):
    """Parses a Flower run config: a bad value raises ``ValueError`` (the ServerApp/ClientApp fails with the message)
    instead of printing usage and exiting."""

    def error(self, message: str):
        raise ValueError(f"invalid Flower run config: {message} (run-config keys are the options of "
                         "recipes/flower_fedsvd.py without the leading '--'; see recipes/flower_fedsvd_app/pyproject.toml)")


def parse_args(argv: list[str] | None = None, *, parser_class: type = argparse.ArgumentParser) -> argparse.Namespace:
    """Parse and validate the command line (``parser.error`` names the bad option)."""
    p = parser_class(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--target-epsilon", type=float, default=None,
                   help="DPTrainer clients, sigma calibrated per client so that all rounds x local steps spend this "
                        "epsilon at --delta (0 or absent: non-private)")
    p.add_argument("--dp-noise-multiplier", type=float, default=None,
                   help="instead of --target-epsilon: a fixed DP-SGD noise multiplier sigma for DPTrainer clients")
    p.add_argument("--max-epsilon", type=float, default=None,
                   help="a DP client stops when one more step would exceed this epsilon (over all its rounds; "
                        "default: --target-epsilon)")
    p.add_argument("--delta", type=float, default=None,
                   help="DP delta (0 or absent: min(1e-5, 1/(10 N)) with N the client's shard size)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP per-example clipping bound C")
    p.add_argument("--num-cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPUs Ray may use")
    p.add_argument("--threads", type=int, default=1, help="torch threads per client / server process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/flower_fedsvd")
    p.add_argument("--report-to", default="none",
                   help="the server's per-round metrics (step = round) to these integrations, as the Trainer's "
                        "report_to: 'tensorboard' writes OUT/runs/server-run<run id>; comma-separated for several")
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
    if args.target_epsilon is not None and args.target_epsilon < 0:
        p.error(f"--target-epsilon must be > 0 (0: non-private), got {args.target_epsilon}")
    if args.target_epsilon == 0:
        args.target_epsilon = None
    if args.delta is not None and not 0 <= args.delta < 1:
        p.error(f"--delta must be in [0, 1): 0 means the default min(1e-5, 1/(10 N)), got {args.delta}")
    if args.delta == 0:
        args.delta = None
    if args.target_epsilon is not None and args.dp_noise_multiplier is not None:
        p.error("--target-epsilon and --dp-noise-multiplier exclude each other (one calibrates the other)")
    private = args.target_epsilon is not None or args.dp_noise_multiplier is not None
    if not private and (args.max_epsilon is not None or args.delta is not None):
        p.error("--max-epsilon and --delta need DP clients (--target-epsilon or --dp-noise-multiplier)")
    if args.dp_noise_multiplier is not None and args.dp_noise_multiplier < 0:
        p.error(f"--dp-noise-multiplier must be >= 0, got {args.dp_noise_multiplier}")
    if args.max_epsilon is not None and args.max_epsilon <= 0:
        p.error(f"--max-epsilon must be > 0, got {args.max_epsilon}")
    if not args.max_grad_norm > 0:
        p.error(f"--max-grad-norm must be > 0 (the DP clipping bound), got {args.max_grad_norm}")
    from hf_svd_plugins.fedsvd.reporting import check_report_to

    args.report_to = [name.strip() for name in args.report_to.split(",")]
    try:  # names only: every SuperNode parses the run config too; the server checks the packages (make_server_app)
        check_report_to(args.report_to, "--report-to", check_installed=False)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
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


def build_apps(args: argparse.Namespace):
    """``(server_app, client_app)`` for ``args`` (from :func:`parse_args`): what both Flower engines run."""
    import logging

    import torch
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
        torch.set_num_threads(args.threads)  # also in every worker process that builds a model
        return minilm_lora_classifier(args.rank, seed=args.seed)[0]

    def dataset_fn(partition_id: int, num_partitions: int) -> torch.utils.data.Dataset:
        if num_partitions != args.clients or not 0 <= partition_id < num_partitions:
            raise ValueError(f"node_config partition-id={partition_id} num-partitions={num_partitions} does not match "
                             f"--clients {args.clients}; start each SuperNode with --node-config "
                             f"'partition-id=<0..{args.clients - 1}> num-partitions={args.clients}'")
        return shards[partition_id]

    training_args = {"per_device_train_batch_size": args.batch_size, "learning_rate": args.lr,
                     "lr_scheduler_type": "constant", "use_cpu": True, "dataloader_num_workers": 0}
    trainer_cls, trainer_kwargs = None, None
    if args.target_epsilon is not None or args.dp_noise_multiplier is not None:
        from hf_svd_plugins.dp import DPConfig, DPTrainer

        trainer_cls = DPTrainer
        # one budget over every round a client may take part in: its accountant history composes across rounds
        trainer_kwargs = {"dp_config": DPConfig(noise_multiplier=args.dp_noise_multiplier,
                                                target_epsilon=args.target_epsilon,
                                                total_steps=args.rounds * args.local_steps,
                                                max_grad_norm=args.max_grad_norm, max_epsilon=args.max_epsilon,
                                                target_delta=args.delta)}
        training_args["max_grad_norm"] = 0.0  # DP clips per example; the Trainer's batch clipping is off
        noise = (f"target_epsilon={args.target_epsilon} over {args.rounds} x {args.local_steps} steps"
                 if args.target_epsilon is not None else f"sigma={args.dp_noise_multiplier}")
        print(f"DP clients: {noise}, C={args.max_grad_norm}, max_epsilon={args.max_epsilon}", flush=True)

    evaluate_fn = make_evaluate_fn(
        model_fn, test_ds, data_collator=collator, compute_metrics=accuracy_metrics,
        training_args={"per_device_eval_batch_size": 64, "use_cpu": True, "dataloader_num_workers": 0},
        output_dir=os.path.join(args.out, "eval"),
    )
    server = make_server_app(
        model_fn, method=args.method, num_rounds=args.rounds, fraction_train=args.fraction,
        min_available_nodes=args.clients, evaluate_fn=evaluate_fn, output_dir=args.out,
        report_to=args.report_to,
    )
    client = make_client_app(
        model_fn, dataset_fn, local_steps=args.local_steps, seed=args.seed, training_args=training_args,
        data_collator=collator, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs,
        output_dir=os.path.join(args.out, "clients"),
    )
    return server, client


def args_from_run_config(run_config) -> argparse.Namespace:
    """:func:`parse_args` of a Flower run config (``[tool.flwr.app.config]`` plus ``--run-config`` overrides).

    Raises:
        ValueError: naming the bad key, before any model or data is loaded.
    """
    argv = [item for key, value in sorted(run_config.items()) for item in (f"--{key}", str(value))]
    return parse_args(argv, parser_class=_RunConfigParser)


# ---------------------------------------------------------------- the deployment engine's entry points (`flwr run`)
server_app = ServerApp()
client_app = ClientApp()
_built: dict[str, object] = {}


def _apps_for(run_config) -> tuple:
    key = json.dumps(dict(run_config), sort_keys=True, default=str)
    if key not in _built:
        _built[key] = build_apps(args_from_run_config(run_config))
    return _built[key]


@server_app.main()
def _server_main(grid, context) -> None:
    _apps_for(context.run_config)[0](grid, context)


@client_app.train()
def _client_train(msg, context):
    return _apps_for(context.run_config)[1](msg, context)
