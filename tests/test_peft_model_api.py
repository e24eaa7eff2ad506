"""PeftModel API: wording, adapters, modules_to_save, checkpoints and their failure modes."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from peftkit import (
    AdapterNameError,
    CheckpointError,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peftkit.tuners._core import ModulesToSaveWrapper
from peftkit.utils.hf_compat import is_activation_checkpointing
from tests.properties import assert_close, assert_differs, output_of
from tests.tiny_models import MODEL_FACTORIES, bert_seq_cls, cls_inputs, llama, lm_inputs


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


def _structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


def test_print_trainable_parameters_wording(capsys):
    model = get_peft_model(llama(), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    # q_proj (32->32) and v_proj (32->16) in 2 layers at r=4: 2 * (4*32 + 32*4 + 4*32 + 16*4)
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)


def test_task_wrapper_follows_task_type():
    assert type(get_peft_model(llama(), lora(task_type="CAUSAL_LM"))) is PeftModelForCausalLM
    assert type(get_peft_model(llama(), lora(target_modules=["q_proj"]))) is PeftModel


def test_seq_cls_trains_and_saves_classifier(tmp_path):
    model = get_peft_model(bert_seq_cls(), lora(task_type="SEQ_CLS"))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    wrapper = model.base_model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    model.save_pretrained(str(tmp_path))
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(keys)


def test_adapter_names_are_validated_before_any_file_operation(tmp_path):
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    for bad in ["../evil", "a/b", "", "a.b", "..", "x\\y", "__base__"]:
        with pytest.raises(AdapterNameError):
            model.add_adapter(bad, lora(target_modules=["q_proj"]))
        with pytest.raises(AdapterNameError):
            model.load_adapter(str(tmp_path), adapter_name=bad)
    assert list(tmp_path.iterdir()) == []


def test_failed_add_adapter_leaves_model_unchanged():
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    before = _structure(model)
    with pytest.raises(TargetModulesError):
        model.add_adapter("second", lora(target_modules=["q_proj", "input_layernorm"]))
    assert _structure(model) == before and list(model.peft_config) == ["default"]


def test_failed_load_adapter_leaves_model_unchanged(tmp_path):
    source = get_peft_model(llama(), lora(r=8, target_modules=["q_proj"]))
    source.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 4  # the config no longer fits the weights
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    inputs = lm_inputs()
    expected, before = output_of(model, inputs), _structure(model)
    with pytest.raises(CheckpointError, match=r"size mismatch for .*q_proj\.lora_A\.weight.*\(8, 32\).*\(4, 32\)"):
        model.load_adapter(str(tmp_path), adapter_name="other")
    assert _structure(model) == before and list(model.peft_config) == ["default"]
    assert_close(output_of(model, inputs), expected, atol=0)


def test_failed_from_pretrained_restores_the_base_model(tmp_path):
    get_peft_model(llama(), lora(target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    base = llama()
    before = _structure(base)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert _structure(base) == before


def test_truncated_safetensors_is_reported(tmp_path):
    get_peft_model(llama(), lora(target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*corrupt or truncated"):
        PeftModel.from_pretrained(llama(), str(tmp_path))


def test_adapter_for_another_model_lists_missing_and_unexpected_keys(tmp_path):
    get_peft_model(llama(), lora(target_modules=["q_proj"])).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["k_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing from the checkpoint: .*k_proj.*not in the model: .*q_proj"):
        PeftModel.from_pretrained(llama(), str(tmp_path))


def test_missing_folder_and_offline_hub_id_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="No adapter_config.json"):
        PeftModel.from_pretrained(llama(), str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="some-user/no-such-adapter.*local adapter folder"):
        PeftModel.from_pretrained(llama(), "some-user/no-such-adapter")


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_hub_arguments_reach_every_download(tmp_path, monkeypatch, how):
    """One list of hub arguments for every loader: repo_type, revision and subfolder reach each
    hf_hub_download call (a stand-in serving a local folder: nothing is fetched)."""
    import huggingface_hub

    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "sub"))
    calls = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append((repo_id, filename, subfolder, kwargs))
        return str(tmp_path / subfolder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = {"repo_type": "model", "revision": "v1", "subfolder": "sub"}
    if how == "from_pretrained":
        loaded = PeftModel.from_pretrained(llama(), "someone/adapter", **hub)
    else:
        loaded = get_peft_model(llama(), lora(target_modules=["q_proj"]))
        loaded.load_adapter("someone/adapter", adapter_name="other", **hub)
        loaded.set_adapter("other")
    assert {filename for _, filename, _, _ in calls} == {"adapter_config.json", "adapter_model.safetensors"}
    for repo_id, _, subfolder, kwargs in calls:
        assert repo_id == "someone/adapter" and subfolder == "sub"
        assert kwargs == {"repo_type": "model", "revision": "v1"}
    assert_close(output_of(loaded, lm_inputs()), output_of(model, lm_inputs()))


def test_bin_weights_load_only_tensors(tmp_path):
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    assert_close(output_of(PeftModel.from_pretrained(llama(), str(tmp_path)), lm_inputs()), output_of(model, lm_inputs()))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, str(tmp_path / "adapter_model.bin"))
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        PeftModel.from_pretrained(llama(), str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_save_layout_for_several_adapters_and_selection(tmp_path):
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    model.add_adapter("other", lora(target_modules=["v_proj"]))
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert all("v_proj" in key for key in load_file(str(tmp_path / "other" / "adapter_model.safetensors")))
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    only = tmp_path / "only"
    model.save_pretrained(str(only), selected_adapters=["other"])
    assert sorted(os.listdir(only)) == ["other"]
    reloaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    reloaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    model.set_adapter("other")
    reloaded.set_adapter("other")
    assert_close(output_of(reloaded, lm_inputs()), output_of(model, lm_inputs()))


def test_unknown_adapter_and_redundant_operations():
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="Unknown adapter"):
        model.set_adapter("nope")
    with pytest.raises(AdapterNameError, match="already exists"):
        model.add_adapter("default", lora(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()
    model.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()


def test_deleting_the_active_adapter_activates_another():
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    model.add_adapter("other", lora(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="'other' is active now"):
        model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert list(layer.lora_A.keys()) == ["other"]


def test_inject_adapter_in_model_and_state_dict_without_prefix():
    model = inject_adapter_in_model(lora(target_modules=["q_proj"]), llama())
    state = get_peft_model_state_dict(model)
    assert state and all(key.startswith("model.layers.") and ".default" not in key for key in state)
    other = inject_adapter_in_model(lora(target_modules=["q_proj"]), llama())
    prefixed = {"base_model.model." + key: value for key, value in state.items()}
    result = set_peft_model_state_dict(other, prefixed)
    assert not result.missing_keys and not result.unexpected_keys
    assert_close(output_of(other, lm_inputs()), output_of(model, lm_inputs()))


def test_gradients_reach_adapters_with_reentrant_checkpointing():
    model = get_peft_model(llama(), lora(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**lm_inputs()).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_generate_with_adapter_equals_merged_model():
    inputs = lm_inputs()
    model = get_peft_model(llama(), lora(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    kwargs = dict(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = model.generate(**kwargs)
    assert generated.shape == (2, 12)
    with model.disable_adapter():
        base_generated = model.generate(**kwargs)
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(**kwargs), generated)
    assert not torch.equal(base_generated, generated), "the adapter must change what is generated"


def test_unload_returns_base_outputs_and_merge_and_unload_keeps_them():
    case = MODEL_FACTORIES["bert"]
    inputs = cls_inputs()
    base_out = output_of(case.make_model(), inputs)
    model = get_peft_model(case.make_model(), lora(task_type="SEQ_CLS", target_modules=["query"]))
    adapted = output_of(model, inputs)
    assert_differs(adapted, base_out)
    assert_close(output_of(model.merge_and_unload(), inputs), adapted)
    model = get_peft_model(case.make_model(), lora(task_type="SEQ_CLS", target_modules=["query"]))
    assert_close(output_of(model.unload(), inputs), base_out)


def test_auto_peft_model_loads_base_and_adapter_from_disk(tmp_path):
    from peftkit import AutoPeftModelForCausalLM, ConfigError

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    llama().save_pretrained(str(base_dir))
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)), lora(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir))
    assert isinstance(loaded, PeftModelForCausalLM)
    assert_close(output_of(loaded, lm_inputs()), output_of(model, lm_inputs()))
    anonymous = tmp_path / "anonymous"
    get_peft_model(llama(), lora(target_modules=["q_proj"])).save_pretrained(str(anonymous))
    with pytest.raises(ConfigError, match="does not name its base model"):
        AutoPeftModelForCausalLM.from_pretrained(str(anonymous))


def test_wrapping_twice_and_shadowing_names_are_refused():
    from peftkit import ConfigError

    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="PeftModel already; add more adapters with model.add_adapter"):
        get_peft_model(model, lora(target_modules=["q_proj"]))
    with pytest.raises(AdapterNameError, match="clashes with a torch.nn.Module attribute"):
        model.add_adapter("double", lora(target_modules=["q_proj"]))
    from peftkit import IA3Config

    with pytest.raises(ConfigError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]), mixed=True)


def test_save_from_a_given_state_dict_matches_names_and_refuses_a_foreign_one(tmp_path):
    model = get_peft_model(llama(), lora(target_modules=["q_proj"]))
    wrapped = {"module." + name: tensor.clone() for name, tensor in model.state_dict().items()}  # DDP-style names
    from_given = get_peft_model_state_dict(model, state_dict=wrapped)
    assert from_given.keys() == get_peft_model_state_dict(model).keys()
    assert all(torch.equal(from_given[k], v) for k, v in get_peft_model_state_dict(model).items())
    with pytest.raises(CheckpointError, match="holds none of its tensors"):
        model.save_pretrained(str(tmp_path), state_dict={"unrelated.weight": torch.zeros(1)})


def test_activation_checkpointing_enable_takes_transformers_5_keywords():
    model = get_peft_model(llama(), lora(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1)
    assert is_activation_checkpointing(model.get_base_model())
    model.train()
    model(**lm_inputs()).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_set_requires_grad_and_modules_to_save_names():
    """peft's `set_requires_grad` (other adapters and the active set untouched) and `modules_to_save` names."""
    from torch import nn

    from peftkit import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["0"]), adapter_name="a")
    assert peft_model.modules_to_save is None
    peft_model.add_adapter("b", LoraConfig(target_modules=["0", "1"], modules_to_save=["2"]))
    assert peft_model.modules_to_save == {"2"}

    def grads(name):
        return {p.requires_grad for n, p in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")}

    assert grads("a") == {True} and grads("b") == {False}
    peft_model.set_requires_grad("b")
    assert grads("a") == {True} and grads("b") == {True}
    assert peft_model.active_adapters == ["a"]
    peft_model.set_requires_grad(["a", "b"], requires_grad=False)
    assert grads("a") == {False} and grads("b") == {False}
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        peft_model.set_requires_grad("nope")
