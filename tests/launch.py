"""``accelerate launch`` for the multi-process tests: a free port per launch (several test runs may share a machine,
and accelerate's default port 29500 would collide), this checkout first on PYTHONPATH, one thread per process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "accelerate_configs")
#: 2-process CPU DDP without a config file (`--cpu --num_processes 2` would silently run one process)
DDP_FLAGS = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"]


def config_flags(name: str) -> list[str]:
    """``["--config_file", accelerate_configs/<name>.yaml]``."""
    return ["--config_file", os.path.join(CONFIGS, f"{name}.yaml")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(launch_flags: list[str], script: str, *script_args: str, timeout: int = 900,
                      env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``accelerate launch <flags> script args``; raise with the tail of its output if it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
           *launch_flags, str(script), *map(str, script_args)]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
