"""LoraConfig fields, defaults, validation and JSON form."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from peftkit import CheckpointError, ConfigError, LoraConfig, PeftConfig, PeftType, TaskType, TargetModulesError, get_peft_model
from tests.tiny_models import bert_seq_cls, gpt2, llama, t5


def test_defaults_and_fields_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert set(theirs) - {"runtime_config"} <= set(ours)
    for name in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights", "inference_mode"):
        assert ours[name].default == theirs[name].default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0"),
        ({"r": -2}, "r=-2"),
        ({"r": 2.5}, "positive integer"),
        ({"lora_alpha": 0}, "lora_alpha=0"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"lora_dropout": -0.1}, r"\[0, 1\)"),
        ({"bias": "some"}, "bias='some'"),
        ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights"),
        ({"task_type": "CAUSAL"}, "Invalid task_type"),
        ({"use_qalora": True}, "does not support yet"),
        ({"lora_bias": "yes"}, "lora_bias=.yes. must be True or False"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "regex"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"target_modules": ["q", 3]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_task_type_accepts_enum_and_string():
    assert LoraConfig(task_type="SEQ_CLS").task_type == TaskType.SEQ_CLS
    assert LoraConfig(task_type=TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"


def test_json_roundtrip_and_dispatch(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", rank_pattern={"q": 2})
    config.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert sorted(data["target_modules"]) == ["q_proj", "v_proj"]
    assert list(data) == sorted(data)
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LoraConfig)
    assert loaded.target_modules == {"q_proj", "v_proj"} and loaded.rank_pattern == {"q": 2}


def test_unknown_keys_warn_and_are_ignored():
    data = LoraConfig(r=4).to_dict() | {"shiny_new_field": 1}
    with pytest.warns(UserWarning, match="shiny_new_field"):
        config = PeftConfig.from_peft_type(**data)
    assert config.r == 4


def test_unknown_peft_type_and_missing_type():
    with pytest.raises(ConfigError, match="Unknown peft_type 'NOPE'"):
        PeftConfig.from_peft_type(peft_type="NOPE")
    with pytest.raises(ConfigError, match="no `peft_type`"):
        PeftConfig.from_dict({"r": 4})


def test_config_for_other_method_is_refused_by_lora():
    with pytest.raises(ConfigError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_corrupt_config_file_gives_checkpoint_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        PeftConfig.from_pretrained(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        PeftConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "factory, expected",
    [(llama, {"q_proj", "v_proj"}), (gpt2, {"c_attn"}), (bert_seq_cls, {"query", "value"}), (t5, {"q", "v"})],
)
def test_default_target_modules_per_architecture(factory, expected):
    model = get_peft_model(factory(), LoraConfig(r=2))
    assert model.peft_config["default"].target_modules == expected
    assert {name.rpartition(".")[2] for name in model.base_model.targeted_module_names} == expected


def test_user_config_is_not_mutated():
    config = LoraConfig(r=2, target_modules="all-linear")
    model = get_peft_model(llama(), config)
    assert config.target_modules == "all-linear" and config.base_model_name_or_path is None
    resolved = model.peft_config["default"].target_modules
    assert isinstance(resolved, set) and not any(name.endswith("lm_head") for name in resolved)


@pytest.mark.parametrize("second", ["lora", "ia3"])
def test_all_linear_for_a_second_adapter_targets_the_same_layers(second):
    """A second "all-linear" adapter wraps the layers the first one wrapped, not their insides
    (`base_layer`, `lora_A.default`, ...), whichever method either adapter is."""
    from peftkit import IA3Config

    model = get_peft_model(llama(), LoraConfig(r=2, target_modules="all-linear"))
    config = LoraConfig(r=2, target_modules="all-linear") if second == "lora" else IA3Config(target_modules="all-linear", feedforward_modules=[])
    first = set(model.peft_config["default"].target_modules)
    if second == "lora":
        model.add_adapter("second", config)
        assert set(model.peft_config["second"].target_modules) == first
    else:
        names = model.base_model._all_linear_names(config)
        assert names == first
    assert not any(".base_layer" in name or "lora_" in name for name in first)


def test_no_default_for_custom_model_asks_for_target_modules():
    import torch.nn as nn

    with pytest.raises(ConfigError, match="target_modules is not set"):
        get_peft_model(nn.Sequential(nn.Linear(2, 2)), LoraConfig(r=2))


def test_unmatched_targets_list_close_matches():
    with pytest.raises(TargetModulesError, match=r"Close matches: \['q_proj'") as info:
        get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_prj"]))
    assert "v_proj" in str(info.value)


def test_unsupported_layer_type_names_supported_types():
    with pytest.raises(TargetModulesError, match="LlamaRMSNorm.*Supported: torch.nn.Linear"):
        get_peft_model(llama(), LoraConfig(r=2, target_modules=["input_layernorm"]))


def test_peft_type_enum_values():
    assert PeftType.LORA == "LORA" and json.dumps(PeftType.LORA) == '"LORA"'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig()  # a default config is valid and silent


def test_a_peft_type_registers_once():
    from peftkit.registry import method_spec, register_method

    before = method_spec(PeftType.LORA)
    with pytest.raises(ConfigError, match="'LORA' is registered already .*LoraConfig.*peft_type of its own"):
        register_method(PeftType.LORA, PeftConfig, object, prefix="other_")
    assert method_spec(PeftType.LORA) == before


def test_runtime_config_is_never_saved_and_ignored_when_read(tmp_path):
    from peftkit import LoraRuntimeConfig

    config = LoraConfig(r=2, runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=True))
    assert config.runtime_config.ephemeral_gpu_offload is True
    assert "runtime_config" not in config.to_dict()
    config.save_pretrained(str(tmp_path))
    assert "runtime_config" not in json.loads((tmp_path / "adapter_config.json").read_text())
    data = {**config.to_dict(), "runtime_config": {"ephemeral_gpu_offload": True}}
    with pytest.warns(UserWarning, match="contains a `runtime_config` key. This is ignored"):
        loaded = LoraConfig.from_dict(data)
    assert loaded.runtime_config == LoraRuntimeConfig()  # the file's value is not taken


def test_unmatched_rank_and_alpha_pattern_keys_warn_as_in_peft():
    """A typo in rank_pattern silently keeps the default rank; peft warns (RuntimeWarning), so do we."""
    import warnings

    from peftkit import LoraConfig, get_peft_model
    from tests.tiny_models import llama

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2, "q_prj": 3},
                        alpha_pattern={r"layers\.1\.self_attn\.v_proj": 8, "k_proj": 2})
    with pytest.warns(RuntimeWarning) as caught:
        model = get_peft_model(llama(), config)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "The following rank_pattern keys did not match any targeted module and were ignored: ['q_prj']." in texts
    assert "The following alpha_pattern keys did not match any targeted module and were ignored: ['k_proj']." in texts
    assert model.base_model.model.model.layers[0].self_attn.q_proj.r["default"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}))
