"""Interoperability with Hugging Face peft: checkpoints written by one library load in the other.

peft is a test-only dependency; the whole module is skipped when it is not installed. Every test
uses adapters with `init_lora_weights=False` (random A and B), so an adapter that is not loaded,
or loaded into the wrong place, changes the outputs and the test fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

# peft's own notices (fan_in_fan_out flipped for Conv1D, embedding layers saved, ...).
pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning:peft\..*")

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft->peftkit", "peftkit->peft"]
MODEL_NAMES = ["llama", "gpt2", "bert", "t5"]
ATOL = 1e-5

# ---------------------------------------------------------------------------------------------- helpers
class TinyConvNet(nn.Module):
    """A custom (non-transformers) module with Conv2d, Conv1d and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, kernel_size=1)
        self.seq_conv = nn.Conv1d(6, 5, kernel_size=3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = self.conv2(h).flatten(2)  # (batch, 6, H*W)
        h = self.seq_conv(h).mean(dim=2)
        return self.head(h)


def _conv_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 8, 8, generator=generator)}


def make_model(name: str) -> nn.Module:
    if name == "conv":
        return TinyConvNet().eval()
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name[: -len("-bf16")]].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    if name == "conv":
        return _conv_inputs()
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def base_config(name: str, **overrides) -> dict:
    """LoraConfig kwargs for model `name`: its small target list, non-trivial init, its task type."""
    if name == "conv":
        kwargs = {"target_modules": ["conv", "conv2", "seq_conv", "head"], "r": 4, "lora_alpha": 8}
    else:
        case = MODEL_FACTORIES[name.removesuffix("-bf16")]
        kwargs = {"target_modules": list(case.targets), "r": 4, "lora_alpha": 8, "task_type": case.task_type}
    kwargs["init_lora_weights"] = False
    kwargs.update(overrides)
    return kwargs


def wrap(lib_name: str, model_name: str, config_kwargs: dict, adapter_name: str = "default"):
    """get_peft_model of library `lib_name` on a fresh tiny model (seeded, so both libs agree)."""
    lib = LIBS[lib_name]
    model = make_model(model_name)
    torch.manual_seed(1234)
    peft_model = lib.get_peft_model(model, lib.LoraConfig(**config_kwargs), adapter_name=adapter_name)
    return peft_model.eval()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    return result if isinstance(result, torch.Tensor) else result.logits


@torch.no_grad()
def perturb_full_copies(model: nn.Module, seed: int = 7) -> None:
    """Add noise to every trainable non-LoRA tensor (modules_to_save copies, trained biases).

    Freshly copied heads equal the base model's, so without this a loader that skips them passes.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        if param.requires_grad or ".modules_to_save." in name:
            param.add_(0.5 * torch.randn(param.shape, generator=generator))


def weights_file(directory) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise AssertionError(f"no adapter weights in {directory}: {os.listdir(directory)}")


def read_weights(directory) -> dict[str, torch.Tensor]:
    path = weights_file(directory)
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_config(directory) -> dict:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3, "the adapter does not change the output; the test could not fail"


def assert_loaded_state_matches_file(dst_name: str, loaded: nn.Module, directory, adapter_name="default") -> None:
    """The adapter tensors held by the loading library equal the ones in the file.

    peftkit (strict loading) must hold nothing the file lacks. peft's own state dict has extras
    that peftkit does not write (e.g. `original_module.bias` with bias="all"), so for peft we
    require the converse: everything in the file is held by the loaded model.
    """
    in_file = read_weights(directory)
    in_model = LIBS[dst_name].get_peft_model_state_dict(loaded, adapter_name=adapter_name)
    if dst_name == "peftkit":
        assert set(in_model) <= set(in_file), sorted(set(in_model) - set(in_file))
    else:
        assert set(in_file) <= set(in_model), sorted(set(in_file) - set(in_model))
    for key in set(in_model) & set(in_file):
        torch.testing.assert_close(in_model[key], in_file[key], atol=0, rtol=0, msg=key)


def roundtrip(src_name, dst_name, model_name, config_kwargs, tmp_path, save_kwargs=None):
    """Train-like adapter in `src_name`, save, load in `dst_name` on a fresh base; outputs must agree."""
    src = wrap(src_name, model_name, config_kwargs)
    perturb_full_copies(src)
    inputs = make_inputs(model_name)
    expected = output(src, inputs)
    assert_differs(expected, output(make_model(model_name), inputs))
    src.save_pretrained(str(tmp_path), **(save_kwargs or {}))

    loaded = LIBS[dst_name].PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
    loaded.eval()
    assert type(loaded).__name__ == type(src).__name__
    assert_close(output(loaded, inputs), expected)
    assert_loaded_state_matches_file(dst_name, loaded, tmp_path)
    return src, loaded


# ---------------------------------------------------------------------------------------------- a) + b)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_peft_checkpoint_loads_in_peftkit(model_name, tmp_path):
    roundtrip("peft", "peftkit", model_name, base_config(model_name), tmp_path)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_peftkit_checkpoint_loads_in_peft(model_name, tmp_path):
    roundtrip("peftkit", "peft", model_name, base_config(model_name), tmp_path)


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
def test_seq_cls_head_is_loaded(src_name, dst_name, tmp_path):
    """The SEQ_CLS classifier copy (modules_to_save) travels with the adapter and is used."""
    src, loaded = roundtrip(src_name, dst_name, "bert", base_config("bert"), tmp_path)
    in_file = read_weights(tmp_path)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(in_file)
    expected = src.base_model.model.classifier.modules_to_save["default"].weight
    got = loaded.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    fresh_head = make_model("bert").classifier.weight
    assert not torch.allclose(got, fresh_head)


# ---------------------------------------------------------------------------------------------- c)
PARITY_CASES = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "t5": ("t5", {}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "llama-patterns": (
        "llama",
        {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
    ),
    "llama-layers": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}),
    "llama-modules-to-save": ("llama", {"modules_to_save": ["lm_head"]}),
    "gpt2-bias-all": ("gpt2", {"bias": "all"}),
    "bert-bias-lora-only": ("bert", {"bias": "lora_only"}),
    "t5-rslora": ("t5", {"use_rslora": True}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-lm-head": ("llama", {"target_modules": ["lm_head", "q_proj"]}),
    "llama-regex-targets": ("llama", {"target_modules": r".*\.layers\.0\.self_attn\.(q|v)_proj"}),
    "llama-exclude": ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]}),
    "llama-no-task-type": ("llama", {"task_type": None}),
    "t5-gaussian-dropout": ("t5", {"init_lora_weights": "gaussian", "lora_dropout": 0.1}),
    "llama-bf16": ("llama-bf16", {}),  # peft keeps bf16 models' adapters in float32 (autocast_adapter_dtype)
    "bert-bf16": ("bert-bf16", {}),
    "conv": ("conv", {}),
}


def _cases(cases: dict) -> list:
    return [pytest.param(name, id=name) for name in cases]


def _saved_pair(model_name, overrides, tmp_path):
    dirs = {}
    for lib_name in LIBS:
        model = wrap(lib_name, model_name, base_config(model_name, **overrides))
        dirs[lib_name] = tmp_path / lib_name
        model.save_pretrained(str(dirs[lib_name]))
    return dirs


@pytest.mark.parametrize(
    "case",
    _cases(PARITY_CASES),
)
def test_checkpoint_key_and_shape_parity(case, tmp_path):
    model_name, overrides = PARITY_CASES[case]
    dirs = _saved_pair(model_name, overrides, tmp_path)
    theirs, ours = read_weights(dirs["peft"]), read_weights(dirs["peftkit"])
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    with safe_open(weights_file(dirs["peftkit"]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def _normalised(config: dict) -> dict:
    config = dict(config)
    config.pop("peft_version")
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    return config


@pytest.mark.parametrize(
    "case", _cases(PARITY_CASES)
)
def test_adapter_config_parity(case, tmp_path):
    model_name, overrides = PARITY_CASES[case]
    dirs = _saved_pair(model_name, overrides, tmp_path)
    theirs, ours = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert sorted(ours) == sorted(theirs)
    assert ours["peft_version"] == "0.21.2@peftkit"
    assert ours["inference_mode"] is True
    assert ours["peft_type"] == "LORA"
    if isinstance(overrides.get("target_modules"), str) and overrides["target_modules"] != "all-linear":
        assert ours["target_modules"] == overrides["target_modules"]  # a regex stays a string
    else:
        assert isinstance(ours["target_modules"], list)
    assert _normalised(ours) == _normalised(theirs)
    # the file is peft's layout: keys sorted, indent 2
    text = (dirs["peftkit"] / "adapter_config.json").read_text()
    assert text == json.dumps(ours, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- d)
VARIANTS = {
    "bert-bias-all": ("bert", {"bias": "all"}, {}),
    "bert-bias-lora-only": ("bert", {"bias": "lora_only"}, {}),
    "gpt2-bias-all": ("gpt2", {"bias": "all"}, {}),
    "llama-rank-alpha-pattern": (
        "llama",
        {"rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
        {},
    ),
    "gpt2-rslora": ("gpt2", {"use_rslora": True, "lora_alpha": 16}, {}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}, {}),
    "llama-layers-to-transform": ("llama", {"layers_to_transform": [1], "layers_pattern": "layers"}, {}),
    "t5-layers-to-transform-int": ("t5", {"layers_to_transform": 1}, {}),
    "llama-modules-to-save": ("llama", {"modules_to_save": ["lm_head"]}, {}),
    "bert-user-modules-to-save": ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["pooler"]}, {}),
    "llama-bin": ("llama", {}, {"safe_serialization": False}),
    "bert-bin": ("bert", {}, {"safe_serialization": False}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}, {}),
    "llama-lm-head": ("llama", {"target_modules": ["lm_head", "q_proj"]}, {}),
    "gpt2-embedding-wte": ("gpt2", {"target_modules": ["wte", "c_attn"]}, {}),
    "llama-regex-targets": ("llama", {"target_modules": r".*\.layers\.0\.self_attn\.(q|v)_proj"}, {}),
    "llama-exclude": ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]}, {}),
    "llama-no-task-type": ("llama", {"task_type": None}, {}),
    "llama-bf16": ("llama-bf16", {}, {}),
    "conv2d-custom-module": ("conv", {}, {}),
}


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_roundtrip(variant, src_name, dst_name, tmp_path):
    model_name, overrides, save_kwargs = VARIANTS[variant]
    roundtrip(src_name, dst_name, model_name, base_config(model_name, **overrides), tmp_path, save_kwargs)
    if save_kwargs.get("safe_serialization") is False:
        assert os.listdir(tmp_path).count("adapter_model.bin") == 1
        assert "adapter_model.safetensors" not in os.listdir(tmp_path)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_peft_checkpoint_resaved_by_peftkit_is_unchanged(model_name, tmp_path):
    """peft file -> peftkit -> save_pretrained: same tensors and the same config as peft wrote."""
    src = wrap("peft", model_name, base_config(model_name))
    perturb_full_copies(src)
    src.save_pretrained(str(tmp_path / "peft"))
    loaded = peftkit.PeftModel.from_pretrained(make_model(model_name), str(tmp_path / "peft"))
    loaded.save_pretrained(str(tmp_path / "peftkit"))
    theirs, ours = read_weights(tmp_path / "peft"), read_weights(tmp_path / "peftkit")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)
    assert _normalised(read_config(tmp_path / "peftkit")) == _normalised(read_config(tmp_path / "peft"))


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_inject_adapter_in_model_state_dict_parity(model_name):
    """Without a PeftModel the keys have no prefix, in both libraries, and load across them."""
    states, outputs = {}, {}
    inputs = make_inputs(model_name)
    config_kwargs = base_config(model_name, task_type=None)
    for lib_name, lib in LIBS.items():
        torch.manual_seed(5)
        model = lib.inject_adapter_in_model(lib.LoraConfig(**config_kwargs), make_model(model_name))
        states[lib_name] = lib.get_peft_model_state_dict(model)
        outputs[lib_name] = (model, output(model.eval(), inputs))
    assert sorted(states["peftkit"]) == sorted(states["peft"])
    assert all(not key.startswith("base_model.") for key in states["peftkit"])
    for key, tensor in states["peft"].items():
        assert states["peftkit"][key].shape == tensor.shape
    # peft's tensors into peftkit's model, and the other way round
    for src_name, dst_name in DIRECTIONS:
        dst_model = outputs[dst_name][0]
        LIBS[dst_name].set_peft_model_state_dict(dst_model, states[src_name])
        assert_close(output(dst_model, inputs), outputs[src_name][1])


@pytest.mark.parametrize("writer", list(LIBS))
def test_load_trainable_counts_match(writer, tmp_path):
    """`from_pretrained(..., is_trainable=True)` of one file trains the same tensors in both libraries."""
    src = wrap(writer, "bert", base_config("bert"))
    src.save_pretrained(str(tmp_path))
    counts = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model("bert"), str(tmp_path), is_trainable=True)
        counts[lib_name] = loaded.get_nb_trainable_parameters()
        frozen = lib.PeftModel.from_pretrained(make_model("bert"), str(tmp_path))
        assert not any(p.requires_grad for p in frozen.parameters())
    assert counts["peftkit"] == counts["peft"]
    assert counts["peftkit"][0] > 0


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_named_adapter_in_subfolder(model_name, src_name, dst_name, tmp_path):
    """Adapter "default" in the root, "other" in dir/other/; loaded with load_adapter."""
    src = wrap(src_name, model_name, base_config(model_name))
    torch.manual_seed(99)
    other_targets = {"llama": ["k_proj", "o_proj"], "bert": ["key", "query"]}[model_name]
    src.add_adapter("other", LIBS[src_name].LoraConfig(**base_config(model_name, r=2, target_modules=other_targets)))
    perturb_full_copies(src)
    inputs = make_inputs(model_name)
    expected_default = output(src, inputs)
    src.set_adapter("other")
    src.eval()
    expected_other = output(src, inputs)
    assert_differs(expected_default, expected_other)
    src.save_pretrained(str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "other"))

    dst = LIBS[dst_name]
    loaded = dst.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    loaded.eval()
    assert_close(output(loaded, inputs), expected_default)
    loaded.set_adapter("other")
    loaded.eval()
    assert_close(output(loaded, inputs), expected_other)
    assert_loaded_state_matches_file(dst_name, loaded, tmp_path / "other", adapter_name="other")

    # the same adapter through `subfolder=`, as peft supports
    again = dst.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
    again.load_adapter(str(tmp_path), adapter_name="other", subfolder="other")
    again.set_adapter("other")
    again.eval()
    assert_close(output(again, inputs), expected_other)


@pytest.mark.parametrize(("src_name", "dst_name"), DIRECTIONS, ids=DIRECTION_IDS)
def test_selected_adapters_writes_only_that_one(src_name, dst_name, tmp_path):
    src = wrap(src_name, "llama", base_config("llama"))
    src.add_adapter("other", LIBS[src_name].LoraConfig(**base_config("llama", r=2)))
    src.set_adapter("other")
    src.eval()
    inputs = make_inputs("llama")
    expected = output(src, inputs)
    src.save_pretrained(str(tmp_path), selected_adapters=["other"])
    assert os.path.isdir(tmp_path / "other")
    assert not {"adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(tmp_path))
    loaded = LIBS[dst_name].PeftModel.from_pretrained(
        make_model("llama"), str(tmp_path / "other"), adapter_name="other"
    )
    assert_close(output(loaded.eval(), inputs), expected)


# ---------------------------------------------------------------------------------------------- e)
MERGE_CASES = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "t5": ("t5", {}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "bert-bias-all": ("bert", {"bias": "all"}),
    "gpt2-rslora-patterns": (
        "gpt2",
        {"use_rslora": True, "rank_pattern": {"c_proj": 2}, "alpha_pattern": {"c_attn": 5}},
    ),
    "conv2d": ("conv", {}),
}


@pytest.mark.parametrize("case", _cases(MERGE_CASES))
def test_merge_and_unload_parity(case, tmp_path):
    model_name, overrides = MERGE_CASES[case]
    src = wrap("peft", model_name, base_config(model_name, **overrides))
    perturb_full_copies(src)
    src.save_pretrained(str(tmp_path))
    inputs = make_inputs(model_name)
    unmerged = output(src, inputs)

    merged = {}
    for lib_name, lib in LIBS.items():
        loaded = lib.PeftModel.from_pretrained(make_model(model_name), str(tmp_path))
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    theirs, ours = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert type(merged["peftkit"]) is type(merged["peft"])
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    assert not any("lora_" in name or "base_layer" in name for name, _ in merged["peftkit"].named_modules())
    assert_close(output(merged["peftkit"], inputs), output(merged["peft"], inputs))
    torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- f)
TRAINABLE_CASES = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "t5": ("t5", {}),
    "bert-bias-all": ("bert", {"bias": "all"}),
    "bert-bias-lora-only": ("bert", {"bias": "lora_only"}),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}),
    "llama-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-modules-to-save": ("llama", {"modules_to_save": ["lm_head"]}),
    "llama-patterns": ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    "conv2d": ("conv", {}),
}


@pytest.mark.parametrize("case", list(TRAINABLE_CASES))
def test_trainable_parameter_counts(case):
    model_name, overrides = TRAINABLE_CASES[case]
    counts, printed, grads = {}, {}, {}
    for lib_name in LIBS:
        model = wrap(lib_name, model_name, base_config(model_name, **overrides))
        model.train()
        counts[lib_name] = model.get_nb_trainable_parameters()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        printed[lib_name] = buffer.getvalue()
        grads[lib_name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["peftkit"] == counts["peft"]
    assert printed["peftkit"] == printed["peft"]
    assert printed["peftkit"].startswith("trainable params: ")
    assert grads["peftkit"] == grads["peft"]
