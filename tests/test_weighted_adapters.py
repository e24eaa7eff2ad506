"""add_weighted_adapter: exact for "cat", and the same adapters as peft's for every combination."""

from __future__ import annotations

import pytest
import torch

from peftkit import ConfigError, LoraConfig, PeftModel
from tests.properties import assert_close, output_of
from tests.tiny_models import llama, lm_inputs

COMBINATIONS = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.4}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.6}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.5}),
]


def _config(library=None, **kw) -> LoraConfig:
    config_cls = library.LoraConfig if library is not None else LoraConfig
    return config_cls(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "init_lora_weights": False, **kw})


def _two_adapters(library, second_overrides=None):
    torch.manual_seed(3)
    model = library.get_peft_model(llama(), _config(library))
    torch.manual_seed(4)
    model.add_adapter("other", _config(library, **(second_overrides or {"lora_alpha": 4})))
    return model


def _delta(model: PeftModel, name: str, key: str) -> torch.Tensor:
    return model.base_model.model.get_submodule(key).get_delta_weight(name)


def test_cat_is_exactly_the_weighted_sum_of_deltas():
    model = _two_adapters(__import__("peftkit"), second_overrides={"r": 2, "lora_alpha": 6})
    model.add_weighted_adapter(["default", "other"], [0.7, -1.3], "mix", combination_type="cat")
    assert model.peft_config["mix"].r == 6 and model.peft_config["mix"].lora_alpha == 6
    for key in ("model.layers.0.self_attn.q_proj", "model.embed_tokens"):
        expected = 0.7 * _delta(model, "default", key) - 1.3 * _delta(model, "other", key)
        assert torch.allclose(_delta(model, "mix", key), expected, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)


def test_single_adapter_linear_scales_the_delta():
    model = _two_adapters(__import__("peftkit"))
    model.add_weighted_adapter(["default"], [2.0], "doubled", combination_type="svd")
    key = "model.layers.1.self_attn.v_proj"
    assert torch.allclose(_delta(model, "doubled", key), 2.0 * _delta(model, "default", key), atol=1e-5)


@pytest.mark.parametrize("combination, kwargs", COMBINATIONS, ids=[c + "-" + "-".join(map(str, k.values())) for c, k in COMBINATIONS])
def test_same_result_as_peft(combination, kwargs):
    peft = pytest.importorskip("peft")
    import peftkit

    inputs = lm_inputs()
    results = []
    for library in (peft, peftkit):
        model = _two_adapters(library)
        torch.manual_seed(5)
        model.add_weighted_adapter(["default", "other"], [0.6, 0.9], "mix", combination_type=combination, **kwargs)
        model.set_adapter("mix")
        results.append(output_of(model, inputs))
    assert_close(results[1], results[0])


def test_bad_requests_give_clear_errors():
    model = _two_adapters(__import__("peftkit"), second_overrides={"r": 2})
    with pytest.raises(ConfigError, match="equal rank"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ConfigError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "other"], [1], "mix")
    with pytest.raises(ConfigError, match="density"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="ties_svd")
    with pytest.raises(ConfigError, match="Unknown combination_type"):
        model.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="average")
    assert set(model.peft_config) == {"default", "other"}


@pytest.mark.parametrize("writer", ["peft", "peftkit"])
def test_weighted_adapter_checkpoints_move_between_libraries(writer, tmp_path):
    peft = pytest.importorskip("peft")
    import peftkit

    libraries = {"peft": peft, "peftkit": peftkit}
    reader = "peftkit" if writer == "peft" else "peft"
    model = _two_adapters(libraries[writer])
    model.add_weighted_adapter(["default", "other"], [0.5, -0.8], "mix", combination_type="cat")
    model.set_adapter("mix")
    expected = output_of(model, lm_inputs())
    model.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    loaded = libraries[reader].PeftModel.from_pretrained(llama(), str(tmp_path / "mix"))
    assert_close(output_of(loaded, lm_inputs()), expected)
