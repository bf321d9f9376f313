"""Run the selected demo steps one after another: a failing step is reported and the others still run."""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hf_svd_plugins.demo import STEP_MODULES
from hf_svd_plugins.demo.common import DemoContext, StepResult, console_table, markdown_table

StepFn = Callable[[DemoContext], StepResult]


@dataclass
class StepOutcome:
    name: str
    title: str
    result: StepResult | None
    error: str | None
    wall_seconds: float
    cpu_seconds: float


def load_steps(names: Sequence[str]) -> dict[str, tuple[str, StepFn]]:
    """``name -> (title, run)`` for the named steps, from :data:`STEP_MODULES`."""
    steps = {}
    for name in names:
        module = importlib.import_module(STEP_MODULES[name])
        steps[name] = (module.TITLE, module.run)
    return steps


def run_step(name: str, title: str, fn: StepFn, ctx: DemoContext) -> StepOutcome:
    """Run one step; an exception becomes the outcome's ``error`` (its type, message and last frame)."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result, error = fn(ctx), None
    except Exception as exc:  # noqa: BLE001 - one failing step must not stop the others
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        result = None
        error = f"{type(exc).__name__}: {exc} (at {os.path.basename(frame.filename)}:{frame.lineno})"
    return StepOutcome(name, title, result, error, time.perf_counter() - wall, time.process_time() - cpu)


def _section(outcome: StepOutcome, output_dir: str) -> str:
    head = (f"## {outcome.title}\n\n_{outcome.wall_seconds:.0f} s wall, {outcome.cpu_seconds:.0f} s CPU "
            f"(all threads of this process)_\n")
    if outcome.result is None:
        return f"{head}\n**Failed**: `{outcome.error}`\n"
    res = outcome.result
    parts = [head, markdown_table(res.headers, res.rows), ""]
    parts += [f"- {note}" for note in res.notes]
    if res.artefacts:
        parts.append("\nSaved: " + ", ".join(f"{k} `{os.path.relpath(v, output_dir)}`" for k, v in res.artefacts.items()))
    if res.png:
        parts.append(f"\n![{outcome.name}]({os.path.relpath(res.png, output_dir)})")
    return "\n".join(parts) + "\n"


def write_report(outcomes: Sequence[StepOutcome], ctx: DemoContext) -> str:
    path = ctx.path("report.md")
    lines = [f"# hf-svd demo{' (--quick)' if ctx.quick else ''}\n",
             "Packaged real weights and text, offline. Times: wall clock and process CPU time (all threads); "
             "a busy machine inflates wall time, not CPU time.\n"]
    lines += [_section(o, ctx.output_dir) for o in outcomes]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def print_outcome(index: int, total: int, outcome: StepOutcome, output_dir: str) -> None:
    status = "failed" if outcome.error else "done"
    print(f"  {status} in {outcome.wall_seconds:.0f} s wall / {outcome.cpu_seconds:.0f} s CPU", flush=True)
    if outcome.result is None:
        print(f"  FAILED: {outcome.error}\n", flush=True)
        return
    res = outcome.result
    print(console_table(res.headers, res.rows))
    for note in res.notes:
        print(f"  * {note}")
    for label, path in res.artefacts.items():
        print(f"  saved {label}: {os.path.relpath(path, output_dir)}")
    print(flush=True)


def run_demo(names: Sequence[str], ctx: DemoContext, steps: Mapping[str, tuple[str, StepFn]] | None = None) -> int:
    """Run ``names`` in order (``steps`` overrides where each comes from; tests inject failing ones).

    Returns 0 if every step succeeded, else 1. ``report.md`` is rewritten after every step, so an interrupted run
    keeps what it finished.
    """
    os.makedirs(ctx.output_dir, exist_ok=True)
    steps = dict(steps) if steps is not None else {}
    outcomes = []
    for i, name in enumerate(names, 1):
        if name not in steps:
            try:
                steps.update(load_steps([name]))
            except Exception as exc:  # noqa: BLE001 - e.g. an optional dependency of one step is missing
                outcomes.append(StepOutcome(name, name, None, f"{type(exc).__name__}: {exc}", 0.0, 0.0))
                print(f"[{i}/{len(names)}] {name}\n  FAILED: {outcomes[-1].error}\n", flush=True)
                continue
        title, fn = steps[name]
        print(f"[{i}/{len(names)}] {title}", flush=True)
        outcomes.append(run_step(name, title, fn, ctx))
        print_outcome(i, len(names), outcomes[-1], ctx.output_dir)
        report = write_report(outcomes, ctx)
    failed = [o.name for o in outcomes if o.error]
    wall = sum(o.wall_seconds for o in outcomes)
    cpu = sum(o.cpu_seconds for o in outcomes)
    report = write_report(outcomes, ctx)
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} steps done in {wall:.0f} s wall / {cpu:.0f} s CPU"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"Report, plots and saved models: {os.path.abspath(ctx.output_dir)} (open {os.path.abspath(report)})")
    return 1 if failed else 0
