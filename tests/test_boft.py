"""BOFT: config checks, block/butterfly geometry, the butterfly maths, each layer kind by hand, dropout,
several adapters, quantized bases, biases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftkit import BOFTConfig, ConfigError, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.boft import butterfly
from peftkit.tuners.boft.layer import Conv2d as BOFTConv2d
from peftkit.tuners.boft.layer import Linear as BOFTLinear
from peftkit.tuners.boft.layer import resolve_butterfly
from tests import properties as prop
from tests.bnb_helpers import bnb_forward_disagreement, bnb_llama, bnb_quantize_model, needs_bnb, skip_if_kernel_disagrees
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> BOFTConfig:
    """Blocks of 4 in 2 butterfly factors, random blocks and scales (a non-trivial adapter)."""
    kwargs = dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return BOFTConfig(**kwargs)


def random_rotations(factors: int, blocks: int, size: int, seed: int = 0) -> torch.Tensor:
    params = torch.randn(factors, blocks, size, size, generator=torch.Generator().manual_seed(seed)) * 0.3
    return butterfly.cayley_blocks(params)


class Net(nn.Module):
    """Linear layers and a padded, strided 3x3 Conv2d (4 * 3 * 3 = 36 rotated features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin0(x))) + self.conv(img).mean((2, 3))


def net_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(3, 16, generator=generator), torch.randn(3, 4, 7, 7, generator=generator)


def wrap_net(**overrides) -> PeftModel:
    kwargs = dict(target_modules=["lin0", "conv", "head"], boft_block_size=2, boft_n_butterfly_factor=2, init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(Net(), BOFTConfig(**kwargs)).eval()


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boft_block_size": 0}, r"Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, "
                                 r"boft_block_size = 0 and boft_block_num = 0."),
        ({"boft_block_num": 2}, r"You can only specify either boft_block_size \(4\) or boft_block_num \(2\), but not "
                                r"both simultaneously, because boft_block_size x boft_block_num == in_features."),
        ({"boft_n_butterfly_factor": 0}, "You can only specify boft_n_butterfly_factor 0 to be a positive integer"),
        ({"boft_n_butterfly_factor": 1.5}, "boft_n_butterfly_factor 1.5"),
        ({"boft_block_size": -4}, "boft_block_size=-4 is invalid"),
        ({"boft_block_size": 2.0}, "boft_block_size=2.0 is invalid"),
        ({"boft_block_size": 0, "boft_block_num": True}, "boft_block_num=True is invalid"),
        ({"boft_dropout": 1.0}, r"boft_dropout=1.0 .*\[0, 1\)"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is invalid"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out=1 is invalid"),
        ({"layers_pattern": "layers"}, "When `layers_pattern` is specified, `layers_to_transform` must also be"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BOFTConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_boft(tmp_path):
    config = BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, boft_dropout=0.1,
                        bias="boft_only", target_modules=["q_proj"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is BOFTConfig
    assert (loaded.boft_block_size, loaded.boft_block_num, loaded.boft_n_butterfly_factor) == (0, 8, 3)
    assert (loaded.boft_dropout, loaded.bias, loaded.target_modules) == (0.1, "boft_only", {"q_proj"})


# ---------------------------------------------------------------------------------------------- geometry
def test_resolve_butterfly_derives_the_other_size():
    assert resolve_butterfly(32, 4, 0, 1) == (4, 8)
    assert resolve_butterfly(32, 0, 4, 1) == (8, 4)
    assert resolve_butterfly(32, 2, 0, 3) == (2, 16)  # 32 is a multiple of 2 * 2^2
    assert resolve_butterfly(72, 2, 0, 3) == (2, 36)  # a Conv2d's 8 * 3 * 3
    assert resolve_butterfly(36, 0, 1, 1) == (36, 1)  # one block: plain OFT over the whole dimension


@pytest.mark.parametrize(
    "args, conv, message",
    [
        ((30, 4, 0, 1), False, r"^in_features \(30\) must be divisible by boft_block_size \(4\)!$"),
        ((30, 0, 4, 1), False, r"^in_features \(30\) must be divisible by boft_block_num \(4\)!$"),
        ((36, 5, 0, 1), True, r"^Convolutional kernel dimension \(36\) must be divisible by boft_block_size \(5\)!$"),
        ((32, 0, 2, 3), False, r"^Invalid combination of boft_n_butterfly_factor \(3\) and boft_block_num \(2\)!$"),
        ((48, 0, 6, 3), False, r"^boft_block_num \(6\) must be a multiple of 2 raised to the power of "
                                r"boft_n_butterfly_factor \(3\)!$"),
        ((32, 16, 0, 3), False, r"^Invalid combination of in_features \(32\), boft_n_butterfly_factor \(3\) and "
                                r"boft_block_size \(16\)!$"),
        ((36, 12, 0, 2), True, r"^Invalid combination of convolutional kernel dimension \(36\), boft_n_butterfly_factor "
                               r"\(2\) and boft_block_size \(12\)!$"),
        ((36, 0, 4, 2), False, r"^boft_block_size \(9\) must be an even number!$"),
        ((24, 0, 3, 1), False, None),  # one factor: odd counts are fine
    ],
)
def test_resolve_butterfly_refuses_with_peft_messages(args, conv, message):
    if message is None:
        assert resolve_butterfly(*args, conv=conv) == (8, 3)
        return
    with pytest.raises(ConfigError, match=message):
        resolve_butterfly(*args, conv=conv)


def test_bad_geometry_at_injection_leaves_model_unchanged():
    model = llama()
    with pytest.raises(ConfigError, match=r"in_features \(48\) must be divisible by boft_block_size \(5\)"):
        get_peft_model(model, BOFTConfig(boft_block_size=5, target_modules=["down_proj"]))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


def test_layer_shapes_and_checkpoint_keys(tmp_path):
    model = get_peft_model(llama(), config_for("llama", boft_n_butterfly_factor=3))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert layer.boft_R["default"].shape == (3, 8, 4, 4) and layer.boft_s["default"].shape == (16, 1)
    assert (layer.boft_block_size["default"], layer.boft_block_num["default"]) == (4, 8)
    conv = wrap_net().base_model.model.conv
    assert conv.boft_R["default"].shape == (2, 18, 2, 2) and conv.boft_s["default"].shape == (1, 4)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.v_proj.boft_R" in keys
    assert "base_model.model.model.layers.0.self_attn.v_proj.boft_s" in keys
    assert all(key.endswith((".boft_R", ".boft_s")) for key in keys)


# ---------------------------------------------------------------------------------------------- maths
def test_cayley_blocks_are_orthogonal_and_zero_is_identity():
    rotations = random_rotations(2, 3, 4)
    eye = torch.eye(4).expand(2, 3, 4, 4)
    prop.assert_close(rotations @ rotations.transpose(-2, -1), eye)
    prop.assert_close(butterfly.cayley_blocks(torch.zeros(1, 2, 3, 3)), torch.eye(3).expand(1, 2, 3, 3), atol=0)
    # only the skew part counts
    params = torch.randn(1, 2, 3, 3)
    skew_part = 0.5 * (params - params.transpose(-2, -1))
    prop.assert_close(butterfly.cayley_blocks(params), butterfly.cayley_blocks(skew_part))


def test_butterfly_permutation_pairs_half_blocks_apart():
    """Factor 1 over blocks of 2 in groups of 4: [0 1 2 3] -> [0 2 1 3]; factor 0 is the identity."""
    assert butterfly.butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly.butterfly_permutation(8, 2, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert butterfly.butterfly_permutation(8, 4, 1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert torch.equal(butterfly.butterfly_permutation(8, 2, 0), torch.arange(8))


def test_butterfly_rows_equals_dense_permuted_block_products():
    rotations = random_rotations(3, 4, 4, seed=1)  # n = 16, 3 factors
    dense = None
    for level in range(3):
        perm = butterfly.butterfly_permutation(16, 4, level)
        permutation = torch.eye(16)[perm]  # (P x)[k] = x[perm[k]]
        factor = permutation @ torch.block_diag(*rotations[level]) @ permutation.T
        dense = factor if dense is None else factor @ dense
    x = torch.randn(2, 5, 16)
    prop.assert_close(butterfly.butterfly_rows(x, rotations), x @ dense)
    prop.assert_close(butterfly.butterfly_rows(x, rotations, transpose=True), x @ dense.T)
    prop.assert_close(butterfly.dense_rotation(rotations), dense)
    prop.assert_close(dense @ dense.T, torch.eye(16))
    assert (dense.abs() > 1e-6).float().mean() > 0.4  # several factors mix blocks: R is not block-diagonal


def test_dropout_replaces_blocks_of_one_factor_with_identity_in_training_only():
    dropout = butterfly.MultiplicativeDropoutLayer(p=0.5)
    rotations = random_rotations(3, 4, 2)
    dropout.eval()
    assert dropout(rotations) is rotations
    dropout.train()
    torch.manual_seed(0)
    dropped = dropout(rotations)
    is_identity = torch.isclose(dropped, torch.eye(2)).flatten(2).all(-1)
    changed = ~torch.isclose(dropped, rotations).flatten(2).all(-1)
    assert changed.sum() == 2 and changed.any(-1).sum() == 1  # int(0.5 * 4) blocks of one factor
    assert torch.equal(changed, is_identity)


# ---------------------------------------------------------------------------------------------- layers by hand
def test_linear_rotates_inputs_and_scales_outputs():
    model = get_peft_model(llama(), config_for("llama", target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BOFTLinear)
    rotation, scale = layer.get_delta_weight("default")
    assert rotation.shape == (32, 32) and scale.shape == (32, 1)
    x = torch.randn(3, 32)
    with torch.no_grad():
        base = layer.base_layer
        expected = (x @ rotation) @ base.weight.T * scale.squeeze(-1)
        if base.bias is not None:
            expected = expected + base.bias
        prop.assert_close(layer(x), expected)
        merged, _ = layer.fold("default", base.weight, None)
        prop.assert_close(merged, (base.weight @ rotation.T) * scale)
        prop.assert_close(layer.unfold("default", merged, None)[0], base.weight)


def test_linear_with_bias_keeps_bias_unscaled():
    layer_model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), BOFTConfig(target_modules=["0"], boft_block_size=2,
                                                                            init_weights=False))
    layer = layer_model.base_model.model[0]
    x = torch.randn(4, 8)
    with torch.no_grad():
        rotation, scale = layer.get_delta_weight("default")
        expected = (x @ rotation @ layer.base_layer.weight.T) * scale.squeeze(-1) + layer.base_layer.bias
        prop.assert_close(layer(x), expected)


def test_conv2d_rotates_and_scales_each_filter():
    """Padded, strided 3x3 conv: conv(x, (W R^T) * s); a fresh adapter changes nothing."""
    x, img = net_inputs()
    with torch.no_grad():
        prop.assert_close(wrap_net(init_weights=True)(x, img), Net()(x, img))
        layer = wrap_net().base_model.model.conv
        assert isinstance(layer, BOFTConv2d)
        rotation, scale = layer.get_delta_weight("default")
        base = layer.base_layer
        weight = ((base.weight.reshape(4, 36) @ rotation.T) * scale).reshape(base.weight.shape)
        prop.assert_close(layer(img), nn.functional.conv2d(img, weight, base.bias, stride=2, padding=1))


def test_forward_and_merge_never_form_the_dense_rotation(monkeypatch):
    """The n x n matrix R is only built for peft's `get_delta_weight` API."""
    model = wrap_net(boft_dropout=0.3)
    x, img = net_inputs()

    def refuse(*args, **kwargs):
        raise AssertionError("a dense rotation was built")

    monkeypatch.setattr(torch, "block_diag", refuse)
    monkeypatch.setattr(butterfly, "dense_rotation", refuse)
    model.train()
    model(x, img).sum().backward()
    model.eval()
    with torch.no_grad():
        model.merge_adapter()
        model.unmerge_adapter()


def test_net_merge_unmerge_disable_save_load(tmp_path):
    model = wrap_net()
    x, img = net_inputs()
    with torch.no_grad():
        base_out, adapted = Net()(x, img), model(x, img)
        prop.assert_differs(adapted, base_out)
        with model.disable_adapter():
            prop.assert_close(model(x, img), base_out)
        originals = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        model.merge_adapter(safe_merge=True)
        prop.assert_close(model(x, img), adapted)
        model.unmerge_adapter()
        for key, value in model.state_dict().items():
            if key in originals:
                prop.assert_close(value, originals[key], atol=1e-6)
        model.save_pretrained(str(tmp_path))
        loaded = PeftModel.from_pretrained(Net(), str(tmp_path)).eval()
        prop.assert_close(loaded(x, img), adapted, atol=0)
        prop.assert_close(model.merge_and_unload()(x, img), adapted)


def test_dropout_only_acts_in_training():
    model = wrap_net(boft_dropout=0.5)
    x, img = net_inputs()
    with torch.no_grad():
        evaluated = model(x, img)
        prop.assert_close(model(x, img), evaluated, atol=0)
        model.train()
        torch.manual_seed(0)
        prop.assert_differs(model(x, img), evaluated)
    assert isinstance(model.base_model.model.lin0.boft_dropout["default"], butterfly.MultiplicativeDropoutLayer)
    assert isinstance(wrap_net().base_model.model.lin0.boft_dropout["default"], nn.Identity)


def test_two_active_adapters_on_one_layer_merge_like_they_run():
    """Rotations do not commute: merged == unmerged needs one order for both (the merge order)."""
    model = wrap_net()
    torch.manual_seed(3)
    model.add_adapter("other", BOFTConfig(target_modules=["lin0", "conv", "head"], boft_block_size=0, boft_block_num=4,
                                          init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x, img = net_inputs()
    with torch.no_grad():
        both = model(x, img)
        model.base_model.set_adapter("default")
        only_default = model(x, img)
        model.base_model.set_adapter(["default", "other"])
        prop.assert_differs(both, only_default)
        model.merge_adapter()
        prop.assert_close(model(x, img), both)
        model.unmerge_adapter()
        prop.assert_close(model(x, img), both)


def test_delete_adapter_leaves_no_per_adapter_state():
    model = wrap_net()
    model.add_adapter("other", BOFTConfig(target_modules=["lin0", "conv"], boft_block_size=4, boft_dropout=0.2))
    model.delete_adapter("other")
    for _, layer in model.base_model.tuner_layers():
        containers = {**vars(layer), **layer._modules, **layer._parameters}
        dangling = [name for name, value in containers.items()
                    if isinstance(value, (dict, nn.ModuleDict, nn.ParameterDict)) and "other" in value]
        assert not dangling, dangling
        assert "default" in layer.boft_R


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "boft_" in n)
    inputs = lm_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()
        model.merge_adapter()
        merged = model(**inputs).logits.float()
    assert (merged - unmerged).abs().mean() < 0.02 * unmerged.abs().mean()


def test_low_cpu_mem_usage_load_matches(tmp_path):
    model = get_peft_model(llama(), config_for("llama"))
    inputs = lm_inputs()
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    prop.assert_close(prop.output_of(loaded, inputs), expected, atol=0)


def test_checkpoint_with_fewer_factors_is_refit_with_a_warning():
    """A checkpoint whose boft_R has another factor count than the config (peft without its CUDA extension)."""
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    one = get_peft_model(llama(), config_for("llama", boft_n_butterfly_factor=1))
    state = get_peft_model_state_dict(one)
    two = get_peft_model(llama(), config_for("llama", boft_n_butterfly_factor=2))
    with pytest.warns(UserWarning, match=r"holds 1 butterfly factor\(s\) per layer"):
        result = set_peft_model_state_dict(two, state)
    assert not result.missing_keys and not result.unexpected_keys
    layer = two.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.boft_R["default"].shape[0] == 1
    prop.assert_close(prop.output_of(two, lm_inputs()), prop.output_of(one, lm_inputs()), atol=0)
    # other shapes are still a shape mismatch
    state = {k: v[..., :2, :2] if k.endswith("boft_R") else v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="size mismatch"):
        set_peft_model_state_dict(get_peft_model(llama(), config_for("llama")), state)


# ---------------------------------------------------------------------------------------------- refusals, warnings
def test_gpt2_conv1d_is_not_supported_as_in_peft():
    with pytest.raises(TargetModulesError, match="Conv1D.*Supported: torch.nn.Linear, torch.nn.Conv2d"):
        get_peft_model(gpt2(), BOFTConfig(target_modules=["c_attn"]))


def test_grouped_conv_is_refused_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(NotImplementedError, match=r"BOFT does not support Conv2d layers with groups > 1 \(got groups=2\)"):
        get_peft_model(model, BOFTConfig(target_modules=["0"], boft_block_size=2))
    assert type(model[0]) is nn.Conv2d


def test_fan_in_fan_out_is_corrected_with_peft_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(llama(), config_for("llama", fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


def test_scaling_is_not_supported_and_warns():
    model = get_peft_model(llama(), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.warns(UserWarning, match="Scaling operation for BOFT not supported"):
        layer.scale_layer(2.0)
    with pytest.warns(UserWarning, match="Scaling operation for BOFT not supported"):
        layer.set_scale("default", 2.0)
    with pytest.warns(UserWarning, match="Unscaling operation for BOFT not supported"):
        layer.unscale_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.scale_layer(1)


# ---------------------------------------------------------------------------------------------- biases
@pytest.mark.parametrize("bias", ["all", "boft_only"])
def test_bias_training_and_saving(bias, tmp_path):
    model = get_peft_model(Net(), BOFTConfig(target_modules=["lin0"], boft_block_size=4, bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert ("base_model.model.head.bias" in trainable) is (bias == "all")
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.bias.fill_(1.5)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin0.base_layer.bias" in saved and "base_model.model.lin0.boft_R" in saved
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path))
    assert torch.all(loaded.base_model.model.lin0.base_layer.bias == 1.5)
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", BOFTConfig(target_modules=["lin0"], boft_block_size=4, bias="all"))
    with pytest.warns(UserWarning, match=f"disabling adapter layers with bias configured to be '{bias}'"):
        with model.disable_adapter():
            pass


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_matches_dequantized_reference_and_merges(quant):
    settings = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}[quant]
    inputs = lm_inputs()
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**settings)), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, BOFTLinear) and isinstance(layer.get_base_layer(), (Linear4bit, Linear8bit))
    reference = get_peft_model(
        dequantize_model(quantize_model(llama(), QuantizationConfig(**settings)), torch.float32), config_for("llama")
    )
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "boft_" in k}, strict=False)
    with torch.no_grad():
        got, expected = model(**inputs).logits, reference(**inputs).logits
        prop.assert_close(got, expected, atol=1e-4)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        merged = model(**inputs).logits
        one_rounding = quantize_model(llama(), QuantizationConfig(**settings))(**inputs).logits - llama()(**inputs).logits
    # A rotation moves every weight off the code grid: merging costs about one more quantization.
    assert (merged - got).abs().mean() < 2 * one_rounding.abs().mean()


def test_quantized_base_trains_only_the_adapter():
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)),
                           config_for("llama", init_weights=True))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    codes = base.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**lm_inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight, codes)


@needs_bnb
def test_over_bitsandbytes_linear4bit_matches_ours():
    inputs = lm_inputs()
    config = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"],
                        init_weights=False)
    nf4 = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ours = get_peft_model(quantize_model(bnb_llama(), nf4), config)
    theirs = get_peft_model(bnb_quantize_model(bnb_llama()), config)
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BOFTLinear) and type(layer.get_base_layer()).__name__ == "Linear4bit"
    skip_if_kernel_disagrees(bnb_forward_disagreement(theirs))
    _, unexpected = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "boft_" in k}, strict=False)
    assert not unexpected
    ours.train(), theirs.train()  # no dropout; keeps bitsandbytes' CPU weight layout (see bnb_helpers)
    with torch.no_grad():
        expected, got = ours(**inputs).logits, theirs(**inputs).logits
        assert torch.equal(got, expected)  # same codes, same maths
        with pytest.warns(UserWarning, match="re-quantizes"):
            theirs.merge_adapter()
        assert layer.merged
        theirs.unmerge_adapter()
    theirs(**inputs).loss.backward()
    assert all(p.grad is not None for p in theirs.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 1},
    lr=1e-2,
))


@pytest.mark.parametrize(
    "overrides",
    [
        {"boft_n_butterfly_factor": 3},
        {"boft_block_size": 0, "boft_block_num": 2},
        {"boft_dropout": 0.25},
        {"layers_to_transform": [1], "layers_pattern": "layers"},
    ],
    ids=["butterfly3", "block-num", "dropout", "layers"],
)
def test_llama_variants(overrides, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    config = config_for("llama", **overrides)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
