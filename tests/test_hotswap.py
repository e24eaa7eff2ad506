"""Hot-swapping a LoRA adapter in place: same outputs as loading it, and no recompilation."""

from __future__ import annotations

import pytest
import torch

from peftkit import CheckpointError, LoraConfig, PeftModel, get_peft_model
from peftkit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from tests.properties import assert_close, output_of
from tests.tiny_models import llama, lm_inputs


def _save(path, seed: int, **kw) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kw})
    get_peft_model(llama(), config).save_pretrained(str(path))


def test_hotswap_equals_loading_the_new_adapter(tmp_path):
    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2, r=2, lora_alpha=3, target_modules=["q_proj"])
    model = PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    layers_before = [id(m) for m in model.modules()]
    hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    assert [id(m) for m in model.modules()] == layers_before, "hot-swap must not re-inject modules"
    expected = output_of(PeftModel.from_pretrained(llama(), str(tmp_path / "b")), lm_inputs())
    assert_close(output_of(model, lm_inputs()), expected)


def test_hotswap_refuses_larger_rank_and_new_targets(tmp_path):
    _save(tmp_path / "a", 1)
    _save(tmp_path / "big", 2, r=8)
    _save(tmp_path / "other", 3, target_modules=["k_proj"])
    model = PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="target_rank"):
        hotswap_adapter(model, str(tmp_path / "big"), adapter_name="default")
    with pytest.raises(CheckpointError, match="modules the loaded one lacks"):
        hotswap_adapter(model, str(tmp_path / "other"), adapter_name="default")


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_dropout", 0.1), ("use_rslora", True),
                                          ("alpha_pattern", {"q_proj": 2})])
def test_hotswap_refuses_configs_whose_layers_differ_and_changes_nothing(tmp_path, field, value):
    from peftkit import ConfigError

    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2, **{field: value})
    model = PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    before = output_of(model, lm_inputs())
    with pytest.raises(ConfigError, match=f"Configs are incompatible: for {field}"):
        hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
    assert_close(output_of(model, lm_inputs()), before, atol=0)


def test_check_hotswap_configs_compatible_as_peft():
    from peftkit import ConfigError, IA3Config
    from peftkit.hotswap import check_hotswap_configs_compatible

    check_hotswap_configs_compatible(LoraConfig(r=4, lora_alpha=8), LoraConfig(r=2, lora_alpha=3))  # ranks / alpha may differ
    with pytest.raises(ConfigError, match="Incompatible PEFT types found: LORA and IA3"):
        check_hotswap_configs_compatible(LoraConfig(), IA3Config())
    with pytest.raises(ValueError, match="Hotswapping only supports LORA but IA3 was passed"):
        check_hotswap_configs_compatible(IA3Config(), IA3Config())


def test_compiled_model_is_not_recompiled_after_a_prepared_hotswap(tmp_path):
    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2, r=6, lora_alpha=5)
    model = PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    inputs = {k: v for k, v in lm_inputs().items() if k != "labels"}
    assert_close(output_of(model, inputs), output_of(PeftModel.from_pretrained(llama(), str(tmp_path / "a")), inputs))
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    with torch.no_grad():
        compiled(**inputs)
        first = len(compiles)
        hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default")
        swapped = compiled(**inputs).logits
    assert len(compiles) == first, "the hot-swap triggered a recompilation"
    assert_close(swapped, output_of(PeftModel.from_pretrained(llama(), str(tmp_path / "b")), inputs))
