"""OFT: config checks, block resolution, the rotation maths, each layer kind by hand, quantized bases,
biases, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from peftkit import ConfigError, OFTConfig, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit.quantization import Linear4bit, Linear8bit, QuantizationConfig, dequantize_model, quantize_model
from peftkit.tuners.oft import rotation
from peftkit.tuners.oft.layer import Conv2d as OFTConv2d
from peftkit.tuners.oft.layer import Embedding as OFTEmbedding
from peftkit.tuners.oft.layer import Linear as OFTLinear
from peftkit.tuners.oft.layer import adjust_oft_parameters, resolve_blocks
from tests import properties as prop
from tests.bnb_helpers import (
    bnb_forward_disagreement,
    bnb_llama,
    bnb_quantize_model,
    needs_bnb,
    skip_if_kernel_disagrees,
)
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> OFTConfig:
    """Blocks of 8, random rotations (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(oft_block_size=8, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return OFTConfig(**kwargs)


def random_skew_params(blocks: int, block_size: int, scale: float = 0.3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, block_size * (block_size - 1) // 2, generator=generator) * scale


def dense_rotation(layer, adapter_name: str = "default") -> torch.Tensor:
    return layer.rotations[adapter_name].get_weight().detach()


class Net(nn.Module):
    """Embedding, Linear and a padded, strided 3x3 Conv2d (whose input is larger than the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.lin0 = nn.Linear(12, 16)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        text = self.lin0(self.emb(ids)).mean(1)
        return self.head(text) + self.conv(img).mean((2, 3)).sum(1, keepdim=True)


def net_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randint(0, 20, (2, 5), generator=generator), torch.randn(2, 3, 7, 7, generator=generator)


def wrap_net(**overrides) -> PeftModel:
    kwargs = dict(target_modules=["emb", "lin0", "conv", "head"], oft_block_size=4, init_weights=False)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # conv: 27 is not a multiple of 4 (adjusted, warned about)
        return get_peft_model(Net(), OFTConfig(**kwargs)).eval()


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(OFTConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.OFTConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name == "peft_type":
            continue
        assert ours[name].default == their_field.default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0, "oft_block_size": 0}, r"Either `r` or `oft_block_size` must be non-zero. Currently, r = 0"),
        ({"r": 4}, r"You can only specify either r \(4\) or oft_block_size \(32\), but not both"),
        ({"r": -1, "oft_block_size": 0}, "r=-1 is invalid"),
        ({"oft_block_size": 2.5}, "oft_block_size=2.5 is invalid"),
        ({"oft_block_size": True}, "oft_block_size=True is invalid"),
        ({"module_dropout": 1.0}, r"module_dropout=1.0 .*\[0, 1\)"),
        ({"bias": "lora_only"}, "bias='lora_only' is not supported"),
        ({"eps": 0}, "eps=0 is invalid"),
        ({"eps": float("nan")}, "eps=nan is invalid"),
        ({"num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms=0 is invalid"),
        ({"coft": 1}, "coft=1 is invalid"),
        ({"block_share": "yes"}, "block_share='yes' is invalid"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is invalid"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OFTConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_json_roundtrip_dispatches_to_oft(tmp_path):
    config = OFTConfig(r=4, oft_block_size=0, coft=True, eps=1e-3, target_modules=["q_proj"])
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is OFTConfig
    assert (loaded.r, loaded.oft_block_size, loaded.coft, loaded.eps) == (4, 0, True, 1e-3)
    assert loaded.target_modules == {"q_proj"}


def test_saved_configs_from_old_peft_versions():
    old = OFTConfig(target_modules=["q_proj"]).to_dict()
    del old["oft_block_size"]  # peft < 0.14 had no oft_block_size: a different, unloadable format
    with pytest.raises(ConfigError, match="OFT has been updated since PEFT 0.14.0"):
        OFTConfig.from_dict(old)
    neumann = dict(OFTConfig(target_modules=["q_proj"]).to_dict(), peft_version="0.17.1")
    with pytest.warns(UserWarning, match="cayley-neumann parameterization has been slightly changed"):
        OFTConfig.from_dict(neumann)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OFTConfig.from_dict(dict(neumann, peft_version="0.21.2@peftkit"))
        OFTConfig.from_dict(dict(neumann, peft_version="0.17.1", use_cayley_neumann=False))


# ---------------------------------------------------------------------------------------------- blocks
def test_adjust_picks_nearest_divisor_like_peft():
    assert adjust_oft_parameters(48, 32) == 24  # 24 and 48 divide 48; 24 is nearer
    assert adjust_oft_parameters(27, 4) == 3  # 3 and 9: 3 is nearer
    assert adjust_oft_parameters(10, 4) == 5  # 2 and 5 divide 10; 5 is nearer
    assert adjust_oft_parameters(12, 5) == 4  # 4 and 6 tie: the smaller
    assert adjust_oft_parameters(8, 100) == 8
    peft_layer = pytest.importorskip("peft.tuners.oft.layer")
    for dim in (7, 12, 27, 48, 60):
        for value in range(1, dim + 3):
            assert adjust_oft_parameters(dim, value) == peft_layer.OFTLayer.adjust_oft_parameters(None, dim, value)


def test_resolve_blocks_warns_with_peft_texts():
    assert resolve_blocks(32, 0, 8) == (4, 8)
    assert resolve_blocks(32, 4, 0) == (4, 8)
    with pytest.warns(UserWarning, match=r"Invalid `oft_block_size` \(32\)! Adjusted `oft_block_size` to \(24\)."):
        assert resolve_blocks(48, 0, 32) == (2, 24)
    with pytest.warns(UserWarning, match=r"Invalid `r` \(5\)! Adjusted `r` to \(4\)."):
        assert resolve_blocks(12, 5, 0) == (4, 3)


def test_layer_shapes_follow_r_block_and_block_share():
    model = get_peft_model(llama(), OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (layer.r["default"], layer.oft_block_size["default"]) == (4, 8)
    assert layer.oft_R["default"].weight.shape == (4, 28)
    shared = get_peft_model(llama(), OFTConfig(oft_block_size=8, block_share=True, target_modules=["q_proj"]))
    layer = shared.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.oft_R["default"].weight.shape == (1, 28) and layer.r["default"] == 4


# ---------------------------------------------------------------------------------------------- rotation maths
def test_exact_cayley_is_orthogonal_and_neumann_follows_peft_series():
    vec = random_skew_params(3, 5, scale=0.2)
    exact = rotation.cayley(vec, 5, use_neumann=False)
    eye = torch.eye(5).expand(3, 5, 5)
    prop.assert_close(exact @ exact.transpose(-2, -1), eye)
    skew = rotation.skew_symmetric(vec, 5)
    prop.assert_close(skew, -skew.transpose(-2, -1), atol=0)
    prop.assert_close(rotation.upper_entries(skew), vec, atol=0)
    prop.assert_close(exact, (eye - skew) @ torch.linalg.inv(eye + skew))
    # Neumann with t terms: I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)
    q2, q3, q4 = skew @ skew, skew @ skew @ skew, skew @ skew @ skew @ skew
    prop.assert_close(rotation.cayley(vec, 5, True, 5), eye + 2 * skew + 2 * q2 + 2 * q3 + q4)
    prop.assert_close(rotation.cayley(vec, 5, True, 3), eye + 2 * skew + 2 * q2 + q3)
    prop.assert_close(rotation.cayley(vec, 5, True, 2), eye + 2 * skew)
    prop.assert_close(rotation.cayley(vec, 5, True, 1), eye)


def test_rotate_rows_equals_dense_block_diagonal_product():
    blocks = rotation.cayley(random_skew_params(3, 4), 4, use_neumann=False)
    x = torch.randn(2, 5, 12)
    prop.assert_close(rotation.rotate_rows(x, blocks, 3), x @ torch.block_diag(*blocks))
    shared = blocks[:1]
    prop.assert_close(rotation.rotate_rows(x, shared, 3), x @ torch.block_diag(*shared.expand(3, 4, 4)))


def test_coft_projects_each_block_into_its_ball():
    vec = random_skew_params(4, 4, scale=1.0)
    vec[0] *= 1e-5  # already inside: kept as is
    projected = rotation.project_coft(vec, 4, eps=0.1)
    norms = torch.linalg.matrix_norm(rotation.skew_symmetric(projected, 4))
    radius = 0.1 / 2  # eps / sqrt(4 blocks)
    assert torch.all(norms <= radius * (1 + 1e-6))
    prop.assert_close(projected[0], vec[0], atol=0)
    prop.assert_close(norms[1:], torch.full((3,), radius))
    # the direction is kept
    prop.assert_close(projected[1] / projected[1].norm(), vec[1] / vec[1].norm())


# ---------------------------------------------------------------------------------------------- layers by hand
def test_linear_rotates_input_blocks():
    model = get_peft_model(llama(), config_for("llama", target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, OFTLinear)
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = layer.base_layer(x @ dense_rotation(layer))
        prop.assert_close(layer(x), expected)
        prop.assert_differs(layer(x), layer.base_layer(x))
        merged_weight, _ = layer.fold("default", layer.base_layer.weight, None)
        prop.assert_close(merged_weight, layer.base_layer.weight @ dense_rotation(layer).T)


def test_forward_never_forms_the_dense_rotation(monkeypatch):
    """The d x d block-diagonal matrix is only built for peft's `get_delta_weight` API."""
    model = wrap_net()
    ids, img = net_inputs()

    def refuse(*args, **kwargs):
        raise AssertionError("a dense block-diagonal rotation was built")

    monkeypatch.setattr(torch, "block_diag", refuse)
    model.train()
    model(ids, img).sum().backward()
    model.eval()
    with torch.no_grad():
        model.merge_adapter()
        model.unmerge_adapter()


def test_conv2d_rotates_each_receptive_field_and_identity_is_a_noop():
    """Padded, strided 3x3 convolution on a 7x7 input: conv(x, W R^T); a fresh adapter changes nothing."""
    ids, img = net_inputs()
    fresh = wrap_net(init_weights=True)
    with torch.no_grad():
        prop.assert_close(fresh(ids, img), Net()(ids, img))
    model = wrap_net()
    layer = model.base_model.model.conv
    assert isinstance(layer, OFTConv2d)
    assert layer.oft_R["default"].weight.shape == (9, 3)  # d = 3 * 3 * 3 = 27, blocks adjusted from 4 to 3
    with torch.no_grad():
        base = layer.base_layer
        rotated = (base.weight.reshape(4, 27) @ dense_rotation(layer).T).reshape(base.weight.shape)
        expected = nn.functional.conv2d(img, rotated, base.bias, stride=2, padding=1)
        prop.assert_close(layer(img), expected)


def test_embedding_rotates_looked_up_rows_and_merges_into_the_table():
    model = wrap_net()
    layer = model.base_model.model.emb
    assert isinstance(layer, OFTEmbedding)
    assert "default" in layer.oft_embedding_R and "default" not in layer.oft_R
    ids, img = net_inputs()
    with torch.no_grad():
        prop.assert_close(layer(ids), layer.base_layer(ids) @ dense_rotation(layer))
        table, _ = layer.fold("default", layer.base_layer.weight, None)
        prop.assert_close(table, layer.base_layer.weight @ dense_rotation(layer))


def test_net_merge_unmerge_disable_save_load(tmp_path):
    model = wrap_net()
    ids, img = net_inputs()
    with torch.no_grad():
        base_out, adapted = Net()(ids, img), model(ids, img)
        prop.assert_differs(adapted, base_out)
        with model.disable_adapter():
            prop.assert_close(model(ids, img), base_out)
        originals = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
        model.merge_adapter()
        prop.assert_close(model(ids, img), adapted)
        model.unmerge_adapter()
        for key, value in model.state_dict().items():
            if key in originals:
                prop.assert_close(value, originals[key], atol=1e-6)
        model.save_pretrained(str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(Net(), str(tmp_path)).eval()
        prop.assert_close(loaded(ids, img), adapted, atol=0)
        prop.assert_close(model.merge_and_unload()(ids, img), adapted)


@pytest.mark.parametrize("use_cayley_neumann", [True, False])
def test_two_active_adapters_on_one_layer_merge_like_they_run(use_cayley_neumann):
    """Blocks of 4 do not commute: merged == unmerged needs one order for both (the merge order)."""
    model = wrap_net(use_cayley_neumann=use_cayley_neumann)
    torch.manual_seed(3)
    model.add_adapter("other", OFTConfig(target_modules=["emb", "lin0", "conv", "head"], oft_block_size=4,
                                         init_weights=False, use_cayley_neumann=use_cayley_neumann))
    model.base_model.set_adapter(["default", "other"])
    ids, img = net_inputs()
    with torch.no_grad():
        both = model(ids, img)
        model.base_model.set_adapter("default")
        only_default = model(ids, img)
        model.base_model.set_adapter(["default", "other"])
        prop.assert_differs(both, only_default)
        model.merge_adapter()
        prop.assert_close(model(ids, img), both)
        model.unmerge_adapter()
        prop.assert_close(model(ids, img), both)


def test_delete_adapter_leaves_no_per_adapter_state():
    model = wrap_net()
    model.add_adapter("other", OFTConfig(target_modules=["lin0", "emb"], oft_block_size=4, module_dropout=0.2))
    model.delete_adapter("other")
    for _, layer in model.base_model.tuner_layers():
        containers = {**vars(layer), **layer._modules}  # every per-adapter dict / ModuleDict, declared or not
        dangling = [name for name, value in containers.items()
                    if isinstance(value, (dict, nn.ModuleDict)) and "other" in value]
        assert not dangling, dangling
        assert "default" in layer.rotations


def test_coft_keeps_parameters_in_the_ball_during_training():
    model = get_peft_model(llama(), config_for("llama", coft=True, eps=1e-2))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        model(**lm_inputs()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model(**lm_inputs())  # each use projects first
    for _, layer in model.base_model.tuner_layers():
        module = layer.oft_R["default"]
        norms = torch.linalg.matrix_norm(rotation.skew_symmetric(module.weight.detach(), module.block_size))
        assert torch.all(norms <= 1e-2 / module.weight.shape[0] ** 0.5 * (1 + 1e-5))


def test_module_dropout_is_recorded_but_unused_as_in_peft():
    model = get_peft_model(llama(), config_for("llama", module_dropout=0.5))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.module_dropout["default"] == 0.5
    inputs = lm_inputs()
    with torch.no_grad():
        model.eval()
        evaluated = model(**inputs).logits
        model.train()
        prop.assert_close(model(**inputs).logits, evaluated)


def test_half_precision_base_keeps_fp32_adapter_and_merges():
    model = get_peft_model(llama().to(torch.bfloat16), config_for("llama"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "oft_R" in n)
    inputs = lm_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).logits.float()
        model.merge_adapter()
        merged = model(**inputs).logits.float()
    assert (merged - unmerged).abs().mean() < 0.02 * unmerged.abs().mean()


# ---------------------------------------------------------------------------------------------- refusals, warnings
def test_gpt2_conv1d_is_not_supported_as_in_peft():
    with pytest.raises(TargetModulesError, match="Conv1D.*Supported: torch.nn.Linear, torch.nn.Conv2d"):
        get_peft_model(gpt2(), OFTConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize(
    "conv, error, message",
    [
        (nn.Conv2d(4, 4, 3, groups=2), TargetModulesError, "groups=2"),
        (nn.Conv2d(4, 4, 3, dilation=2), ConfigError, "dilation > 1 is not supported by OFT"),
    ],
)
def test_unsupported_convolutions_raise_and_leave_model_unchanged(conv, error, message):
    model = nn.Sequential(conv)
    with pytest.raises(error, match=message):
        get_peft_model(model, OFTConfig(target_modules=["0"], oft_block_size=4))
    assert type(model[0]) is nn.Conv2d


def test_fan_in_fan_out_is_corrected_with_peft_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        model = get_peft_model(llama(), config_for("llama", fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is False


def test_scaling_is_not_supported_and_warns():
    model = get_peft_model(llama(), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.warns(UserWarning, match="Scaling operation for OFT not supported"):
        layer.scale_layer(2.0)
    with pytest.warns(UserWarning, match="Unscaling operation for OFT not supported"):
        layer.unscale_layer()


# ---------------------------------------------------------------------------------------------- biases
@pytest.mark.parametrize("bias", ["all", "oft_only"])
def test_bias_training_and_saving(bias, tmp_path):
    model = get_peft_model(Net(), OFTConfig(target_modules=["lin0"], oft_block_size=4, bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.lin0.base_layer.bias" in trainable
    assert ("base_model.model.head.bias" in trainable) is (bias == "all")
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.bias.fill_(1.5)
    model.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lin0.base_layer.bias" in saved and "base_model.model.lin0.oft_R.weight" in saved
    loaded = PeftModel.from_pretrained(Net(), str(tmp_path))
    assert torch.all(loaded.base_model.model.lin0.base_layer.bias == 1.5)
    with pytest.raises(ConfigError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", OFTConfig(target_modules=["lin0"], oft_block_size=4, bias="all"))


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base_matches_dequantized_reference_and_merges(quant):
    settings = {"nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "int8": {"load_in_8bit": True}}[quant]
    inputs = lm_inputs()
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(**settings)), config_for("llama"))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(layer, OFTLinear) and isinstance(layer.get_base_layer(), (Linear4bit, Linear8bit))
    reference = get_peft_model(
        dequantize_model(quantize_model(llama(), QuantizationConfig(**settings)), torch.float32), config_for("llama")
    )
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "oft_R" in k}, strict=False)
    with torch.no_grad():
        got, expected = model(**inputs).logits, reference(**inputs).logits
        prop.assert_close(got, expected, atol=1e-4)
        with pytest.warns(UserWarning, match="re-quantizes"):
            model.merge_adapter()
        merged = model(**inputs).logits
        quantized_base = quantize_model(llama(), QuantizationConfig(**settings))
        one_rounding = quantized_base(**inputs).logits - llama()(**inputs).logits
    # A rotation moves every weight off the code grid: merging costs about one more quantization
    # (the error of quantizing the dense model in the first place), no more.
    assert (merged - got).abs().mean() < 2 * one_rounding.abs().mean()


def test_quantized_base_trains_only_the_rotations():
    model = get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)), config_for("llama"))
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
    config = OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    nf4 = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ours = get_peft_model(quantize_model(bnb_llama(), nf4), config)
    theirs = get_peft_model(bnb_quantize_model(bnb_llama()), config)
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, OFTLinear) and type(layer.get_base_layer()).__name__ == "Linear4bit"
    skip_if_kernel_disagrees(bnb_forward_disagreement(theirs))
    _, unexpected = theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "oft_R" in k}, strict=False)
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
    second=lambda name: {"r": 2, "oft_block_size": 0, "use_cayley_neumann": False},
    lr=1e-2,
))


@pytest.mark.parametrize(
    "overrides",
    [
        {"block_share": True},
        {"coft": True, "eps": 1e-2},
        {"use_cayley_neumann": False, "r": 4, "oft_block_size": 0},
        {"layers_to_transform": [1], "layers_pattern": "layers"},
    ],
    ids=["block_share", "coft", "exact-cayley", "layers"],
)
def test_llama_variants(overrides, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    config = config_for("llama", **overrides)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
