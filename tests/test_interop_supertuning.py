"""Super-Tuning checkpoints move between peft and peftkit: same keys, shapes, dtypes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: peft's
random init (`init_weights=False`) or a default adapter given a few optimizer steps. The support is
chosen from the base weights by magnitude in both libraries, so both build the same indices.
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


def make_model(name: str) -> nn.Module:
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def arch(name: str) -> str:
    return name.removesuffix("-bf16")


def tolerance(case: str) -> float:
    return 2e-2 if CASES[case][0].endswith("-bf16") else ATOL


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    kwargs = dict(task_type=MODEL_FACTORIES[arch(model_name)].task_type, target_modules=TARGETS[arch(model_name)],
                  init_weights=False, sparsity=0.9)
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.SupertuningConfig(**kwargs))
    if steps:
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        inputs = MODEL_FACTORIES[arch(model_name)].make_inputs()
        for _ in range(steps):
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


def read_weights(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    ("case", "src_name", "dst_name"),
    [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in CASES for s, d in DIRECTIONS],
)
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case)
    inputs = MODEL_FACTORIES[arch(model_name)].make_inputs()
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded.base_model).__name__ == "SupertuningModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "llama-bf16", "llama-supra", "llama-no-indices", "t5"])
def test_same_seed_builds_the_same_tensors(case, tmp_path):
    """From the same weights and seed both libraries hold identical tensors and write the same files."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    states = {name: model.state_dict() for name, model in models.items()}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])
    assert {k: (tuple(t.shape), t.dtype) for k, t in ours.items()} == {k: (tuple(t.shape), t.dtype) for k, t in theirs.items()}
    assert any(".supertuning_values" in key for key in ours) and not any(".default" in key for key in ours)
    saved_indices = models["peft"].peft_config["default"].save_precomputed_indices
    assert any(key.endswith(".supertuning_indices") for key in ours) == saved_indices
    assert read_config(dirs["peftkit"]) == read_config(dirs["peft"])
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("case", ["llama", "llama-supra-trained", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    inputs = MODEL_FACTORIES[arch(model_name)].make_inputs()
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


def test_two_adapters_active_and_merged_match_peft():
    inputs = MODEL_FACTORIES["llama"].make_inputs()
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("llama"), lib.SupertuningConfig(target_modules=["q_proj"], sparsity=0.8,
                                                                             init_weights=False))
        model.add_adapter("other", lib.SupertuningConfig(target_modules=["q_proj", "v_proj"], sparsity=0.9, r=2,
                                                         init_weights=False))
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
        results[lib_name] = (both, output(model, inputs))
        model.unmerge_adapter()
        torch.testing.assert_close(output(model, inputs), both, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=1e-4, rtol=0)
