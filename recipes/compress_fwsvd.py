"""Fine-tune, then compress by Fisher-weighted SVD (FWSVD): ``FisherCallback`` + ``fwsvd_compress`` + ``save_pretrained``.

Default: all-MiniLM-L6-v2 + LoRA on the packaged Rotten Tomatoes snippets, offline. During the last
``--fisher-batches`` micro-batches of training, ``FisherCallback(mode="train")`` reads the Trainer's own forward and
backward passes (no extra compute) and accumulates each Linear's Fisher importances. After training,
``fwsvd_compress`` merges the LoRA adapter into the base model and replaces every Linear of the encoder blocks by two
low-rank Linears keeping ``--ratio`` of its weights (``--method fisher``, or ``svd`` / ``whiten`` for comparison),
then the compressed model is saved with ``save_pretrained`` (plain ``AutoModelFor*.from_pretrained`` loads it after
``import hf_svd_plugins``) and reloaded to check that it gives the same logits. The Fisher sums and the compression
report (``fwsvd/...``) go through the Trainer's log (TensorBoard with ``--report-to tensorboard``).

    python recipes/compress_fwsvd.py
    python recipes/compress_fwsvd.py --ratio 0.3 --method whiten
    accelerate launch --config_file accelerate_configs/cpu_ddp_2proc.yaml recipes/compress_fwsvd.py
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/compress_fwsvd.py

Runs under a single process, DDP (``cpu_ddp_2proc``), DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (rank 0 compresses a
gathered CPU copy of sharded weights); ZeRO-3 + offload is refused.
"""

from __future__ import annotations

from hf_svd_plugins import recipe_args as common

SUPPORTED = ("single", "cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
METHODS = ("fisher", "svd", "whiten")


def parse_args(argv: list[str] | None = None):
    p = common.recipe_parser(__doc__, dataset="packaged:rotten_tomatoes", output_dir="outputs/compress_fwsvd",
                             max_steps=100, batch_size=16, lr=5e-3, max_length=64,
                             model_help="packaged all-MiniLM-L6-v2")
    p.add_argument("--label-column", default="label")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the fine-tune")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of each compressed layer's weights kept, (0, 1]")
    p.add_argument("--method", choices=METHODS, default="fisher",
                   help="fisher (FWSVD), svd (plain truncated SVD) or whiten (activation-whitened, SVD-LLM)")
    p.add_argument("--fisher-batches", type=int, default=32,
                   help="the Fisher is read from the last N training micro-batches (per process)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="module-name suffixes to compress (default: every Linear of the repeated blocks)")
    args = common.parse_recipe_args(p, argv, positive=("max_steps", "batch_size", "max_length", "rank",
                                                        "fisher_batches"))
    if not 0 < args.ratio <= 1:
        p.error(f"--ratio must be in (0, 1] (fraction of each layer's weights kept), got {args.ratio}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune, compress, save, reload; returns ``{"eval_accuracy", "compressed_accuracy", "model_share",
    "output_dir"}`` (``compressed_accuracy`` and ``model_share`` are None on ranks without the compressed model)."""
    args = parse_args(argv)
    common.require_launch_config("FWSVD (FisherCallback + fwsvd_compress)", SUPPORTED)

    import os

    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_svd_plugins import FisherCallback, fwsvd_compress
    from hf_svd_plugins.examples import TokenizedClassification, classifier_accuracy
    from hf_svd_plugins.fedsvd import accuracy_metrics

    train, test = common.load_labelled(args.dataset, args.text_column, args.label_column, args.seed, args.limit)
    model, tokenizer = common.lora_classifier(args.model, max(train.label) + 1, args.rank, args.seed)
    fisher = FisherCallback(targets=args.targets, mode="train", max_batches=args.fisher_batches)
    collate = DataCollatorWithPadding(tokenizer)
    test_set = TokenizedClassification(test, tokenizer, args.max_length)
    trainer = Trainer(
        model=model, args=TrainingArguments(args.output_dir, per_device_eval_batch_size=64, **common.training_kwargs(args)),
        train_dataset=TokenizedClassification(train, tokenizer, args.max_length), eval_dataset=test_set,
        data_collator=collate, compute_metrics=accuracy_metrics, callbacks=[fisher],
    )
    trainer.train()
    eval_accuracy = trainer.evaluate()["eval_accuracy"]

    # whitening reads layer inputs on a few training batches; fisher uses the sums FisherCallback collected
    calibration = None
    if args.method == "whiten":
        calibration = [collate([trainer.train_dataset[i] for i in range(j, min(j + args.batch_size, len(train.text)))])
                       for j in range(0, min(len(train.text), 8 * args.batch_size), args.batch_size)]
    report = fwsvd_compress(trainer.model, args.method, importance=fisher.fisher if args.method == "fisher" else None,
                            calibration=calibration, ratio=args.ratio, targets=args.targets,
                            progress=False)
    trainer.log(report.log_metrics())  # fwsvd/... through every report_to integration
    final = os.path.join(args.output_dir, "compressed")
    result = {"eval_accuracy": eval_accuracy, "compressed_accuracy": None, "model_share": None, "output_dir": final}
    if report.model is not None and trainer.is_world_process_zero():  # under ZeRO-3/FSDP2 only rank 0 holds it
        compressed = report.model.eval()
        compressed.save_pretrained(final)
        tokenizer.save_pretrained(final)
        result["compressed_accuracy"] = classifier_accuracy(compressed, test_set, tokenizer, batch_size=64)
        result["model_share"] = report.model_share
        reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
        batch = collate([test_set[i] for i in range(min(8, len(test_set)))])
        with torch.no_grad():
            same = torch.allclose(reloaded(**batch).logits, compressed(**batch).logits, atol=1e-5)
        if not same:
            raise RuntimeError(f"the model reloaded from {final} does not reproduce the compressed model's logits")
        print(report.to_markdown(), flush=True)
        print(f"eval_accuracy={eval_accuracy:.4f} fine-tuned, {result['compressed_accuracy']:.4f} after {args.method} "
              f"compression to ratio {args.ratio} ({report.model_share:.1%} of the model's parameters kept); "
              "reloaded with from_pretrained: same logits", flush=True)
    common.saved("the compressed model", final)
    return result


if __name__ == "__main__":
    main()
