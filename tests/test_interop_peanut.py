"""PEANuT checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
a random B (`init_weights=False`) or a default (B = 0) adapter given a few optimizer steps, so an
adapter that is not loaded, or loaded into the wrong place (a swapped encoder), changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, merge_both_adapters,
    roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-depth2-gelu": ("llama", {"depth": 2, "act_fn": "gelu", "scaling": 0.5}, 0),
    "llama-trained": ("llama", {"init_weights": True, "depth": 1}, 3),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, 0),
    "llama-bf16": ("llama-bf16", {"depth": 1}, 0),
    "bert": ("bert", {"depth": 1}, 0),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type, "r": 4, "target_modules": TARGETS[arch],
                    "init_weights": False}
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "PeanutConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "PeanutModel")


@pytest.mark.parametrize("case", ["llama", "llama-depth2-gelu", "bert", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(".peanut_A.weight" in key for key in ours) and not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama", "llama-trained", "t5"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def test_two_adapters_merged_in_turn_match_peft():
    """Two adapters on the same modules, merged one after the other: both updates read W0, as in peft."""
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.PeanutConfig(r=2, target_modules=["q_proj"], init_weights=False))
        model.add_adapter("other", lib.PeanutConfig(r=3, depth=1, target_modules=["q_proj", "v_proj"], init_weights=False))
        results[lib_name] = merge_both_adapters(model, inputs)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)
