"""``hf-svd compress``: a saved tiny model in, a checkpoint that plain ``from_pretrained`` loads out."""

import json

import pytest
import torch
import transformers
from tiny import tiny_model, tiny_tokenizer

from hf_svd_plugins.cli import main
from hf_svd_plugins.fwsvd import LowRankLinear


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model("llama", spectral_decay=0.8)
    model.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_compress_verb_writes_a_loadable_checkpoint(model_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(" ".join(f"w{(s + i) % 90 + 3}" for i in range(20)) for s in range(30)))
    out = tmp_path / "compressed"
    code = main(["compress", str(model_dir), "--ratio", "0.5", "--method", "fisher", "--data", str(text),
                 "--out", str(out), "--max-length", "16", "--batch-size", "4", "--max-batches", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | 32 x 32 | 8 |" in printed and "targeted layers" in printed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "fisher"
    transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[3, 4, 5, 6]])).logits).all()


def test_compress_verb_with_packaged_text_and_a_budget(model_dir, tmp_path):
    out = tmp_path / "whitened"
    code = main(["compress", str(model_dir), "--param-budget", "9000", "--method", "whiten", "--data", "packaged",
                 "--out", str(out), "--max-length", "32", "--max-batches", "2"])
    assert code == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.quantization_config.method == "whiten"


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5", "--method", "svd"], "--ratio must be in (0, 1]"),
    (["--ratio", "0.5", "--method", "fisher"], "needs --data"),
    (["--ratio", "0.5", "--method", "whiten", "--data", "missing.txt"], "neither a file nor 'packaged'"),
    (["--param-budget", "10", "--method", "svd"], "rank 8 per layer"),
])
def test_compress_verb_reports_bad_input(model_dir, tmp_path, capsys, argv, message):
    assert main(["compress", str(model_dir), "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

