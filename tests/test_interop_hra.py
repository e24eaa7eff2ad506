"""HRA checkpoints move between peft and peftkit: same keys, shapes, config, logits.

peft is a test-only dependency; the module is skipped without it. Every adapter is initialised
randomly (`init_weights=False`) or trained for a few steps, so an adapter that is not loaded, or
loaded into the wrong place, changes the outputs and the test fails.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import output, read_config, read_weights  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
ATOL = 1e-5


class MixedNet(nn.Module):
    """Linear layers, a 1x1 Conv2d and a padded, strided 3x3 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 12)
        self.pointwise = nn.Conv2d(4, 6, kernel_size=1)
        self.patch = nn.Conv2d(6, 8, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(8 + 12, 5)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        text = torch.relu(self.lin(x)).mean(1)
        image = self.patch(torch.relu(self.pointwise(img))).mean((2, 3))
        return self.head(torch.cat([text, image], dim=1))


MIXED_TARGETS = ["lin", "pointwise", "patch", "head"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]

# name -> (model, config overrides)
CASES = {
    "llama-r4": ("llama", {"r": 4}),
    "llama-gs": ("llama", {"r": 6, "apply_GS": True}),
    "llama-odd": ("llama", {"r": 3}),
    "llama-default-r": ("llama", {}),
    "llama-layers": ("llama", {"r": 4, "layers_to_transform": [1], "layers_pattern": "layers"}),
    "llama-bias": ("llama", {"r": 2, "target_modules": ["q_proj", "v_proj"], "bias": "hra_only"}),
    "llama-bf16": ("llama-bf16", {"r": 4}),
    "bert": ("bert", {"r": 4, "target_modules": ["query", "value", "dense"]}),
    "t5": ("t5", {"r": 4, "target_modules": ["q", "v", "wo"]}),
    "mixed": ("mixed", {"r": 4}),
    "mixed-gs": ("mixed", {"r": 2, "apply_GS": True}),
}


def make_model(name: str) -> nn.Module:
    if name == "mixed":
        return MixedNet().eval()
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    model = MODEL_FACTORIES[name].make_model()
    if name == "llama":  # non-zero biases, so that a bias that is not loaded shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                proj.bias = nn.Parameter(torch.randn(proj.out_features) * 0.5)
    return model


def make_inputs(name: str) -> dict:
    if name == "mixed":
        generator = torch.Generator().manual_seed(1)
        return {"x": torch.randn(2, 5, 16, generator=generator), "img": torch.randn(2, 4, 7, 7, generator=generator)}
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def config_kwargs(model_name: str, overrides: dict) -> dict:
    arch = model_name.removesuffix("-bf16")
    kwargs: dict = {"init_weights": False}
    if arch == "mixed":
        kwargs["target_modules"] = MIXED_TARGETS
    else:
        kwargs.update(task_type=MODEL_FACTORIES[arch].task_type, target_modules=LLAMA_TARGETS)
    kwargs.update(overrides)
    return kwargs


def wrap(lib_name: str, case: str):
    model_name, overrides = CASES[case]
    lib = LIBS[lib_name]
    config = lib.HRAConfig(**config_kwargs(model_name, overrides))
    torch.manual_seed(1234)
    model = lib.get_peft_model(make_model(model_name), config).eval()
    if overrides.get("bias", "none") != "none":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and name.endswith("bias"):
                    param.add_(1.0)
    return model


def normalised(config: dict) -> dict:
    config = dict(config)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
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
    assert any(key.endswith(".hra_u") for key in ours)
    with safe_open(os.path.join(dirs["peftkit"], "adapter_model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    config_theirs, config_ours = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert sorted(config_ours) == sorted(config_theirs)
    assert normalised(config_ours) == normalised(config_theirs)
    assert config_ours["peft_type"] == "HRA" and config_ours["peft_version"] == "0.21.2@peftkit"
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]


@pytest.mark.parametrize("direction", DIRECTIONS, ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("apply_GS", [False, True], ids=["chain", "gram-schmidt"])
def test_trained_adapter_moves_across(direction, apply_GS, tmp_path):
    """A few optimizer steps in one library, logits equal in the other (the default, identity init
    for the chain; a random start for Gram-Schmidt, whose paired init is not the identity)."""
    src_name, dst_name = direction
    lib = LIBS[src_name]
    config = lib.HRAConfig(r=4, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM", apply_GS=apply_GS,
                           init_weights=not apply_GS)
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


@pytest.mark.parametrize("case", ["llama-r4", "llama-gs", "mixed", "t5"])
def test_merge_and_unload_parity(case, tmp_path):
    model_name = CASES[case][0]
    src = wrap("peft", case)
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


def test_dense_reflection_matches_peft_get_delta_weight():
    theirs, ours = wrap("peft", "mixed"), wrap("peftkit", "mixed")
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "hra_u" in k}, strict=False)
    for name in ("lin", "patch"):
        layer_theirs, layer_ours = getattr(theirs.base_model.model, name), getattr(ours.base_model.model, name)
        for reverse in (False, True):
            torch.testing.assert_close(
                layer_ours.get_delta_weight("default", reverse=reverse),
                layer_theirs.get_delta_weight("default", reverse=reverse),
                atol=1e-6, rtol=0,
            )


def test_both_refuse_transformers_conv1d():
    kwargs = {"target_modules": ["c_attn"]}
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(make_model("gpt2"), peft.HRAConfig(**kwargs))
    with pytest.raises(ValueError):
        peftkit.get_peft_model(make_model("gpt2"), peftkit.HRAConfig(**kwargs))
