"""RoAd checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Adapters are initialised
randomly (`init_weights=False`) or trained for a few steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    DIRECTIONS, check_checkpoint_parity, check_merge_parity, check_roundtrip, make_inputs, make_model, output,
    roundtrip_params, seeded_peft_model, train_a_few_steps)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

# name -> (model, config overrides)
CASES = {
    "llama-road1": ("llama", {"group_size": 8}),
    "llama-road2": ("llama", {"group_size": 16, "variant": "road_2"}),
    "llama-road4": ("llama", {"group_size": 4, "variant": "road_4"}),
    "llama-bf16": ("llama-bf16", {"group_size": 8, "variant": "road_2"}),
    "bert": ("bert", {"group_size": 8, "target_modules": ["query", "value", "dense"]}),
    "t5": ("t5", {"group_size": 8, "variant": "road_4", "target_modules": ["q", "v", "wo"]}),
}


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs = {"init_weights": False, "task_type": MODEL_FACTORIES[arch].task_type, "target_modules": LLAMA_TARGETS}
    kwargs.update(overrides)
    return seeded_peft_model(LIBS[lib_name], "RoadConfig", kwargs, model_name)


@pytest.mark.parametrize(("case", "src_name", "dst_name"), roundtrip_params(CASES))
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    check_roundtrip(LIBS, wrap(src_name, case), dst_name, partial(make_model, model_name), make_inputs(model_name),
                    tmp_path, ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    files = check_checkpoint_parity({name: wrap(name, case) for name in LIBS}, tmp_path)
    assert any(key.endswith(".road_theta") for key in files["peftkit"])


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps from the identity init, logits equal in the other library."""
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.RoadConfig(group_size=8, variant="road_2", target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    inputs = make_inputs("llama")
    train_a_few_steps(model, inputs, 3, lr=5e-2, optimizer_cls=torch.optim.AdamW)
    check_roundtrip(LIBS, model, dst_name, partial(make_model, "llama"), inputs, tmp_path, ATOL)


@pytest.mark.parametrize("case", ["llama-road1", "llama-road4", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    check_merge_parity(LIBS, tmp_path, partial(make_model, model_name), atol=ATOL)


def test_mixed_batch_parity(tmp_path):
    """Two adapters, rows alternating base / first / second: both libraries give the same logits."""
    for index, variant in enumerate(("road_1", "road_4")):
        torch.manual_seed(index)
        config = peft.RoadConfig(group_size=8, variant=variant, init_weights=False, target_modules=LLAMA_TARGETS)
        peft.get_peft_model(make_model("llama"), config).save_pretrained(str(tmp_path / variant))
    inputs = {k: v.repeat(2, 1) for k, v in make_inputs("llama").items()}  # 4 rows
    names = ["__base__", "road_1", "road_4", "road_1"]
    got = {}
    for lib_name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "road_1"), adapter_name="road_1")
        model.load_adapter(str(tmp_path / "road_4"), adapter_name="road_4")
        got[lib_name] = output(model.eval(), inputs, adapter_names=names)
    torch.testing.assert_close(got["peftkit"], got["peft"], atol=ATOL, rtol=0)
    assert (got["peft"][1] - got["peft"][2]).abs().max() > 1e-3
