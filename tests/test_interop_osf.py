"""OSF checkpoints move between peft and peftkit: same keys, shapes, config, logits, and the same
projected gradients.

peft is a test-only dependency; the module is skipped without it. Only U_low, S_low, V_low are
saved (both libraries rebuild the frozen SVD parts from the base weight), so these tests also check
that the rebuild agrees. Adapters start random (`init_weights=False`) or are trained for a few steps.
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
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

CASES = {
    "llama": ("llama", {"effective_rank": 0.75}),
    "llama-default-rank": ("llama", {}),
    "llama-rank-pattern": ("llama", {"effective_rank": 20, "rank_pattern": {"down_proj": 0.5, "v_proj": 30}}),
    "llama-default-targets": ("llama", {"target_modules": None, "effective_rank": 0.875}),
    "llama-bf16": ("llama-bf16", {"effective_rank": 0.75}),
    "bert": ("bert", {"target_modules": ["query", "value", "dense"], "effective_rank": 0.75}),
    "t5": ("t5", {"target_modules": ["q", "v", "wo"], "effective_rank": 0.9}),
}


def make_model(name: str) -> nn.Module:
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs = {"init_weights": False, "task_type": MODEL_FACTORIES[arch].task_type, "target_modules": LLAMA_TARGETS,
              **overrides}
    torch.manual_seed(1234)
    return LIBS[lib_name].get_peft_model(make_model(model_name), LIBS[lib_name].OSFConfig(**kwargs)).eval()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.pop("peft_version")
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
    adapter_keys = [key for key in files["peftkit"] if ".osf_svd_params." in key]
    assert {key.rpartition(".")[2] for key in adapter_keys} == {"U_low", "S_low", "V_low"}
    others = set(files["peftkit"]) - set(adapter_keys)  # only a SEQ_CLS head (modules_to_save) besides
    assert all(".classifier." in key for key in others), sorted(others)
    assert read_config(tmp_path / "peftkit") == read_config(tmp_path / "peft")
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


def _train(lib_name: str, steps: int = 3):
    lib = LIBS[lib_name]
    config = lib.OSFConfig(target_modules=LLAMA_TARGETS, effective_rank=0.5, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lib.get_peft_model(make_model("llama"), config)
    inputs = make_inputs("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_projected_gradients_match_peft_hooks():
    """peft projects with parameter hooks, peftkit inside autograd: the gradients must agree."""
    grads = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(0)
        config = lib.OSFConfig(target_modules=LLAMA_TARGETS, effective_rank=0.5, init_weights=False)
        model = lib.get_peft_model(make_model("llama"), config)
        model.train()
        model(**make_inputs("llama")).loss.backward()
        grads[lib_name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads["peft"]) == sorted(grads["peftkit"])
    for name, grad in grads["peft"].items():
        torch.testing.assert_close(grads["peftkit"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_is_the_same_in_both():
    ours, theirs = _train("peftkit"), _train("peft")
    inputs = make_inputs("llama")
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
def test_trained_adapter_moves_across(direction, tmp_path):
    """A few optimizer steps from the identity init, logits equal in the other library."""
    src_name, dst_name = direction
    model = _train(src_name)
    inputs = make_inputs("llama")
    expected = output(model, inputs)
    assert (expected - output(make_model("llama"), inputs)).abs().max() > 1e-3
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "bert", "llama-bf16"])
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


def test_unmerge_refusal_matches_peft():
    errors = {}
    for lib_name in LIBS:
        model = wrap(lib_name, "llama")
        model.merge_adapter()
        with pytest.raises(NotImplementedError) as info:
            model.unmerge_adapter()
        errors[lib_name] = str(info.value)
    assert errors["peftkit"] == errors["peft"]
