"""In-process Federation: equivalences with plain training, resume, robustness, bad input; server rules and shards."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
from transformers import Trainer, TrainingArguments

from hf_svd_plugins.fedsvd import (
    Federation,
    accuracy_metrics,
    aggregate_lora,
    partition_dirichlet,
    partition_iid,
)
from hf_svd_plugins.lora import find_lora_pairs, read_lora_weights

TRAIN = dict(per_device_train_batch_size=8, learning_rate=2e-2, use_cpu=True, dataloader_num_workers=0)


def _federation(tmp_path, kind="llama", **kw) -> Federation:
    data_kind = "cls" if kind == "bert" else "lm"
    base = dict(
        num_clients=3,
        method="fedsvd",
        local_steps=2,
        data_collator=pad_collate,
        training_args=TRAIN,
        output_dir=str(tmp_path),
        seed=0,
    )
    base.update(kw)
    return Federation(tiny_lora_model(kind, r=4), TinyTokenDataset(n=48, kind=data_kind), **base)


# --------------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("kind,method", [("llama", "fedavg_lora"), ("bert", "fedavg_lora"), ("llama", "ffa_lora")])
def test_one_client_equals_plain_local_training(tmp_path, kind, method):
    data_kind = "cls" if kind == "bert" else "lm"
    dataset = TinyTokenDataset(n=32, kind=data_kind)
    fed = Federation(
        tiny_lora_model(kind, r=4),
        dataset,
        num_clients=1,
        method=method,
        local_steps=3,
        data_collator=pad_collate,
        training_args=TRAIN,
        output_dir=str(tmp_path / "fed"),
        seed=0,
    )
    fed.run(1)
    model = tiny_lora_model(kind, r=4)
    if method == "ffa_lora":
        for pair in find_lora_pairs(model):
            pair.A.requires_grad_(False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), max_steps=3, seed=0, report_to=[], save_strategy="no", **TRAIN
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=pad_collate).train()
    plain = read_lora_weights(find_lora_pairs(model))
    for name, (a, b) in plain.items():
        torch.testing.assert_close(fed.global_weights[name][0], a, atol=1e-7, rtol=0)
        torch.testing.assert_close(fed.global_weights[name][1], b, atol=1e-7, rtol=0)
    # non-LoRA trainable parameters (BERT's classifier head, PEFT modules_to_save) are carried too
    params = dict(model.named_parameters())
    assert (kind == "bert") == bool(fed.extra_names)
    for name in fed.extra_names:
        torch.testing.assert_close(fed.global_extra[name], params[name].detach(), atol=1e-7, rtol=0)


def test_fedsvd_and_ffa_lora_agree_on_the_product_after_a_round(tmp_path):
    runs = {m: _federation(tmp_path / m, method=m, client_fraction=2 / 3) for m in ("fedsvd", "ffa_lora")}
    for fed in runs.values():
        fed.run(1)
    assert runs["fedsvd"].history[0]["clients"] == runs["ffa_lora"].history[0]["clients"]
    for name, (a_ffa, b_ffa) in runs["ffa_lora"].global_weights.items():
        a_svd, b_svd = runs["fedsvd"].global_weights[name]
        np.testing.assert_allclose(
            (b_svd.double() @ a_svd.double()).numpy(), (b_ffa.double() @ a_ffa.double()).numpy(), atol=1e-6
        )
        np.testing.assert_allclose((a_svd.double() @ a_svd.double().T).numpy(), np.eye(4), atol=1e-5)


def test_resumed_federation_equals_uninterrupted(tmp_path):
    kw = dict(method="fedsvd", num_clients=4, client_fraction=0.5, partition="dirichlet", alpha=0.5, kind="bert")
    full = _federation(tmp_path / "full", **kw)
    full.run(3)
    _federation(tmp_path / "part", **kw).run(2)  # killed after round 2
    resumed = _federation(tmp_path / "part", **kw)
    resumed.run(3)
    assert resumed.round == full.round == 3
    for name, (a, b) in full.global_weights.items():
        assert torch.equal(resumed.global_weights[name][0], a) and torch.equal(resumed.global_weights[name][1], b)
    for name, t in full.global_extra.items():
        assert torch.equal(resumed.global_extra[name], t)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed.history) == drop(full.history)
    # the model holds the final global adapter; the checkpoint and the CSV are there
    final = read_lora_weights(resumed.pairs)
    assert all(torch.equal(final[n][1], b) for n, (_, b) in full.global_weights.items())
    with open(tmp_path / "part" / "server" / "state.json") as f:
        assert json.load(f)["round"] == 3
    with open(tmp_path / "part" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1", "2", "3"] and "eval_loss" not in rows[0]


def test_eval_metrics_and_csv(tmp_path):
    fed = _federation(
        tmp_path,
        kind="bert",
        method="ffa_lora",
        eval_dataset=TinyTokenDataset(n=16, kind="cls", seed=1),
        compute_metrics=accuracy_metrics,
    )
    rows = fed.run(2)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and np.isfinite(r["eval_loss"]) for r in rows)
    with open(tmp_path / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[1]["eval_accuracy"]) == rows[1]["eval_accuracy"]
    assert "sigma_max_mean" not in rows[0]  # only fedsvd has a spectrum


# --------------------------------------------------------------------------------------------- robustness


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        raise RuntimeError("disk on fire")


class _NaNTrainer(Trainer):
    """Returns NaN weights when its data set is flagged."""

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        if getattr(self.train_dataset, "poison", False):
            with torch.no_grad():
                find_lora_pairs(self.model)[0].B.fill_(float("nan"))
        return out


def test_failing_and_nan_clients_are_skipped(tmp_path):
    good = TinyTokenDataset(n=16, seed=1)
    poisoned = TinyTokenDataset(n=16, seed=2)
    poisoned.poison = True
    fed = Federation(
        tiny_lora_model("llama", r=4),
        client_datasets=[good, _Broken(), poisoned],
        method="fedsvd",
        local_steps=2,
        data_collator=pad_collate,
        training_args=TRAIN,
        trainer_cls=_NaNTrainer,
        output_dir=str(tmp_path),
    )
    with pytest.warns(UserWarning) as record:
        row = fed.run(1)[0]
    messages = " ".join(str(w.message) for w in record)
    assert "client 1 failed" in messages and "disk on fire" in messages and "client 2 sent NaN/Inf" in messages
    assert row["n_ok"] == 1 and row["failed"] == "1" and row["rejected"] == "2"
    assert all(bool(torch.isfinite(b).all()) for _, b in fed.global_weights.values())

    only_broken = Federation(
        tiny_lora_model("llama", r=4),
        client_datasets=[_Broken()],
        local_steps=1,
        data_collator=pad_collate,
        training_args=TRAIN,
        output_dir=str(tmp_path / "b"),
    )
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable client update"):
        only_broken.run(1)


def test_bad_configuration_errors(tmp_path):
    model = tiny_lora_model("llama", r=4)
    ds = TinyTokenDataset(n=8)
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        Federation(model, ds, method="fedprox", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_clients"):
        Federation(model, ds, num_clients=0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="samples zero clients"):
        Federation(model, ds, num_clients=4, client_fraction=0.1, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Federation\\(local_steps"):
        Federation(model, ds, training_args={"max_steps": 5}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least one of 8 examples"):
        Federation(model, ds, num_clients=9, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        Federation(torch.nn.Linear(2, 2), ds, output_dir=str(tmp_path))
    # resuming into a directory written with other settings
    _federation(tmp_path / "x", local_steps=1).run(1)
    with pytest.raises(ValueError, match="different configuration \\(method\\)"):
        _federation(tmp_path / "x", local_steps=1, method="ffa_lora").run(2)
    assert _federation(tmp_path / "x", local_steps=1, method="ffa_lora").run(1, resume=False)[0]["round"] == 1


# --------------------------------------------------------------------------------------------- server rule (pure)


def _global_and_clients(n=3, shapes=((6, 3, 5), (4, 3, 7)), seed=0):
    g = torch.Generator().manual_seed(seed)
    glob = {
        f"m{i}": (torch.randn(r, di, generator=g), torch.randn(do, r, generator=g))
        for i, (do, r, di) in enumerate(shapes)
    }
    clients = [
        {
            k: (a + 0.1 * torch.randn(a.shape, generator=g), b + torch.randn(b.shape, generator=g))
            for k, (a, b) in glob.items()
        }
        for _ in range(n)
    ]
    return glob, clients


def test_aggregate_lora_rules_against_numpy():
    glob, clients = _global_and_clients()
    counts = [5, 1, 2]
    w = np.array(counts, dtype=np.float64) / sum(counts)
    for method in ("fedavg_lora", "ffa_lora", "fedsvd"):
        new, spectrum = aggregate_lora(method, glob, clients, counts)
        for name, (a_g, _) in glob.items():
            b_avg = sum(wi * c[name][1].double().numpy() for wi, c in zip(w, clients, strict=True))
            a_avg = sum(wi * c[name][0].double().numpy() for wi, c in zip(w, clients, strict=True))
            a_new, b_new = (t.double().numpy() for t in new[name])
            if method == "fedavg_lora":
                np.testing.assert_allclose(a_new, a_avg, atol=1e-6)
                np.testing.assert_allclose(b_new, b_avg, atol=1e-6)
            elif method == "ffa_lora":
                np.testing.assert_allclose(a_new, a_g.numpy(), atol=0)
                np.testing.assert_allclose(b_new, b_avg, atol=1e-6)
            else:
                m = b_avg @ a_g.double().numpy()
                np.testing.assert_allclose(b_new @ a_new, m, atol=1e-5)
                np.testing.assert_allclose(a_new @ a_new.T, np.eye(3), atol=1e-5)
                np.testing.assert_allclose(spectrum[name].numpy(), np.linalg.svd(m, compute_uv=False)[:3], atol=1e-5)
        assert bool(spectrum) == (method == "fedsvd")
    # ffa/fedsvd clients may send B only
    b_only = [{k: (None, b) for k, (_, b) in c.items()} for c in clients]
    new, _ = aggregate_lora("fedsvd", glob, b_only, counts)
    assert set(new) == set(glob)


def test_aggregate_lora_bad_input():
    glob, clients = _global_and_clients()
    with pytest.raises(ValueError, match="unknown method"):
        aggregate_lora("flora", glob, clients, [1, 1, 1])
    with pytest.raises(ValueError, match="zero participating clients"):
        aggregate_lora("fedsvd", glob, [], [])
    bad = dict(clients[1])
    bad["m0"] = (bad["m0"][0], torch.randn(6, 4))
    with pytest.raises(ValueError, match="rank mismatch: client 1 sent B of shape \\(6, 4\\) for m0"):
        aggregate_lora("fedsvd", glob, [clients[0], bad], [1, 1])
    with pytest.raises(ValueError, match="fedavg_lora clients must send A"):
        aggregate_lora("fedavg_lora", glob, [{k: (None, b) for k, (_, b) in clients[0].items()}], [1])
    with pytest.raises(ValueError, match="missing \\['m1'\\]"):
        aggregate_lora("ffa_lora", glob, [{"m0": clients[0]["m0"]}], [1])
    nan = {k: (a, b.clone()) for k, (a, b) in clients[0].items()}
    nan["m1"][1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="client 0 update contains NaN or Inf"):
        aggregate_lora("ffa_lora", glob, [nan], [1])


# --------------------------------------------------------------------------------------------- shards


def test_partition_iid():
    shards = partition_iid(50, 4, seed=1)
    assert sorted(i for s in shards for i in s) == list(range(50))
    assert sorted(len(s) for s in shards) == [12, 12, 13, 13]
    assert shards == partition_iid(50, 4, seed=1) and shards != partition_iid(50, 4, seed=2)
    assert partition_iid(5, 1) == [[0, 1, 2, 3, 4]]


def test_partition_dirichlet_covers_and_skews():
    labels = [i % 2 for i in range(400)]
    shards = partition_dirichlet(labels, 6, alpha=0.5, seed=0)
    assert sorted(i for s in shards for i in s) == list(range(400))
    assert shards == partition_dirichlet(labels, 6, alpha=0.5, seed=0)

    def mean_majority(alpha):
        sh = partition_dirichlet(labels, 6, alpha=alpha, seed=0)
        return np.mean([max(np.bincount([labels[i] for i in s], minlength=2)) / len(s) for s in sh])

    # small alpha: clients dominated by one label; large alpha: close to the global 50/50
    assert mean_majority(0.1) > 0.85 and mean_majority(100.0) < 0.6
    with pytest.raises(ValueError, match="alpha must be a positive"):
        partition_dirichlet(labels, 6, alpha=0)
    with pytest.raises(ValueError, match="use a larger alpha"):
        partition_dirichlet([0] * 10 + [1] * 10, 8, alpha=0.01, min_size=2, max_tries=3)


def test_checkpoint_files_are_pruned(tmp_path):
    fed = _federation(tmp_path, local_steps=1, num_clients=1)
    fed.run(4)
    files = sorted(os.listdir(tmp_path / "server"))
    assert files == ["round_00003.safetensors", "round_00004.safetensors", "state.json"]


# --------------------------------------------------------------------------------------------- DP clients


def test_dp_clients_accountant_composes_across_rounds(tmp_path):
    dp = pytest.importorskip("hf_svd_plugins.dp")
    datasets = [TinyTokenDataset(n=32, kind="cls", seed=s) for s in (1, 2)]
    config = dp.DPConfig(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        target_delta=1e-3,
        noise_seed=0,
        accountant="rdp",
        per_sample_method="vmap",
    )
    kw = dict(
        client_datasets=datasets, method="fedsvd", local_steps=2, data_collator=pad_collate,
        training_args={**TRAIN, "max_grad_norm": 0.0}, trainer_cls=dp.DPTrainer, trainer_kwargs={"dp_config": config},
    )  # fmt: skip
    fed = Federation(tiny_lora_model("bert", r=4), output_dir=str(tmp_path / "a"), **kw)
    rows = fed.run(2)
    q = 8 / 32  # expected batch / shard size
    for r, row in enumerate(rows, start=1):
        assert row["n_ok"] == 2
        for c in (0, 1):
            # independent check: the same accountant on the composed history (2 steps per round so far)
            expected = dp.compute_epsilon(1.0, q, 2 * r, 1e-3, accountant="rdp")
            assert row[f"epsilon_client{c}"] == pytest.approx(expected, rel=1e-6)
        assert row["epsilon_max"] == pytest.approx(max(row["epsilon_client0"], row["epsilon_client1"]))
    assert rows[1]["epsilon_max"] > rows[0]["epsilon_max"]
    # the accountant history is part of the server checkpoint: a resumed federation keeps counting
    resumed = Federation(tiny_lora_model("bert", r=4), output_dir=str(tmp_path / "a"), **kw)
    assert resumed.load_state() and resumed.client_states["0"]["accountant"]["history"][-1][2] == 4

    # a budget of exactly one round: in the second round no step fits, the client is skipped
    budget = dp.compute_epsilon(1.0, q, 2, 1e-3, accountant="rdp") * 1.0001
    kw["trainer_kwargs"] = {"dp_config": dp.DPConfig(**{**config.to_dict(), "max_epsilon": budget})}
    kw["client_datasets"] = datasets[:1]
    capped = Federation(tiny_lora_model("bert", r=4), output_dir=str(tmp_path / "b"), **kw)
    assert capped.run(1)[0]["n_ok"] == 1
    with pytest.warns(UserWarning, match="took no optimizer step"), pytest.raises(RuntimeError, match="no usable"):
        capped.run(2)


def test_dp_clients_target_epsilon_covers_the_whole_federation(tmp_path):
    dp = pytest.importorskip("hf_svd_plugins.dp")
    datasets = [TinyTokenDataset(n=32, kind="cls", seed=s) for s in (1, 2)]
    config = dp.DPConfig(
        target_epsilon=4.0, total_steps=3 * 2, max_grad_norm=1.0, target_delta=1e-3, noise_seed=0,
        accountant="rdp", per_sample_method="vmap",
    )  # fmt: skip
    kw = dict(
        client_datasets=datasets, method="fedsvd", local_steps=2, data_collator=pad_collate,
        training_args={**TRAIN, "max_grad_norm": 0.0}, trainer_cls=dp.DPTrainer, trainer_kwargs={"dp_config": config},
    )  # fmt: skip
    rows = Federation(tiny_lora_model("bert", r=4), output_dir=str(tmp_path / "a"), **kw).run(3)
    assert [row["n_ok"] for row in rows] == [2, 2, 2]  # the budget is not spent in round 1
    # independent check: sigma calibrated by bisection on the RDP accountant, composed over all 3 rounds x 2 steps
    lo, hi = 0.1, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if dp.compute_epsilon(mid, 8 / 32, 6, 1e-3, accountant="rdp") <= 4.0 else (mid, hi)
    final = dp.compute_epsilon(hi, 8 / 32, 6, 1e-3, accountant="rdp")
    assert rows[-1]["epsilon_max"] == pytest.approx(final, rel=0.02)
    assert rows[-1]["epsilon_max"] <= 4.0 * 1.01
    assert rows[0]["epsilon_max"] < rows[1]["epsilon_max"] < rows[2]["epsilon_max"]

    kw["trainer_kwargs"] = {"dp_config": dp.DPConfig(**{**config.to_dict(), "total_steps": None})}
    with pytest.raises(ValueError, match="total_steps=rounds"):
        Federation(tiny_lora_model("bert", r=4), output_dir=str(tmp_path / "b"), **kw)


# --------------------------------------------------------------------------------------------- client callbacks


def test_callbacks_that_write_lora_weights_are_refused_in_clients(tmp_path):
    """EvaCallback in a client would re-initialise A there, away from the server's global A (silently, with rho=1)."""
    from transformers import TrainerCallback

    from hf_svd_plugins.eva import EvaCallback
    from hf_svd_plugins.fedsvd import FedSVDCallback

    class MyInit(TrainerCallback):
        writes_lora_weights = True

    class LoggingEva(EvaCallback):  # recognised through its base class, without the package importing eva
        pass

    for callback in (EvaCallback(rho=1.0), LoggingEva, FedSVDCallback(), MyInit()):
        name = callback.__name__ if isinstance(callback, type) else type(callback).__name__
        with pytest.raises(ValueError, match=f"contains {name}, which writes LoRA weights.*eva_init"):
            _federation(tmp_path, trainer_kwargs={"callbacks": [callback]})
    _federation(tmp_path, trainer_kwargs={"callbacks": [TrainerCallback()]})  # anything else is fine

    pytest.importorskip("flwr")
    from hf_svd_plugins.fedsvd.flower import make_client_app

    with pytest.raises(ValueError, match="contains EvaCallback"):
        make_client_app(lambda: None, lambda i, n: None, trainer_kwargs={"callbacks": [EvaCallback()]})


def test_partitions_live_on_the_federation_side_and_old_imports_still_work():
    import hf_svd_plugins.fedsvd.core as core
    from hf_svd_plugins.fedsvd import partition

    assert partition_iid is partition.partition_iid and partition_dirichlet is partition.partition_dirichlet
    with pytest.warns(DeprecationWarning, match="moved to hf_svd_plugins.fedsvd.partition"):
        assert core.partition_iid is partition.partition_iid
    with pytest.raises(AttributeError):
        core.no_such_name  # noqa: B018


def test_eva_init_before_the_federation_is_the_round_zero_adapter(tmp_path):
    """The documented way to combine EVA with a federation: initialise once, then federate from it."""
    from tiny import tiny_batches

    from hf_svd_plugins.eva import eva_init

    model = tiny_lora_model("llama", r=4, spectral_decay=0.7)
    eva_init(model, tiny_batches(3, 8), rho=2.0, tau=1.0, min_batches=3, max_batches=3, show_progress_bar=False)
    initial = read_lora_weights(find_lora_pairs(model))
    fed = Federation(model, TinyTokenDataset(n=48), num_clients=2, method="fedsvd", local_steps=2,
                     data_collator=pad_collate, training_args=TRAIN, output_dir=str(tmp_path), seed=0)
    assert all(torch.equal(fed.global_weights[n][0], a) for n, (a, _) in initial.items())
    fed.run(1)
    assert all(float(b.abs().max()) > 0 for _, b in fed.global_weights.values())
