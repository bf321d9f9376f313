"""FisherCallback under real 2-process runs (`accelerate launch`, CPU over gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3,
and accelerate's FSDP2 (accelerate_configs/fsdp.yaml; on this CPU machine through tests/distributed/fsdp_train.py's
``CpuFsdp2Trainer``, which sets the FSDP state the launcher sets on GPUs).

Every rank ends with the same Fisher sums, equal to one process on the union of both ranks' batches (mode "train",
gradient accumulation 2, and mode "end"); under each launcher the compressed model is saved by rank 0 (under ZeRO-3
and FSDP2 from gathered weights) and loads with plain from_pretrained, with the logits of a single-process compression. ``fwsvd_compress(...,
"whiten")`` on the trained model, each rank with its own calibration batches, equals one process on all of them.
"""

import os
import sys

import pytest
import torch
from launch import DDP_FLAGS, REPO, accelerate_launch, config_flags
from tiny import tiny_batches, tiny_lora_model
from transformers import AutoModelForCausalLM

from hf_svd_plugins.fwsvd import LowRankLinear, estimate_fisher, fwsvd_compress

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = os.path.join(REPO, "tests", "distributed", "fwsvd_train.py")
ACCUMULATE = ["--gradient_accumulation_steps", "2"]  # the script's TrainingArguments; the configs say 1
LAUNCH = {"ddp": DDP_FLAGS, "zero2": config_flags("deepspeed_zero2") + ACCUMULATE,
          "zero3": config_flags("deepspeed_zero3") + ACCUMULATE, "fsdp2": config_flags("fsdp")}


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp2"])
def test_fisher_callback_in_a_real_two_process_run(mode, tmp_path):
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    accelerate_launch(LAUNCH[mode], SCRIPT, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2
    fsdp2 = mode == "fsdp2"  # proof that FSDP2 was active: base and LoRA weights were DTensor shards while training
    assert r0["sharding"] == r1["sharding"] == {"dtensor": fsdp2, "is_fsdp2": fsdp2, "base_dtensor": fsdp2}
    for key in ("train", "end"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][n], r1[key][n]) for n in r0[key]), f"{key}: ranks differ"
    assert r0["batches"] == r1["batches"] == (12, 4)  # 3 steps x 2 micro-batches x 2 ranks; 2 end batches x 2 ranks
    assert not torch.equal(r0["seen"]["train"][0]["input_ids"], r1["seen"]["train"][0]["input_ids"])

    model = tiny_lora_model("llama", r=4, spectral_decay=0.8)  # lr=0: the weights every rank trained with
    for key in ("train", "end"):
        union = r0["seen"][key] + r1["seen"][key]
        assert len(union) == r0["batches"][("train", "end").index(key)]
        replay = estimate_fisher(model, union)
        for name, value in replay.items():
            torch.testing.assert_close(r0[key][name], value, rtol=0, atol=1e-5 * float(value.abs().max()))

    batch = {k: v for k, v in tiny_batches(1, seed=9)[0].items() if k != "labels"}
    with torch.no_grad():  # the callbacks left the Trainer's model as it was
        reference = model.eval()(**batch).logits
    for r in (r0, r1):
        torch.testing.assert_close(r["logits"], reference, rtol=1e-5, atol=1e-5)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")  # plain transformers, after our import
    report = fwsvd_compress(model, "fisher", importance=r0["end"], ratio=0.5, progress=False)
    assert report.ranks == r0["ranks"]
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == report.ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, report.model.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-5)

    # fwsvd_compress(..., "whiten") called on the trained model: equal to one process on both ranks' calibration
    whitened = fwsvd_compress(tiny_lora_model("llama", r=4, spectral_decay=0.8), "whiten", ratio=0.5, progress=False,
                              calibration=r0["calibration"] + r1["calibration"])
    assert not torch.equal(r0["calibration"][0]["input_ids"], r1["calibration"][0]["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(r0["whitened_logits"], whitened.model.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    if mode in ("zero3", "fsdp2"):
        assert r1["whitened_logits"] is None  # rank 0 compressed the gathered copy
    else:
        torch.testing.assert_close(r1["whitened_logits"], r0["whitened_logits"], rtol=0, atol=0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
