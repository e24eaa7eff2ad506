"""DeLoRA checkpoints move between peft and peftkit: same keys (the column-norm buffer included),
shapes, config and logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random A and B (`init_weights=False`) or the zero-B default given a few optimizer steps, so an
adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

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
    "llama-patterns": ("llama", {"rank_pattern": {"v_proj": 2}, "lambda_pattern": {"q_proj": 7}}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-dropout": ("llama", {"module_dropout": 0.1}, 0),
    "bert": ("bert", {}, 0),
    "bert-bias-all-trained": ("bert", {"bias": "all"}, 3),
    "bert-delora-only-bias-trained": ("bert", {"bias": "delora_only"}, 3),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, delora_lambda=3, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "DeloraConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# peft's quirk with bias="all": it also writes the head's unused `original_module.bias` and
# `modules_to_save.bias`; peftkit accepts them from peft's files but does not write them.
HEAD_BIAS_COPIES = (".original_module.bias", ".modules_to_save.bias")


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, tolerance(case), "DeloraModel", without=HEAD_BIAS_COPIES)


@pytest.mark.parametrize("case", ["llama", "llama-patterns", "llama-bf16", "bert-delora-only-bias-trained"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    theirs, ours = files["peft"], files["peftkit"]
    assert any(key.endswith(".delora_w_norm") for key in ours) and not any(".default" in key for key in ours)
    for key, tensor in theirs.items():  # the frozen norms come from the same base weights
        if key.endswith(".delora_w_norm"):
            torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-default-trained", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), make_inputs(model_name), ATOL)
