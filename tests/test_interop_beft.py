"""BEFT checkpoints move between peft and peftkit: same keys, shapes, config, logits; same merge.

peft is a test-only dependency; the module is skipped without it. Adapters are non-trivial: either
random biases (`init_weights=False`) or a default (no-op) adapter given a few optimizer steps, so
an adapter that is not loaded, or loaded into the wrong place, changes the outputs.
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


class MLP(nn.Module):
    """Biased and bias-free Linear layers, and a head that is never wrapped."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(torch.relu(self.lin0(x)))))


TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "t5": ["q", "v", "wo"],
    "mlp": ["lin0", "lin1", "head"],
}

# name -> (model, config overrides, steps of training from the default init (0: init_weights=False))
CASES = {
    "llama": ("llama", {}, 0),
    "llama-trained": ("llama", {"init_weights": True}, 3),
    "llama-bf16": ("llama-bf16", {}, 0),
    "llama-default-targets": ("llama", {"target_modules": None}, 0),
    "bert": ("bert", {}, 0),
    "bert-trained": ("bert", {"init_weights": True}, 3),
    "t5": ("t5", {}, 0),
    "mlp": ("mlp", {}, 0),
    "mlp-modules-to-save": ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["head"]}, 0),
}


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return MLP().eval()
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    if name == "mlp":
        return {"x": torch.randn(4, 6, generator=torch.Generator().manual_seed(1))}
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def output(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs, **kwargs)
    return result if isinstance(result, torch.Tensor) else result.logits


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    result = model(**inputs)
    return result.square().mean() if isinstance(result, torch.Tensor) else result.loss


def wrap(lib_name: str, case: str):
    model_name, overrides, steps = CASES[case]
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {} if arch == "mlp" else {"task_type": MODEL_FACTORIES[arch].task_type}
    kwargs.update(target_modules=TARGETS[arch], init_weights=False)
    kwargs.update(overrides)
    lib = LIBS[lib_name]
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), lib.BeftConfig(**kwargs))
    if steps:
        train(model, make_inputs(model_name), steps)
    return model.eval()


def train(model: nn.Module, inputs: dict, steps: int) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss_of(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


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
    assert (expected.float() - output(make_model(model_name), inputs).float()).abs().max() > 1e-3, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path)).eval()
    assert type(loaded.base_model).__name__ == "BeftModel"
    torch.testing.assert_close(output(loaded, inputs), expected, atol=tolerance(case), rtol=0)
    in_file = read_weights(tmp_path)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded)
    assert sorted(in_model) == sorted(in_file)
    for key, tensor in in_file.items():
        torch.testing.assert_close(in_model[key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama", "bert", "mlp-modules-to-save", "llama-default-targets", "llama-bf16"])
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
    assert any(key.endswith(".beft_bias") for key in ours) and not any(".default" in key for key in ours)
    assert read_config(dirs["peftkit"]) == read_config(dirs["peft"])
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


def test_same_seed_draws_the_same_adapter():
    """peftkit draws the biases as peft does (N(0, 1), in module order): one seed, one adapter."""
    states = {}
    for lib_name in LIBS:
        model = wrap(lib_name, "bert")
        states[lib_name] = {k: v for k, v in model.state_dict().items() if "beft_" in k}
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    for key, tensor in states["peft"].items():
        torch.testing.assert_close(states["peftkit"][key], tensor, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["bert", "bert-trained", "mlp-modules-to-save"])
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


def test_two_adapters_merged_in_turn_match_peft():
    inputs = make_inputs("mlp")
    results = {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(7)
        model = lib.get_peft_model(make_model("mlp"), lib.BeftConfig(target_modules=["lin0"], init_weights=False))
        model.add_adapter("other", lib.BeftConfig(target_modules=["lin0", "head"], init_weights=False))
        model.base_model.set_adapter(["default", "other"])
        both = output(model, inputs)
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
        results[lib_name] = (both, output(model, inputs))
        model.unmerge_adapter()
        torch.testing.assert_close(output(model, inputs), both, atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][0], results["peft"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(results["peftkit"][1], results["peft"][1], atol=ATOL, rtol=0)
    assert (results["peftkit"][0] - output(make_model("mlp"), inputs)).abs().max() > 1e-3


def test_merge_without_base_bias_fails_in_both():
    """llama's projections have no bias: peft and peftkit both refuse to merge (peftkit merges nothing)."""
    for lib_name in LIBS:
        model = wrap(lib_name, "llama")
        with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter default"):
            model.merge_adapter()
