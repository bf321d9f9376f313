"""EVA under real multi-process runs (`accelerate launch`, 2 CPU processes over gloo): DDP, DeepSpeed ZeRO-2, ZeRO-3
and ZeRO-3 with the optimizer offloaded to CPU, each through the shipped config in accelerate_configs/.

Checks: every rank ends with identical LoRA weights and EVA ranks; unused ranks are still exactly zero after training;
training ran to the end; and EVA's A equals a single-process EVA over the batches *both* ranks read (activations from
all ranks are combined, not just rank 0's).
"""

import os
import sys
import warnings

import pytest
import torch
from launch import REPO, accelerate_launch, config_flags
from tiny import tiny_lora_model

from hf_svd_plugins.eva import EvaConfig, compute_eva

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = os.path.join(REPO, "tests", "distributed", "eva_train.py")
N_EVA_BATCHES = 3
LAUNCH = {
    "ddp": config_flags("cpu_ddp_2proc"),
    "zero2": config_flags("deepspeed_zero2"),
    "zero3": config_flags("deepspeed_zero3"),
    "zero3_offload": config_flags("deepspeed_zero3_offload"),
}


def launch(mode: str, out: str) -> None:
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    accelerate_launch(LAUNCH[mode], SCRIPT, out, N_EVA_BATCHES)


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_eva_in_a_real_two_process_run(mode, tmp_path):
    launch(mode, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    r0, r1 = results
    assert r0["world"] == 2 and r0["steps"] == r1["steps"] == 6
    assert r0["ranks"] == r1["ranks"]
    for name, (a0, b0) in r0["weights"].items():
        a1, b1 = r1["weights"][name]
        assert torch.equal(a0, a1) and torch.equal(b0, b1), f"ranks differ on {name}"
        r_m = r0["ranks"][name]
        assert torch.count_nonzero(a0[r_m:]) == 0 and torch.count_nonzero(b0[:, r_m:]) == 0
        assert torch.count_nonzero(b0[:, :r_m]) > 0, "training must continue after EVA"
    for name, (a0, _) in r0["initial"].items():
        assert torch.equal(a0, r1["initial"][name][0])

    # the saved adapter is a standard PEFT adapter that reproduces the trained model
    from peft import PeftModel
    from tiny import tiny_model

    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=0.7), str(tmp_path / "final")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**r0["batch"]).logits, r0["logits"], rtol=1e-4, atol=1e-4)

    # replay in one process on the union of both ranks' batches: same statistics, so the same EVA
    seen = r0["seen"] + r1["seen"]
    assert len(r0["seen"]) == len(r1["seen"]) == N_EVA_BATCHES
    assert not torch.equal(r0["seen"][0]["input_ids"], r1["seen"][0]["input_ids"]), "ranks must read different data"
    config = EvaConfig(rho=2.0, tau=1.0, min_batches=len(seen), max_batches=len(seen), show_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        replay = compute_eva(tiny_lora_model("llama", r=4, spectral_decay=0.7), seen, config)
    assert replay.ranks == r0["ranks"]
    for name, (a0, _) in r0["initial"].items():
        r_m = replay.ranks[name]
        cos = (a0[:r_m].double() * replay.matrices[name]).sum(1).abs()
        assert cos.min() > 1 - 1e-5, (name, cos)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
