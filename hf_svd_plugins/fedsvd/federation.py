"""An in-process federation on one machine: N clients with private data shards, each trains LoRA with an HF Trainer.

Every round the server samples a fraction of the clients; each sampled client starts from the global adapter, trains
``local_steps`` optimizer steps (only ``B`` for ``fedsvd``/``ffa_lora``; ``A`` and ``B`` for ``fedavg_lora``) with a
fresh optimizer, and sends its weights; the server aggregates them by example counts with
:func:`hf_svd_plugins.fedsvd.core.aggregate_lora`. Other trainable parameters (e.g. a classification head saved by
PEFT's ``modules_to_save``) are averaged the same way under every method.

The server state (round, global ``A``/``B`` and extras, config, sampling RNG, metric history) is checkpointed every
round to ``output_dir/server``; ``run`` resumes from it and reproduces an uninterrupted run.

Each round's metric row also goes to ``report_to`` (TensorBoard, W&B, ... through transformers' own integration
callbacks) and to ``callbacks``, with the round as the step (:class:`~hf_svd_plugins.fedsvd.reporting.RoundReporter`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.fedsvd.client import (
    LoraUpdate,
    accuracy_metrics,
    check_client_trainer_kwargs,
    client_seed,
    load_lora_state,
    quiet_trainer,
    set_trainable_for_method,
    train_lora_client,
    trainable_extra_names,
)
from hf_svd_plugins.fedsvd.core import aggregate_lora, aggregate_weighted, check_method, is_finite_update
from hf_svd_plugins.fedsvd.partition import partition_dirichlet, partition_iid
from hf_svd_plugins.fedsvd.reporting import RoundReporter, check_report_to
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights

logger = logging.getLogger(__name__)

__all__ = ["Federation", "accuracy_metrics"]

_RESERVED_ARGS = {"output_dir": "output_dir", "max_steps": "local_steps", "seed": "seed"}
_STATE_JSON = "state.json"


class Federation:
    """Federated LoRA fine-tuning simulated in one process (FedSVD, FFA-LoRA, FedAvg-LoRA).

    Args:
        model: a PEFT LoRA model; one instance is reused by all clients (the global adapter is loaded before each).
        train_dataset: the data to split into client shards (ignored if ``client_datasets`` is given).
        num_clients: number of clients ``N``.
        method: ``"fedsvd"``, ``"ffa_lora"`` or ``"fedavg_lora"``.
        client_fraction: fraction of clients sampled per round (``round(fraction * N)`` of them, at least 1 needed).
        local_steps: optimizer steps per client per round (``TrainingArguments.max_steps``).
        partition: ``"iid"`` or ``"dirichlet"`` (non-IID by label, ``Dirichlet(alpha)``).
        alpha: the Dirichlet concentration.
        label_key: the example field holding the integer label (for ``"dirichlet"``).
        client_datasets: explicit per-client data sets instead of a partition of ``train_dataset``.
        eval_dataset: evaluated on the global model after every round (``eval_loss``, plus ``compute_metrics``).
        data_collator: passed to every Trainer.
        compute_metrics: passed to the evaluation Trainer (e.g. :func:`accuracy_metrics`).
        training_args: extra ``TrainingArguments`` kwargs for the clients (batch size, learning rate, ``use_cpu``...).
            ``output_dir``, ``max_steps`` and ``seed`` are set by the federation.
        trainer_cls: the client Trainer class; called as ``trainer_cls(model=, args=, train_dataset=,
            data_collator=, **trainer_kwargs)``. With ``hf_svd_plugins.dp.DPTrainer`` (``trainer_kwargs={"dp_config":
            DPConfig(noise_multiplier=..., max_epsilon=...)}``) each client's accountant history is carried across
            rounds and checkpoints (``client_states``), rows report ``epsilon_client<i>``/``epsilon_max``, and a
            client with no budget left (no step taken) is skipped.
        trainer_kwargs: extra kwargs for ``trainer_cls``.
        output_dir: where the server checkpoint (``server/``), ``metrics.csv`` and client scratch dirs go.
        seed: seeds the partition, the client sampling and every client Trainer (``seed + 1000 * round + client``).
        adapter_name: the LoRA adapter (default: the active one).
        report_to: where the server's per-round rows go, as ``TrainingArguments.report_to`` (``"tensorboard"``,
            ``["wandb", "tensorboard"]``, ``"all"``, ``"none"``); step = round. Default ``None``: the clients'
            ``training_args["report_to"]`` if set, else ``"none"`` (transformers' default). TensorBoard writes to
            ``output_dir/runs/server``, one directory across resumes (a restart with ``resume=False`` replaces the
            old curve: see :mod:`~hf_svd_plugins.fedsvd.reporting`).
        client_report_to: the client Trainers' ``report_to``. Default ``None``: ``"none"`` whenever the server
            reports to an integration (its own or one followed from ``training_args``), else ``training_args``'
            (a W&B client would otherwise reuse the server's run and log steps restarting at 0 into its curve;
            TensorBoard clients write one run per client per round). Set it to have clients report too. The
            user's ``training_args`` dict is never changed.
        callbacks: ``TrainerCallback`` classes or instances that get the server's ``on_train_begin`` / ``on_log`` (one
            row per round, ``state.global_step`` = round) / ``on_train_end``; a callback that sets
            ``control.should_training_stop`` ends ``run`` after that round (the state is saved: ``run`` resumes).
            Client Trainers' callbacks go in ``trainer_kwargs["callbacks"]``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: torch.utils.data.Dataset | None = None,
        *,
        num_clients: int = 2,
        method: str = "fedsvd",
        client_fraction: float = 1.0,
        local_steps: int = 10,
        partition: str = "iid",
        alpha: float = 0.5,
        label_key: str = "labels",
        client_datasets: Sequence[torch.utils.data.Dataset] | None = None,
        eval_dataset: torch.utils.data.Dataset | None = None,
        data_collator: Callable | None = None,
        compute_metrics: Callable | None = None,
        training_args: Mapping[str, Any] | None = None,
        trainer_cls: type = Trainer,
        trainer_kwargs: Mapping[str, Any] | None = None,
        output_dir: str | os.PathLike = "fedsvd_federation",
        seed: int = 0,
        adapter_name: str | None = None,
        report_to: str | Sequence[str] | None = None,
        callbacks: Sequence[TrainerCallback | type[TrainerCallback]] | None = None,
        client_report_to: str | Sequence[str] | None = None,
    ) -> None:
        self.method = check_method(method)
        if client_datasets is not None:
            num_clients = len(client_datasets)
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients must be an int >= 1 (got {num_clients!r}); a federation needs clients")
        if not (isinstance(client_fraction, int | float) and 0 < client_fraction <= 1):
            raise ValueError(f"client_fraction must be in (0, 1], got {client_fraction!r}")
        self.clients_per_round = int(round(client_fraction * num_clients))
        if self.clients_per_round < 1:
            raise ValueError(
                f"client_fraction={client_fraction} of num_clients={num_clients} samples zero clients per round; "
                f"use client_fraction >= {1 / num_clients:.3g}"
            )
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"local_steps must be an int >= 1, got {local_steps!r}")
        if partition not in ("iid", "dirichlet"):
            raise ValueError(f"partition must be 'iid' or 'dirichlet', got {partition!r}")
        training_args = dict(training_args or {})
        for key, ours in _RESERVED_ARGS.items():
            if key in training_args:
                raise ValueError(f"training_args must not set {key!r}; pass Federation({ours}=...) instead")

        check_client_trainer_kwargs(trainer_kwargs)
        followed = check_report_to(training_args.get("report_to"), "training_args['report_to']")
        self.reporter = RoundReporter(
            followed if report_to is None else report_to, callbacks, output_dir=output_dir, model=model
        )
        if client_report_to is not None:
            training_args["report_to"] = check_report_to(client_report_to, "client_report_to")
        elif self.reporter.report_to:  # the server reports: clients would write into (W&B) or beside its run
            training_args["report_to"] = "none"
        self.model = model
        self.num_clients = num_clients
        self.client_fraction = float(client_fraction)
        self.local_steps = local_steps
        self.partition = partition
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.adapter_name = adapter_name
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator
        self.compute_metrics = compute_metrics
        self.training_args = training_args
        self.trainer_cls = trainer_cls
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.output_dir = os.fspath(output_dir)

        self.pairs = find_lora_pairs(model, adapter_name)
        if not self.pairs:
            raise ValueError("model has no Linear LoRA layers; wrap it with peft.get_peft_model(..., LoraConfig(...))")
        set_trainable_for_method(self.pairs, self.method)
        self.extra_names = trainable_extra_names(model, self.pairs)

        if client_datasets is not None:
            self.client_datasets = list(client_datasets)
        else:
            if train_dataset is None:
                raise ValueError("pass train_dataset (to split into client shards) or client_datasets")
            if partition == "iid":
                shards = partition_iid(len(train_dataset), num_clients, seed=self.seed)
            else:
                labels = [int(train_dataset[i][label_key]) for i in range(len(train_dataset))]
                shards = partition_dirichlet(labels, num_clients, self.alpha, seed=self.seed)
            self.client_datasets = [torch.utils.data.Subset(train_dataset, s) for s in shards]
        self.client_sizes = [len(d) for d in self.client_datasets]
        if min(self.client_sizes) < 1:
            raise ValueError(f"every client needs at least one example, got shard sizes {self.client_sizes}")

        # Server state.
        self.round = 0
        self.global_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            n: (a.float().cpu(), b.float().cpu()) for n, (a, b) in read_lora_weights(self.pairs).items()
        }
        params = dict(model.named_parameters())
        self.global_extra: dict[str, torch.Tensor] = {
            n: params[n].detach().float().cpu().clone() for n in self.extra_names
        }
        self.rng = np.random.default_rng(self.seed)
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False  # set by a callback's control.should_training_stop in the last round
        # per client (str id): state kept between rounds, e.g. a DP accountant's history; JSON-serialisable
        self.client_states: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ checkpointing

    @property
    def server_dir(self) -> str:
        return os.path.join(self.output_dir, "server")

    def _config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_clients": self.num_clients,
            "client_fraction": self.client_fraction,
            "local_steps": self.local_steps,
            "partition": self.partition,
            "alpha": self.alpha,
            "seed": self.seed,
            "client_sizes": self.client_sizes,
            "modules": {n: [list(a.shape), list(b.shape)] for n, (a, b) in self.global_weights.items()},
        }

    def save_state(self) -> None:
        """Write the server state: ``server/round_XXXX.safetensors`` then ``server/state.json`` (atomically)."""
        os.makedirs(self.server_dir, exist_ok=True)
        tensors = {}
        for n, (a, b) in self.global_weights.items():
            tensors[f"lora::{n}::A"] = a.contiguous()
            tensors[f"lora::{n}::B"] = b.contiguous()
        for n, t in self.global_extra.items():
            tensors[f"extra::{n}"] = t.contiguous()
        weights_file = f"round_{self.round:05d}.safetensors"
        tmp = os.path.join(self.server_dir, weights_file + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, os.path.join(self.server_dir, weights_file))
        state = {
            "format": 1,
            "round": self.round,
            "weights_file": weights_file,
            "config": self._config(),
            "rng": self.rng.bit_generator.state,
            "history": self.history,
            "client_states": self.client_states,
        }
        tmp = os.path.join(self.server_dir, _STATE_JSON + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, os.path.join(self.server_dir, _STATE_JSON))
        for old in os.listdir(self.server_dir):  # keep the current and the previous round's weights
            if old.startswith("round_") and old.endswith(".safetensors") and old < f"round_{self.round - 1:05d}":
                os.remove(os.path.join(self.server_dir, old))

    def load_state(self) -> bool:
        """Restore the server state from ``output_dir/server`` if present; returns whether it did.

        Raises:
            ValueError: if the checkpoint was written by a federation with a different configuration.
        """
        path = os.path.join(self.server_dir, _STATE_JSON)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            state = json.load(f)
        saved, ours = state["config"], json.loads(json.dumps(self._config()))
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if diff:
            raise ValueError(
                f"{self.server_dir} holds a federation with a different configuration ({', '.join(diff)}); use another "
                "output_dir, the same settings, or run(..., resume=False) to start over"
            )
        tensors = load_file(os.path.join(self.server_dir, state["weights_file"]))
        self.global_weights = {n: (tensors[f"lora::{n}::A"], tensors[f"lora::{n}::B"]) for n in self.global_weights}
        self.global_extra = {n: tensors[f"extra::{n}"] for n in self.global_extra}
        self.rng.bit_generator.state = state["rng"]
        self.round = int(state["round"])
        self.history = list(state["history"])
        self.client_states = dict(state.get("client_states", {}))
        return True

    def write_metrics_csv(self, path: str | None = None) -> str:
        """Write the per-round history to ``output_dir/metrics.csv`` (or ``path``); returns the path."""
        path = path or os.path.join(self.output_dir, "metrics.csv")
        keys: list[str] = []
        for row in self.history:
            keys.extend(k for k in row if k not in keys)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in self.history:
                writer.writerow(row)
        return path

    # ------------------------------------------------------------------ model I/O

    def load_global_into_model(self) -> None:
        """Write the global adapter (and averaged extra parameters) into ``self.model``."""
        load_lora_state(self.model, self.pairs, self.global_weights, self.global_extra)

    def client_seed(self, cid: int, rnd: int) -> int:
        """The Trainer seed of client ``cid`` in round ``rnd`` (0-based): ``seed + 1000 * rnd + cid``."""
        return client_seed(self.seed, cid, rnd)

    def train_client(self, cid: int, rnd: int) -> tuple[LoraUpdate, dict[str, torch.Tensor], float]:
        """Client ``cid``'s local training in round ``rnd`` (0-based) from the global state.

        Returns:
            ``({module: (A or None, B)}, {extra param: tensor}, train loss)``; ``A`` only for ``fedavg_lora``.
        """
        return train_lora_client(
            self.model,
            self.client_datasets[cid],
            method=self.method,
            global_weights=self.global_weights,
            global_extra=self.global_extra,
            local_steps=self.local_steps,
            seed=self.client_seed(cid, rnd),
            output_dir=os.path.join(self.output_dir, "clients", f"client_{cid}"),
            training_args=self.training_args,
            data_collator=self.data_collator,
            trainer_cls=self.trainer_cls,
            trainer_kwargs=self.trainer_kwargs,
            pairs=self.pairs,
            client_state=self.client_states.setdefault(str(cid), {}),
        )

    def evaluate(self) -> dict[str, float]:
        """Evaluate the global model on ``eval_dataset`` (empty dict if there is none)."""
        if self.eval_dataset is None:
            return {}
        self.load_global_into_model()
        kwargs: dict[str, Any] = {"report_to": [], "disable_tqdm": True}
        keep = (
            "per_device_eval_batch_size",
            "use_cpu",
            "bf16",
            "fp16",
            "dataloader_num_workers",
            "remove_unused_columns",
        )
        kwargs.update({k: v for k, v in self.training_args.items() if k in keep})
        args = TrainingArguments(output_dir=os.path.join(self.output_dir, "eval"), seed=self.seed, **kwargs)
        trainer = Trainer(
            model=self.model,
            args=args,
            eval_dataset=self.eval_dataset,
            data_collator=self.data_collator,
            compute_metrics=self.compute_metrics,
        )
        quiet_trainer(trainer)
        metrics = trainer.evaluate()
        skip = ("runtime", "per_second", "preparation_time")
        return {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and not any(x in k for x in skip)}

    # ------------------------------------------------------------------ rounds

    def run_round(self) -> dict[str, Any]:
        """Sample clients, train them, aggregate, evaluate, checkpoint. Returns the round's metrics row."""
        rnd = self.round
        start = time.time()
        sampled = sorted(int(c) for c in self.rng.choice(self.num_clients, self.clients_per_round, replace=False))
        updates, extras, counts, losses, failed, rejected = [], [], [], [], [], []
        for cid in sampled:
            try:
                update, extra, loss = self.train_client(cid, rnd)
            except Exception as exc:  # noqa: BLE001 - a failing client must not stop the federation
                msg = f"round {rnd + 1}: client {cid} failed and is skipped: {type(exc).__name__}: {exc}"
                warnings.warn(msg, stacklevel=2)
                logger.warning(msg)
                failed.append(cid)
                continue
            if not (is_finite_update(update) and is_finite_update(extra)):
                msg = f"round {rnd + 1}: client {cid} sent NaN/Inf weights; update rejected"
                warnings.warn(msg, stacklevel=2)
                logger.warning(msg)
                rejected.append(cid)
                continue
            updates.append(update)
            extras.append(extra)
            counts.append(self.client_sizes[cid])
            losses.append(loss)
        if not updates:
            raise RuntimeError(
                f"round {rnd + 1}: no usable client update (failed {failed}, rejected {rejected}); see the warnings"
            )
        self.global_weights, spectrum = aggregate_lora(self.method, self.global_weights, updates, counts)
        self.global_extra = {n: aggregate_weighted([e[n] for e in extras], counts) for n in self.extra_names}
        self.round = rnd + 1
        row: dict[str, Any] = {
            "round": self.round,
            "method": self.method,
            "clients": " ".join(map(str, sampled)),
            "n_ok": len(updates),
            "failed": " ".join(map(str, failed)),
            "rejected": " ".join(map(str, rejected)),
            "train_loss": float(np.average(losses, weights=counts)),
        }
        eps = {int(c): st["epsilon"] for c, st in self.client_states.items() if "epsilon" in st}
        if eps:
            row.update({f"epsilon_client{c}": eps[c] for c in sampled if c in eps})
            row["epsilon_max"] = max(eps.values())
        if spectrum:
            row["sigma_max_mean"] = float(np.mean([float(s[0]) for s in spectrum.values() if s.numel()]))
        row.update(self.evaluate())
        row["seconds"] = round(time.time() - start, 3)
        self.history.append(row)
        self.save_state()
        self.write_metrics_csv()
        logger.info("federation %s", row)
        self.stop_requested = self.reporter.log(self.round, row)
        return row

    def run(self, rounds: int, resume: bool = True) -> list[dict[str, Any]]:
        """Run until ``rounds`` rounds are done in total (resuming from ``output_dir/server`` if ``resume``).

        Returns:
            The per-round metric rows (also in ``output_dir/metrics.csv``). The final global adapter is loaded into
            ``self.model``.
        """
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        if resume and self.round == 0:
            if self.load_state():
                logger.info("federation resumed at round %d from %s", self.round, self.server_dir)
        if self.round < rounds:
            self.reporter.begin(self.round, rounds, self.history)
            while self.round < rounds:
                self.run_round()
                if self.stop_requested:
                    logger.info("federation stopped by a callback after round %d", self.round)
                    break
            self.reporter.end()
        self.load_global_into_model()
        return self.history
