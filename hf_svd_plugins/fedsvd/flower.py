"""Flower integration (extra ``[flower]``): a ``FedSVD`` strategy and a ``ClientApp`` that trains LoRA B with an HF Trainer.

Message API of Flower >= 1.21 (``flwr.serverapp.strategy``). The server sends the global adapter (A and B of every
module, plus averaged extra parameters such as a classifier head) in one ``ArrayRecord``; clients reply with B only
(A too for ``fedavg_lora``) and a ``MetricRecord`` holding ``num-examples``. The strategy keeps A itself and, for
``fedsvd``, refactorizes ``B_avg @ A`` by SVD after the weighted average (:func:`~hf_svd_plugins.fedsvd.core.aggregate_lora`).

Key layout of the ``ArrayRecord``: ``"lora::<module>::A"``, ``"lora::<module>::B"``, ``"extra::<param>"``.

DP clients (``trainer_cls=DPTrainer``): what a client keeps between rounds (its ``PrivacyAccountant`` history) lives in
Flower's per-node ``context.state`` under :data:`CLIENT_STATE_KEY`, so a client's epsilon composes over every round it
took part in. Replies carry ``epsilon``; the strategy logs the largest client epsilon so far as ``epsilon-max``.

Run under the simulation engine (Ray)::

    from flwr.simulation import run_simulation
    run_simulation(server_app=make_server_app(model_fn, ...), client_app=make_client_app(model_fn, dataset_fn, ...),
                   num_supernodes=6, backend_config={"client_resources": {"num_cpus": 1}})
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.fedsvd.client import (
    check_client_trainer_kwargs,
    client_seed,
    load_lora_state,
    quiet_trainer,
    set_trainable_for_method,
    train_lora_client,
    trainable_extra_names,
)
from hf_svd_plugins.fedsvd.core import aggregate_lora, aggregate_weighted, check_method, is_finite_update, trains_a
from hf_svd_plugins.fedsvd.reporting import RoundReporter, check_callbacks, check_report_to, reporting_evaluate_fn
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights

logger = logging.getLogger(__name__)

__all__ = [
    "CLIENT_STATE_KEY",
    "FedSVD",
    "arrayrecord_to_lora",
    "client_train",
    "load_client_state",
    "lora_to_arrayrecord",
    "make_client_app",
    "make_evaluate_fn",
    "make_server_app",
    "save_client_state",
]

#: ``context.state`` key of the ``ConfigRecord`` holding a client's state between rounds (``{"json": "<json>"}``).
CLIENT_STATE_KEY = "fedsvd-client-state"
#: Reply metrics that describe one client and are not averaged across clients by the strategy.
PER_CLIENT_METRICS = ("partition-id", "epsilon")

LoraWeights = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


def lora_to_arrayrecord(
    weights: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> ArrayRecord:
    """Pack ``{module: (A or None, B or None)}`` and ``{param: tensor}`` into an ``ArrayRecord`` (None is left out)."""
    state: dict[str, torch.Tensor] = {}
    for name, (a, b) in weights.items():
        if a is not None:
            state[f"lora::{name}::A"] = a.detach().float().cpu().contiguous()
        if b is not None:
            state[f"lora::{name}::B"] = b.detach().float().cpu().contiguous()
    for name, t in (extra or {}).items():
        state[f"extra::{name}"] = t.detach().float().cpu().contiguous()
    return ArrayRecord(torch_state_dict=state)


def arrayrecord_to_lora(record: ArrayRecord) -> tuple[LoraWeights, dict[str, torch.Tensor]]:
    """Inverse of :func:`lora_to_arrayrecord`: ``({module: (A or None, B or None)}, {param: tensor})``.

    Raises:
        ValueError: on a key that is neither ``lora::<module>::A|B`` nor ``extra::<param>``.
    """
    weights: dict[str, list[torch.Tensor | None]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in record.to_torch_state_dict().items():
        if key.startswith("extra::"):
            extra[key[len("extra::") :]] = t
            continue
        parts = key.split("::")
        if len(parts) != 3 or parts[0] != "lora" or parts[2] not in ("A", "B"):
            raise ValueError(
                f"unexpected key {key!r} in the ArrayRecord; expected 'lora::<module>::A|B' or 'extra::<param>'"
            )
        weights.setdefault(parts[1], [None, None])[0 if parts[2] == "A" else 1] = t
    return {n: (ab[0], ab[1]) for n, ab in weights.items()}, extra


class FedSVD(FedAvg):
    """Flower strategy for federated LoRA: FedSVD (default), FFA-LoRA or FedAvg-LoRA server aggregation.

    Clients train B (A frozen) and send B with ``num-examples``; the strategy remembers the A it sent
    (``configure_train``), averages B by example counts, and for ``fedsvd`` refactorizes ``B_avg @ A``; the returned
    arrays carry the new A and B. Client replies with NaN/Inf are dropped with a warning; a rank mismatch raises.

    Replies' ``partition-id`` and ``epsilon`` metrics are per client, not averaged: the epsilons go to
    ``client_epsilons[round][partition_id]`` (rejected replies included: their privacy is spent too), and the
    aggregated metrics carry ``epsilon-max``, the largest latest epsilon of any client so far.

    Args:
        method: ``"fedsvd"``, ``"ffa_lora"`` or ``"fedavg_lora"``.
        **kwargs: ``FedAvg`` arguments (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``, ...).
    """

    def __init__(self, method: str = "fedsvd", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = check_method(method)
        self.global_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.global_extra: dict[str, torch.Tensor] = {}
        self.rejected: dict[int, list[int]] = {}
        self.client_epsilons: dict[int, dict[str, float]] = {}
        self.train_metrics: dict[int, MetricRecord] = {}  # the aggregated reply metrics of each round

    def summary(self) -> None:
        logger.info("FedSVD strategy, method=%s", self.method)
        super().summary()

    def set_global(self, arrays: ArrayRecord) -> None:
        """Remember the global adapter that is sent to clients (must carry A and B of every module)."""
        weights, extra = arrayrecord_to_lora(arrays)
        missing = [n for n, (a, b) in weights.items() if a is None or b is None]
        if missing:
            raise ValueError(
                f"the global arrays lack A or B for {missing[:3]}; send the full adapter (lora_to_arrayrecord)"
            )
        self.global_weights = {n: (a, b) for n, (a, b) in weights.items()}  # type: ignore[misc]
        self.global_extra = extra

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.set_global(arrays)
        config["fedsvd-method"] = self.method
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_contents(
        self, server_round: int, contents: list[RecordDict]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate reply contents (one ``ArrayRecord`` + one ``MetricRecord`` each) into the new global arrays."""
        if self.global_weights is None:
            raise ValueError("aggregate before configure_train: call set_global(initial_arrays) first")
        updates, extras, counts, kept = [], [], [], []
        rejected = []
        epsilons: dict[str, float] = {}
        for i, content in enumerate(contents):
            arrays = next(iter(content.array_records.values()))
            metrics = next(iter(content.metric_records.values()))
            if "epsilon" in metrics:
                epsilons[str(int(metrics.get("partition-id", i)))] = float(metrics["epsilon"])  # type: ignore[arg-type]
            weights, extra = arrayrecord_to_lora(arrays)
            if not (is_finite_update(weights) and is_finite_update(extra)):
                logger.warning("round %d: reply %d has NaN/Inf weights; rejected", server_round, i)
                rejected.append(i)
                continue
            updates.append(weights)
            extras.append(extra)
            counts.append(float(metrics[self.weighted_by_key]))
            kept.append(_without_per_client_metrics(content))
        self.rejected[server_round] = rejected
        if epsilons:
            self.client_epsilons[server_round] = epsilons
        if not updates:
            logger.warning("round %d: no usable client update; the global adapter is unchanged", server_round)
            return None, None
        new, spectrum = aggregate_lora(self.method, self.global_weights, updates, counts)
        extra_avg = {n: aggregate_weighted([e[n] for e in extras], counts) for n in self.global_extra}
        self.global_weights, self.global_extra = new, extra_avg
        metrics = self.train_metrics_aggr_fn(kept, self.weighted_by_key)
        metrics[self.weighted_by_key] = int(sum(counts))
        metrics["rejected-replies"] = len(rejected)
        if self.client_epsilons:
            metrics["epsilon-max"] = max(self.latest_client_epsilons().values())
        if spectrum:
            tops = [float(s[0]) for s in spectrum.values() if s.numel()]
            metrics["sigma-max-mean"] = sum(tops) / max(1, len(tops))
        self.train_metrics[server_round] = metrics
        return lora_to_arrayrecord(new, extra_avg), metrics

    def latest_client_epsilons(self) -> dict[str, float]:
        """``{partition id: epsilon}``: each client's epsilon from its latest reply (its privacy spent so far)."""
        latest: dict[str, float] = {}
        for rnd in sorted(self.client_epsilons):
            latest.update(self.client_epsilons[rnd])
        return latest

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        return self.aggregate_contents(server_round, [m.content for m in valid])


def _without_per_client_metrics(content: RecordDict) -> RecordDict:
    """A copy of ``content`` whose ``MetricRecord`` s lack :data:`PER_CLIENT_METRICS` (so they are not averaged)."""
    out = RecordDict()
    for key, record in content.items():
        if isinstance(record, MetricRecord):
            record = MetricRecord({k: v for k, v in record.items() if k not in PER_CLIENT_METRICS})
        out[key] = record
    return out


# --------------------------------------------------------------------------------------------- client side


def load_client_state(state: RecordDict) -> dict[str, Any]:
    """The client state kept in Flower's ``context.state`` (empty dict if there is none yet)."""
    if CLIENT_STATE_KEY not in state:
        return {}
    return json.loads(str(state.config_records[CLIENT_STATE_KEY]["json"]))


def save_client_state(state: RecordDict, client_state: Mapping[str, Any]) -> None:
    """Store ``client_state`` (JSON-serialisable, e.g. a DP accountant's ``state_dict()``) in ``context.state``."""
    state[CLIENT_STATE_KEY] = ConfigRecord({"json": json.dumps(client_state)})


def client_train(
    model: nn.Module,
    content: RecordDict,
    dataset: torch.utils.data.Dataset,
    *,
    partition_id: int,
    local_steps: int,
    output_dir: str,
    seed: int = 0,
    method: str | None = None,
    training_args: Mapping[str, Any] | None = None,
    data_collator: Callable | None = None,
    trainer_cls: type | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    client_state: dict[str, Any] | None = None,
) -> RecordDict:
    """A client's train handler without the Flower runtime: global arrays in, ``{"arrays", "metrics"}`` out.

    The method comes from the server's config (``fedsvd-method``) unless given. Seeds follow
    :class:`~hf_svd_plugins.fedsvd.Federation` (``seed + 1000 * (server_round - 1) + partition_id``).

    ``client_state`` (updated in place, also when training raises) is passed to
    :func:`~hf_svd_plugins.fedsvd.federation.train_lora_client`: with a DP trainer it carries the accountant history
    between rounds. The reply metrics are ``num-examples``, ``train-loss``, ``partition-id`` and, with a DP trainer,
    ``epsilon`` (privacy spent over all rounds in ``client_state``; this round alone if it is None).

    Raises:
        RuntimeError: if no optimizer step was taken (with a DP trainer: the budget ``max_epsilon`` is spent).
    """
    arrays = (
        content.array_records["arrays"]
        if "arrays" in content.array_records
        else next(iter(content.array_records.values()))
    )
    config = content.config_records["config"] if "config" in content.config_records else ConfigRecord()
    method = check_method(method or str(config.get("fedsvd-method", "fedsvd")))
    server_round = int(config.get("server-round", 1))
    weights, extra = arrayrecord_to_lora(arrays)
    state = {} if client_state is None else client_state
    update, new_extra, loss = train_lora_client(
        model,
        dataset,
        method=method,
        global_weights=weights,  # type: ignore[arg-type]
        global_extra=extra,
        local_steps=local_steps,
        seed=client_seed(seed, partition_id, server_round - 1),
        output_dir=output_dir,
        training_args=training_args,
        data_collator=data_collator,
        trainer_cls=trainer_cls or Trainer,
        trainer_kwargs=trainer_kwargs,
        client_state=state,
    )
    if not trains_a(method):
        update = {n: (None, b) for n, (_, b) in update.items()}
    metrics = MetricRecord({"num-examples": len(dataset), "train-loss": float(loss), "partition-id": partition_id})
    if "epsilon" in state:
        metrics["epsilon"] = float(state["epsilon"])
    return RecordDict({"arrays": lora_to_arrayrecord(update, new_extra), "metrics": metrics})


def make_client_app(
    model_fn: Callable[[], nn.Module],
    dataset_fn: Callable[[int, int], torch.utils.data.Dataset],
    *,
    local_steps: int = 10,
    seed: int = 0,
    training_args: Mapping[str, Any] | None = None,
    data_collator: Callable | None = None,
    trainer_cls: type | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    output_dir: str = "fedsvd_flower",
) -> ClientApp:
    """A Flower ``ClientApp`` whose ``train`` handler runs an HF Trainer (or ``trainer_cls``, e.g. a DP trainer) on B.

    The handler loads the client's state from ``context.state[CLIENT_STATE_KEY]`` (persistent per node and run),
    trains with :func:`client_train`, and writes the state back, also when training fails. A failing client (e.g. a
    DP client whose ``max_epsilon`` is spent, so no step fits) replies with a Flower ``Error`` instead of raising,
    because under the simulation engine a raising handler's ``context`` changes are discarded; the strategy skips
    error replies.

    Args:
        model_fn: builds the PEFT LoRA model (called once per client process; weights come from the server).
        dataset_fn: ``(partition_id, num_partitions) -> dataset`` of this client (from ``context.node_config``).
        local_steps: optimizer steps per round.
        seed: client Trainer seeds are ``seed + 1000 * (server_round - 1) + partition_id``.
        training_args: extra ``TrainingArguments`` kwargs (not ``output_dir``/``max_steps``/``seed``).
        data_collator: passed to every Trainer.
        trainer_cls: the client Trainer class (default ``transformers.Trainer``), e.g.
            ``hf_svd_plugins.dp.DPTrainer``.
        trainer_kwargs: extra kwargs for ``trainer_cls``, e.g. ``{"dp_config": DPConfig(noise_multiplier=1.0,
            max_epsilon=8.0)}``; ``max_epsilon`` then bounds the client's privacy over the whole federation.
        output_dir: client scratch directories go to ``output_dir/client_<partition id>``.
    """
    check_client_trainer_kwargs(trainer_kwargs)
    app = ClientApp()
    cache: dict[str, nn.Module] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", 0))
        n = int(context.node_config.get("num-partitions", 1))
        state = load_client_state(context.state)
        try:
            if "model" not in cache:
                cache["model"] = model_fn()
            reply = client_train(
                cache["model"],
                msg.content,
                dataset_fn(pid, n),
                partition_id=pid,
                local_steps=local_steps,
                seed=seed,
                output_dir=os.path.join(output_dir, f"client_{pid}"),
                training_args=training_args,
                data_collator=data_collator,
                trainer_cls=trainer_cls,
                trainer_kwargs=trainer_kwargs,
                client_state=state,
            )
        except Exception as exc:  # noqa: BLE001 - reply with an error so the state below is kept
            logger.exception("client %d: training failed", pid)
            reason = f"client {pid}: {type(exc).__name__}: {exc}"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        finally:
            save_client_state(context.state, state)
        return Message(content=reply, reply_to=msg)

    return app


@contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore Python's, numpy's and torch's global RNG states afterwards.

    ``Trainer()`` reseeds them all (``set_seed(args.seed)``), and Flower's strategies sample clients with Python's
    ``random``: a server-side Trainer would otherwise make every round sample the same clients.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def make_evaluate_fn(
    model_fn: Callable[[], nn.Module],
    eval_dataset: torch.utils.data.Dataset,
    *,
    data_collator: Callable | None = None,
    compute_metrics: Callable | None = None,
    training_args: Mapping[str, Any] | None = None,
    output_dir: str = "fedsvd_flower_eval",
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """A central ``evaluate_fn`` for :func:`make_server_app`: loads the global arrays into ``model_fn()`` (built once)
    and runs ``Trainer.evaluate`` on ``eval_dataset``. The server's global RNGs are left as they were (Flower samples
    the clients of a round with Python's ``random``, which ``Trainer()`` would reseed).

    Args:
        compute_metrics: e.g. :func:`hf_svd_plugins.fedsvd.accuracy_metrics` (adds ``eval_accuracy``).
        training_args: ``TrainingArguments`` kwargs for evaluation (``per_device_eval_batch_size``, ``use_cpu``...).

    Returns:
        ``(server_round, arrays) -> MetricRecord`` of the numeric ``eval_*`` metrics (no timings).
    """
    cache: dict[str, nn.Module] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if "model" not in cache:
            cache["model"] = model_fn()
        model = cache["model"]
        weights, extra = arrayrecord_to_lora(arrays)
        load_lora_state(model, find_lora_pairs(model), weights, extra)
        kwargs: dict[str, Any] = {"report_to": [], "disable_tqdm": True, **dict(training_args or {})}
        with _global_rng_kept():
            trainer = Trainer(
                model=model,
                args=TrainingArguments(output_dir=output_dir, **kwargs),
                eval_dataset=eval_dataset,
                data_collator=data_collator,
                compute_metrics=compute_metrics,
            )
            quiet_trainer(trainer)
            metrics = trainer.evaluate()
        skip = ("runtime", "per_second", "preparation_time")
        return MetricRecord(
            {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and not any(x in k for x in skip)}
        )

    return evaluate


def make_server_app(
    model_fn: Callable[[], nn.Module],
    *,
    method: str = "fedsvd",
    num_rounds: int = 3,
    fraction_train: float = 1.0,
    min_train_nodes: int = 1,
    min_available_nodes: int = 1,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    output_dir: str | None = None,
    report_to: str | list[str] | None = "none",
    callbacks: list[TrainerCallback | type[TrainerCallback]] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running :class:`FedSVD` from ``model_fn()``'s initial adapter for ``num_rounds``.

    If ``output_dir`` is set, the final adapter goes to ``final.safetensors`` (same keys as the ``ArrayRecord``) and
    the per-round metrics to ``metrics.json`` there: ``train`` (aggregated client metrics, ``epsilon-max`` with DP
    clients), ``server_eval`` (``evaluate_fn``'s results, round 0 = the initial adapter, see
    :func:`make_evaluate_fn`), ``rejected`` (NaN/Inf replies) and ``client_epsilon`` (``{round: {partition id:
    epsilon}}``).

    ``report_to`` (as ``TrainingArguments.report_to``; default ``"none"``) and ``callbacks`` get one row per round,
    step = server round (:func:`~hf_svd_plugins.fedsvd.reporting.reporting_evaluate_fn`): the aggregated client
    metrics (``train/train-loss``, ``train/epsilon-max``, ...) and ``evaluate_fn``'s (``eval/loss``; round 0 = the
    initial adapter). TensorBoard writes to ``<output_dir or "fedsvd_flower">/runs/server-run<run id>``.

    Bad ``report_to`` names and ``callbacks`` fail here; a tracker package missing on the server fails when the
    ServerApp starts, before ``model_fn``. Only the server reports, so building this app on a SuperNode (which may
    have no tracker installed) checks the names alone.

    Raises:
        TypeError, ValueError: on a bad ``report_to`` or ``callbacks`` (a ``ValueError`` from the running app if an
            integration's package is not installed on the server).
    """
    check_method(method)
    log_dir = output_dir or "fedsvd_flower"
    check_report_to(report_to, check_installed=False)
    check_callbacks(callbacks)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        reporter = RoundReporter(report_to, callbacks, output_dir=log_dir,
                                 tensorboard_run=f"server-run{context.run_id}")  # fmt: skip
        model = model_fn()
        reporter.handler.model = model  # TensorBoard logs its config
        pairs = find_lora_pairs(model)
        params = dict(model.named_parameters())
        set_trainable_for_method(pairs, method)
        extra = {n: params[n].detach() for n in trainable_extra_names(model, pairs)}
        initial = lora_to_arrayrecord(read_lora_weights(pairs), extra)
        strategy = FedSVD(
            method=method,
            fraction_train=fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_available_nodes,
        )
        round_fn = reporting_evaluate_fn(evaluate_fn, strategy.train_metrics, reporter) if reporter.active else None
        reporter.begin(0, num_rounds)
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds,
                                evaluate_fn=round_fn or evaluate_fn)  # fmt: skip
        reporter.end()
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            save_file(result.arrays.to_torch_state_dict(), os.path.join(output_dir, "final.safetensors"))
            rows = {
                "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
                "server_eval": {str(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()},
                "rejected": {str(r): v for r, v in strategy.rejected.items()},
                "client_epsilon": {str(r): e for r, e in strategy.client_epsilons.items()},
            }
            with open(os.path.join(output_dir, "metrics.json"), "w") as f:
                json.dump(rows, f, indent=1, default=float)

    return app
