"""Tiny models built from configs (no downloads) shared by the whole suite."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------- lanes
#: Methods whose own test files every CI lane runs; the other methods' files (`tests/test_<m>.py`,
#: `tests/test_interop_<m>.py`) are marked `catalog` and run in the pinned lane only: the latest and
#: lowest lanes run `-m "not catalog"` (see the Makefile). Every method still meets every lane
#: through tests/test_registry.py (the property suite on each method) and tests/test_catalog_surface.py.
#: ShadowPEFT is among them because its dual KV cache meets transformers' cache API, which moves (5.24
#: renamed the argument to `cache`).
EVERY_LANE_METHODS = frozenset(
    {"lora", "adalora", "ia3", "loha", "lokr", "bottleneck", "prompt_tuning", "prefix_tuning", "p_tuning",
     "trainable_tokens", "shadow"}
)
_TUNERS = Path(__file__).resolve().parent.parent / "src" / "peftkit" / "tuners"


def catalog_method_of(test_file: Path) -> str | None:
    """The catalog method a test file is about (its name is `test_<m>.py` / `test_interop_<m>.py`), or None."""
    stem = test_file.stem.removeprefix("test_").removeprefix("interop_")
    if stem in EVERY_LANE_METHODS or not (_TUNERS / stem / "__init__.py").is_file():
        return None
    return stem


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if catalog_method_of(item.path) is not None:
            item.add_marker(pytest.mark.catalog)
