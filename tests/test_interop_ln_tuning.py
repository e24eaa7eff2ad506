"""LN tuning checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. A fresh LN tuning adapter is a
copy of the layer (a no-op), so the adapters here are perturbed or trained for a few steps.
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

CASES = {
    "llama": ("llama", {}),
    "llama-bf16": ("llama-bf16", {}),
    "llama-attention-and-norm": ("llama", {"target_modules": ["q_proj", "norm"]}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {"target_modules": ["LayerNorm"]}),
    "t5": ("t5", {"exclude_modules": ["final_layer_norm"], "target_modules": ["layer_norm", "final_layer_norm"]}),
}


def make_model(name: str) -> nn.Module:
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".ln_tuning_layers." in name:
                param.add_((0.3 * torch.randn(param.shape, generator=generator)).to(param.dtype))
    return model


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    lib = LIBS[lib_name]
    config = lib.LNTuningConfig(task_type=MODEL_FACTORIES[model_name.removesuffix("-bf16")].task_type, **overrides)
    return perturbed(lib.get_peft_model(make_model(model_name), config)).eval()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("peft_version")
    if isinstance(config["target_modules"], list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


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
    assert any(".ln_tuning_layers." in key for key in files["peftkit"])
    assert read_config(tmp_path / "peftkit") == read_config(tmp_path / "peft")
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    src_name, dst_name = direction
    lib = LIBS[src_name]
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), lib.LNTuningConfig(task_type="CAUSAL_LM"))
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


@pytest.mark.parametrize("case", ["llama", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    wrap("peft", case).save_pretrained(str(tmp_path))
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    # peft's LN tuning unload leaves modules_to_save wrappers in the merged model (peftkit unwraps them):
    # compare the trained copy of the head with ours.
    theirs = {key.replace(".modules_to_save.default.", "."): value for key, value in theirs.items()
              if ".original_module." not in key}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
