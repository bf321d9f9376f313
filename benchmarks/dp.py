"""DP-SGD benchmark, side by side in one run: seconds per optimizer step on Llama + LoRA and MiniLM + LoRA for

- the non-private ``transformers.Trainer`` (reference) and a plain non-private PyTorch loop,
- our ``DPTrainer`` with each per-sample method (``vmap``, ``hooks``, ``loop``),
- Opacus ``PrivacyEngine.make_private`` in a plain PyTorch loop, with per-sample ``hooks`` and ``ghost`` clipping,

on the same model, data, batch size and LoRA adapter. Llama models are built from configs (offline): ``tiny`` (the test
suite's 2-layer, 32-wide Llama) and ``small`` (4 layers, 256 wide), on random tokens. ``minilm`` is the packaged
all-MiniLM-L6-v2 (real weights) as a sentiment classifier with LoRA on the Rotten Tomatoes snippets (real text), via
:mod:`hf_svd_plugins.examples`. The step time is the median over the timed steps after warm-up. Privacy settings are
identical (sigma=1, C=1, Poisson sampling with q = B / N).

``--utility`` runs the private-LoRA study's final table instead of the timing (``benchmarks/dp_lora.py final``:
non-private LoRA, DP LoRA at epsilon 8 and 3, DP head only, 3 seeds, test accuracy; resumable, results appended to
``benchmarks/results/dp_lora.jsonl``). ``--utility-only`` is the earlier head-only comparison at epsilon 8.

    python benchmarks/dp.py                          # tiny, small, minilm; 12 timed steps each
    python benchmarks/dp.py --sizes tiny --steps 6   # quick smoke run
    python benchmarks/dp.py --utility                 # private LoRA vs non-private, 3 seeds (docs/dp.md)
    python benchmarks/dp.py --utility-only            # the earlier head-only DP vs non-private run, no timing
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab=97, seq_len=16),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab=1000, seq_len=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(size: str, r: int = 8):
    if size == "minilm":
        from hf_svd_plugins.examples import minilm_lora_classifier

        return minilm_lora_classifier(r)[0]
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    spec = dict(SIZES[size])
    vocab = spec.pop("vocab")
    spec.pop("seq_len")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False, **spec)
    model = tf.LlamaForCausalLM(cfg)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


class TokenDataset:
    """Fixed-length random token sequences with LM labels (first 2 positions masked)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        import torch

        labels = self.ids[i].clone()
        labels[:2] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def collate(items: list[dict]) -> dict:
    """Stack fixed-length items, or right-pad variable-length token lists (MiniLM) to the longest."""
    import torch

    if torch.is_tensor(items[0]["input_ids"]):
        return {k: torch.stack([x[k] for x in items]) for k in items[0]}
    longest = max(len(x["input_ids"]) for x in items)
    out = {k: torch.tensor([list(x[k]) + [0] * (longest - len(x[k])) for x in items])
           for k in ("input_ids", "attention_mask")}
    out["labels"] = torch.tensor([x["labels"] for x in items])
    return out


_MINILM_DATA: dict = {}


def dataset(size: str, n: int, split: str = "train"):
    """``n`` training examples (random tokens for Llama sizes; Rotten Tomatoes for MiniLM, ``n`` ignored)."""
    if size != "minilm":
        spec = SIZES[size]
        return TokenDataset(n, spec["seq_len"], spec["vocab"])
    if split not in _MINILM_DATA:
        from transformers import AutoTokenizer

        from hf_svd_plugins.examples import TokenizedClassification, minilm_path, rotten_tomatoes

        tok = AutoTokenizer.from_pretrained(minilm_path())
        train, test = rotten_tomatoes()
        _MINILM_DATA["train"] = TokenizedClassification(train, tok, max_length=64)
        _MINILM_DATA["test"] = TokenizedClassification(test, tok, max_length=64)
    return _MINILM_DATA[split]


class StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        self.times: list[float] = []
        self.callback = _CB()


def run_trainer(size: str, method: str | None, batch: int, steps: int, warmup: int, n: int) -> float:
    from transformers import Trainer, TrainingArguments

    from hf_svd_plugins.dp import DPConfig, DPTrainer

    data = dataset(size, n)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=warmup + steps,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        max_grad_norm=0.0, dataloader_num_workers=0,
    )
    timer = StepTimer()
    kw = dict(model=build_model(size), args=args, train_dataset=data, data_collator=collate,
              callbacks=[timer.callback])
    if method is None:
        trainer = Trainer(**kw)
    else:
        trainer = DPTrainer(**kw, dp_config=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0,
                                                     per_sample_method=method))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return statistics.median(timer.times[warmup:])


def run_plain_loop(size: str, batch: int, steps: int, warmup: int, n: int, opacus_mode: str | None) -> float:
    """A plain PyTorch loop; with ``opacus_mode`` ("hooks" or "ghost") wrapped by Opacus ``make_private``."""
    import torch
    from torch.utils.data import DataLoader

    from hf_svd_plugins.dp.per_sample import per_example_loss

    data = dataset(size, n)
    model = build_model(size).train()
    loss_type = "sequence" if size == "minilm" else "causal_lm"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = DataLoader(data, batch_size=batch, shuffle=True, collate_fn=collate)

    class PerExampleLM(torch.nn.Module):
        """Criterion for Opacus: per-example mean token loss (ghost clipping calls it with reduction='none')."""

        reduction = "mean"

        def forward(self, logits, labels):
            losses = per_example_loss(logits, labels, loss_type)
            return losses if self.reduction == "none" else losses.mean()

    criterion = PerExampleLM()
    if opacus_mode is not None:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode=opacus_mode, criterion=criterion,
        )
        if opacus_mode == "ghost":
            model, optimizer, criterion, loader = out
        else:
            model, optimizer, loader = out
    times = []
    it = iter(loader)
    for _ in range(warmup + steps):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        labels = b.pop("labels")
        logits = model(**b).logits
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def accuracy(trainer, size: str) -> float:
    import numpy as np

    pred = trainer.predict(dataset(size, 0, "test"))
    return float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())


def run_utility(a) -> list[tuple[str, float, float, float]]:
    """MiniLM + LoRA on Rotten Tomatoes: non-private Trainer vs DPTrainer at ``a.epsilon``, each with its own batch
    size, epochs and learning rate (DP-SGD wants large batches and higher rates); test accuracy."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.examples import minilm_mean_pool_classifier

    rows = []
    runs = [("non-private", a.utility_batch, a.epochs, a.lr), (f"DP eps={a.epsilon:g}", a.dp_batch, a.dp_epochs, a.dp_lr)]
    for name, batch, epochs, lr in runs:
        private = name != "non-private"
        micro = min(batch, a.micro_batch)
        if batch % micro:
            raise SystemExit(f"batch {batch} must be a multiple of --micro-batch {micro}")
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
            per_device_eval_batch_size=128, num_train_epochs=epochs, learning_rate=lr, report_to=[], use_cpu=True,
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, max_grad_norm=0.0 if private else 1.0, seed=0,
        )
        lora = not private or a.dp_trainable == "lora"
        model = minilm_mean_pool_classifier(8 if lora else None, target_modules=a.utility_targets)[0]
        kw = dict(model=model, args=args, train_dataset=dataset("minilm", 0), data_collator=collate)
        trainer = (DPTrainer(**kw, dp_config=DPConfig(target_epsilon=a.epsilon, max_grad_norm=1.0)) if private
                   else Trainer(**kw))
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        acc = accuracy(trainer, "minilm")
        eps = trainer.get_epsilon() if private else float("inf")
        print(f"[utility] {name}: {'LoRA + head' if lora else 'head only'}, batch {batch}, {epochs:g} epochs, lr {lr:g}, {trainer.state.global_step} steps: "
              f"accuracy {acc:.4f}, epsilon {eps:.3f}, {seconds:.0f} s", flush=True)
        rows.append((f"{name} ({'LoRA + head' if lora else 'head only'})", acc, eps, seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "minilm"], choices=[*SIZES, "minilm"])
    parser.add_argument("--batch", type=int, default=16, help="(expected) examples per optimizer step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--n", type=int, default=1024, help="training examples (q = batch / n)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow per-example loop method")
    parser.add_argument("--utility", action="store_true",
                        help="the private-LoRA study's final table (benchmarks/dp_lora.py final), no timing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--utility: seeds")
    parser.add_argument("--utility-only", action="store_true",
                        help="the earlier head-only utility comparison at epsilon 8 (no timing)")
    parser.add_argument("--epochs", type=float, default=1.0, help="utility: non-private epochs")
    parser.add_argument("--utility-batch", type=int, default=32, help="utility: non-private batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="utility: non-private learning rate")
    parser.add_argument("--dp-epochs", type=float, default=10.0, help="utility: DP epochs")
    parser.add_argument("--dp-batch", type=int, default=512, help="utility: DP expected batch size")
    parser.add_argument("--dp-lr", type=float, default=0.1, help="utility: DP learning rate")
    parser.add_argument("--micro-batch", type=int, default=64, help="utility: examples per forward (grad. accumulation)")
    parser.add_argument("--utility-targets", nargs="+", default=["query", "value"], help="utility: LoRA target modules")
    parser.add_argument("--epsilon", type=float, default=8.0, help="utility: target epsilon")
    parser.add_argument("--dp-trainable", choices=["head", "lora"], default="head",
                        help="utility: what DP trains (the non-private run trains LoRA + head)")
    a = parser.parse_args()
    if a.utility:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import dp_lora

        raise SystemExit(dp_lora.main(["final", "--threads", str(a.threads), "--seeds", *map(str, a.seeds)]))

    import torch

    torch.set_num_threads(a.threads)
    rows = []
    for size in [] if a.utility_only else a.sizes:
        runs = [("Trainer (non-private)", lambda s=size: run_trainer(s, None, a.batch, a.steps, a.warmup, a.n)),
                ("plain loop (non-private)", lambda s=size: run_plain_loop(s, a.batch, a.steps, a.warmup, a.n, None))]
        for m in ["vmap", "hooks"] + ([] if a.skip_loop else ["loop"]):
            runs.append((f"DPTrainer {m}", lambda s=size, m=m: run_trainer(s, m, a.batch, a.steps, a.warmup, a.n)))
        for mode in ["hooks", "ghost"]:
            runs.append((f"Opacus make_private {mode}",
                         lambda s=size, mode=mode: run_plain_loop(s, a.batch, a.steps, a.warmup, a.n, mode)))
        base = None
        for name, fn in runs:
            try:
                sec = fn()
            except Exception as exc:  # noqa: BLE001 - report and keep going
                print(f"[{size}] {name}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                rows.append((size, name, float("nan"), float("nan")))
                continue
            base = sec if base is None else base
            rows.append((size, name, sec, sec / base))
            print(f"[{size}] {name}: {sec * 1000:.1f} ms/step", flush=True)

    if rows:
        print()
        print(f"threads={a.threads}, expected batch={a.batch}, N={a.n}, steps={a.steps} (median after {a.warmup} warm-up)")
        print("| model | method | s/step | vs non-private Trainer |")
        print("|---|---|---|---|")
        for size, name, sec, ratio in rows:
            model = "MiniLM + LoRA (real text)" if size == "minilm" else f"{size} Llama + LoRA"
            print(f"| {model} | {name} | {sec:.4f} | {ratio:.2f}x |")
    if a.utility_only:
        util = run_utility(a)
        print()
        print(f"MiniLM mean-pooled + linear head (LoRA r=8 on {' '.join(a.utility_targets)}), Rotten Tomatoes")
        print("| run | test accuracy | epsilon | seconds |")
        print("|---|---|---|---|")
        for name, acc, eps, sec in util:
            print(f"| {name} | {acc:.4f} | {eps:.3f} | {sec:.0f} |")

if __name__ == "__main__":
    main()
