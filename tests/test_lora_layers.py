"""LoRA layer math, checked by hand on planted values and on every supported layer type."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peftkit.tuners.lora import Conv, Embedding, Linear


def _linear_with_planted_adapter(fan_in_fan_out: bool = False, use_rslora: bool = False) -> Linear:
    base = Conv1D(3, 4) if fan_in_fan_out else nn.Linear(4, 3, bias=True)
    layer = Linear(base, "default", fan_in_fan_out=fan_in_fan_out, r=2, lora_alpha=4, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 1] = 1.0  # A reads x[1] into rank 0
        layer.lora_B["default"].weight[2, 0] = 1.0  # B writes rank 0 into y[2]
    return layer


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_forward_is_base_plus_scaled_low_rank(fan_in_fan_out):
    layer = _linear_with_planted_adapter(fan_in_fan_out)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = layer.base_layer(x).clone()
    expected[0, 2] += (4 / 2) * 2.0  # scaling * x[1]
    assert torch.allclose(layer(x), expected)


def test_rslora_scaling_uses_sqrt_rank():
    layer = _linear_with_planted_adapter(use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(4 / math.sqrt(2))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_delta_weight_has_base_layout_and_merge_matches(fan_in_fan_out):
    layer = _linear_with_planted_adapter(fan_in_fan_out)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape
    x = torch.randn(5, 4)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), before, atol=1e-6)
    layer.unmerge()
    assert not layer.merged


def test_default_init_is_kaiming_a_and_zero_b():
    layer = Linear(nn.Linear(64, 32), "default", r=8, lora_alpha=16)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert layer.lora_A["default"].weight.abs().max() <= bound
    assert layer.lora_A["default"].weight.std() > bound / 4


def test_zero_dropout_adds_no_op_and_positive_dropout_is_random_in_train():
    assert isinstance(Linear(nn.Linear(4, 4), "a", r=2, lora_alpha=2).lora_dropout["a"], nn.Identity)
    layer = Linear(nn.Linear(8, 8), "a", r=2, lora_alpha=2, lora_dropout=0.5, init_lora_weights=False).train()
    x = torch.randn(4, 8)
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    assert torch.allclose(layer(x), layer(x))


def test_embedding_lookup_matches_delta_weight_and_merges():
    base = nn.Embedding(10, 6, padding_idx=0)
    layer = Embedding(base, "default", r=3, lora_alpha=6, init_lora_weights=False)
    ids = torch.tensor([[1, 2, 9, 0]])
    expected = nn.functional.embedding(ids, base.weight + layer.get_delta_weight("default"))
    assert torch.allclose(layer(ids), expected, atol=1e-6)
    before = layer(ids)
    layer.merge()
    assert torch.allclose(layer(ids), before, atol=1e-6)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(4, 5, kernel_size=(3, 2), stride=1, padding=1, dilation=1)
        self.conv3d = nn.Conv3d(5, 2, kernel_size=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1d(x)  # (b, 4, L)
        x = self.conv2d(x.unsqueeze(-1))  # (b, 5, L', W)
        x = self.conv3d(x.unsqueeze(-1))  # (b, 2, L', W, 1)
        return self.head(x.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("target", ["conv1d", "conv2d", "conv3d"])
def test_conv_layers_merge_equals_unmerged(target):
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    x = torch.randn(2, 3, 7)
    base_out = model(x)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=[target], init_lora_weights=False), model)
    assert isinstance(getattr(model, target), Conv)
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    layer = getattr(model, target)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
    layer.merge()
    assert torch.allclose(model(x), adapted, atol=1e-5)


def _grouped_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))


def test_grouped_conv_adapters_move_both_ways_with_peft(tmp_path):
    """As peft: B is grouped like the base; peft's adapter loads with its outputs, and ours loads in peft."""
    import peft

    x = torch.randn(2, 4, 9, 9)
    with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
        theirs = peft.get_peft_model(_grouped_model(), peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
        ours = PeftModel.from_pretrained(_grouped_model(), tmp_path / "peft")
    layer = ours.base_model.model[0]
    assert layer.lora_B["default"].groups == 2 and layer.lora_B["default"].weight.shape == (8, 2, 1, 1)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
        assert not torch.allclose(ours(x), _grouped_model()(x), atol=1e-3)  # the adapter does something
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_grouped_model(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-6)


def test_grouped_conv_refuses_merging_and_bad_ranks():
    with pytest.warns(UserWarning):
        model = get_peft_model(_grouped_model(), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    before = model.base_model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()
    layer = model.base_model.model[0]
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)
    with pytest.raises(ValueError, match="groups=2 and rank 3.*divisible by groups"):
        inject_adapter_in_model(LoraConfig(r=3, target_modules=["0"]), _grouped_model())


def test_dora_on_grouped_conv_matches_peft_both_ways(tmp_path):
    """DoRA on a grouped conv: peft's normaliser (B A reshaped to the kernel), same outputs in both
    libraries, a fresh adapter equal to plain LoRA, and merging refused with the layer unchanged."""
    import peft

    x = torch.randn(2, 4, 9, 9)
    config = dict(r=4, target_modules=["0"], init_lora_weights=False, use_dora=True)
    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = peft.get_peft_model(_grouped_model(), peft.LoraConfig(**config))
    with torch.no_grad():  # a magnitude that is not the initial norm, so the factor is not 1
        theirs.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="groups > 1"):
        ours = PeftModel.from_pretrained(_grouped_model(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_grouped_model(), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-5)
    torch.manual_seed(1)
    with pytest.warns(UserWarning):
        fresh = get_peft_model(_grouped_model(), LoraConfig(**config))
    torch.manual_seed(1)
    with pytest.warns(UserWarning):
        plain = get_peft_model(_grouped_model(), LoraConfig(**{**config, "use_dora": False}))
    with torch.no_grad():
        assert torch.allclose(fresh(x), plain(x), atol=1e-5)  # m starts at the norm: f = 1
    before = fresh.base_model.model[0].base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        fresh.merge_adapter()
    assert torch.equal(fresh.base_model.model[0].base_layer.weight, before)


def test_low_precision_base_keeps_fp32_adapter_and_output_dtype():
    layer = Linear(nn.Linear(8, 8).to(torch.bfloat16), "default", r=2, lora_alpha=2, init_lora_weights=False)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_multiple_active_adapters_add_up():
    base = nn.Linear(6, 6)
    layer = Linear(base, "a", r=2, lora_alpha=2, init_lora_weights=False)
    layer.update_layer("b", r=3, lora_alpha=3, init_lora_weights=False)
    x = torch.randn(2, 6)
    layer.set_adapter("a")
    out_a = layer(x) - base(x)
    layer.set_adapter("b")
    out_b = layer(x) - base(x)
    layer.set_adapter(["a", "b"])
    assert torch.allclose(layer(x) - base(x), out_a + out_b, atol=1e-6)


def test_gpt2_conv1d_targets_get_fan_in_fan_out():
    from tests.tiny_models import gpt2

    model = get_peft_model(gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (32, 96)


def test_registered_custom_layer_types_are_wrapped_by_the_registered_class(tmp_path):
    """peft's experimental `LoraConfig._register_custom_module`: a module type LoRA does not know is
    wrapped by the user's class (here plain LoRA's Linear code over a Linear-like module), with peft's
    warning; the registration survives the config copies made on the way and is not saved."""
    import warnings

    from peftkit import LoraConfig, PeftModel, get_peft_model
    from peftkit.tuners.lora.layer import Linear as LoraLinear

    class LinearLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 6, 5
            self.weight = nn.Parameter(torch.randn(5, 6))

        def forward(self, x):
            return x @ self.weight.T

    class MyLora(LoraLinear):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inner = LinearLike()
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.inner(x))

    config = LoraConfig(target_modules=["inner", "head"], init_lora_weights=False)
    with pytest.raises(Exception, match="LinearLike, which LoRA cannot wrap"):
        get_peft_model(Net(), config)
    config._register_custom_module({LinearLike: MyLora})
    with pytest.warns(UserWarning, match=r"Unsupported layer type '.*LinearLike'>' encountered, proceed at your own risk."):
        model = get_peft_model(Net(), config)
    assert type(model.base_model.model.inner) is MyLora and isinstance(model.base_model.model.inner.base_layer, LinearLike)
    x = torch.randn(3, 6)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    assert "custom" not in (tmp_path / "adapter_config.json").read_text()
    loaded_config = LoraConfig.from_pretrained(str(tmp_path))
    assert loaded_config._custom_modules is None
    loaded_config._register_custom_module({LinearLike: MyLora})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(Net(), str(tmp_path), config=loaded_config)
    torch.testing.assert_close(loaded(x), expected)
