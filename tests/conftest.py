"""Tiny models built from configs (no downloads) shared by the whole suite."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*token_id must be.*")

from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

# Tiny models: one thread per test process is fastest (CI runs two processes with pytest-xdist).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def tiny_model_case(request):
    """Each tiny architecture in turn: (name, factory)."""
    return request.param, MODEL_FACTORIES[request.param]
