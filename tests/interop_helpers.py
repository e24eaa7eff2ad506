"""What the peft <-> peftkit interop tests share: tiny models by case name, outputs, the saved files,
and the checks the tuners' interop tests run alike (roundtrip, checkpoint parity, merge parity).

A case name is a tiny architecture of `tests/tiny_models.py` (`"llama"`), optionally with `-bf16`
for the same model in bfloat16. `libs` is `{"peft": peft, "peftkit": peftkit}` in that order.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.tiny_models import MODEL_FACTORIES

#: Config fields whose list order carries no meaning (sets saved as lists).
UNORDERED_CONFIG_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")

#: Saving with one library and loading with the other, both ways.
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]


def make_model(name: str) -> nn.Module:
    """A fresh tiny model for case `name` (`<arch>` or `<arch>-bf16`)."""
    if name.endswith("-bf16"):
        return MODEL_FACTORIES[name.removesuffix("-bf16")].make_model().to(torch.bfloat16)
    return MODEL_FACTORIES[name].make_model()


def make_inputs(name: str) -> dict:
    """The tiny model's example batch for case `name`."""
    return MODEL_FACTORIES[name.removesuffix("-bf16")].make_inputs()


def output(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    """The model's logits (or its output, when it returns a tensor), without gradients; `kwargs` go to the call."""
    with torch.no_grad():
        result = model(**inputs, **kwargs)
    return result if isinstance(result, torch.Tensor) else result.logits


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of `directory/adapter_model.safetensors`."""
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def read_config(directory: str, comparable: bool = False) -> dict:
    """`directory/adapter_config.json`; with `comparable`, without `peft_version` and with set-like lists sorted."""
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if comparable:
        config.pop("peft_version", None)
        for key in UNORDERED_CONFIG_FIELDS:
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
    return config


def roundtrip_params(cases) -> list:
    """`(case, src_name, dst_name)` parameters, `case-src->dst` ids, for every case in both directions."""
    return [pytest.param(c, s, d, id=f"{c}-{s}->{d}") for c in cases for s, d in DIRECTIONS]


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's loss, or the mean square of its output when it returns a tensor."""
    result = model(**inputs)
    return result.square().mean() if isinstance(result, torch.Tensor) else result.loss


def train_a_few_steps(model: nn.Module, inputs: dict, steps: int, lr: float = 0.05,
                      optimizer_cls=torch.optim.Adam) -> nn.Module:
    """`steps` optimizer steps of the trainable parameters on `inputs`; the model, back in eval mode."""
    model.train()
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss_of(model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def nudge_adapter(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Add fixed noise to every `lora_*` tensor: a "trained" adapter that differs from its init."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * scale)
    return model


def base_copy(model: nn.Module, make_base: Callable[[], nn.Module]) -> nn.Module:
    """A fresh `make_base()` holding `model`'s base weights (as inits such as LoftQ, LoRA-GA or CorDA left them)."""
    plain = make_base()
    state = {key.replace(".base_layer", ""): value for key, value in model.get_base_model().state_dict().items()
             if "lora_" not in key}
    plain.load_state_dict(state)
    return plain


def seeded_peft_model(lib, config_name: str, kwargs: dict, model_name: str, steps: int = 0,
                      make_base: Callable[[str], nn.Module] = make_model,
                      make_batch: Callable[[str], dict] = make_inputs, seed: int = 1234) -> nn.Module:
    """`lib.get_peft_model` of a fresh `make_base(model_name)` with `lib.<config_name>(**kwargs)` after
    `torch.manual_seed(seed)`, then `steps` Adam steps on `make_batch(model_name)`; in eval mode."""
    torch.manual_seed(seed)
    model = lib.get_peft_model(make_base(model_name), getattr(lib, config_name)(**kwargs))
    if steps:
        train_a_few_steps(model, make_batch(model_name), steps)
    return model.eval()


def assert_same_tensors(actual: dict, expected: dict, atol: float = 0.0) -> None:
    """The same keys, and per key the same dtype and values up to `atol`."""
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, atol=atol, rtol=0, msg=key)


def check_roundtrip(libs: dict, src: nn.Module, dst_name: str, make_base: Callable[[], nn.Module], inputs: dict,
                    tmp_path, atol: float = 1e-5, tuner_name: str | None = None, min_change: float = 1e-3,
                    without: tuple[str, ...] = (), **load_kwargs) -> nn.Module:
    """Save `src` to `tmp_path`, load it into a fresh `make_base()` with `dst_name`: a non-vacuous adapter
    (logits move by more than `min_change`), the same logits (to `atol`), `tuner_name`'s model when given,
    and a state dict equal to the file (keys ending in one of `without` left out). The loaded model."""
    expected = output(src, inputs)
    assert (expected.float() - output(make_base(), inputs).float()).abs().max() > min_change, "vacuous adapter"
    src.save_pretrained(str(tmp_path))

    loaded = libs[dst_name].PeftModel.from_pretrained(make_base(), str(tmp_path), **load_kwargs).eval()
    if tuner_name is not None:
        assert type(loaded.base_model).__name__ == tuner_name
    torch.testing.assert_close(output(loaded, inputs), expected, atol=atol, rtol=0)
    in_file = {k: v for k, v in read_weights(tmp_path).items() if not k.endswith(without)}
    in_model = libs[dst_name].get_peft_model_state_dict(loaded)
    in_model = {k: v for k, v in in_model.items() if not k.endswith(without)}
    assert_same_tensors(in_model, in_file)
    return loaded


def check_checkpoint_parity(models: dict, tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    """Save each library's model under `tmp_path/<lib>`: the same tensor keys, shapes and dtypes, the same
    adapter_config.json (both with a `peft_version`, set-like lists sorted), the same trainable-parameter
    counts. The saved tensors by library."""
    dirs = {name: tmp_path / name for name in models}
    for name, model in models.items():
        model.save_pretrained(str(dirs[name]))
    files = {name: read_weights(directory) for name, directory in dirs.items()}
    theirs, ours = files["peft"], files["peftkit"]
    assert {k: (tuple(t.shape), t.dtype) for k, t in ours.items()} == {k: (tuple(t.shape), t.dtype) for k, t in theirs.items()}
    assert all("peft_version" in read_config(directory) for directory in dirs.values())
    assert read_config(dirs["peftkit"], comparable=True) == read_config(dirs["peft"], comparable=True)
    counts = {name: model.get_nb_trainable_parameters() for name, model in models.items()}
    assert counts["peftkit"] == counts["peft"]
    return files


def check_same_seed_tensors(models: dict, tmp_path, atol: float = 0.0) -> dict[str, dict[str, torch.Tensor]]:
    """Models built from the same weights and seed hold the same state dicts (to `atol`), and pass
    `check_checkpoint_parity`. The saved tensors by library."""
    states = {name: model.state_dict() for name, model in models.items()}
    assert_same_tensors(states["peftkit"], states["peft"], atol)
    return check_checkpoint_parity(models, tmp_path)


def check_merge_parity(libs: dict, tmp_path, make_base: Callable[[], nn.Module], inputs: dict | None = None,
                       atol: float = 1e-5) -> None:
    """Load the adapter in `tmp_path` into a fresh `make_base()` in each library and merge and unload:
    the same merged weights (to `atol`); with `inputs`, peftkit's merged logits are its unmerged ones."""
    merged, unmerged = {}, {}
    for lib_name, lib in libs.items():
        loaded = lib.PeftModel.from_pretrained(make_base(), str(tmp_path))
        if inputs is not None:
            unmerged[lib_name] = output(loaded, inputs)
        with torch.no_grad():
            merged[lib_name] = loaded.merge_and_unload().eval()
    assert_same_tensors(merged["peftkit"].state_dict(), merged["peft"].state_dict(), atol)
    if inputs is not None:
        torch.testing.assert_close(output(merged["peftkit"], inputs), unmerged["peftkit"], atol=1e-4, rtol=0)


def merge_both_adapters(model: nn.Module, inputs: dict, together: bool = False,
                        atol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with "default" and "other" both active, and after merging them (in one call with
    `together`, else one after the other); unmerging gives the first logits back (to `atol`)."""
    model.base_model.set_adapter(["default", "other"])
    both = output(model, inputs)
    if together:
        model.merge_adapter(["default", "other"])
    else:
        model.merge_adapter(["default"])
        model.merge_adapter(["other"])
    merged = output(model, inputs)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, inputs), both, atol=atol, rtol=0)
    return both, merged
