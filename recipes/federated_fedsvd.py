"""A federation simulated in one process (``hf_svd_plugins.fedsvd.Federation``): FedSVD, FFA-LoRA or FedAvg-LoRA.

Default: all-MiniLM-L6-v2 + LoRA on the packaged Rotten Tomatoes snippets, offline, split into ``--clients``
Dirichlet(``--alpha``) non-IID shards by label. Every round ``--fraction`` of the clients train ``--max-steps``
local steps each with an HF Trainer; the server averages B (and A for ``fedavg_lora``), refactorizes ``B_avg @ A``
by SVD (``fedsvd``) and evaluates the global adapter on the test snippets. The server state is checkpointed every
round under ``<output-dir>/server``: rerunning the same command resumes where it stopped.
``--dp-target-epsilon`` makes every client a DPTrainer whose budget covers all rounds.

The per-round server metrics (``eval/accuracy``, ``eval/loss``, ``train/train_loss``, ``train/epsilon_max``, ...; step =
round) go to ``--report-to`` through transformers' own integrations (default: TensorBoard if it is installed), in
``<output-dir>/runs/server``; a resumed run continues the same curve. The clients' Trainers report nothing (their steps
restart every round; the server row carries what matters).

    python recipes/federated_fedsvd.py
    python recipes/federated_fedsvd.py --report-to tensorboard && tensorboard --logdir outputs/federated_fedsvd/runs
    python recipes/federated_fedsvd.py --method ffa_lora --clients 8 --fraction 0.5 --rounds 10
    python recipes/federated_fedsvd.py --dp-target-epsilon 8

One process only (the clients take turns on one model); for processes on several machines use Flower
(``recipes/flower_fedsvd.py`` and ``docs/deploy.md``). ``accelerate launch`` with more than one process is refused.
"""

from __future__ import annotations

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single",)


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset="packaged:rotten_tomatoes", output_dir="outputs/federated_fedsvd",
                      max_steps=10, batch_size=16, lr=5e-3, max_length=48, model_help="packaged all-MiniLM-L6-v2")
    p.add_argument("--label-column", default="label")
    p.add_argument("--method", choices=("fedsvd", "ffa_lora", "fedavg_lora"), default="fedsvd")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the clients trained per round")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration of the label split")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--dp-target-epsilon", type=float, default=None,
                   help="DPTrainer clients, sigma calibrated so that every round spends at most this epsilon")
    p.set_defaults(limit=2000)
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "rank", "rounds", "clients"))
    if not 0 < args.fraction <= 1:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if round(args.fraction * args.clients) < 1:
        p.error(f"--fraction {args.fraction} of --clients {args.clients} samples no client per round; "
                f"use --fraction >= {1 / args.clients:.3g}")
    if args.alpha <= 0:
        p.error(f"--alpha must be > 0, got {args.alpha}")
    if args.dp_target_epsilon is not None and args.dp_target_epsilon <= 0:
        p.error(f"--dp-target-epsilon must be > 0, got {args.dp_target_epsilon}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run (or resume) the federation; returns its per-round history."""
    args = parse_args(argv)
    common.require_launch_config("Federation (in-process)", SUPPORTED)

    import os

    from transformers import DataCollatorWithPadding, Trainer

    from hf_svd_plugins.examples import TokenizedClassification
    from hf_svd_plugins.fedsvd import Federation, accuracy_metrics

    train, test = common.load_labelled(args.dataset, args.text_column, args.label_column, args.seed, args.limit)
    model, tokenizer = common.lora_classifier(args.model, max(train.label) + 1, args.rank, args.seed)
    client_args = common.training_kwargs(args)
    for key in ("max_steps", "seed"):  # set by the federation per round and client
        client_args.pop(key)
    report_to = client_args.pop("report_to")  # the server's rows, not every client's restart-at-0 steps
    trainer_cls, trainer_kwargs = Trainer, None
    if args.dp_target_epsilon is not None:
        from hf_svd_plugins import DPConfig, DPTrainer

        trainer_cls = DPTrainer
        trainer_kwargs = {"dp_config": DPConfig(target_epsilon=args.dp_target_epsilon,
                                                total_steps=args.rounds * args.max_steps)}
        client_args["max_grad_norm"] = 0.0
    federation = Federation(
        model, TokenizedClassification(train, tokenizer, args.max_length), num_clients=args.clients,
        method=args.method, client_fraction=args.fraction, local_steps=args.max_steps, partition="dirichlet",
        alpha=args.alpha, eval_dataset=TokenizedClassification(test, tokenizer, args.max_length),
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy_metrics,
        training_args=client_args, trainer_cls=trainer_cls, trainer_kwargs=trainer_kwargs,
        output_dir=args.output_dir, seed=args.seed, report_to=report_to,
    )
    print(f"{args.method}: {args.clients} clients (shard sizes {federation.client_sizes}), "
          f"{federation.clients_per_round} per round, {args.rounds} rounds x {args.max_steps} local steps", flush=True)
    history = federation.run(args.rounds)
    print("\nround  eval_accuracy  eval_loss")
    for row in history:
        print(f"{row['round']:5d}  {row.get('eval_accuracy', float('nan')):13.4f}  {row.get('eval_loss', float('nan')):9.4f}")
    federation.load_global_into_model()
    final = os.path.join(args.output_dir, "final")
    model.save_pretrained(final)
    if "tensorboard" in report_to:
        print(f"TensorBoard: tensorboard --logdir {os.path.join(args.output_dir, 'runs')}")
    common.saved(f"the global adapter (metrics: {federation.write_metrics_csv()})", final)
    return history


if __name__ == "__main__":
    main()
