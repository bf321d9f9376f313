"""Flower integration: the FedSVD strategy's aggregation (direct), client+strategy == Federation, and a Ray simulation."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_svd_plugins.fedsvd import Federation  # noqa: E402
from hf_svd_plugins.fedsvd.client import set_trainable_for_method, trainable_extra_names  # noqa: E402
from hf_svd_plugins.fedsvd.flower import (  # noqa: E402
    CLIENT_STATE_KEY,
    FedSVD,
    arrayrecord_to_lora,
    client_train,
    load_client_state,
    lora_to_arrayrecord,
    make_client_app,
    make_evaluate_fn,
    make_server_app,
)
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights  # noqa: E402

TRAIN = dict(per_device_train_batch_size=8, learning_rate=2e-2, use_cpu=True, dataloader_num_workers=0)


def _reply(arrays, n: int, node: int = 1) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    meta = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x", group_id="1",
        created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content=content, metadata=meta)


def _global(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "m0": (torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)),
        "m1": (torch.randn(3, 4, generator=g), torch.randn(6, 3, generator=g)),
    }, {"head.weight": torch.randn(2, 4, generator=g)}


def test_arrayrecord_round_trip():
    weights, extra = _global()
    back_w, back_e = arrayrecord_to_lora(lora_to_arrayrecord(weights, extra))
    assert all(torch.equal(back_w[n][0], a) and torch.equal(back_w[n][1], b) for n, (a, b) in weights.items())
    assert torch.equal(back_e["head.weight"], extra["head.weight"])
    b_only, _ = arrayrecord_to_lora(lora_to_arrayrecord({n: (None, b) for n, (_, b) in weights.items()}))
    assert all(a is None for a, _ in b_only.values())


@pytest.mark.parametrize("method", ["fedsvd", "ffa_lora", "fedavg_lora"])
def test_strategy_aggregation_against_numpy(method):
    weights, extra = _global()
    g = torch.Generator().manual_seed(1)
    clients = [
        ({n: (a + 0.1 * torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)) for n, (a, b) in weights.items()},
         {"head.weight": torch.randn(2, 4, generator=g)})
        for _ in range(3)
    ]  # fmt: skip
    counts = [3, 1, 4]
    send_a = method == "fedavg_lora"
    replies = [
        _reply(lora_to_arrayrecord({n: (a if send_a else None, b) for n, (a, b) in w.items()}, e), c, node=i)
        for i, ((w, e), c) in enumerate(zip(clients, counts, strict=True))
    ]
    strategy = FedSVD(method=method, min_train_nodes=1, min_available_nodes=1)
    strategy.set_global(lora_to_arrayrecord(weights, extra))
    arrays, metrics = strategy.aggregate_train(1, replies)
    new_w, new_e = arrayrecord_to_lora(arrays)
    p = np.array(counts, dtype=np.float64) / sum(counts)
    for n, (a_g, _) in weights.items():
        b_avg = sum(pi * w[n][1].double().numpy() for pi, (w, _) in zip(p, clients, strict=True))
        a_avg = sum(pi * w[n][0].double().numpy() for pi, (w, _) in zip(p, clients, strict=True))
        a_new, b_new = new_w[n][0].double().numpy(), new_w[n][1].double().numpy()
        a_ref = a_avg if method == "fedavg_lora" else a_g.double().numpy()
        np.testing.assert_allclose(b_new @ a_new, b_avg @ a_ref, atol=1e-5)
        if method == "fedsvd":
            np.testing.assert_allclose(a_new @ a_new.T, np.eye(3), atol=1e-5)
        else:
            np.testing.assert_allclose(a_new, a_ref, atol=1e-6)
    head = sum(pi * e["head.weight"].double().numpy() for pi, (_, e) in zip(p, clients, strict=True))
    np.testing.assert_allclose(new_e["head.weight"].double().numpy(), head, atol=1e-6)
    assert metrics["num-examples"] == 8 and metrics["rejected-replies"] == 0
    assert ("sigma-max-mean" in metrics) == (method == "fedsvd")
    # the strategy keeps the new global state for the next round
    assert torch.equal(strategy.global_weights["m0"][0], new_w["m0"][0])


def test_strategy_rejects_nan_and_mismatched_ranks():
    weights, extra = _global()
    strategy = FedSVD(min_train_nodes=1, min_available_nodes=1)
    strategy.set_global(lora_to_arrayrecord(weights, extra))
    good = {n: (None, b + 1) for n, (_, b) in weights.items()}
    bad = {n: (None, b.clone()) for n, (_, b) in weights.items()}
    bad["m1"][1][0, 0] = float("nan")
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(lora_to_arrayrecord(good, extra), 2), _reply(lora_to_arrayrecord(bad, extra), 5, 2)]
    )
    assert metrics["rejected-replies"] == 1 and strategy.rejected[1] == [1]
    new_w, _ = arrayrecord_to_lora(arrays)
    for n, (a_g, b_g) in weights.items():  # only the good client counts
        torch.testing.assert_close(new_w[n][1] @ new_w[n][0], (b_g + 1) @ a_g, atol=1e-5, rtol=0)
    # all rejected: no new arrays (Flower keeps the previous ones)
    assert strategy.aggregate_train(2, [_reply(lora_to_arrayrecord(bad, extra), 5)]) == (None, None)
    wrong_rank = {n: (None, torch.randn(b.shape[0], 4)) for n, (_, b) in weights.items()}
    with pytest.raises(ValueError, match="rank mismatch"):
        strategy.aggregate_train(3, [_reply(lora_to_arrayrecord(wrong_rank, extra), 1)])
    with pytest.raises(ValueError, match="unknown method"):
        FedSVD(method="fedbuff")
    with pytest.raises(ValueError, match="lack A or B"):
        strategy.set_global(lora_to_arrayrecord(good))


def test_flower_client_and_strategy_equal_federation(tmp_path):
    """The Flower client handler + strategy reproduce the in-process Federation round for round."""
    datasets = [TinyTokenDataset(n=16, seed=s) for s in (1, 2)]
    fed = Federation(
        tiny_lora_model("llama", r=4), client_datasets=datasets, method="fedsvd", local_steps=2,
        data_collator=pad_collate, training_args=TRAIN, output_dir=str(tmp_path / "fed"), seed=3,
    )  # fmt: skip
    fed.run(2)

    model = tiny_lora_model("llama", r=4)
    strategy = FedSVD(method="fedsvd", min_train_nodes=1, min_available_nodes=1)
    arrays = lora_to_arrayrecord(read_lora_weights(find_lora_pairs(model)))
    for rnd in (1, 2):
        strategy.set_global(arrays)
        content = RecordDict(
            {"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "fedsvd-method": "fedsvd"})}
        )
        replies = [
            client_train(model, content, ds, partition_id=pid, local_steps=2, seed=3, output_dir=str(tmp_path / "fl"),
                         training_args=TRAIN, data_collator=pad_collate)
            for pid, ds in enumerate(datasets)
        ]  # fmt: skip
        assert set(replies[0]["arrays"].keys()) == {f"lora::{p.name}::B" for p in find_lora_pairs(model)}
        arrays, _ = strategy.aggregate_contents(rnd, replies)
    new_w, _ = arrayrecord_to_lora(arrays)
    for n, (a, b) in fed.global_weights.items():
        torch.testing.assert_close(new_w[n][0], a, atol=1e-6, rtol=0)
        torch.testing.assert_close(new_w[n][1], b, atol=1e-6, rtol=0)


def _model_fn():
    return tiny_lora_model("llama", r=4)


def _dataset_fn(pid: int, n: int):
    return TinyTokenDataset(n=16, seed=pid + 1)


@pytest.mark.slow
def test_flower_simulation_runs_with_ray(tmp_path):
    from flwr.simulation import run_simulation

    out = str(tmp_path / "server")
    server = make_server_app(_model_fn, method="fedsvd", num_rounds=2, output_dir=out)
    client = make_client_app(
        _model_fn, _dataset_fn, local_steps=2, seed=3, training_args=TRAIN, data_collator=pad_collate,
        output_dir=str(tmp_path / "clients"),
    )  # fmt: skip
    run_simulation(
        server_app=server, client_app=client, num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )  # fmt: skip
    assert os.path.isfile(os.path.join(out, "final.safetensors")), "the ServerApp did not finish"
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert sorted(metrics["train"]) == ["1", "2"] and metrics["train"]["2"]["num-examples"] == 32
    final, _ = arrayrecord_to_lora(lora_to_arrayrecord({}))  # empty round trip works
    state = load_file(os.path.join(out, "final.safetensors"))
    # same clients, same seeds: equals the in-process federation (to float tolerance across processes)
    fed = Federation(
        _model_fn(), client_datasets=[_dataset_fn(0, 2), _dataset_fn(1, 2)], method="fedsvd", local_steps=2,
        data_collator=pad_collate, training_args=TRAIN, output_dir=str(tmp_path / "fed"), seed=3,
    )  # fmt: skip
    fed.run(2)
    for n, (a, b) in fed.global_weights.items():
        torch.testing.assert_close(state[f"lora::{n}::B"] @ state[f"lora::{n}::A"], b @ a, atol=1e-5, rtol=0)


def test_evaluate_fn_matches_the_model_and_keeps_the_rng(tmp_path):
    """Central evaluation of arrays == a direct forward pass of the model they came from; Flower's client sampling
    (Python's global ``random``) is not reseeded by the evaluation Trainer."""
    import random

    from hf_svd_plugins.fedsvd import accuracy_metrics

    source = tiny_lora_model("bert", r=4)
    pairs = find_lora_pairs(source)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:  # LoRA A/B and the classifier head
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    params = dict(source.named_parameters())
    extra = {n: params[n].detach() for n in trainable_extra_names(source, pairs)}
    arrays = lora_to_arrayrecord(read_lora_weights(pairs), extra)
    data = TinyTokenDataset(n=16, kind="cls", seed=4)
    batch = pad_collate([data[i] for i in range(len(data))])
    source.eval()
    with torch.no_grad():
        out = source(**batch)
    evaluate = make_evaluate_fn(
        lambda: tiny_lora_model("bert", r=4), data, data_collator=pad_collate, compute_metrics=accuracy_metrics,
        training_args={"per_device_eval_batch_size": 64, "use_cpu": True}, output_dir=str(tmp_path),
    )  # fmt: skip
    random.seed(123)
    metrics = evaluate(1, arrays)
    after = random.random()
    random.seed(123)
    assert after == random.random()
    assert metrics["eval_loss"] == pytest.approx(float(out.loss), rel=1e-5)
    expected_acc = float((out.logits.argmax(-1) == batch["labels"]).float().mean())
    assert metrics["eval_accuracy"] == pytest.approx(expected_acc)
    assert set(metrics) == {"eval_loss", "eval_accuracy"}


# --------------------------------------------------------------------------------------------- DP clients

DP_TRAIN = {**TRAIN, "max_grad_norm": 0.0}
Q = 8 / 32  # expected batch / shard size of the DP clients below


def _dp_config(**kw):
    dp = pytest.importorskip("hf_svd_plugins.dp")
    return dp.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, target_delta=1e-3, noise_seed=0, accountant="rdp",
                       per_sample_method="vmap", **kw)  # fmt: skip


def _dp_model_fn():
    return tiny_lora_model("bert", r=4)


def _dp_dataset_fn(pid: int, n: int):
    return TinyTokenDataset(n=32, kind="cls", seed=pid + 1)


def _dp_client_app(tmp_path, config):
    from hf_svd_plugins.dp import DPTrainer

    return make_client_app(
        _dp_model_fn, _dp_dataset_fn, local_steps=2, training_args=DP_TRAIN, data_collator=pad_collate,
        trainer_cls=DPTrainer, trainer_kwargs={"dp_config": config}, output_dir=str(tmp_path / "clients"),
    )  # fmt: skip


def _train_message(arrays, rnd: int, node: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "fedsvd-method": "fedsvd"})})
    meta = Metadata(
        run_id=1, message_id=f"r{rnd}n{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id=str(rnd), created_at=time.time(), ttl=600.0, message_type="train",
    )  # fmt: skip
    return Message(content=content, metadata=meta)


def _node_context(pid: int, n: int) -> Context:
    return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": n},
                   state=RecordDict(), run_config={})  # fmt: skip


def _initial_arrays():
    """What the ServerApp sends first: the fresh adapter of ``_dp_model_fn()`` plus its classifier head."""
    model = _dp_model_fn()
    pairs = find_lora_pairs(model)
    set_trainable_for_method(pairs, "fedsvd")
    params = dict(model.named_parameters())
    extra = {n: params[n].detach() for n in trainable_extra_names(model, pairs)}
    return lora_to_arrayrecord(read_lora_weights(pairs), extra)


def test_flower_dp_client_accountant_composes_across_rounds(tmp_path):
    """The ClientApp keeps each node's accountant in context.state: epsilon after round 2 is that of 4 steps."""
    from hf_svd_plugins.dp import compute_epsilon

    app = _dp_client_app(tmp_path, _dp_config())
    contexts = [_node_context(pid, 2) for pid in (0, 1)]
    strategy = FedSVD(method="fedsvd", min_train_nodes=1, min_available_nodes=1)
    arrays = _initial_arrays()
    for rnd in (1, 2):
        strategy.set_global(arrays)
        replies = [app(_train_message(arrays, rnd, pid + 1), ctx) for pid, ctx in enumerate(contexts)]
        assert not any(r.has_error() for r in replies), [r.error for r in replies if r.has_error()]
        # independent reference: the RDP accountant on the composed history, 2 steps per round so far
        expected = compute_epsilon(1.0, Q, 2 * rnd, 1e-3, accountant="rdp")
        for pid, (reply, ctx) in enumerate(zip(replies, contexts, strict=True)):
            metrics = reply.content["metrics"]
            assert metrics["partition-id"] == pid
            assert metrics["epsilon"] == pytest.approx(expected, rel=1e-6)
            assert sum(n for _, _, n in load_client_state(ctx.state)["accountant"]["history"]) == 2 * rnd
        arrays, agg = strategy.aggregate_train(rnd, replies)
        # per-client metrics are not averaged; the strategy logs them per client and the max
        assert "epsilon" not in agg and "partition-id" not in agg
        assert agg["epsilon-max"] == pytest.approx(expected, rel=1e-6)
        assert strategy.client_epsilons[rnd] == {str(p): r.content["metrics"]["epsilon"] for p, r in enumerate(replies)}
    assert strategy.client_epsilons[2]["0"] > strategy.client_epsilons[1]["0"]
    assert CLIENT_STATE_KEY in contexts[0].state.config_records

    # a node's state is its own: a fresh node starts from an empty history
    fresh = app(_train_message(arrays, 3, 9), _node_context(0, 2))
    assert fresh.content["metrics"]["epsilon"] == pytest.approx(compute_epsilon(1.0, Q, 2, 1e-3, "rdp"), rel=1e-6)


def test_flower_dp_client_stops_when_budget_is_spent(tmp_path):
    """max_epsilon = one round's epsilon: round 1 trains, round 2 replies with an error the strategy skips."""
    from hf_svd_plugins.dp import compute_epsilon

    budget = compute_epsilon(1.0, Q, 2, 1e-3, accountant="rdp") * 1.0001
    app = _dp_client_app(tmp_path, _dp_config(max_epsilon=budget))
    ctx = _node_context(0, 1)
    strategy = FedSVD(method="fedsvd", min_train_nodes=1, min_available_nodes=1)
    arrays = _initial_arrays()
    strategy.set_global(arrays)
    first = app(_train_message(arrays, 1, 1), ctx)
    assert not first.has_error() and first.content["metrics"]["epsilon"] <= budget
    arrays, _ = strategy.aggregate_train(1, [first])
    strategy.set_global(arrays)
    second = app(_train_message(arrays, 2, 1), ctx)
    assert second.has_error() and "took no optimizer step" in second.error.reason
    # the strategy skips error replies: no new arrays, Flower keeps the previous global adapter
    assert strategy.aggregate_train(2, [second]) == (None, None)
    # the state survived the failed round (written back in the handler's finally) and no step was added
    assert sum(n for _, _, n in load_client_state(ctx.state)["accountant"]["history"]) == 2


@pytest.mark.slow
def test_flower_simulation_dp_clients_report_composed_epsilon(tmp_path):
    """Under Ray, context.state survives between rounds: metrics.json carries each client's composed epsilon."""
    from flwr.simulation import run_simulation

    from hf_svd_plugins.dp import compute_epsilon

    out = str(tmp_path / "server")
    run_simulation(
        server_app=make_server_app(_dp_model_fn, method="fedsvd", num_rounds=2, output_dir=out),
        client_app=_dp_client_app(tmp_path, _dp_config()), num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )  # fmt: skip
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    for rnd in (1, 2):
        expected = compute_epsilon(1.0, Q, 2 * rnd, 1e-3, accountant="rdp")
        assert metrics["client_epsilon"][str(rnd)] == pytest.approx({"0": expected, "1": expected}, rel=1e-6)
        assert metrics["train"][str(rnd)]["epsilon-max"] == pytest.approx(expected, rel=1e-6)


def test_client_app_refuses_target_epsilon_without_total_steps():
    dp = pytest.importorskip("hf_svd_plugins.dp")
    from hf_svd_plugins.fedsvd.flower import make_client_app

    config = dp.DPConfig(target_epsilon=3.0)
    with pytest.raises(ValueError, match="total_steps=rounds"):
        make_client_app(lambda: None, lambda pid, n: None, trainer_cls=dp.DPTrainer,
                        trainer_kwargs={"dp_config": config})
