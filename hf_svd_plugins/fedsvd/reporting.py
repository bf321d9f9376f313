"""A federation server's per-round metrics through the Trainer's reporting integrations and ``TrainerCallback`` s.

The server of a federation is not a Trainer, but its users expect ``report_to`` to work as it does for one.
:class:`RoundReporter` drives transformers' own integration callbacks (the classes
``transformers.integrations.get_reporting_integration_callbacks(report_to)`` returns: ``TensorBoardCallback``,
``WandbCallback``, ``MLflowCallback``, ...) and user callbacks through a ``CallbackHandler``, with a ``TrainerState``
whose ``global_step`` is the round: ``on_train_begin`` when a run starts or resumes (``global_step`` = the rounds
already done, ``log_history`` = their rows), ``on_log`` once per round, ``on_train_end`` at the end. Names are
rewritten by the integrations exactly as for a Trainer: ``eval_loss`` -> ``eval/loss``, ``train_loss`` ->
``train/train_loss``, ``epsilon_max`` -> ``train/epsilon_max``.

TensorBoard writes to ``<output_dir>/runs/server`` (``TENSORBOARD_LOGGING_DIR`` overrides it, as for a Trainer), one
fixed directory, so a resumed federation appends to the same run and its curve continues at the next round. Each
``begin(step)`` opens the writer with ``purge_step=step + 1``: TensorBoard's reader drops the events of rounds after
``step`` written earlier, so a restart (``resume=False``: ``step = 0``) replaces the old curve instead of drawing a
second one over it, and a round logged before a crash but never checkpointed is replaced by its rerun.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import (
    TensorBoardCallback,
    get_available_reporting_integrations,
    get_reporting_integration_callbacks,
)
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

__all__ = ["RoundReporter", "check_callbacks", "check_report_to", "reporting_evaluate_fn", "scalar_logs"]


def check_report_to(value: Any, name: str = "report_to", *, check_installed: bool = True) -> list[str]:
    """``report_to`` as a list of integration names, checked before any training (``"none"``/``None``: ``[]``,
    ``"all"``: every installed one).

    ``check_installed=False`` checks the names only (no integration is instantiated): for a process that only
    carries the value on, e.g. a Flower SuperNode building the ServerApp it never runs.

    Raises:
        TypeError: if ``value`` is not a string or a list of strings.
        ValueError: on an unknown integration name, or (``check_installed``) one whose package is not installed.
    """
    if value is None or value == "none" or value == ["none"]:
        return []
    if value == "all" or value == ["all"]:
        return get_available_reporting_integrations()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not all(isinstance(v, str) for v in names):
        raise TypeError(f"{name} must be a string or a list of strings like 'tensorboard', got {value!r}")
    names = list(names)
    try:
        classes = get_reporting_integration_callbacks(names)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: {exc} Use one of them, or 'none'") from exc
    if not check_installed:
        return names
    for integration, cls in zip(names, classes, strict=True):
        try:
            cls()  # the integration checks its package here (no files written, no run started)
        except (ImportError, RuntimeError) as exc:
            raise ValueError(
                f"{name} includes {integration!r}, whose package is not installed ({exc}); "
                f"`pip install {integration}` or leave it out"
            ) from exc
    return names


def check_callbacks(callbacks: Iterable[Any] | None) -> list[TrainerCallback | type[TrainerCallback]]:
    """``callbacks`` as a list, each a ``TrainerCallback`` class or instance.

    Raises:
        TypeError: naming the first entry that is neither.
    """
    user = list(callbacks or [])
    for cb in user:
        is_class = isinstance(cb, type) and issubclass(cb, TrainerCallback)
        if not (is_class or isinstance(cb, TrainerCallback)):
            raise TypeError(f"callbacks must be TrainerCallback classes or instances, got {cb!r}")
    return user


def scalar_logs(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a round's metric row to log: ints and floats, without ``round`` (it is the step)."""
    return {
        k: v for k, v in row.items() if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class RoundReporter:
    """Sends a federation's per-round metric rows to ``report_to`` integrations and ``callbacks``, step = round.

    Args:
        report_to: integration names as for ``TrainingArguments.report_to`` (``"tensorboard"``, ``["wandb",
            "tensorboard"]``, ``"all"``, ``"none"``).
        callbacks: more ``TrainerCallback`` classes or instances (they see ``on_train_begin``, ``on_log``,
            ``on_train_end``; setting ``control.should_training_stop`` in ``on_log`` ends the run after the round).
        output_dir: the server's directory; TensorBoard writes to ``output_dir/runs/<tensorboard_run>``.
        model: passed to the callbacks as ``model=`` (TensorBoard logs its config as text).
        run_name: ``TrainingArguments.run_name`` (the W&B / MLflow run name).
        tensorboard_run: the TensorBoard run directory under ``output_dir/runs`` (default ``server``: a resumed
            federation appends to it).

    Raises:
        TypeError, ValueError: on a bad ``report_to`` (see :func:`check_report_to`) or a callback that is not a
            ``TrainerCallback``.
    """

    def __init__(
        self,
        report_to: str | Sequence[str] | None,
        callbacks: Iterable[TrainerCallback | type[TrainerCallback]] | None = None,
        *,
        output_dir: str | os.PathLike,
        model: nn.Module | None = None,
        run_name: str | None = None,
        tensorboard_run: str = "server",
    ) -> None:
        self.report_to = check_report_to(report_to)
        user = check_callbacks(callbacks)
        self.output_dir = os.fspath(output_dir)
        integrations = [cls() for cls in get_reporting_integration_callbacks(self.report_to)]
        for cb in integrations:
            if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # None unless TENSORBOARD_LOGGING_DIR
                cb.logging_dir = os.path.join(self.output_dir, "runs", tensorboard_run)
        self.args = TrainingArguments(
            output_dir=self.output_dir, report_to=self.report_to, run_name=run_name, logging_steps=1,
            disable_tqdm=True, save_strategy="no",
        )  # fmt: skip
        self.handler = CallbackHandler([DefaultFlowCallback, *integrations, *user], model, None, None, None)
        self.state = TrainerState(logging_steps=1)
        self.control = TrainerControl()

    @property
    def active(self) -> bool:
        """Whether anything listens (an integration or a user callback)."""
        return len(self.handler.callbacks) > 1

    def begin(self, step: int, max_steps: int, history: Iterable[Mapping[str, Any]] = ()) -> None:
        """A run starts at round ``step`` (the rounds already done; > 0 on resume) of ``max_steps`` in total."""
        self.state = TrainerState(global_step=int(step), max_steps=int(max_steps), logging_steps=1)
        self.state.log_history = [{**scalar_logs(r), "step": int(r["round"])} for r in history if "round" in r]
        self.control = TrainerControl()
        for cb in self.handler.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is None:
                # rounds after `step` logged by an earlier run (a restart, or a crash before the checkpoint) are stale
                cb.tb_writer = cb._SummaryWriter(log_dir=cb.logging_dir, purge_step=int(step) + 1)
        self.control = self.handler.on_train_begin(self.args, self.state, self.control)

    def log(self, step: int, row: Mapping[str, Any]) -> bool:
        """Log round ``step``'s numbers (see :func:`scalar_logs`); returns whether a callback asked to stop."""
        logs = scalar_logs(row)
        self.state.global_step = int(step)
        self.state.log_history.append({**logs, "step": int(step)})
        self.control = self.handler.on_log(self.args, self.state, self.control, logs)
        return bool(self.control.should_training_stop)

    def end(self) -> None:
        """The run ends (integrations flush and close their writers / runs)."""
        self.control = self.handler.on_train_end(self.args, self.state, self.control)


def reporting_evaluate_fn(
    evaluate_fn: Callable[[int, Any], Mapping[str, Any] | None] | None,
    train_metrics: Mapping[int, Mapping[str, Any]],
    reporter: RoundReporter,
) -> Callable[[int, Any], Mapping[str, Any] | None]:
    """A Flower ``evaluate_fn`` that runs ``evaluate_fn`` (if any), then logs the round's row: ``train_metrics
    [round]`` (e.g. ``FedSVD.train_metrics``, filled by the strategy's aggregation) and the evaluation's metrics.

    ``Strategy.start`` calls ``evaluate_fn`` after every round's aggregation (and at round 0, before training): the
    one per-round hook of a Flower ``ServerApp``. A callback's ``control.should_training_stop`` is not honoured
    there (Flower runs all its rounds).
    """

    def evaluate_and_report(server_round: int, arrays: Any) -> Mapping[str, Any] | None:
        result = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
        row = {**dict(train_metrics.get(server_round, {})), **dict(result or {})}
        if row:
            reporter.log(server_round, row)
        return result

    return evaluate_and_report
