"""MiSS checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
peft's random init (`init_weights=False`) or a zero-init variant ("bat", "mini", default) given a few
optimizer steps, so an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, roundtrip_params,
    seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
}

# name -> (model, config overrides, steps of training)
CASES = {
    "llama": ("llama", {}, 0),
    "llama-default-trained": ("llama", {"init_weights": True}, 3),
    "llama-remainder": ("llama", {"r": 5}, 0),
    "llama-remainder-trained": ("llama", {"r": 5, "init_weights": True}, 3),
    "llama-mini-trained": ("llama", {"init_weights": "mini", "mini_r": 2}, 3),
    "llama-bat-trained": ("llama", {"init_weights": "bat"}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-dropout": ("llama", {"miss_dropout": 0.1}, 0),
    "bert": ("bert", {}, 0),
    "bert-bat-trained": ("bert", {"init_weights": "bat", "r": 8}, 3),
    "bert-bias-all-trained": ("bert", {"bias": "all"}, 3),
    "bert-miss-only-bias-trained": ("bert", {"bias": "MiSS_only"}, 3),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "MissConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    # peft's quirk with bias="all": it also writes the head's unused `original_module.bias` and
    # `modules_to_save.bias`; peftkit accepts them from peft's files but does not write them.
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "MissModel", without=(".original_module.bias", ".modules_to_save.bias"))


@pytest.mark.parametrize("case", ["llama", "llama-remainder", "llama-mini-trained", "llama-bat-trained", "llama-bf16", "bert-miss-only-bias-trained"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(".miss_block" in key for key in ours) and not any(".default" in key for key in ours)


@pytest.mark.parametrize("case", ["llama", "llama-remainder", "llama-mini-trained", "llama-bat-trained", "bert-bat-trained"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)
