"""transformers' adapter API on a base model (`model.load_adapter(path)`, ...), done by peftkit where
transformers cannot use peft (here: peft 0.21.2 is older than what transformers 5.24 asks for)."""

from __future__ import annotations

import os

import pytest
import torch

import peftkit
from peftkit import LoraConfig, get_peft_model
from peftkit.integrations.recognition import _peft_usable
from tests.tiny_models import llama, lm_inputs

transformers_peft = pytest.importorskip("transformers.integrations.peft")
pytestmark = pytest.mark.skipif(
    _peft_usable(transformers_peft.MIN_PEFT_VERSION), reason="transformers uses the installed peft itself"
)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**lm_inputs()).logits


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(1)
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", _logits(model)


def test_load_adapter_switch_disable_and_delete(folder):
    path, expected = folder
    model = llama()
    model.load_adapter(str(path), adapter_name="sql")
    assert torch.allclose(_logits(model), expected, atol=1e-6)
    assert model.active_adapters() == ["sql"] and list(model.peft_config) == ["sql"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # loaded for inference
    model.disable_adapters()
    assert torch.allclose(_logits(model), _logits(llama()), atol=1e-6)
    model.enable_adapters()
    model.add_adapter(LoraConfig(target_modules=["q_proj"]), adapter_name="fresh")
    assert model.active_adapters() == ["fresh"]
    assert torch.allclose(_logits(model), _logits(llama()), atol=1e-6)  # a new LoRA starts as a no-op
    model.set_adapter("sql")
    assert torch.allclose(_logits(model), expected, atol=1e-6)
    with pytest.raises(ValueError, match="could not be found: nope"):
        model.set_adapter("nope")
    model.delete_adapter(["fresh", "sql"])
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(_logits(model), _logits(llama()), atol=1e-6)


def test_state_dict_and_save_pretrained_write_the_adapter_folder(folder, tmp_path):
    from safetensors.torch import load_file

    path, expected = folder
    model = llama()
    model.load_adapter(str(path))
    saved = load_file(path / "adapter_model.safetensors")
    state = model.get_adapter_state_dict()
    assert set(state) == {key.removeprefix("base_model.model.") for key in saved}
    model.save_pretrained(tmp_path / "again")  # transformers saves only the adapter of such a model
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "again"))
    reloaded = peftkit.PeftModel.from_pretrained(llama(), tmp_path / "again")
    assert torch.allclose(_logits(reloaded), expected, atol=1e-6)


def test_a_peft_saved_adapter_loads_and_a_bad_one_leaves_the_model_alone(tmp_path):
    import peft

    torch.manual_seed(2)
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    model = llama()
    model.load_adapter(str(tmp_path / "peft"))
    assert torch.allclose(_logits(model), _logits(theirs), atol=1e-6)
    bad = llama()
    config = LoraConfig(target_modules=["q_proj"], r=4)
    with pytest.raises(ValueError, match="size mismatch"):
        bad.load_adapter(str(tmp_path / "peft"), peft_config=config.to_dict() | {"r": 4})
    assert type(bad.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not getattr(bad, "_hf_peft_config_loaded", False)
