"""LoRA variants: DoRA, PiSSA / OLoRA initialisation (and their conversion to plain LoRA), LoRA+.

DoRA starts with `m = ||W + s B A||`, i.e. as plain LoRA; tests that must see the magnitude at
work perturb it first (`_perturb`). PiSSA / OLoRA adapters start as exact no-ops on a modified
base, so "trained" adapters are likewise simulated by perturbing A and B.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from peftkit import ConfigError, LoraConfig, PeftModel, create_loraplus_optimizer, get_peft_model
from peftkit.tuners.lora import dora
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, VOCAB


class TinyEmbedConv(nn.Module):
    """Embedding -> Conv2d -> Linear head, returning `.logits` / `.loss` like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8)
        self.conv = nn.Conv2d(8, 8, kernel_size=3, padding=1)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = self.embed(input_ids).transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 2)  # (B, 8, L, 2)
        hidden = torch.tanh(self.conv(hidden)).mean(-1).transpose(1, 2).contiguous()
        logits = self.head(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_embed_conv() -> TinyEmbedConv:
    return TinyEmbedConv().eval()


LLAMA, GPT2 = MODEL_FACTORIES["llama"], MODEL_FACTORIES["gpt2"]
CUSTOM = SimpleNamespace(make_model=tiny_embed_conv, make_inputs=LLAMA.make_inputs, task_type=None,
                         targets=["embed", "conv", "head"])
DORA_CASES = {"llama": LLAMA, "gpt2": GPT2, "embed-conv": CUSTOM}


def lora(case, **overrides) -> LoraConfig:
    kwargs = dict(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False, task_type=case.task_type)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


@torch.no_grad()
def _perturb(model: nn.Module, seed: int = 3, only: str = "lora_") -> None:
    """Add noise to the adapter tensors, rescale DoRA magnitudes by 0.8-1.25: a stand-in for training."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(0.8 + 0.45 * torch.rand(param.shape, generator=generator))
        elif only in name:
            param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------------- DoRA
@pytest.fixture(params=sorted(DORA_CASES))
def dora_case(request):
    return DORA_CASES[request.param]


def test_dora_property_suite(dora_case, tmp_path):
    case, inputs = dora_case, dora_case.make_inputs()
    prop.fresh_adapter_is_noop(case.make_model, inputs, lora(case, use_dora=True, init_lora_weights=True))
    prop.check_disable_gives_base(case.make_model, inputs, lora(case, use_dora=True))
    prop.check_save_load_roundtrip(case.make_model, inputs, lora(case, use_dora=True), tmp_path)
    prop.check_only_adapter_params_train(case.make_model, inputs, lora(case, use_dora=True))
    prop.check_merge_equals_unmerged(case.make_model, inputs, lora(case, use_dora=True))
    prop.check_merge_unmerge_restores_weights(case.make_model, lora(case, use_dora=True))


def test_dora_training_and_switching():
    case, inputs = LLAMA, LLAMA.make_inputs()
    prop.check_training_lowers_loss(case.make_model, inputs, lora(case, use_dora=True, init_lora_weights=True))
    prop.check_adapters_switch(case.make_model, inputs, lora(case, use_dora=True), lora(case, r=2))


def test_dora_merge_with_trained_magnitude(dora_case):
    """With m != ||W + s B A||, merged == unmerged, unmerge restores W, also for two DoRA adapters at once."""
    case, inputs = dora_case, dora_case.make_inputs()
    model = get_peft_model(case.make_model(), lora(case, use_dora=True), adapter_name="a")
    model.add_adapter("b", lora(case, use_dora=True, r=2))
    _perturb(model)
    originals = {name: layer.get_base_layer().weight.clone() for name, layer in model.base_model.tuner_layers()}
    for active in (["a"], ["a", "b"]):
        model.base_model.set_adapter(active)
        unmerged = prop.output_of(model, inputs)
        model.merge_adapter()
        prop.assert_close(prop.output_of(model, inputs), unmerged)
        model.unmerge_adapter()
        for name, layer in model.base_model.tuner_layers():
            assert torch.allclose(layer.get_base_layer().weight, originals[name], atol=1e-5), name
        prop.assert_close(prop.output_of(model, inputs), unmerged)
    merged = model.merge_and_unload()
    prop.assert_close(prop.output_of(merged, inputs), unmerged)


def test_dora_checkpoint_keys_and_shapes(tmp_path):
    model = get_peft_model(tiny_embed_conv(), lora(CUSTOM, use_dora=True))
    model.save_pretrained(str(tmp_path))
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.embed.lora_magnitude_vector"] == (8,)
    assert shapes["base_model.model.conv.lora_magnitude_vector"] == (1, 8, 1, 1)
    assert shapes["base_model.model.head.lora_magnitude_vector"] == (VOCAB,)
    assert not any(key.endswith("lora_magnitude_vector.weight") for key in shapes)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True


def _planted_dora_linear():
    model = get_peft_model(nn.Sequential(nn.Linear(5, 3)), LoraConfig(target_modules=["0"], r=2, use_dora=True,
                                                                       init_lora_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.tensor([0.5, 1.0, 2.0]))
    return model, layer


def test_dora_norm_is_detached_and_formula_holds():
    """y = m / ||W + sBA|| * (W + sBA) x + b, with no gradient through the norm (DoRA paper, 4.3)."""
    model, layer = _planted_dora_linear()
    model.train()
    x = torch.randn(4, 5)
    weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    base = layer.get_base_layer()
    adapted = base.weight + layer.scaling["default"] * weight_b @ weight_a
    expected = x @ (magnitude[:, None] / adapted.norm(dim=1, keepdim=True).detach() * adapted).T + base.bias
    got = model(x)
    prop.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [weight_a, weight_b, magnitude])
    expected_grads = torch.autograd.grad(expected.square().sum(), [weight_a, weight_b, magnitude])
    for grad, expected_grad in zip(grads, expected_grads):
        prop.assert_close(grad, expected_grad)


def test_dora_caches_the_weight_norm_in_eval_only(monkeypatch):
    model, layer = _planted_dora_linear()
    calls = []
    original = dora.weight_norm
    monkeypatch.setattr(dora, "weight_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 5)
    model.eval()
    with torch.no_grad():
        first = model(x)
        model(x)
        assert len(calls) == 1, "eval forward must reuse the weight norm"
        layer.lora_B["default"].weight.add_(0.5)  # any in-place change invalidates the cache
        assert not torch.allclose(model(x), first)
        assert len(calls) == 2
    model.train()
    model(x)
    model(x)
    assert len(calls) == 4, "training recomputes the norm every step"


# ---------------------------------------------------------------------------------------------- PiSSA / OLoRA
BASE_INITS = ["pissa", "pissa_niter_4", "olora"]


@pytest.mark.parametrize("init", BASE_INITS)
@pytest.mark.parametrize("case", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_base_weight_inits_are_noops_that_change_the_base(init, case):
    inputs = case.make_inputs()
    prop.fresh_adapter_is_noop(case.make_model, inputs, lora(case, init_lora_weights=init))
    original = case.make_model()
    model = get_peft_model(case.make_model(), lora(case, init_lora_weights=init))
    for name, layer in model.base_model.tuner_layers():
        key = name.removeprefix("base_model.model.") + ".weight"
        residual = layer.get_base_layer().weight
        assert not torch.allclose(residual, original.state_dict()[key], atol=1e-4), f"{name}: base unchanged"
        assert torch.allclose(residual + layer.get_delta_weight("default"), original.state_dict()[key], atol=1e-5)
    # A "trained" adapter merges like any LoRA adapter.
    _perturb(model)
    unmerged = prop.output_of(model, inputs)
    prop.assert_differs(unmerged, prop.output_of(original, inputs))
    prop.assert_close(prop.output_of(model.merge_and_unload(), inputs), unmerged)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_weight_init_roundtrip_on_original_base(init, tmp_path):
    """As in peft: loading re-runs the (deterministic) init on the original base, then loads A and B."""
    inputs = LLAMA.make_inputs()
    model = get_peft_model(LLAMA.make_model(), lora(LLAMA, init_lora_weights=init, use_dora=init == "olora"))
    _perturb(model)
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(LLAMA.make_model(), str(tmp_path))
    prop.assert_close(prop.output_of(loaded, inputs), expected)


@pytest.mark.parametrize("init", BASE_INITS)
def test_conversion_gives_plain_lora_for_the_original_base(init, tmp_path):
    inputs = LLAMA.make_inputs()
    config = lora(LLAMA, init_lora_weights=init, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4})
    model = get_peft_model(LLAMA.make_model(), config)
    model.peft_config["default"].init_lora_weights = True  # peft's documented step before the first save
    model.save_pretrained(str(tmp_path / "initial"))
    model.peft_config["default"].init_lora_weights = init
    _perturb(model)  # "training"
    trained = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path / "lora"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    assert saved["rank_pattern"] == {"v_proj": 4} and saved["alpha_pattern"] == {"q_proj": 8}
    converted = PeftModel.from_pretrained(LLAMA.make_model(), str(tmp_path / "lora"))
    prop.assert_close(prop.output_of(converted, inputs), trained)
    with converted.disable_adapter():  # the original base really is untouched
        prop.assert_close(prop.output_of(converted, inputs), prop.output_of(LLAMA.make_model(), inputs))


def test_conversion_refuses_dora_and_rslora_with_patterns(tmp_path):
    model = get_peft_model(LLAMA.make_model(), lora(LLAMA, init_lora_weights="olora", use_dora=True))
    model.save_pretrained(str(tmp_path / "initial"))
    with pytest.raises(ConfigError, match="DoRA"):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.warns(UserWarning, match="rank_pattern"):
        config = lora(LLAMA, init_lora_weights="pissa", use_rslora=True, rank_pattern={"q_proj": 2})
    model = get_peft_model(LLAMA.make_model(), config)
    with pytest.raises(ConfigError, match="use_rslora"):
        model.save_pretrained(str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "initial"))


def test_base_weight_init_errors():
    with pytest.raises(ConfigError, match="Linear layers only"):
        get_peft_model(tiny_embed_conv(), LoraConfig(target_modules=["conv"], init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="r <= min"):
        get_peft_model(LLAMA.make_model(), LoraConfig(target_modules=["k_proj"], r=32, init_lora_weights="olora"))
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig(init_lora_weights="pissa_niter_")
    # Embedding targets keep the standard init (as in peft) and their base weight.
    model = get_peft_model(tiny_embed_conv(), LoraConfig(target_modules=["embed", "head"], init_lora_weights="pissa"))
    assert torch.equal(model.base_model.model.embed.weight, tiny_embed_conv().embed.weight)


# ---------------------------------------------------------------------------------------------- LoRA+
def test_loraplus_groups_and_learning_rates():
    config = LoraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["norm"], use_dora=True,
                        task_type="CAUSAL_LM")
    model = get_peft_model(LLAMA.make_model(), config)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1, betas=(0.8, 0.9))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [sorted(names[id(p)] for p in group["params"]) for group in optimizer.param_groups]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-6, 1.6e-2, 1.6e-2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1, 0.1, 0.0]
    assert optimizer.defaults["betas"] == (0.8, 0.9)
    assert groups[0] and all(".lora_A." in n for n in groups[0])
    assert groups[1] and all("embed_tokens.lora_embedding_" in n for n in groups[1])
    assert any(".lora_B." in n for n in groups[2]) and any("lora_magnitude_vector" in n for n in groups[2])
    assert any(".modules_to_save." in n for n in groups[2])  # RMSNorm weight: 1-d, not a LayerNorm
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(n for group in groups for n in group)


# ====================================================================== VeLoRA, BD-LoRA, MonteCLoRA, KaSA
# (tuners/lora/velora.py, bdlora.py, monteclora.py, kasa.py; their interop in test_interop_lora_variants.py)
import dataclasses  # noqa: E402
import math  # noqa: E402

import peftkit  # noqa: E402
from peftkit import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig  # noqa: E402
from peftkit.tuners.lora.bdlora import BlockDiagonalLinear  # noqa: E402
from peftkit.tuners.lora.monteclora import MontecloraSampler  # noqa: E402
from peftkit.tuners.lora.velora import sub_tokens, unit_vector  # noqa: E402

SUB_CONFIGS = {
    "velora_config": VeloraConfig(num_groups=4),
    "use_bdlora": BdLoraConfig(target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2),
    "monteclora_config": MontecloraConfig(num_samples=2),
    "kasa_config": KasaConfig(),
}


def variant_lora(field_name: str, **overrides) -> LoraConfig:
    return lora(LLAMA, **{field_name: SUB_CONFIGS[field_name], **overrides})


def lora_layers(model) -> list:
    return [layer for _, layer in model.base_model.tuner_layers()]


@pytest.mark.parametrize("name", ["VeloraConfig", "BdLoraConfig", "MontecloraConfig", "KasaConfig"])
def test_variant_sub_config_defaults_equal_peft(name):
    peft_lora = pytest.importorskip("peft.tuners.lora.config")
    ours, theirs = getattr(peftkit, name), getattr(peft_lora, name)
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]
    assert dataclasses.asdict(ours()) == dataclasses.asdict(theirs())
    assert getattr(peftkit.tuners.lora.config, name) is ours  # where peft has it too


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: VeloraConfig(num_groups=0), "num_groups"),
        (lambda: VeloraConfig(scale=0), "scale"),
        (lambda: VeloraConfig(init_type="mean"), "init_type"),
        (lambda: BdLoraConfig(target_modules_bd_a=["q"], target_modules_bd_b=["q"]), "overlapping"),
        (lambda: MontecloraConfig(num_samples=0), "num_samples"),
        (lambda: MontecloraConfig(dirichlet_prior=0), "dirichlet_prior"),
        (lambda: MontecloraConfig(buffer_size=0), "buffer_size"),
        (lambda: KasaConfig(beta=-1), "beta"),
        (lambda: KasaConfig(gamma=-1), "gamma"),
    ],
)
def test_variant_sub_config_validation(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variant_sub_configs_from_dicts_and_back(field_name, tmp_path):
    sub = SUB_CONFIGS[field_name]
    config = LoraConfig(**{field_name: {**dataclasses.asdict(sub), "a_future_field": 1}})
    assert getattr(config, field_name) == sub
    assert config.to_dict()[field_name] == dataclasses.asdict(sub)
    with pytest.raises(TypeError, match=type(sub).__name__):
        LoraConfig(**{field_name: True})


def test_variant_combinations_are_refused_before_injection():
    model = LLAMA.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for extra in ({"use_dora": True}, {"init_lora_weights": "mica"}, {"monteclora_config": MontecloraConfig()}):
        with pytest.raises(ConfigError, match="Invalid or unsupported variant combination"):
            get_peft_model(model, variant_lora("kasa_config", **extra))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variants_refuse_non_linear_layers(field_name):
    config = lora(CUSTOM, **{field_name: SUB_CONFIGS[field_name]}, target_modules=["embed"])
    if field_name == "use_bdlora":
        config.use_bdlora = BdLoraConfig(target_modules_bd_a=["embed"])
    with pytest.raises(ConfigError, match="Linear layers only"):
        get_peft_model(CUSTOM.make_model(), config)
    if field_name == "velora_config":
        with pytest.raises(ConfigError, match="VeLoRA does not support adapting conv layers"):
            get_peft_model(CUSTOM.make_model(), lora(CUSTOM, velora_config=VeloraConfig(), target_modules=["conv"]))


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variants_refuse_quantized_bases(field_name):
    from peftkit.quantization import QuantizationConfig, quantize_model

    model = quantize_model(LLAMA.make_model(), QuantizationConfig(load_in_8bit=True))
    with pytest.raises(ConfigError, match="does not support"):
        get_peft_model(model, variant_lora(field_name))


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variant_property_suite(field_name, tmp_path):
    inputs = LLAMA.make_inputs()
    make = LLAMA.make_model
    if field_name != "kasa_config":  # KaSA truncates the base: disabled is not the original base (own test)
        prop.check_disable_gives_base(make, inputs, variant_lora(field_name))
        prop.check_merge_equals_unmerged(make, inputs, variant_lora(field_name))
        prop.check_merge_unmerge_restores_weights(make, variant_lora(field_name))
    prop.check_save_load_roundtrip(make, inputs, variant_lora(field_name), tmp_path)
    prop.check_only_adapter_params_train(make, inputs, variant_lora(field_name))
    prop.check_training_lowers_loss(make, inputs, variant_lora(field_name, init_lora_weights=True), lr=3e-2)
    if field_name != "kasa_config":  # a second KaSA adapter truncates the base again (SVD round-off ~1e-5)
        prop.check_adapters_switch(make, inputs, variant_lora(field_name), variant_lora(field_name, r=2))


# ---------------------------------------------------------------------- VeLoRA
def test_velora_forward_is_lora_and_grad_of_a_uses_the_compressed_input():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=3, lora_alpha=6, init_lora_weights=False,
                                                            velora_config=VeloraConfig(num_groups=3, scale=0.5)))
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, 10)
    model.train()
    out = model(x)
    # v is the normalised mean sub-token of this batch (batch_average): d = ceil(10 / 3) = 4, zero-padded to 12
    padded = torch.nn.functional.pad(x, (0, 2)).reshape(-1, 3, 4)
    v = padded.reshape(-1, 4).mean(0)
    v = v / v.norm()
    prop.assert_close(layer.lora_velora_embed["default"], v)
    expected = base(x) + 2.0 * (x @ a.T) @ b.T
    prop.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # grad_A = s * (B^T g)^T x~,  x~ = scale * <x_g, v> v  (then cut back to 10 features)
    rebuilt = (0.5 * (padded @ v).unsqueeze(-1) * v).reshape(-1, 12)[:, :10]
    g_hidden = (grad_out.reshape(-1, 6) @ b) * 2.0
    prop.assert_close(a.grad, g_hidden.T @ rebuilt)
    assert not torch.allclose(a.grad, g_hidden.T @ x.reshape(-1, 10), atol=1e-4)  # it is an approximation
    prop.assert_close(b.grad, 2.0 * grad_out.reshape(-1, 6).T @ (x.reshape(-1, 10) @ a.T))


@pytest.mark.parametrize("init_type, changes", [("batch_average", True), ("batch_average_once", False), ("random", False)])
def test_velora_projection_vector_updates(init_type, changes):
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 4)),
                           LoraConfig(target_modules=["0"], velora_config=VeloraConfig(num_groups=2, init_type=init_type)))
    embed = model.base_model.model[0].lora_velora_embed
    initial = embed["default"].clone()
    assert initial.shape == (4,)
    assert (initial.norm() - 1).abs() < 1e-5 if init_type == "random" else bool((initial == 0).all())
    model.train()
    model(torch.randn(3, 8)).sum().backward()
    first = embed["default"].clone()
    assert (first.norm() - 1).abs() < 1e-5
    model(torch.randn(3, 8) + 5).sum().backward()
    assert (not torch.equal(embed["default"], first)) is changes
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 8) - 5)
    assert (not torch.equal(embed["default"], first)) is changes  # eval never updates v


def test_velora_zero_mean_falls_back_to_ones():
    prop.assert_close(unit_vector(torch.zeros(4)), torch.full((4,), 0.5))
    assert sub_tokens(torch.ones(2, 5), 2).shape == (2, 2, 3)


# ---------------------------------------------------------------------- BD-LoRA
def test_bdlora_factors_shapes_and_formula(tmp_path):
    model = get_peft_model(LLAMA.make_model(), variant_lora("use_bdlora"))
    attn = model.base_model.model.model.layers[0].self_attn
    down = model.base_model.model.model.layers[0].mlp.down_proj
    q_a, q_b = attn.q_proj.lora_A["default"], attn.q_proj.lora_B["default"]
    assert type(q_a) is nn.Linear and isinstance(q_b, BlockDiagonalLinear) and q_b.weight.shape == (32, 2)
    assert isinstance(down.lora_A["default"], BlockDiagonalLinear) and down.lora_A["default"].weight.shape == (4, 24)
    # the block-diagonal B of q_proj: y = s diag(B_1, B_2) A x with B_i = rows of `weight` per block
    x = torch.randn(3, 32)
    blocks = torch.block_diag(q_b.weight[:16], q_b.weight[16:])
    expected = attn.q_proj.base_layer(x) + attn.q_proj.scaling["default"] * x @ q_a.weight.T @ blocks.T
    with torch.no_grad():
        prop.assert_close(attn.q_proj(x), expected)
        prop.assert_close(attn.q_proj.get_delta_weight("default"), attn.q_proj.scaling["default"] * blocks @ q_a.weight)
    model.save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 24)


def test_bdlora_block_diagonal_b_starts_at_zero_even_with_random_init():
    model = get_peft_model(LLAMA.make_model(), variant_lora("use_bdlora"))
    assert all(
        not layer.lora_B["default"].weight.any() for layer in lora_layers(model)
        if isinstance(layer.lora_B["default"], BlockDiagonalLinear)
    )


def test_bdlora_errors():
    with pytest.raises(ConfigError, match="matches neither A nor B"):
        get_peft_model(LLAMA.make_model(), lora(LLAMA, use_bdlora=BdLoraConfig(target_modules_bd_a=["down_proj"])))
    with pytest.raises(ConfigError, match="matches both A and B"):
        get_peft_model(LLAMA.make_model(),
                       lora(LLAMA, use_bdlora=BdLoraConfig(target_modules_bd_a=["proj"], target_modules_bd_b=["q_proj"])))
    with pytest.raises(ConfigError, match="not divisible by 3"):
        get_peft_model(LLAMA.make_model(),
                       lora(LLAMA, use_bdlora=BdLoraConfig(target_modules_bd_a=["proj"], nblocks=3)))
    # match_strict=False: unmatched modules keep plain LoRA factors
    model = get_peft_model(LLAMA.make_model(),
                           lora(LLAMA, use_bdlora=BdLoraConfig(target_modules_bd_a=["down_proj"], match_strict=False)))
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]) is nn.Linear


def test_bdlora_mixed_batch_matches_single_adapters():
    model = get_peft_model(LLAMA.make_model(), variant_lora("use_bdlora"), adapter_name="bd")
    model.add_adapter("plain", lora(LLAMA))
    inputs = LLAMA.make_inputs()
    rows = inputs["input_ids"].shape[0]
    names = (["bd", "plain"] * rows)[:rows]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
        singles = {}
        for name in ("bd", "plain"):
            model.set_adapter(name)
            singles[name] = model(**inputs).logits
    for row, name in enumerate(names):
        prop.assert_close(mixed[row], singles[name][row])


# ---------------------------------------------------------------------- MonteCLoRA
def test_monteclora_eval_is_lora_and_training_perturbs_a():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=2, lora_alpha=4, init_lora_weights=False,
                                                            monteclora_config=MontecloraConfig(num_samples=3, sample_scaler=0.5)))
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    sampler = layer.lora_monteclora_sampler["default"]
    assert isinstance(sampler, MontecloraSampler) and sampler.std_prior.shape == (2,) and sampler.expert_weights_prior.shape == (3,)
    x = torch.randn(4, 6)
    model.eval()
    with torch.no_grad():
        prop.assert_close(model(x), base(x) + 2.0 * x @ a.T @ b.T)
    assert model._get_monteclora_loss() == 0.0
    model.train()
    torch.manual_seed(1)
    out = model(x)
    prop.assert_differs(out, base(x) + 2.0 * x @ a.T @ b.T)
    weights = sampler.expert_weights
    assert weights.shape == (3,) and abs(float(weights.sum()) - 1) < 1e-5
    loss = model._get_monteclora_loss()
    assert loss.dim() == 0 and torch.isfinite(loss)
    (out.sum() + loss).backward()
    assert sampler.std_prior.grad is not None and sampler.expert_weights_prior.grad is not None


def test_monteclora_loss_terms_by_hand():
    torch.manual_seed(0)
    config = MontecloraConfig(num_samples=3, use_entropy=True, dirichlet_prior=0.5, kl_loss_weight=0.1)
    sampler = MontecloraSampler(4, 2, config).train()
    kl, entropy = sampler.get_variational_loss()  # before any draw: V = I, w uniform
    alpha = sampler.expert_weights_prior.exp()
    prior = torch.full((3,), 0.5)
    kl_dir = (torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum()) + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
              + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())
    var = (2 * sampler.std_prior).exp()
    kl_wishart = 0.5 * (-var.log().sum() * 2 + var.sum() * 2 - 4)
    kl_gauss = 3 * 0.5 * (2 - 0 - 2)
    prop.assert_close(kl, 0.1 * (kl_dir + kl_wishart + kl_gauss))
    prop.assert_close(torch.as_tensor(entropy), torch.tensor(3 * (1 / 3) ** 2))
    assert sampler.eval().get_variational_loss() == (0.0, 0.0)


# ---------------------------------------------------------------------- KaSA
def test_kasa_truncates_the_base_and_adds_the_diagonal_update():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    original = base.weight.detach().clone()
    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=2, lora_alpha=4, init_lora_weights=False,
                                                            kasa_config=KasaConfig()))
    layer = model.base_model.model[0]
    values = torch.linalg.svdvals(original)
    kept = torch.linalg.svdvals(layer.get_base_layer().weight)
    prop.assert_close(kept[:4], values[:4], atol=1e-4)  # k - r = 6 - 2 components kept
    assert bool((kept[4:] < 1e-4).all())
    a, b, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
    assert d.shape == (2,) and d.requires_grad
    x = torch.randn(3, 8)
    with torch.no_grad():
        truncated = layer.get_base_layer()(x)
        prop.assert_close(model(x), truncated + 2.0 * ((x @ a.T) * d) @ b.T)
        prop.assert_close(layer.get_delta_weight("default"), 2.0 * (b * d) @ a)
        unmerged = model(x)
        model.merge_adapter()
        prop.assert_close(model(x), unmerged)
        model.unmerge_adapter()
        with model.disable_adapter():
            prop.assert_close(model(x), truncated)  # disabling keeps the truncated base (peft's behaviour)
    loss = model._get_kasa_loss()
    eye = torch.eye(2)
    expected = 1e-4 * (d**2).sum() + 1e-3 * (torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye))
    prop.assert_close(loss, expected)


def test_kasa_fresh_adapter_is_a_noop_on_the_truncated_base():
    model = get_peft_model(LLAMA.make_model(), variant_lora("kasa_config", init_lora_weights=True))
    inputs = LLAMA.make_inputs()
    adapted = prop.output_of(model, inputs)
    with model.disable_adapter():
        prop.assert_close(prop.output_of(model, inputs), adapted)
    prop.assert_differs(adapted, prop.output_of(LLAMA.make_model(), inputs))


def test_kasa_errors():
    with pytest.raises(ConfigError, match="smaller than min"):
        get_peft_model(nn.Sequential(nn.Linear(8, 4)), LoraConfig(target_modules=["0"], r=4, kasa_config=KasaConfig()))
    with pytest.raises(ConfigError, match="fan_in_fan_out"):
        get_peft_model(GPT2.make_model(), lora(GPT2, kasa_config=KasaConfig()))
    model = get_peft_model(LLAMA.make_model(), variant_lora("kasa_config"))
    with pytest.raises(ConfigError, match="KaSA cannot be combined"):
        model.add_adapter("plain", lora(LLAMA))
    model = get_peft_model(LLAMA.make_model(), lora(LLAMA))
    with pytest.raises(ConfigError, match="KaSA cannot be combined"):
        model.add_adapter("kasa", variant_lora("kasa_config"))
    assert math.isclose(get_peft_model(LLAMA.make_model(), lora(LLAMA))._get_kasa_loss(), 0.0)


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variant_adapters_are_not_combined_by_add_weighted_adapter(field_name):
    model = get_peft_model(LLAMA.make_model(), variant_lora(field_name))
    model.add_adapter("second", variant_lora(field_name))
    with pytest.raises(ConfigError, match="Cannot combine adapters"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="linear")


@pytest.mark.parametrize("field_name", list(SUB_CONFIGS))
def test_variants_refuse_multihead_attention_before_changing_it(field_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(target_modules=["0"], **{field_name: SUB_CONFIGS[field_name]})
    if field_name == "use_bdlora":
        config.use_bdlora = BdLoraConfig(target_modules_bd_a=["0"])
    with pytest.raises(ConfigError, match="MultiheadAttention does not support"):
        get_peft_model(model, config)
    assert type(model[0].out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_failed_kasa_injection_restores_the_truncated_base_weights():
    model = LLAMA.make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # q_proj (32 x 32) takes r = 20 and is truncated first; v_proj (16 x 32) cannot: the add fails
    with pytest.raises(ConfigError, match="smaller than min"):
        get_peft_model(model, LoraConfig(r=20, target_modules=["q_proj", "v_proj"], kasa_config=KasaConfig()))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field_name", ["velora_config", "use_bdlora", "monteclora_config"])
def test_variants_on_gpt2_conv1d_merge_like_unmerged(field_name):
    sub = SUB_CONFIGS[field_name]
    if field_name == "use_bdlora":
        sub = BdLoraConfig(target_modules_bd_a=["c_proj"], target_modules_bd_b=["c_attn"], nblocks=2)
    prop.check_merge_equals_unmerged(GPT2.make_model, GPT2.make_inputs(), lora(GPT2, **{field_name: sub}))
