"""Super-Tuning checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: peft's
random init (`init_weights=False`) or a default adapter given a few optimizer steps. The support is
chosen from the base weights by magnitude in both libraries, so both build the same indices.
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

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-supra": ("llama", {"r": 2}, 0),
    "llama-supra-trained": ("llama", {"r": 2, "lora_alpha": 3.0, "init_weights": True}, 3),
    "llama-bottom": ("llama", {"select_top": False}, 0),
    "llama-no-indices": ("llama", {"save_precomputed_indices": False, "r": 2}, 0),
    "llama-dropout": ("llama", {"r": 2, "lora_dropout": 0.1}, 0),
    "bert": ("bert", {}, 0),
    "t5": ("t5", {"r": 2}, 0),
}


def arch(name: str) -> str:
    return name.removesuffix("-bf16")


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type=MODEL_FACTORIES[arch(model_name)].task_type, target_modules=TARGETS[arch(model_name)],
                  init_weights=False, sparsity=0.9)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "SupertuningConfig", kwargs, model_name, steps)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "SupertuningModel")


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "llama-supra", "llama-no-indices", "t5"])
def test_same_seed_builds_the_same_tensors(case, tmp_path):
    """From the same weights and seed both libraries hold identical tensors and write the same files."""
    models = {name: wrap(name, case) for name in LIBS}
    ours = check_same_seed_tensors(models, tmp_path)["peftkit"]
    assert any(".supertuning_values" in key for key in ours) and not any(".default" in key for key in ours)
    saved_indices = models["peft"].peft_config["default"].save_precomputed_indices
    assert any(key.endswith(".supertuning_indices") for key in ours) == saved_indices


@pytest.mark.parametrize("case", ["llama", "llama-supra-trained", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def test_two_adapters_active_and_merged_match_peft():
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.SupertuningConfig(target_modules=["q_proj"], sparsity=0.8,
                                                                             init_weights=False))
        model.add_adapter("other", lib.SupertuningConfig(target_modules=["q_proj", "v_proj"], sparsity=0.9, r=2,
                                                         init_weights=False))
        results[lib_name] = merge_both_adapters(model, inputs)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
