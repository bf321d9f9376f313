import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Tiny models: one intra-op thread is faster than two and immune to oversubscription on the 2-core CI machine.
torch.set_num_threads(1)

from tiny import TinyTokenDataset, pad_collate, tiny_batches, tiny_lora_model, tiny_model  # noqa: E402


@pytest.fixture(params=["llama", "gpt2", "bert"])
def kind(request):
    return request.param


@pytest.fixture
def make_lora_model():
    return tiny_lora_model


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def lm_dataset():
    return TinyTokenDataset(n=64, kind="lm")


@pytest.fixture
def collate():
    return pad_collate


@pytest.fixture
def batches():
    return tiny_batches


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep every test on one thread even if code under test changes it."""
    torch.set_num_threads(1)
    yield
