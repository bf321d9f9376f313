"""EvaCallback and FedSVDCallback under FSDP2: real 2-process CPU runs over gloo, against the same training in one
process with the two ranks' batches together.

* accelerate's FSDP2 (`accelerate launch` with the shipped accelerate_configs/fsdp.yaml): LoRA weights are DTensor
  shards (see tests/distributed/fsdp_train.py for how the FSDP2 state is set on a CPU-only machine).
* transformers' own FSDP2 (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``, the route
  transformers supports on CPU): the base is sharded, the LoRA weights are replicated tensors.

Checks: the weights really were sharded as described during training; both ranks end with identical full weights;
weights, logits and loss equal the one-process run (to float32 round-off of a different reduction order); EVA chose
the same ranks and its unused ranks are still exactly zero; FedSVD's last refactorization left A orthonormal; the
adapter that ``trainer.save_model`` wrote under FSDP2 reloads with PEFT to the trained model's logits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from launch import DDP_FLAGS, REPO, accelerate_launch, config_flags

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = os.path.join(REPO, "tests", "distributed", "fsdp_train.py")


def _single_process(out, method: str, *flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, SCRIPT, str(out), method, "--single", *flags], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "single.pt", weights_only=False)


def _assert_same_training(r0: dict, r1: dict, single: dict, method: str) -> None:
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == single["steps"] == 6
    for name, (a, b) in single["weights"].items():
        for r in (r0, r1):
            torch.testing.assert_close(r["weights"][name][0], a, atol=1e-5, rtol=0)
            torch.testing.assert_close(r["weights"][name][1], b, atol=1e-5, rtol=0)
        assert torch.equal(r0["weights"][name][0], r1["weights"][name][0])
        assert torch.equal(r0["weights"][name][1], r1["weights"][name][1])
    torch.testing.assert_close(r0["logits"], single["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(r0["loss"]), torch.tensor(single["loss"]), atol=1e-5, rtol=0)
    if method == "eva":
        assert r0["ranks"] == r1["ranks"] == single["ranks"]
        for name, r_m in r0["ranks"].items():
            a, b = r0["weights"][name]
            assert torch.count_nonzero(a[r_m:]) == 0 and torch.count_nonzero(b[:, r_m:]) == 0
            assert torch.count_nonzero(b[:, :r_m]) > 0, "training must continue after EVA"
    else:
        for a, _ in r0["weights"].values():  # refactorized at step 6: A has orthonormal rows
            torch.testing.assert_close(a.double() @ a.double().T, torch.eye(a.shape[0], dtype=torch.float64),
                                       atol=1e-5, rtol=0)


def _ranks(out) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.mark.parametrize("method", ["fedsvd", "eva"])
def test_callback_under_accelerate_fsdp2_equals_one_process(tmp_path, method):
    accelerate_launch(config_flags("fsdp"), SCRIPT, tmp_path, method)
    r0, r1 = _ranks(tmp_path)
    single = _single_process(tmp_path, method)
    assert r0["sharding"] == r1["sharding"] == {"dtensor": True, "is_fsdp2": True, "base_dtensor": True}
    assert single["sharding"] == {"dtensor": False, "is_fsdp2": False, "base_dtensor": False}
    _assert_same_training(r0, r1, single, method)

    # trainer.save_model under FSDP2 (fsdp.yaml: FULL_STATE_DICT) writes a standard PEFT adapter (EVA: truncated to
    # its ranks) that reproduces the trained model
    from peft import PeftModel
    from tiny import tiny_batches, tiny_model

    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=0.7), str(tmp_path / "final")).eval()
    batch = {k: v for k, v in tiny_batches(1, seed=9)[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, r0["logits"], atol=1e-5, rtol=0)


def test_fedsvd_under_transformers_fsdp2_loading_equals_one_process(tmp_path):
    accelerate_launch(DDP_FLAGS, SCRIPT, tmp_path, "fedsvd", "--native")
    r0, r1 = _ranks(tmp_path)
    single = _single_process(tmp_path, "fedsvd", "--native")
    assert r0["sharding"] == r1["sharding"] == {"dtensor": False, "is_fsdp2": False, "base_dtensor": True}
    _assert_same_training(r0, r1, single, "fedsvd")
