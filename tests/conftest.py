"""Shared fixtures: everything offline, tiny and seeded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fpo.models.tiny import build_tiny_model, build_tiny_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_tiny_model()
