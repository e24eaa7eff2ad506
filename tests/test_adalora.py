"""AdaLoRA: the shared property suite, the SVD-form update, rank allocation, the orthogonality
penalty, pruned checkpoints and config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import AdaLoraConfig, AdaLoraModel, PeftModel, get_peft_model
from peftkit.errors import AdapterStateError, ConfigError, TargetModulesError
from peftkit.tuners.adalora import RankAllocator, SVDConv2d, SVDLinear
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES

CASES = ["llama", "bert", "gpt2"]


def adalora(case, **overrides) -> AdaLoraConfig:
    """A small AdaLoRA config; init_lora_weights=False gives random A, E, B (a non-trivial adapter)."""
    kwargs = dict(
        init_r=4, target_r=2, lora_alpha=0.5, target_modules=case.targets, init_lora_weights=False,
        total_step=10, task_type=case.task_type,
    )
    kwargs.update(overrides)
    return AdaLoraConfig(**kwargs)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


def config_for(name: str, **overrides) -> AdaLoraConfig:
    return adalora(MODEL_FACTORIES[name], **overrides)


LLAMA = MODEL_FACTORIES["llama"]


# ---------------------------------------------------------------------------------------------- properties
# AdaLoRA allows one trainable adapter only: the switch is checked by hand below
globals().update(prop.property_tests(
    config_for,
    second=None,
    fresh=({"init_lora_weights": True},),
    train=({"init_lora_weights": True},),
    lr=1e-2,
))


def test_adapters_switch():
    """A second, inference-mode adapter: switching changes the output, deleting restores the first."""
    inputs = LLAMA.make_inputs()
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA), adapter_name="first")
    out_first = prop.output_of(model, inputs)
    model.add_adapter("second", adalora(LLAMA, init_r=2, inference_mode=True))
    assert prop.output_of(model, inputs).equal(out_first)
    model.set_adapter("second")
    prop.assert_differs(prop.output_of(model, inputs), out_first)
    assert not any(p.requires_grad for p in model.parameters()), "an inference-mode adapter must stay frozen"
    model.delete_adapter("second")
    assert model.active_adapter == "first"
    prop.assert_close(prop.output_of(model, inputs), out_first)


def test_lora_only_features_are_refused():
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA))
    with pytest.raises(ConfigError, match="AdaLoRA"):
        model(**LLAMA.make_inputs(), adapter_names=["default", "default"])
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "combined")


def test_only_one_trainable_adapter():
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA))
    with pytest.raises(ConfigError, match="only 1 trainable adapter"):
        model.add_adapter("other", adalora(LLAMA))
    assert list(model.peft_config) == ["default"]


# ---------------------------------------------------------------------------------------------- the update
def test_delta_weight_by_hand():
    """One planted rank: delta_W[j, i] = B[j, 0] * A[0, i] * E[0] * lora_alpha / (init_r + 1e-5)."""
    base = nn.Linear(5, 3)
    layer = SVDLinear(base, "default", r=4, lora_alpha=2.0, init_lora_weights=True)
    with torch.no_grad():
        layer.lora_A["default"].zero_()
        layer.lora_B["default"].zero_()
        layer.lora_A["default"][0, 1] = 1.0
        layer.lora_E["default"][0, 0] = 2.0
        layer.lora_B["default"][2, 0] = 3.0
    expected = torch.zeros(3, 5)
    expected[2, 1] = 1.0 * 2.0 * 3.0 * 2.0 / (4 + 1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(2, 5)
    torch.testing.assert_close(layer(x), base(x) + x @ expected.T)
    assert layer.ranknum["default"].item() == 4 and not layer.ranknum["default"].requires_grad


def test_conv2d_merge_equals_unmerged():
    conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    torch.manual_seed(0)
    layer = SVDConv2d(conv, "default", r=2, lora_alpha=0.5, init_lora_weights=False)
    x = torch.randn(1, 3, 5, 5)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, conv(x))
    layer.merge()
    torch.testing.assert_close(conv(x), unmerged, atol=1e-5, rtol=0)


def test_unsupported_layer_names_the_module():
    with pytest.raises(TargetModulesError, match="embed_tokens"):
        get_peft_model(LLAMA.make_model(), adalora(LLAMA, target_modules=["embed_tokens"]))


def test_default_targets_follow_peft_adalora_mapping():
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA, target_modules=None))
    assert {name.rpartition(".")[2] for name, _ in model.base_model.tuner_layers()} == {"q_proj", "v_proj"}


# ---------------------------------------------------------------------------------------------- config
def test_seed_config_without_total_step_says_what_to_pass():
    with pytest.warns(UserWarning, match="`r` is not used"), pytest.raises(ConfigError) as info:
        AdaLoraConfig(r=12, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_r=12, tinit=200, tfinal=1000, deltaT=10)
    message = str(info.value)
    assert "total_step" in message and "steps per epoch" in message


def test_seed_config_with_total_step_works():
    with pytest.warns(UserWarning, match="init_r"):
        config = AdaLoraConfig(
            r=12, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_r=12, tinit=200, tfinal=1000, deltaT=10,
            total_step=1500, task_type="CAUSAL_LM",
        )
    model = get_peft_model(LLAMA.make_model(), config)
    assert isinstance(model.base_model, AdaLoraModel)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].shape == (12, 32) and layer.lora_E["default"].shape == (12, 1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"total_step": 0}, "total_step"),
        ({"tinit": 6, "tfinal": 4}, "tinit \\+ tfinal < total_step"),
        ({"orth_reg_weight": -1.0}, "orth_reg_weight"),
        ({"use_dora": True}, "DoRA"),
        ({"deltaT": 0}, "deltaT"),
        ({"init_r": 0}, "init_r"),
        ({"rank_pattern": {"q_proj.lora_E": [1, 0]}}, "list of booleans"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        adalora(LLAMA, **overrides)


def test_training_needs_valid_betas_and_target_r():
    with pytest.raises(ConfigError, match="beta1"):
        get_peft_model(LLAMA.make_model(), adalora(LLAMA, beta1=1.0))
    with pytest.raises(ConfigError, match="target_r"):
        get_peft_model(LLAMA.make_model(), adalora(LLAMA, target_r=6))


# ---------------------------------------------------------------------------------------------- allocation
class _Layers:
    def __init__(self, layers):
        self.layers = layers

    def tuner_layers(self):
        return iter(self.layers)


def test_budget_schedule_is_cubic():
    config = AdaLoraConfig(init_r=6, target_r=2, target_modules=["x"], tinit=10, tfinal=20, deltaT=5, total_step=110)
    layers = [(f"m{i}", SVDLinear(nn.Linear(4, 4), "default", r=6, lora_alpha=1)) for i in range(3)]
    allocator = RankAllocator(_Layers(layers), config, "default")
    assert (allocator.init_bgt, allocator.target_bgt) == (18, 6)
    assert allocator.budget_schedule(10) == (18, False)  # warm-up: full budget, no masking
    assert allocator.budget_schedule(50) == (int(12 * 0.5**3 + 6), True)  # halfway, 50 % 5 == 0
    assert allocator.budget_schedule(51) == (int(12 * (1 - 41 / 80) ** 3 + 6), False)
    assert allocator.budget_schedule(90) == (6, True)
    assert allocator.budget_schedule(91) == (6, True)  # final phase: target budget, always masked


def _train_with_allocation(model, inputs, steps, lr=0.05):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def pruning_config(case, **overrides):
    kwargs = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=case.targets, tinit=1, tfinal=2, deltaT=1,
                  total_step=8, task_type=case.task_type)
    kwargs.update(overrides)
    return AdaLoraConfig(**kwargs)


def test_update_and_allocate_prunes_to_target_budget():
    model = get_peft_model(LLAMA.make_model(), pruning_config(LLAMA))
    assert model.peft_config["default"].rank_pattern is None
    losses = _train_with_allocation(model, LLAMA.make_inputs(), steps=8)
    assert losses[-1] < losses[0]
    rank_pattern = model.peft_config["default"].rank_pattern
    layers = dict(model.base_model.tuner_layers())
    assert set(rank_pattern) == {f"{name}.lora_E" for name in layers}
    assert all(len(mask) == 4 for mask in rank_pattern.values())
    kept = sum(sum(mask) for mask in rank_pattern.values())
    assert 0 < kept <= 2 * len(layers) < 4 * len(layers)
    for name, layer in layers.items():  # final phase: pruned singular values are zeroed after each step
        pruned = ~torch.tensor(rank_pattern[f"{name}.lora_E"])
        assert torch.all(layer.lora_E["default"].detach()[pruned] == 0)


def test_update_and_allocate_needs_gradients_and_a_trainable_adapter(tmp_path):
    model = get_peft_model(LLAMA.make_model(), pruning_config(LLAMA))
    with pytest.raises(AdapterStateError, match="after loss.backward"):
        model.base_model.update_and_allocate(0)
    model.save_pretrained(str(tmp_path))
    frozen = PeftModel.from_pretrained(LLAMA.make_model(), str(tmp_path))
    with pytest.raises(AdapterStateError, match="is_trainable=True"):
        frozen.base_model.update_and_allocate(0)


def test_pruned_adapter_saves_kept_ranks_and_reloads(tmp_path):
    inputs = LLAMA.make_inputs()
    model = get_peft_model(LLAMA.make_model(), pruning_config(LLAMA))
    _train_with_allocation(model, inputs, steps=8)
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    rank_pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert rank_pattern == model.peft_config["default"].rank_pattern
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("ranknum" in key for key in weights)
    layers = dict(model.base_model.tuner_layers())
    for key, mask in rank_pattern.items():
        name = key[: -len(".lora_E")]
        module, kept = "base_model.model." + name, sum(mask)
        assert weights[module + ".lora_A"].shape == (kept, layers[name].in_features)
        assert weights[module + ".lora_E"].shape == (kept, 1)
        assert weights[module + ".lora_B"].shape == (layers[name].out_features, kept)
    loaded = PeftModel.from_pretrained(LLAMA.make_model(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, inputs), expected)
    # Saving the loaded (already resized) adapter writes the same tensors again.
    loaded.save_pretrained(str(tmp_path / "again"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(weights)
    assert all(torch.equal(again[key], weights[key]) for key in weights)


def test_fully_pruned_module_loads_with_rank_zero(tmp_path):
    inputs = LLAMA.make_inputs()
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA))
    layers = dict(model.base_model.tuner_layers())
    masks = {f"{name}.lora_E": [True, False, True, False] for name in layers}
    first = next(iter(masks))
    masks[first] = [False] * 4
    model.peft_config["default"].rank_pattern = masks
    model.base_model._allocator().mask_using_rank_pattern(masks)
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(LLAMA.make_model(), str(tmp_path))
    loaded_layer = dict(loaded.base_model.tuner_layers())[first[: -len(".lora_E")]]
    assert loaded_layer.lora_A["default"].shape == (0, 32) and loaded_layer.r["default"] == 0
    prop.assert_close(prop.output_of(loaded, inputs), expected)
    loaded.merge_adapter()
    prop.assert_close(prop.output_of(loaded, inputs), expected)


# ---------------------------------------------------------------------------------------------- orth reg
def test_orthogonal_regularization_is_added_in_training_only():
    inputs = LLAMA.make_inputs()
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA, orth_reg_weight=0.3))
    with torch.no_grad():
        plain = model.base_model.model(**inputs).loss
        penalty = model.base_model.orthogonal_regularization("default")
        model.eval()
        assert torch.equal(model(**inputs).loss, plain)
        model.train()
        torch.testing.assert_close(model(**inputs).loss, plain + 0.3 * penalty)


def test_orthogonal_regularization_is_zero_for_orthonormal_factors():
    """Plant A with orthonormal rows and B with orthonormal columns: the penalty vanishes."""
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA))
    with torch.no_grad():
        for _, layer in model.base_model.tuner_layers():
            weight_a, weight_b = layer.lora_A["default"], layer.lora_B["default"]
            weight_a.copy_(torch.eye(*weight_a.shape))
            weight_b.copy_(torch.eye(*weight_b.shape))
        assert model.base_model.orthogonal_regularization("default").item() == 0
        layer.lora_A["default"][0, 0] = 2.0  # one entry off: |A A^T - I|_F = 3 for that A
        count = 2 * len(list(model.base_model.tuner_layers()))
        assert math.isclose(model.base_model.orthogonal_regularization("default").item(), 3 / count, rel_tol=1e-6)


def test_pruned_adapter_loads_as_a_second_adapter(tmp_path):
    inputs = LLAMA.make_inputs()
    trained = get_peft_model(LLAMA.make_model(), pruning_config(LLAMA))
    _train_with_allocation(trained, inputs, steps=8)
    expected = prop.output_of(trained, inputs)
    trained.save_pretrained(str(tmp_path))
    model = get_peft_model(LLAMA.make_model(), adalora(LLAMA))
    model.load_adapter(str(tmp_path), adapter_name="pruned")
    model.set_adapter("pruned")
    prop.assert_close(prop.output_of(model, inputs), expected)
    masks = model.peft_config["pruned"].rank_pattern
    for name, layer in model.base_model.tuner_layers():
        assert layer.r["pruned"] == sum(masks[f"{name}.lora_E"]) and layer.r["default"] == 4
