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
