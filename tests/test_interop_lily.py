"""Lily checkpoints move between peft and peftkit: same keys (shared A/B repeated under every layer),
shapes, config, logits and trainable-parameter counts.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random Bs (`init_weights=False`) or the zero-B default given a few optimizer steps, so an adapter
that is not loaded, loaded into the wrong place, or shared differently, changes the outputs.
"""

from __future__ import annotations

from functools import partial
import pytest

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    check_checkpoint_parity, check_roundtrip, make_inputs, make_model, roundtrip_params, seeded_peft_model)
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
    "llama-default-trained": ("llama", {"init_weights": True, "stride_A": 2}, 3),
    "llama-stride2": ("llama", {"stride_A": 2, "num_B": 3, "scaling": 0.5}, 0),
    "llama-regex": ("llama", {"target_modules": r".*\.(q|v)_proj"}, 0),
    "llama-bf16": ("llama-bf16", {}, 0),
    "bert": ("bert", {"stride_A": 2}, 0),
    "t5": ("t5", {}, 0),
}


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(r=4, target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "LilyConfig", kwargs, model_name, steps)


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    loaded = check_roundtrip(LIBS, src, dst_name, partial(make_model, model_name), make_inputs(model_name), tmp_path,
                             tolerance(case), "LilyModel", is_trainable=True)
    assert loaded.get_nb_trainable_parameters() == src.get_nb_trainable_parameters()  # shared as the source shared


@pytest.mark.parametrize("case", ["llama", "llama-stride2", "llama-regex", "llama-bf16", "bert"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, the same adapter_config.json and
    count the same trainable parameters (each shared tensor once)."""
    ours = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)["peftkit"]
    assert any(".lily_B.weight" in key for key in ours) and not any(".default" in key for key in ours)
