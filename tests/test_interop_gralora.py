"""GraLoRA checkpoints move between peft and peftkit: same keys, shapes, config, logits; same draws; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
peft's random init (`init_weights=False`) or the default no-op init given a few optimizer steps, so
an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, output, roundtrip_params,
    seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
}

# name -> (model, config overrides, steps of training)
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-hybrid": ("llama", {"hybrid_r": 2}, 0),
    "llama-hybrid-trained": ("llama", {"hybrid_r": 2, "init_weights": True}, 3),
    "llama-k4": ("llama", {"r": 8, "gralora_k": 4}, 0),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, 0),
    "llama-all-linear": ("llama", {"target_modules": "all-linear", "gralora_k": 1, "r": 2}, 0),
    "llama-bf16": ("llama-bf16", {"hybrid_r": 2}, 0),
    "gpt2": ("gpt2", {"fan_in_fan_out": True, "hybrid_r": 2}, 0),
    "bert": ("bert", {}, 0),
    "bert-bias-trained": ("bert", {"bias": "gralora_only"}, 3),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, alpha=8, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "GraloraConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "GraloraModel")


@pytest.mark.parametrize("case", ["llama", "llama-hybrid", "llama-k4", "llama-bf16", "gpt2", "bert-bias-trained"])
def test_same_seed_same_adapter_and_logits(case):
    """Same seed, same model: both libraries draw the same tensors (init, shapes, dtypes, order) and compute the same logits."""
    models = {name: wrap(name, case) for name in LIBS}
    states = {name: LIBS[name].get_peft_model_state_dict(model) for name, model in models.items()}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        assert states["peftkit"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
    inputs = make_inputs(CASES[case][0])
    torch.testing.assert_close(output(models["peftkit"], inputs), output(models["peft"], inputs),
                               atol=tolerance(case), rtol=0)


@pytest.mark.parametrize("case", ["llama", "llama-hybrid", "llama-bf16", "gpt2", "bert-bias-trained"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(key.endswith(".gralora_A") for key in ours) and not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama-trained", "llama-hybrid", "llama-k4", "gpt2", "bert-bias-trained"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)
