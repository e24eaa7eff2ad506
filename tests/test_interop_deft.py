"""DEFT checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
a random R with the qr projector (`init_weights=False`), PaRa, or a default (no-op) adapter given
a few optimizer steps, so an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
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


def make_model(name: str) -> nn.Module:
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"task_type": MODEL_FACTORIES[arch].task_type, "r": 2, "target_modules": TARGETS[arch],
                    "init_weights": False, "decomposition_method": "qr"}
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.DeftConfig(**kwargs))
    if steps:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(steps):
            model(**make_inputs(model_name)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


def read_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("case", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
)
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-4, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded.base_model).__name__ == "DeftModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-para-qr", "llama-bias", "gpt2", "llama-bf16"])
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])
    layout = {key: (tuple(t.shape), t.dtype) for key, t in ours.items()}
    assert layout == {key: (tuple(t.shape), t.dtype) for key, t in theirs.items()}
    assert any(".deft_P" in key for key in ours) and not any(".default" in key for key in ours)
    assert read_config(dirs["peftkit"]) == read_config(dirs["peft"])
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


def test_same_seed_gives_same_init_as_peft():
    """P and R are drawn in peft's order (P, then R or R = right^T W), so a seed gives the same adapter."""
    for case in ("llama", "llama-relu-trained"):
        states = {}
        for lib_name, lib in LIBS.items():
            overrides = {k: v for k, v in CASES[case][1].items()}
            torch.manual_seed(3)
            model = lib.get_peft_model(make_model("llama"), lib.DeftConfig(r=2, target_modules=["q_proj"], **overrides))
            states[lib_name] = lib.get_peft_model_state_dict(model)
        assert sorted(states["peft"]) == sorted(states["peftkit"])
        for key, tensor in states["peft"].items():
            torch.testing.assert_close(states["peftkit"][key], tensor, atol=1e-7, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-relu-trained", "llama-para-relu", "gpt2"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    inputs = make_inputs(model_name)
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        unmerged = output(loaded, inputs)
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged, atol=1e-4, rtol=0)


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
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        if together:
            model.merge_adapter(["default", "other"])
        else:
            model.merge_adapter(["default"])
            model.merge_adapter(["other"])
        results[lib_name] = (both, output(model, inputs))
        model.unmerge_adapter()
        torch.testing.assert_close(output(model, inputs), both, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
    if together:
        torch.testing.assert_close(results["peftkit"][1], results["peftkit"][0], atol=1e-4, rtol=0)
