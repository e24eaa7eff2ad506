"""LoRA through the shared property suite, on every tiny architecture."""

from __future__ import annotations

import pytest

from peftkit import LoraConfig
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES

CASES = sorted(MODEL_FACTORIES)


def lora(case, **overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False, task_type=case.task_type)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


def config_for(name: str, **overrides) -> LoraConfig:
    return lora(MODEL_FACTORIES[name], **overrides)


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2, "use_rslora": True},
    fresh=({"init_lora_weights": True}, {"init_lora_weights": "gaussian"}),
    train=({"init_lora_weights": True},),
    lr=1e-2,
))


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_rslora": True},
        {"bias": "lora_only"},
        {"bias": "all"},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
        {"target_modules": "all-linear"},
        {"target_modules": r".*\.layers\.1\.self_attn\.(q|k)_proj"},
        {"layers_to_transform": [1]},
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"exclude_modules": ["down_proj"], "target_modules": ["q_proj", "down_proj"]},
    ],
    ids=["rslora", "bias-lora-only", "bias-all", "patterns", "all-linear", "regex", "layers", "embedding", "exclude"],
)
def test_llama_variants_merge_and_roundtrip(overrides, tmp_path):
    case = MODEL_FACTORIES["llama"]
    config = lora(case, **overrides)
    prop.check_merge_equals_unmerged(case.make_model, case.make_inputs(), config)
    prop.check_save_load_roundtrip(case.make_model, case.make_inputs(), config, tmp_path)
    prop.check_disable_gives_base(case.make_model, case.make_inputs(), config) if config.bias == "none" else None
