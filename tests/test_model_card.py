"""The model card `README.md` that `save_pretrained` writes beside each adapter (peft's metadata)."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml
from torch import nn

import peftkit
from peftkit import LoraConfig, IA3Config, get_peft_model
from tests.tiny_models import llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def card_metadata(folder: str) -> tuple[dict, str]:
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"---\n(.*?)\n---", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), text


def test_card_of_a_transformers_causal_lm(tmp_path):
    base = llama()
    base.config._name_or_path = base.name_or_path = "org/tiny-llama"  # as from_pretrained("org/tiny-llama") sets
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    meta, text = card_metadata(str(tmp_path))
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"lora", "transformers", "base_model:adapter:org/tiny-llama"} <= set(meta["tags"])
    assert "### Framework versions" in text and f"peftkit {peftkit.__version__}" in text
    assert len(text) > 1000  # the hub's template, pre-filled


def test_card_of_a_custom_module_has_no_base_model(tmp_path):
    model = get_peft_model(MLP(), IA3Config(target_modules=["lin0"], feedforward_modules=[]))
    model.save_pretrained(str(tmp_path))
    meta, _ = card_metadata(str(tmp_path))
    assert meta["library_name"] == "peft"
    assert "base_model" not in meta
    assert "lora" not in (meta.get("tags") or [])
    assert "pipeline_tag" not in meta


def test_existing_card_keeps_text_and_metadata(tmp_path):
    (tmp_path / "README.md").write_text("---\nmeta: hello\ntags: mine\n---\nThis is my model card\n", encoding="utf-8")
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path))  # saving twice adds nothing twice
    meta, text = card_metadata(str(tmp_path))
    assert meta["meta"] == "hello" and meta["library_name"] == "peft"
    assert set(meta["tags"]) == {"mine", "lora"}
    assert "This is my model card" in text
    assert text.count(f"peftkit {peftkit.__version__}") == 1


def test_every_saved_folder_has_a_card(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    model.add_adapter("second", LoraConfig(target_modules=["lin1"]))
    model.save_pretrained(str(tmp_path))
    for folder in (tmp_path, tmp_path / "second"):
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
        assert card_metadata(str(folder))[0]["library_name"] == "peft"


def test_card_is_written_with_the_save_atomically(tmp_path, monkeypatch):
    """A save that fails while writing the card leaves neither a new card nor a new config behind."""
    from peftkit.checkpoint import adapter_folder

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    real = adapter_folder.text_writer

    def failing(text):
        write = real(text)

        def maybe_fail(path):
            if path.endswith("README.md"):
                raise OSError("disk full")
            write(path)

        return maybe_fail

    monkeypatch.setattr(adapter_folder, "text_writer", failing)
    with pytest.raises(OSError):
        model.save_pretrained(str(tmp_path))
    assert not {"README.md", "adapter_config.json", "adapter_model.safetensors"} & set(os.listdir(tmp_path))


def test_peft_loads_a_folder_with_our_card(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = llama()
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "README.md")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path))
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_create_or_update_model_card_alone(tmp_path):
    (tmp_path / "README.md").write_text("Notes about my adapter.\n", encoding="utf-8")
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    model.create_or_update_model_card(str(tmp_path))
    meta, text = card_metadata(str(tmp_path))
    assert meta == {"library_name": "peft", "tags": ["lora"]}
    assert "Notes about my adapter." in text
    assert [name for name in os.listdir(tmp_path) if name != ".peftkit"] == ["README.md"]  # + the lock area
