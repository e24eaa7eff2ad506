"""FRoD checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: peft's
random init (`init_weights=False`) or a default adapter given a few optimizer steps. The bases V,
S's pattern and lambda_l are computed from the base weights in both libraries, so a model built by
each from the same weights and seed holds the same tensors.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_merge_parity, check_roundtrip, check_same_seed_tensors, make_inputs, make_model, merge_both_adapters,
    roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-no-projection": ("llama", {"save_projection": False}, 0),
    "llama-dense-s": ("llama", {"sparse_rate": 0.5, "projection_prng_key": 7}, 0),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, 0),
    "llama-dropout": ("llama", {"frod_dropout": 0.1}, 0),
    "llama-bias": ("llama", {"target_modules": ["q_proj", "v_proj"], "bias": "all"}, 3),
    "gpt2": ("gpt2", {}, 0),
    "bert": ("bert", {}, 0),
}


def arch(name: str) -> str:
    return name.removesuffix("-bf16")


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type=MODEL_FACTORIES[arch(model_name)].task_type, target_modules=TARGETS[arch(model_name)],
                  init_weights=False, sparse_rate=0.05, progressbar=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "FrodConfig", kwargs, model_name, steps)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "FrodModel")


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "llama-no-projection", "gpt2", "bert"])
def test_same_seed_builds_the_same_tensors(case, tmp_path):
    """Built from the same weights and seed, both libraries hold identical bases, patterns and lambdas,
    write the same keys, shapes and dtypes, and the same adapter_config.json."""
    models = {name: wrap(name, case) for name in LIBS}
    ours = check_same_seed_tensors(models, tmp_path, 1e-6)["peftkit"]
    assert any(".frod_lambda_l" in key for key in ours) and not any(".default" in key for key in ours)
    assert any(key.startswith("base_model.frod_V.") for key in ours) == models["peft"].peft_config["default"].save_projection


@pytest.mark.parametrize("case", ["llama", "llama-trained", "gpt2"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def test_two_adapters_active_and_merged_match_peft():
    """Two adapters active together (each adds its difference to the base), then merged in turn."""
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.FrodConfig(target_modules=["q_proj"], init_weights=False,
                                                                      progressbar=False))
        model.add_adapter("other", lib.FrodConfig(target_modules=["q_proj", "v_proj"], init_weights=False,
                                                  progressbar=False))
        results[lib_name] = merge_both_adapters(model, inputs)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)


def test_later_adapter_projections_match_peft():
    """A second adapter on a subset of the categories reuses the first one's tensors in both libraries."""
    states = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(3)
        model = lib.get_peft_model(make_model("llama"), lib.FrodConfig(target_modules=["q_proj", "v_proj"], init_weights=False,
                                                                      progressbar=False))
        model.add_adapter("other", lib.FrodConfig(target_modules=["v_proj"], init_weights=False, progressbar=False))
        states[lib_name] = {k: v for k, v in model.state_dict().items() if "frod_s_indices" in k or "frod_V" in k}
    assert sorted(states["peftkit"]) == sorted(states["peft"]) and any(".other" in k for k in states["peft"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=1e-6, rtol=0, msg=key)
