"""C3A checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Kernels start random (peft's
default xavier init, or gaussian / kaiming) and take a few optimizer steps, so an adapter that is
not loaded, or loaded into the wrong place, changes the outputs and the test fails.

GPT-2 is not covered in both directions: peft's C3A refuses transformers' Conv1D (peftkit wraps it).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import make_inputs, make_model, output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5

# name -> (model, config overrides)
CASES = {
    "llama": ("llama", {}),
    "llama-pattern": (
        "llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "block_size_pattern": {"q_proj": 8}}
    ),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers", "init_weights": "gaussian"}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear", "init_weights": "kaiming_uniform"}),
    "llama-bf16": ("llama-bf16", {}),
    "llama-small-blocks": ("llama", {"block_size": 4}),
    "bert": ("bert", {"target_modules": ["query", "value", "dense"], "bias": "c3a_only"}),
}


def make_config(lib, case: str):
    model_name, overrides = CASES[case]
    kwargs = dict(block_size=16, target_modules=["q_proj", "v_proj"],
                  task_type=MODEL_FACTORIES[model_name.removesuffix("-bf16")].task_type)
    kwargs.update(overrides)
    return lib.C3AConfig(**kwargs)


def wrap(lib_name: str, case: str, train_steps: int = 0):
    lib = LIBS[lib_name]
    model_name = CASES[case][0]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), make_config(lib, case))
    if train_steps:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
        model.train()
        for _ in range(train_steps):
            model(**make_inputs(model_name)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def perturb_head_copies(model: nn.Module) -> None:
    """Fresh modules_to_save copies equal the base head; noise makes a skipped head fail the test."""
    generator = torch.Generator().manual_seed(7)
    for name, param in model.named_parameters():
        if ".modules_to_save." in name:
            param.add_(0.5 * torch.randn(param.shape, generator=generator).to(param.dtype))


def normalised(config: dict) -> dict:
    config = dict(config)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("case", "src_name", "dst_name"), [(c, s, d) for c in CASES for s, d in DIRECTIONS])
def test_adapter_roundtrip_gives_same_logits(case, src_name, dst_name, tmp_path):
    model_name = CASES[case][0]
    src = wrap(src_name, case, train_steps=2)
    perturb_head_copies(src)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded).__name__ == type(src).__name__
    atol = ATOL
    torch.testing.assert_close(output(loaded, inputs), expected, atol=atol, rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_kernels_are_identical(case):
    """Same seed, same model: both libraries draw the same kernels (init, shapes, dtypes, order)."""
    states = {name: lib.get_peft_model_state_dict(wrap(name, case)) for name, lib in LIBS.items()}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        assert states["peftkit"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_and_config_parity(case, tmp_path):
    """Both libraries write the same tensor keys, shapes and dtypes, and the same adapter_config.json."""
    models, dirs = {}, {}
    for lib_name in LIBS:
        models[lib_name] = wrap(lib_name, case)
        dirs[lib_name] = tmp_path / lib_name
        models[lib_name].save_pretrained(str(dirs[lib_name]))
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])

    def layout(tensors: dict) -> dict:
        return {key: (tuple(tensor.shape), tensor.dtype) for key, tensor in tensors.items()}

    assert layout(ours) == layout(theirs)
    with safe_open(os.path.join(dirs["peftkit"], "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    config_theirs, config_ours = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert sorted(config_ours) == sorted(config_theirs)
    assert normalised(config_ours) == normalised(config_theirs)
    assert config_ours["peft_type"] == "C3A" and config_ours["peft_version"] == "0.21.2@peftkit"
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("case", ["llama", "llama-pattern", "bert"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    src = wrap("peft", case, train_steps=2)
    perturb_head_copies(src)
    src.save_pretrained(str(tmp_path))
    inputs = make_inputs(model_name)
    unmerged = output(src, inputs)
    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged, atol=1e-4, rtol=0)


def test_peft_refuses_gpt2_conv1d_which_peftkit_wraps():
    """Documents the one deliberate layer difference: GPT-2 Conv1D targets (peft raises, peftkit adapts)."""
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(make_model("gpt2"), peft.C3AConfig(block_size=16, target_modules=["c_attn"]))
    model = peftkit.get_peft_model(make_model("gpt2"), peftkit.C3AConfig(block_size=16, target_modules=["c_attn"]))
    assert len(list(model.base_model.tuner_layers())) == 2
