"""peft's public names that peftkit provides beside the core API, each checked by what it does."""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import os
import tempfile
from unittest import mock

import pytest
import torch
from torch import nn

import peftkit
from peftkit import IA3Config, LoraConfig, PeftType, get_peft_model
from peftkit.errors import PeftkitError
from tests.tiny_models import llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def two_adapter_model():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, modules_to_save=["head"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    return model


# ---------------------------------------------------------------------- errors and warnings
def test_peft_error_classes_catch_ours():
    with pytest.raises(peftkit.NoMatchingPeftModuleError) as caught:
        get_peft_model(MLP(), LoraConfig(target_modules=["does_not_exist"]))
    assert isinstance(caught.value, peftkit.TargetModulesError)
    assert isinstance(caught.value, peftkit.PeftError) and isinstance(caught.value, ValueError)
    assert issubclass(peftkit.NoMatchingPeftModuleError, peftkit.PeftError)
    assert issubclass(peftkit.NoMatchingPeftModuleError, ValueError)
    for cls in (peftkit.ConfigError, peftkit.CheckpointError, peftkit.AdapterNameError, peftkit.AdapterStateError):
        assert issubclass(cls, PeftkitError) and issubclass(cls, peftkit.PeftError) and issubclass(cls, ValueError)
    assert issubclass(peftkit.PeftWarning, UserWarning)
    from peftkit.utils import NoMatchingPeftModuleError, PeftError, PeftWarning

    assert (NoMatchingPeftModuleError, PeftError, PeftWarning) == (
        peftkit.NoMatchingPeftModuleError, peftkit.PeftError, peftkit.PeftWarning
    )


# ---------------------------------------------------------------------- mappings
def test_mappings_follow_the_registry():
    from peftkit.registry import registered_methods

    specs = registered_methods()
    assert set(peftkit.PEFT_TYPE_TO_CONFIG_MAPPING) == {PeftType(s.peft_type) for s in specs}
    assert peftkit.PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is LoraConfig
    assert peftkit.PEFT_TYPE_TO_CONFIG_MAPPING["IA3"] is IA3Config
    assert peftkit.PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA] is peftkit.LoraModel
    assert peftkit.PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.LORA] == "lora_"
    assert peftkit.PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.IA3] == "ia3_"
    assert "NOT_A_METHOD" not in peftkit.PEFT_TYPE_TO_CONFIG_MAPPING
    with pytest.raises(KeyError):
        peftkit.PEFT_TYPE_TO_TUNER_MAPPING["NOT_A_METHOD"]
    # the methods a PeftMixedModel combines (mixed_model.COMPATIBLE_TUNER_TYPES)
    assert set(peftkit.PEFT_TYPE_TO_MIXED_MODEL_MAPPING) == {"LORA", "LOHA", "LOKR"}


def test_mappings_see_a_method_registered_later(monkeypatch):
    from peftkit import registry

    spec = registry.MethodSpec("MYMETHOD", LoraConfig, peftkit.LoraModel, prefix="mine_")
    monkeypatch.setitem(registry._REGISTERED, "MYMETHOD", spec)
    assert peftkit.PEFT_TYPE_TO_PREFIX_MAPPING["MYMETHOD"] == "mine_"
    assert "MYMETHOD" in list(peftkit.PEFT_TYPE_TO_CONFIG_MAPPING)


# ---------------------------------------------------------------------- base model state dict
def test_base_model_state_dict_round_trip():
    base = MLP()
    original = {key: value.clone() for key, value in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, modules_to_save=["head"]))
    extracted = peftkit.get_base_model_state_dict(model)
    assert set(extracted) == set(original)
    for key in original:
        torch.testing.assert_close(extracted[key], original[key])
    adapter_before = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = peftkit.set_base_model_state_dict(model, original)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in peftkit.get_base_model_state_dict(model).items():
        torch.testing.assert_close(value, original[key])
    # the adapters (LoRA tensors and the head's trainable copy) were perturbed too, and stay so
    for key, value in peftkit.get_peft_model_state_dict(model).items():
        assert not torch.equal(value, adapter_before[key])


def test_set_base_model_state_dict_strict_and_lenient():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    state = peftkit.get_base_model_state_dict(model)
    partial = {k: v for k, v in state.items() if k != "lin1.bias"}
    partial["extra.weight"] = torch.zeros(1)
    before = model.get_base_model().lin0.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="Missing key.*lin1.bias"):
        peftkit.set_base_model_state_dict(model, {**partial, "lin0.weight": before + 1})
    torch.testing.assert_close(model.get_base_model().lin0.base_layer.weight, before)  # nothing loaded
    result = peftkit.set_base_model_state_dict(model, {**partial, "lin0.weight": before + 1}, strict=False)
    assert result.missing_keys == ["lin1.bias"] and result.unexpected_keys == ["extra.weight"]
    torch.testing.assert_close(model.get_base_model().lin0.base_layer.weight, before + 1)


def test_base_model_state_dict_of_prompt_learning_is_the_plain_model():
    base = llama()
    keys = set(base.state_dict())
    model = get_peft_model(base, peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert set(peftkit.get_base_model_state_dict(model)) == keys


def test_base_model_state_dict_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_base_model_state_dict(
        peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    )
    torch.manual_seed(0)
    ours = peftkit.get_base_model_state_dict(
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
    )
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


# ---------------------------------------------------------------------- status
def test_layer_status_with_two_adapters_one_merged():
    model = two_adapter_model()
    model.get_base_model().lin0.merge(adapter_names=["other"])
    status = {s.name: s for s in peftkit.get_layer_status(model)}
    assert status == {s.name: s for s in model.get_layer_status()}
    lin0, lin1, head = status["model.lin0"], status["model.lin1"], status["model.head"]
    assert lin0.module_type == "lora.Linear" and head.module_type == "ModulesToSaveWrapper"
    assert lin0.available_adapters == ["default", "other"] and lin1.available_adapters == ["default"]
    assert lin0.merged_adapters == ["other"] and lin1.merged_adapters == []
    assert lin0.active_adapters == ["default"] and lin0.enabled is True
    assert lin0.requires_grad == {"default": True, "other": False}
    assert lin0.devices == {"default": ["cpu"], "other": ["cpu"]}
    assert lin0.quantization_backend is None
    assert [f.name for f in dataclasses.fields(peftkit.TunerLayerStatus)] == [
        "name", "module_type", "enabled", "active_adapters", "merged_adapters", "requires_grad",
        "available_adapters", "devices", "quantization_backend",
    ]


def test_model_status_summarises_and_flags_irregular():
    model = two_adapter_model()
    model.get_base_model().lin0.merge(adapter_names=["other"])
    status = model.get_model_status()
    assert status == peftkit.get_model_status(model)
    assert (status.base_model_type, status.adapter_model_type) == ("MLP", "LoraModel")
    assert status.peft_types == {"default": "LORA", "other": "LORA"}
    assert (status.trainable_params, status.total_params) == model.get_nb_trainable_parameters()
    assert status.num_adapter_layers == 3
    assert status.merged_adapters == ["other"]  # merged wherever it exists
    assert status.available_adapters == ["default", "other"]
    assert status.enabled is True and status.active_adapters == ["default"]
    assert status.requires_grad == {"default": True, "other": False}
    # one layer's adapter frozen by hand, another layer disabled: inconsistent
    model.get_base_model().lin1.lora_A["default"].weight.requires_grad_(False)
    model.get_base_model().lin1._disable_adapters = True
    status = model.get_model_status()
    assert status.requires_grad["default"] == "irregular"
    assert status.enabled == "irregular"
    with pytest.warns(UserWarning, match="merged"):
        model.get_base_model().lin0.merge(adapter_names=["default"])
    assert model.get_model_status().merged_adapters == "irregular"  # default merged in lin0 only


def test_status_of_a_model_without_adapters_raises():
    with pytest.raises(ValueError, match="No adapter layers found"):
        peftkit.get_layer_status(MLP())
    prompt = get_peft_model(llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="prefix tuning"):
        prompt.get_model_status()


def test_status_matches_peft():
    peft = pytest.importorskip("peft")
    reports = {}
    for lib in (peft, peftkit):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["head"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin0"]))
        model.base_model.model.lin0.merge(adapter_names=["other"])
        reports[lib.__name__] = (
            [dataclasses.asdict(s) for s in model.get_layer_status()],
            dataclasses.asdict(model.get_model_status()),
        )
    assert reports["peftkit"] == reports["peft"]


# ---------------------------------------------------------------------- helpers
def test_rescale_adapter_scale_changes_outputs_inside_and_restores_after():
    from peftkit.helpers import rescale_adapter_scale

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
        with model.disable_adapter():
            base = model(x)
        with rescale_adapter_scale(model, 0.0):
            torch.testing.assert_close(model(x), base)  # scale 0: the base model
        with rescale_adapter_scale(model, 0.5):
            half = model(x)
        assert not torch.allclose(half, before) and not torch.allclose(half, base)
        torch.testing.assert_close(model(x), before)
        with pytest.raises(RuntimeError):
            with rescale_adapter_scale(model, 2):
                raise RuntimeError("boom")
        torch.testing.assert_close(model(x), before)  # restored after an exception too
    with pytest.raises(TypeError):
        with rescale_adapter_scale(model, "2"):
            pass
    with pytest.raises(ValueError, match="LoraLayer"):
        with rescale_adapter_scale(get_peft_model(MLP(), IA3Config(target_modules=["lin0"], feedforward_modules=[])), 0.5):
            pass


def test_disable_input_dtype_casting_sets_and_restores_the_flag():
    from peftkit.helpers import disable_input_dtype_casting

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"]))
    layers = [model.get_base_model().lin0, model.get_base_model().lin1]
    with disable_input_dtype_casting(model):
        assert [layer.cast_input_dtype_enabled for layer in layers] == [False, False]
    assert [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers] == [True, True]
    with disable_input_dtype_casting(model, active=False):
        assert all(getattr(layer, "cast_input_dtype_enabled", True) for layer in layers)


def test_update_signature_shows_the_base_models_signature():
    from peftkit.helpers import update_signature

    base = llama()
    model = peftkit.PeftModel(base, LoraConfig(target_modules=["q_proj"]))
    assert list(inspect.signature(model.forward).parameters) == ["args", "kwargs"]
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    update_signature(model, "all")
    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "attention_mask" in params
    assert model.forward.__doc__ == type(base).forward.__doc__
    assert "generation_config" in inspect.signature(model.generate).parameters
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)  # still PeftModel's forward
    with pytest.raises(ValueError, match="not supported"):
        update_signature(model, "backward")


def test_check_if_peft_model(tmp_path):
    from peftkit.helpers import check_if_peft_model

    get_peft_model(MLP(), LoraConfig(target_modules=["lin0"])).save_pretrained(str(tmp_path / "adapter"))
    assert check_if_peft_model(str(tmp_path / "adapter")) is True
    (tmp_path / "plain").mkdir()
    assert check_if_peft_model(str(tmp_path / "plain")) is False


def test_find_kappa_target_modules_ranks_by_condition_number():
    model = MLP()
    with torch.no_grad():
        model.lin0.weight.copy_(torch.eye(8, 6))  # kappa 1: the best conditioned
        model.lin1.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-3])) @ torch.randn(4, 8))
    targets = peftkit.find_kappa_target_modules(model, top_p=0.34, show_progress=False)
    assert targets == {"target_modules": ["lin0"], "target_parameters": None}
    from peftkit.helpers import KappaTuneSelector

    ranked = KappaTuneSelector(model, show_progress=False).get_best_targets()
    assert ranked[0] == "lin0" and ranked[-1] == "lin1"
    assert KappaTuneSelector(model, max_dim_size_to_analyze=3, show_progress=False).get_best_targets() == []


# ---------------------------------------------------------------------- load_peft_weights, utils.other
def test_load_peft_weights(tmp_path):
    from peftkit.checkpoint.state_dict import load_peft_weights

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    saved = peftkit.get_peft_model_state_dict(model)
    loaded = peftkit.load_peft_weights(str(tmp_path), device="cpu")
    assert loaded.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key])
    assert load_peft_weights is peftkit.load_peft_weights
    renamed = peftkit.load_peft_weights(str(tmp_path), device="cpu", key_mapping={r"^lin0\.": "layer0."})
    assert set(renamed) == {k.replace("base_model.model.lin0.", "base_model.model.layer0.") for k in saved}


def test_shift_tokens_right_and_cast_mixed_precision_params():
    from peftkit.utils.other import shift_tokens_right

    labels = torch.tensor([[5, 6, -100, 7], [8, -100, -100, -100]])
    out = shift_tokens_right(labels, pad_token_id=0, decoder_start_token_id=2)
    assert out.tolist() == [[2, 5, 6, 0], [2, 8, 0, 0]]
    assert labels.tolist() == [[5, 6, -100, 7], [8, -100, -100, -100]]
    with pytest.raises(ValueError, match="pad_token_id"):
        shift_tokens_right(labels, None, 2)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    peftkit.cast_mixed_precision_params(model, torch.bfloat16)
    for param in model.parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16)
    assert any(p.requires_grad for p in model.parameters()) and any(not p.requires_grad for p in model.parameters())


def test_prepare_model_for_kbit_training_auto_clear_cache(monkeypatch):
    from peftkit.quantization import kbit_training

    calls = []
    monkeypatch.setattr(kbit_training, "clear_accelerator_cache", lambda: calls.append(1))
    model = MLP().to(torch.float16)
    peftkit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, auto_clear_cache=False)
    assert calls == [] and all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    peftkit.prepare_model_for_kbit_training(MLP(), use_gradient_checkpointing=False)
    assert calls == [1]
    assert inspect.signature(peftkit.prepare_model_for_kbit_training).parameters["auto_clear_cache"].default is True


# ---------------------------------------------------------------------- push_to_hub
def _fake_api(uploaded: dict, remote_card: str | None = None):
    api = mock.MagicMock(name="HfApi()")
    api.create_repo.return_value.repo_id = "me/adapter"

    def download(repo_id, filename, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        if remote_card is None:
            raise EntryNotFoundError("no README")
        path = os.path.join(tempfile.mkdtemp(), "README.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(remote_card)
        return path

    def upload_folder(*, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["kwargs"] = kwargs
        uploaded["files"] = {}
        for root, _dirs, names in os.walk(folder_path):
            for name in names:
                relative = os.path.relpath(os.path.join(root, name), folder_path)
                if any(fnmatch.fnmatch(relative, pattern) for pattern in kwargs.get("ignore_patterns") or ()):
                    continue  # as huggingface_hub's filter does
                with open(os.path.join(root, name), "rb") as handle:
                    uploaded["files"][relative] = handle.read()
        return "https://huggingface.co/me/adapter/commit/abc"

    api.hf_hub_download.side_effect = download
    api.upload_folder.side_effect = upload_folder
    return api


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(target_modules=["lin1"]))
    uploaded: dict = {}
    api = _fake_api(uploaded)
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        result = model.push_to_hub("adapter", private=True, token="t", commit_message="msg", tags=["extra"])
    assert result.endswith("commit/abc")
    api.create_repo.assert_called_once_with("adapter", private=True, token="t", exist_ok=True)
    assert uploaded["repo_id"] == "me/adapter" and uploaded["kwargs"]["commit_message"] == "msg"
    model.save_pretrained(str(tmp_path))
    local = {os.path.relpath(os.path.join(r, n), tmp_path) for r, _d, ns in os.walk(tmp_path) for n in ns}
    local = {path for path in local if ".peftkit" not in path.split(os.sep)}  # the lock area is not uploaded
    assert set(uploaded["files"]) == local
    for name in ("adapter_config.json", "adapter_model.safetensors", os.path.join("second", "adapter_model.safetensors")):
        assert uploaded["files"][name] == (tmp_path / name).read_bytes()
    card = uploaded["files"]["README.md"].decode()
    assert "library_name: peft" in card and "- extra" in card


def test_push_to_hub_keeps_the_remote_card_text(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    uploaded: dict = {}
    api = _fake_api(uploaded, remote_card="---\nlicense: mit\n---\nWritten on the hub.\n")
    with mock.patch("huggingface_hub.HfApi", return_value=api):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin0"])).push_to_hub("me/adapter")
    card = uploaded["files"]["README.md"].decode()
    assert "Written on the hub." in card and "license: mit" in card and "library_name: peft" in card


def test_push_to_hub_refuses_offline(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
            get_peft_model(MLP(), LoraConfig(target_modules=["lin0"])).push_to_hub("me/adapter")
    api_cls.assert_not_called()


def test_save_embedding_layers_on_a_custom_module_warns_as_peft(tmp_path):
    class WithEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin0 = nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lin0(self.emb(ids))

    model = get_peft_model(WithEmbedding(), LoraConfig(target_modules=["lin0", "emb"]))
    with pytest.warns(UserWarning, match="not a 🤗 transformers model"):
        model.save_pretrained(str(tmp_path), save_embedding_layers=True)
    assert "base_model.model.emb.base_layer.weight" not in peftkit.load_peft_weights(str(tmp_path), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accelerator_defaults_and_devices(tmp_path):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    assert {t.device.type for t in peftkit.load_peft_weights(str(tmp_path)).values()} == {"cuda"}  # peft's default
    model = model.to("cuda")
    assert model.get_model_status().devices == {"default": ["cuda"]}
    peftkit.prepare_model_for_kbit_training(MLP().half().cuda(), use_gradient_checkpointing=False)  # empties the cache
