"""EVA under real multi-process runs (`accelerate launch`, 2 CPU processes over gloo): DDP, DeepSpeed ZeRO-2, ZeRO-3
and ZeRO-3 with the optimizer offloaded to CPU, each through the shipped config in accelerate_configs/.

Checks: every rank ends with identical LoRA weights and EVA ranks; unused ranks are still exactly zero after training;
training ran to the end; and EVA's A equals a single-process EVA over the batches *both* ranks read (activations from
all ranks are combined, not just rank 0's). These layers are narrow, so their statistics are exact and cross ranks by
all-reduce (32-wide inputs) or by gathering rows (the 48-wide input: fewer bytes at this batch size). ``ddp_sketch``
forces sketches (gathered per rank and merged) and checks the captured variance against a float64 numpy PCA.
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


def launch(mode: str, out: str, statistics: str = "auto") -> list[dict]:
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    accelerate_launch(LAUNCH[mode], SCRIPT, out, N_EVA_BATCHES, statistics)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


def assert_ranks_agree_and_training_ran(r0: dict, r1: dict) -> None:
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


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "zero3_offload"])
def test_eva_in_a_real_two_process_run(mode, tmp_path):
    r0, r1 = launch(mode, str(tmp_path))
    assert_ranks_agree_and_training_ran(r0, r1)
    assert set(r0["statistics"].values()) == {"exact"}
    assert set(r0["communication"].values()) == {"all_reduce_statistics", "all_gather_rows"}
    assert {n for n, c in r0["communication"].items() if c == "all_gather_rows"} == {
        f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}

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


def test_sketched_eva_under_ddp_captures_the_variance_of_both_ranks_data(tmp_path):
    """Sketches of 16 rows (below every width) are made per rank, all-gathered and merged; the result must capture
    >= 0.99 of the variance of the optimal subspace of the union of both ranks' activations (float64 numpy)."""
    import numpy as np
    from test_eva_model import independent_activations

    r0, r1 = launch("ddp", str(tmp_path), "sketch")
    assert_ranks_agree_and_training_ran(r0, r1)
    assert set(r0["statistics"].values()) == {"sketch"}
    assert set(r0["communication"].values()) == {"all_gather_sketches"}
    acts = independent_activations("llama", r0["seen"] + r1["seen"], 0.7)
    for name, (a0, _) in r0["initial"].items():
        r_m = r0["ranks"][name]
        if r_m == 0:
            continue
        x = acts[name] - acts[name].mean(0)
        scatter = x.T @ x
        q, _ = np.linalg.qr(a0[:r_m].double().numpy().T)
        optimal = np.sort(np.linalg.eigvalsh(scatter))[::-1][:r_m].sum()
        assert np.trace(q.T @ scatter @ q) / optimal >= 0.99, name


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
