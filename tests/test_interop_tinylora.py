"""TinyLoRA checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Adapters start from a uniform v
(`init_weights="uniform"`) and take a few optimizer steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.
"""

from __future__ import annotations

import os
import warnings

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
    "llama-tied": ("llama", {"weight_tying": 0.5, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama-all-tied": ("llama", {"weight_tying": 1.0}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-no-projection": ("llama", {"save_projection": False, "projection_seed": 3}),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}),
    "llama-bf16": ("llama-bf16", {}),
    "gpt2": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "bias": "tinylora_only"}),
    "bert": ("bert", {"target_modules": ["query", "value"], "r": 3}),
}


def make_config(lib, case: str):
    model_name, overrides = CASES[case]
    kwargs = dict(
        r=2, u=6, init_weights="uniform", init_v_bound=0.3, target_modules=["q_proj", "v_proj"],
        task_type=MODEL_FACTORIES[model_name.removesuffix("-bf16")].task_type,
    )
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.TinyLoraConfig(**kwargs)


def wrap(lib_name: str, case: str, train_steps: int = 0):
    lib = LIBS[lib_name]
    model_name = CASES[case][0]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), make_config(lib, case))
    if train_steps:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
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
    torch.testing.assert_close(output(loaded, inputs), expected, atol=ATOL, rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_adapters_are_identical(case):
    """Same seed, same model: the SVD factors, projections, groups and v agree tensor by tensor."""
    states = {}
    for lib_name, lib in LIBS.items():
        states[lib_name] = {k: v.detach() for k, v in lib.get_peft_model_state_dict(wrap(lib_name, case)).items()}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        assert states["peftkit"][key].dtype == tensor.dtype, key
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=1e-6, rtol=0, msg=key)


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
    assert config_ours["peft_type"] == "TINYLORA" and config_ours["peft_version"] == "0.21.2@peftkit"
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("case", ["llama-tied", "llama-embedding", "gpt2"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    src = wrap("peft", case, train_steps=2)
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


def test_two_adapters_in_one_folder_load_in_peft(tmp_path):
    """A second adapter (saved in a subfolder) with its own targets and vectors loads in peft."""
    model = wrap("peftkit", "llama")
    model.add_adapter("other", make_config(peftkit, "llama-tied"))
    model.set_adapter("other")
    expected = output(model, make_inputs("llama"))
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(output(loaded, make_inputs("llama")), expected, atol=ATOL, rtol=0)
