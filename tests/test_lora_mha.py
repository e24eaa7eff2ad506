"""LoRA on nn.MultiheadAttention: peft's layout and outputs, merge/disable/unload, training, failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.tuners._core.base_layers import tensors_swapped
from peftkit.tuners.lora.mha import MultiheadAttention


class AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.mha(x, x, x)
        return self.lin0(x)


def _base() -> AttentionModel:
    torch.manual_seed(0)
    return AttentionModel()


X = torch.randn(5, 3, 10, generator=torch.Generator().manual_seed(1))


def _ours(**kwargs) -> PeftModel:
    torch.manual_seed(2)
    return get_peft_model(_base(), LoraConfig(target_modules=["mha"], init_lora_weights=False, **kwargs))


def test_peft_adapter_loads_with_its_outputs_and_ours_loads_in_peft(tmp_path):
    import peft

    theirs = peft.get_peft_model(_base(), peft.LoraConfig(target_modules=["mha"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(_base(), tmp_path / "peft")
    assert isinstance(ours.base_model.model.mha, MultiheadAttention)
    with torch.no_grad():
        assert not torch.allclose(ours(X), _base()(X), atol=1e-3)  # the adapter does something
        assert torch.allclose(ours(X), theirs(X), atol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(X), ours(X), atol=1e-6)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_merged_equals_unmerged_disabled_equals_base_and_unload_restores_the_module():
    model = _ours()
    with torch.no_grad():
        adapted = model(X)
        model.merge_adapter()
        assert torch.allclose(model(X), adapted, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(X), adapted, atol=1e-6)
        with model.disable_adapter():
            assert torch.allclose(model(X), _base()(X), atol=1e-6)
    base_state = {k: v.clone() for k, v in _base().state_dict().items()}
    unloaded = _ours().unload()
    assert type(unloaded.mha) is nn.MultiheadAttention and type(unloaded.mha.out_proj) is not MultiheadAttention
    assert all(torch.equal(unloaded.state_dict()[k], v) for k, v in base_state.items())
    merged = _ours().merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and isinstance(merged.mha.out_proj, nn.Linear)
    assert not hasattr(merged.mha.out_proj, "base_layer")
    with torch.no_grad():
        assert torch.allclose(merged(X), adapted, atol=1e-5)


def test_a_training_step_trains_only_the_adapter_of_both_projections():
    model = _ours()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {
        "base_model.model.mha.lora_A.default.weight",
        "base_model.model.mha.lora_B.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_A.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.default.weight",
    }
    layer = model.base_model.model.mha
    assert not layer.base_layer.in_proj_weight.requires_grad
    assert not layer.base_layer.out_proj.base_layer.weight.requires_grad
    assert isinstance(layer.base_layer.in_proj_weight, nn.Parameter)  # the forward put it back


def test_second_adapter_switch_delete_and_dtype_follow_out_proj():
    model = _ours()
    model.add_adapter("other", LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    layer = model.base_model.model.mha
    assert set(layer.out_proj_layer.r) == {"default", "other"}
    with torch.no_grad():
        first = model(X)
        model.set_adapter("other")
        assert layer.out_proj_layer.active_adapters == ["other"]
        assert not torch.allclose(model(X), first, atol=1e-4)
        model.delete_adapter("default")
    assert set(layer.out_proj_layer.r) == {"other"}
    half = get_peft_model(_base().half(), LoraConfig(target_modules=["mha"]), autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in half.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float16}


def test_refusals_name_the_problem_and_leave_the_model_alone():
    with pytest.raises(ValueError, match="does not support DoRA"):
        get_peft_model(_base(), LoraConfig(target_modules=["mha"], use_dora=True))
    base = nn.Sequential()
    base.add_module("mha", nn.MultiheadAttention(10, 2, kdim=4, vdim=4))
    with pytest.raises(ValueError, match="same embed for query/key/value"):
        get_peft_model(base, LoraConfig(target_modules=["mha"]))
    model = _ours()
    model.add_adapter("other", LoraConfig(target_modules=["mha"], init_lora_weights=False))
    with pytest.raises(TypeError, match="does not support mixed adapter batches"):
        model(X, adapter_names=["default", "other", "default", "other", "default"])
    layer = model.base_model.model.mha
    weight_in = layer.base_layer.in_proj_weight.detach().clone()
    weight_out = layer.base_layer.out_proj.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.out_proj_layer.lora_B["default"].weight[0, 0] = float("nan")  # fails after in_proj merged
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged and not layer.out_proj_layer.merged
    assert torch.equal(layer.base_layer.in_proj_weight, weight_in)
    assert torch.equal(layer.base_layer.out_proj.base_layer.weight, weight_out)


def test_swap_reaches_attributes_that_shadow_parameters():
    """FSDP(use_orig_params=True) keeps views in the instance dict; the swap must reach those too."""
    module = nn.Linear(2, 2)
    shadow = torch.ones(2, 2)
    module.__dict__["weight"] = shadow
    with tensors_swapped([(module, "weight", torch.zeros(2, 2))]):
        assert torch.equal(module.weight, torch.zeros(2, 2))
    assert module.weight is shadow
    plain = nn.Linear(2, 2)
    original = plain.weight
    with tensors_swapped([(plain, "weight", torch.zeros(2, 2))]):
        assert torch.equal(plain(torch.ones(1, 2)), plain.bias.unsqueeze(0))
    assert plain.weight is original
