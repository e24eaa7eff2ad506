"""DEFT checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
a random R with the qr projector (`init_weights=False`), PaRa, or a default (no-op) adapter given
a few optimizer steps, so an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    assert_same_tensors, check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model,
    merge_both_adapters, roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"],
           "t5": ["q", "v", "wo"]}

# name -> (model, config overrides, steps of training from the default init (0: as configured))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-relu-trained": ("llama", {"init_weights": True, "decomposition_method": "relu"}, 3),
    "llama-qr-alpha-trained": ("llama", {"init_weights": True, "alpha": 8}, 3),
    "llama-para-relu": ("llama", {"para": True, "decomposition_method": "relu", "r": 8}, 0),
    "llama-para-qr": ("llama", {"para": True}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, 0),
    "llama-bias": ("llama", {"bias": "deft_only", "init_weights": True}, 3),
    "gpt2": ("gpt2", {}, 0),
    "gpt2-trained": ("gpt2", {"init_weights": True, "decomposition_method": "relu"}, 3),
    "bert": ("bert", {}, 0),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type, "r": 2, "target_modules": TARGETS[arch],
                    "init_weights": False, "decomposition_method": "qr"}
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "DeftConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "DeftModel", min_change=1e-4)


@pytest.mark.parametrize("case", ["llama", "llama-para-qr", "llama-bias", "gpt2", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(".deft_P" in key for key in ours) and not any(".default" in key for key in ours)


def test_same_seed_gives_same_init_as_peft():
    """P and R are drawn in peft's order (P, then R or R = right^T W), so a seed gives the same adapter."""
    for case in ("llama", "llama-relu-trained"):
        states = {}
        for lib_name, lib in LIBS.items():
            overrides = {k: v for k, v in CASES[case][1].items()}
            torch.manual_seed(3)
            model = lib.get_peft_model(make_model("llama"), lib.DeftConfig(r=2, target_modules=["q_proj"], **overrides))
            states[lib_name] = lib.get_peft_model_state_dict(model)
        assert_same_tensors(states["peftkit"], states["peft"], 1e-7)


@pytest.mark.parametrize("case", ["llama", "llama-relu-trained", "llama-para-relu", "gpt2"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


@pytest.mark.parametrize("together", [True, False])
def test_two_adapters_merged_match_peft(together):
    """Two adapters on the same module, merged in one call or in turn, then unmerged: as in peft."""
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        config = dict(init_weights=False, decomposition_method="qr")
        model = lib.get_peft_model(make_model("llama"), lib.DeftConfig(r=2, target_modules=["q_proj"], **config))
        model.add_adapter("other", lib.DeftConfig(r=3, target_modules=["q_proj", "v_proj"], **config))
        results[lib_name] = merge_both_adapters(model, inputs, together)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    if together:
        torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)
