"""RoAd checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Adapters are initialised
randomly (`init_weights=False`) or trained for a few steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import make_inputs, make_model, read_config  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
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
    torch.manual_seed(1234)
    return LIBS[lib_name].get_peft_model(make_model(model_name), LIBS[lib_name].RoadConfig(**kwargs)).eval()


def output(model: nn.Module, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits


@pytest.mark.parametrize(
    ("case", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
)
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    in_file = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    models = {name: wrap(name, case) for name in LIBS}
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
    files = {name: load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in LIBS}
    layout = {name: {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} for name, tensors in files.items()}
    assert layout["peftkit"] == layout["peft"]
    assert any(key.endswith(".road_theta") for key in files["peftkit"])
    assert read_config(tmp_path / "peftkit", comparable=True) == read_config(tmp_path / "peft", comparable=True)
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps from the identity init, logits equal in the other library."""
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.RoadConfig(group_size=8, variant="road_2", target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    inputs = make_inputs("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    expected = output(model, inputs)
    assert (expected - output(make_model("llama"), inputs)).abs().max() > 1e-3
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-road1", "llama-road4", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)


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
