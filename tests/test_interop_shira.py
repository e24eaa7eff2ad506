"""SHiRA checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random values (`init_weights=False`) or a default (zero) adapter given a few optimizer steps, so an
adapter that is not loaded, or loaded at the wrong positions, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    DIRECTIONS, check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, output,
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
    "llama-seeded": ("llama", {"random_seed": 56}, 0),
    "llama-all-linear": ("llama", {"target_modules": "all-linear", "r": 1}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "bert": ("bert", {}, 0),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type, "r": 2, "target_modules": TARGETS[arch],
                    "init_weights": False}
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "ShiraConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "ShiraModel")


@pytest.mark.parametrize("case", ["llama", "llama-seeded", "bert", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Same tensor keys, shapes and dtypes, the very same (seeded) positions, the same adapter_config.json."""
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    theirs, ours = files["peft"], files["peftkit"]
    indices = [key for key in ours if key.endswith(".shira_indices")]
    assert indices and not any(".default" in key for key in ours)
    for key in indices:  # the random mask is drawn exactly as peft draws it
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("case", ["llama", "llama-trained", "t5"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)


def _first_entries(base_layer, r, **kwargs):
    """A custom mask: the first r * (in + out) entries of W in row-major order."""
    mask = torch.zeros_like(base_layer.weight)
    mask.view(-1)[: r * (base_layer.in_features + base_layer.out_features)] = 1
    return mask


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS)
def test_custom_mask_positions_travel_with_the_checkpoint(src_name, dst_name, tmp_path):
    """A custom mask_type cannot be rebuilt at load: both libraries take the positions from the file."""
    lib = LIBS[src_name]
    config = lib.ShiraConfig(r=1, mask_type="first", target_modules=["q_proj"], init_weights=False, task_type="CAUSAL_LM")
    config.mask_fn = _first_entries
    torch.manual_seed(3)
    src = lib.get_peft_model(make_model("llama"), config).eval()
    inputs = make_inputs("llama")
    expected = output(src, inputs)
    src.save_pretrained(str(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.shira_indices["default"][0].max() == 1  # the first 64 entries of a 32-column weight


def test_two_adapters_active_and_merged_match_peft():
    inputs = make_inputs("llama")
    results = {}
    for lib_name, lib in LIBS.items():
        model = lib.get_peft_model(make_model("llama"), lib.ShiraConfig(r=1, target_modules=["q_proj"], init_weights=True))
        model.add_adapter("other", lib.ShiraConfig(r=2, random_seed=9, target_modules=["q_proj", "v_proj"]))
        for _, module in model.named_modules():  # the same values in both libraries
            if hasattr(module, "shira_weight"):
                for name, values in module.shira_weight.items():
                    generator = torch.Generator().manual_seed(len(name) + values.numel())
                    values.data.copy_(torch.randn(values.shape, generator=generator))
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        model.merge_adapter(["default", "other"])
        results[lib_name] = (both, output(model, inputs))
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)
