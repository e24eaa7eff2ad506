"""LoHa and LoKr: configs, layer shapes and math, factored == materialised, Conv2d, property suite."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ConfigError, LoHaConfig, LoKrConfig, PeftConfig, PeftModel, TargetModulesError, get_peft_model
from peftkit.tuners.lokr import factorization
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama

METHODS = {"loha": LoHaConfig, "lokr": LoKrConfig}
CASES = ["llama", "gpt2", "bert"]  # gpt2: transformers' Conv1D, which peft's LoHa/LoKr refuse (peftkit extension)
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "dense"],
}


def config_for(method: str, name: str, **overrides):
    """Small rank, random factors (a non-trivial adapter), the case's targets and task."""
    kwargs = dict(r=4, alpha=8, target_modules=TARGETS[name], init_weights=False)
    kwargs["task_type"] = MODEL_FACTORIES[name].task_type
    kwargs.update(overrides)
    return METHODS[method](**kwargs)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("method", list(METHODS))
def test_fields_and_defaults_match_peft(method):
    peft = pytest.importorskip("peft")
    theirs_cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method]
    ours = {f.name: f for f in dataclasses.fields(METHODS[method])}
    theirs = {f.name: f for f in dataclasses.fields(theirs_cls)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name == "peft_type":  # peft sets it in __post_init__; ours is the field default
            continue
        assert ours[name].default == their_field.default, name
        if their_field.default_factory is not dataclasses.MISSING:
            assert ours[name].default_factory() == their_field.default_factory(), name


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": -1}, "r=-1 is invalid"),
        ({"r": 2.5}, "positive integer"),
        ({"alpha": 0}, "alpha=0 is invalid"),
        ({"rank_dropout": 1.0}, r"rank_dropout=1.0 .*\[0, 1\)"),
        ({"module_dropout": -0.1}, r"module_dropout=-0.1 .*\[0, 1\)"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": -2}}, "alpha_pattern"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian'"),
        ({"use_effective_conv2d": 1}, "use_effective_conv2d=1"),
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": [1]}, "strings"),
    ],
)
def test_bad_fields_raise_config_error(method, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        METHODS[method](**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decompose_factor": 0}, "decompose_factor=0"),
        ({"decompose_factor": -2}, "decompose_factor=-2"),
        ({"decompose_both": "no"}, "decompose_both='no'"),
        ({"rank_dropout_scale": None}, "rank_dropout_scale=None"),
    ],
)
def test_bad_lokr_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoKrConfig(**kwargs)
    LoKrConfig(init_weights="lycoris", decompose_factor=4)  # valid


@pytest.mark.parametrize("method", list(METHODS))
def test_json_roundtrip_dispatches_to_the_method(method, tmp_path):
    METHODS[method](r=3, target_modules=["q"], rank_pattern={"q": 2}).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is METHODS[method] and loaded.r == 3 and loaded.rank_pattern == {"q": 2}


@pytest.mark.parametrize("method", list(METHODS))
def test_default_targets_are_peft_lora_table(method):
    model = get_peft_model(llama(), METHODS[method](r=2))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("method", list(METHODS))
def test_unsupported_layer_names_supported_types(method):
    with pytest.raises(TargetModulesError, match="Embedding, which .* cannot wrap. Supported: torch.nn.Linear"):
        get_peft_model(llama(), METHODS[method](r=2, target_modules=["embed_tokens"]))


# ---------------------------------------------------------------------------------------------- layer math
def _layer(method: str, base: nn.Module, **config):
    model = get_peft_model(nn.Sequential(base), METHODS[method](target_modules=["0"], **config))
    return model, model.base_model.model[0]


def test_loha_linear_delta_by_hand():
    _, layer = _layer("loha", nn.Linear(6, 5), r=2, alpha=6, init_weights=False)
    w1 = layer.hada_w1_a["default"] @ layer.hada_w1_b["default"]
    w2 = layer.hada_w2_a["default"] @ layer.hada_w2_b["default"]
    assert layer.hada_w1_a["default"].shape == (5, 2) and layer.hada_w1_b["default"].shape == (2, 6)
    prop.assert_close(layer.get_delta_weight("default"), w1 * w2 * 3.0)


def test_lokr_linear_delta_by_hand_with_planted_entries():
    _, layer = _layer("lokr", nn.Linear(6, 4), r=8, alpha=8, init_weights=False)
    assert layer.lokr_w1["default"].shape == (2, 2) and layer.lokr_w2["default"].shape == (2, 3)
    with torch.no_grad():
        layer.lokr_w1["default"].zero_()
        layer.lokr_w1["default"][1, 0] = 2.0
        layer.lokr_w2["default"].zero_()
        layer.lokr_w2["default"][0, 2] = 5.0
    delta = layer.get_delta_weight("default")
    # kron: row i*b + j, column k*d + l holds W1[i, k] * W2[j, l] -> (1*2 + 0, 0*3 + 2)
    assert delta[2, 2] == 10.0 and torch.count_nonzero(delta) == 1


@pytest.mark.parametrize("method", list(METHODS))
def test_conv1d_gpt2_delta_is_transposed(method):
    torch.manual_seed(0)
    model, layer = _layer(method, Conv1D(4, 6), r=2, init_weights=False)
    assert layer.get_delta_weight("default").shape == (6, 4)  # like the Conv1D weight (in, out)
    x = torch.randn(3, 6)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ layer.get_delta_weight("default")
        prop.assert_close(model(x), expected)


def test_factorization_examples_and_peft_agreement():
    assert [factorization(n) for n in (256, 128, 127, 12, 1)] == [(16, 16), (8, 16), (1, 127), (3, 4), (1, 1)]
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4) and factorization(12, 2) == (2, 6)
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dimension in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == lokr_layer.factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"r": 8}, {"lokr_w1": (4, 2), "lokr_w2": (4, 4)}),
        ({"r": 1}, {"lokr_w1": (4, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}),
        (
            {"r": 1, "decompose_both": True},
            {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)},
        ),
        ({"r": 8, "decompose_factor": 2}, {"lokr_w1": (2, 2), "lokr_w2": (8, 4)}),
    ],
)
def test_lokr_shapes_follow_rank_and_decomposition(kwargs, expected):
    _, layer = _layer("lokr", nn.Linear(8, 16), **kwargs)
    held = {name: getattr(layer, name) for name in layer.adapter_layer_names}
    shapes = {name: tuple(params["default"].shape) for name, params in held.items() if "default" in params}
    assert shapes == expected


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_lokr_default_inits_are_noops(init):
    model, layer = _layer("lokr", nn.Linear(8, 16), r=1, init_weights=init)
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0
    assert any(torch.count_nonzero(p) for p in layer.adapter_params())


# ---------------------------------------------------------------------------------------------- factored forward
class TinyConvNet(nn.Module):
    """Conv2d (3x3 and 1x1), Conv1d and Linear layers in a custom module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, kernel_size=1)
        self.strided = nn.Conv2d(8, 8, kernel_size=3, stride=2, dilation=1, padding=1)
        self.seq_conv = nn.Conv1d(8, 6, kernel_size=3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.strided(self.conv2(h))).flatten(2)
        return self.head(self.seq_conv(h).mean(dim=2))


CONV_TARGETS = ["conv", "conv2", "strided", "seq_conv", "head"]
CONV_VARIANTS = {
    "loha": ("loha", {}),
    "loha-effective": ("loha", {"use_effective_conv2d": True}),
    "lokr": ("lokr", {}),
    "lokr-r1": ("lokr", {"r": 1}),
    "lokr-effective": ("lokr", {"r": 1, "use_effective_conv2d": True}),
    "lokr-full-w2": ("lokr", {"r": 8}),
    "lokr-both-factor2": ("lokr", {"r": 1, "decompose_both": True, "decompose_factor": 2}),
}


def conv_model(variant: str):
    method, overrides = CONV_VARIANTS[variant]
    kwargs = dict(r=2, alpha=4, target_modules=CONV_TARGETS, init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(TinyConvNet(), METHODS[method](**kwargs))


def conv_input() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def set_delta_mode(model: nn.Module, mode: str) -> None:
    for _, layer in model.base_model.tuner_layers():
        layer.delta_mode = mode


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_factored_forward_equals_materialised(variant):
    """Outputs and gradients agree; dropout masks too (both paths draw the same random numbers)."""
    model = conv_model(variant)
    for _, layer in model.base_model.tuner_layers():
        layer.rank_dropout["default"], layer.module_dropout["default"] = 0.3, 0.2
    x = conv_input()
    results = {}
    for mode in ("materialized", "factored"):
        set_delta_mode(model, mode)
        for training in (False, True):
            model.train(training)
            model.zero_grad()
            torch.manual_seed(11)
            out = model(x)
            out.square().sum().backward()
            # (module dropout may skip a layer: no gradient there)
            trained = [p for p in model.parameters() if p.requires_grad]
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trained]
            results[mode, training] = (out.detach(), grads)
    for training in (False, True):
        (out_m, grads_m), (out_f, grads_f) = results["materialized", training], results["factored", training]
        prop.assert_close(out_f, out_m)
        for grad_f, grad_m in zip(grads_f, grads_m):
            torch.testing.assert_close(grad_f, grad_m, atol=1e-5, rtol=1e-4)
    assert_differs_from_base(model, x)


def assert_differs_from_base(model, x):
    model.eval()
    with torch.no_grad():
        prop.assert_differs(model(x), TinyConvNet()(x))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_factored_forward_equals_materialised_on_transformers(method, name):
    tiny = MODEL_FACTORIES[name]
    model = get_peft_model(tiny.make_model(), config_for(method, name, rank_pattern={"q_proj": 1, "c_proj": 1}))
    outputs = {}
    for mode in ("materialized", "factored"):
        set_delta_mode(model, mode)
        outputs[mode] = prop.output_of(model, tiny.make_inputs())
    prop.assert_close(outputs["factored"], outputs["materialized"])


@pytest.mark.parametrize("method", list(METHODS))
def test_auto_mode_picks_by_cost(method):
    _, big = _layer(method, nn.Linear(256, 256), r=4)
    _, tiny_square = _layer(method, nn.Linear(4, 4), r=4)
    assert big._path(torch.zeros(8, 256), "default") == "factored"
    if method == "loha":  # r^2 (in + out) > in * out: the materialised delta is cheaper
        assert tiny_square._path(torch.zeros(8, 4), "default") == "materialized"
        assert tiny_square._path(torch.zeros(8, 4), "default", fusable=True) == "fused"
    _, grouped = _layer(method, nn.Conv2d(4, 4, 3, groups=2), r=2)
    assert grouped._path(torch.zeros(1, 4, 5, 5), "default") == "materialized"  # no factored form for groups
    grouped.delta_mode = "factored"
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        prop.assert_close(grouped(x), grouped.base_layer(x) + grouped._materialized_output(x, "default"))


# ---------------------------------------------------------------------------------------------- conv2d properties
@pytest.mark.parametrize("variant", ["loha", "loha-effective", "lokr", "lokr-effective"])
def test_conv_merge_disable_roundtrip(variant, tmp_path):
    model = conv_model(variant).eval()
    x = conv_input()
    base_out = TinyConvNet()(x).detach()
    with torch.no_grad():
        adapted = model(x)
        prop.assert_differs(adapted, base_out)
        with model.disable_adapter():
            prop.assert_close(model(x), base_out)
        model.save_pretrained(str(tmp_path))
        loaded = PeftModel.from_pretrained(TinyConvNet(), str(tmp_path)).eval()
        prop.assert_close(loaded(x), adapted, atol=0)
        model.merge_adapter()
        prop.assert_close(model(x), adapted)
        model.unmerge_adapter()
        prop.assert_close(model.merge_and_unload()(x), adapted)
    if "effective" in variant:
        kernels = [n for n, _ in loaded.named_parameters() if n.endswith(("hada_t1.default", "lokr_t2.default"))]
        assert kernels, "use_effective_conv2d made no CP core"


@pytest.mark.parametrize("method", list(METHODS))
def test_conv_training_lowers_loss(method):
    model = get_peft_model(TinyConvNet(), METHODS[method](r=2, target_modules=CONV_TARGETS))
    x, target = conv_input(), torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(15):
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(".default" in n for n, p in model.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=[(m, c) for m in METHODS for c in CASES], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    method, name = request.param
    return (method, name), MODEL_FACTORIES[name]


def case_config(case_name: tuple, **overrides):
    """`config_for` of a case named (method, model name)."""
    method, name = case_name
    return config_for(method, name, **overrides)


globals().update(prop.property_tests(
    case_config,
    second=lambda case_name: {"r": 2, "alpha": 3, "target_modules": TARGETS[case_name[1]][:1]},
    lr=1e-2,
))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "overrides",
    [
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
        {"layers_to_transform": [1]},
        {"target_modules": "all-linear", "exclude_modules": ["down_proj"]},
    ],
    ids=["patterns", "layers", "all-linear-exclude"],
)
def test_llama_variants(method, overrides, tmp_path):
    tiny = MODEL_FACTORIES["llama"]
    config = config_for(method, "llama", **overrides)
    prop.check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), config)
    prop.check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), config, tmp_path)
    model = get_peft_model(tiny.make_model(), config)
    layers = dict(model.base_model.tuner_layers())
    if "rank_pattern" in overrides:
        assert {layer.r["default"] for name, layer in layers.items() if name.endswith("v_proj")} == {2}
        assert {layer.alpha["default"] for name, layer in layers.items() if name.endswith("q_proj")} == {3}
    if "layers_to_transform" in overrides:
        assert all(".layers.1." in name for name in layers)
    if "exclude_modules" in overrides:
        assert not any(name.endswith("down_proj") for name in layers) and len(layers) == 12


def test_gpt2_conv1d_targets_warn_nothing_and_merge():
    """peft's LoHa/LoKr refuse GPT-2's Conv1D; peftkit wraps it (delta stored (out, in), merged transposed)."""
    model = get_peft_model(gpt2(), config_for("loha", "gpt2"))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.is_conv1d_layer and layer.hada_w1_a["default"].shape == (96, 4)
    assert math.prod(layer.get_delta_weight("default").shape) == layer.base_layer.weight.numel()


# ---------------------------------------------------------------------------------------------- fused path
def _outputs_and_grads(model: nn.Module, layer: nn.Module, x: torch.Tensor, mode: str, seed: int) -> list[torch.Tensor]:
    layer.delta_mode = mode
    model.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(seed)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in layer.parameters() if p.requires_grad]
    return [out.detach(), x.grad.clone(), *grads]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("base_kind", ["linear", "linear_no_bias", "conv1d"])
@pytest.mark.parametrize("trainable_base", [True, False])  # False: dL/d delta_W reuses W + delta_W's memory
def test_fused_path_equals_materialised_with_dropouts_and_trainable_base(method, base_kind, trainable_base):
    """y = x (W + delta_W)^T + b in one matmul: outputs and all gradients as the materialised path."""
    torch.manual_seed(0)
    base = {"linear": nn.Linear(12, 20), "linear_no_bias": nn.Linear(12, 20, bias=False), "conv1d": Conv1D(20, 12)}
    model, layer = _layer(method, base[base_kind], r=3, alpha=5, init_weights=False, rank_dropout=0.3,
                          module_dropout=0.2)
    model.train()
    layer.base_layer.requires_grad_(trainable_base)
    x = torch.randn(3, 4, 12, requires_grad=True)
    for seed in range(4):  # some seeds drop the whole module, the others a random set of rows
        fused = _outputs_and_grads(model, layer, x, "fused", seed)
        expected = _outputs_and_grads(model, layer, x, "materialized", seed)
        for got, want in zip(fused, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    layer.delta_mode, layer.module_dropout["default"] = "fused", 0.0
    assert type(layer(x).grad_fn).__name__ == "_FusedDeltaLinearBackward"


def test_fused_path_keeps_nothing_large_and_frozen_base_gets_no_grad():
    model, layer = _layer("loha", nn.Linear(12, 20), r=3, init_weights=False)
    layer.delta_mode = "fused"
    out = layer(torch.randn(5, 12))
    assert type(out.grad_fn).__name__ == "_FusedDeltaLinearBackward"
    out.sum().backward()
    assert layer.base_layer.weight.grad is None
    assert all(p.grad is not None for p in layer.adapter_params(["default"]))


def test_auto_picks_fused_for_training_sized_batches_and_not_where_it_cannot():
    """The bench's shape (1024 tokens, 512 -> 1376, r = 16): fused when training; factored for one token."""
    model, layer = _layer("loha", nn.Linear(512, 1376), r=16)
    tokens = torch.zeros(1024, 512)
    assert layer._fusable_adapter(tokens) == "default"
    assert layer._path(tokens, "default", fusable=True) == "fused"
    assert layer._path(torch.zeros(1, 512), "default", fusable=True) == "factored"
    model.add_adapter("other", LoHaConfig(target_modules=["0"]))
    layer.set_adapter(["default", "other"])
    assert layer._fusable_adapter(tokens) is None  # two active adapters
    layer.set_adapter("default")
    handle = layer.base_layer.register_forward_pre_hook(lambda *_: None)
    assert layer._fusable_adapter(tokens) is None
    handle.remove()
    assert layer._fusable_adapter(tokens.double()) is None


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_path_in_a_model_trains_like_the_materialised_one(method):
    """Same loss and same adapter gradients on a tiny llama, whichever path each layer takes."""
    tiny = MODEL_FACTORIES["llama"]
    inputs = tiny.make_inputs()
    results = {}
    for mode in ("materialized", "fused"):
        model = get_peft_model(tiny.make_model(), config_for(method, "llama"))
        set_delta_mode(model, mode)
        loss = model(**inputs).logits.square().mean()
        loss.backward()
        results[mode] = [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]
    for got, want in zip(results["fused"], results["materialized"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kronecker_linear_function_matches_composed_ops():
    """The LoKr factored product's own backward equals autograd through the composed matmuls."""
    from peftkit.tuners.lokr.kron_linear import KroneckerLinear

    torch.manual_seed(0)
    x = torch.randn(3, 5, 24).transpose(0, 1).requires_grad_()  # non-contiguous rows, in = 4 * 6
    w1 = torch.randn(2, 4, requires_grad=True)  # a x c
    w2 = torch.randn(7, 6, requires_grad=True)  # b x d
    weights = torch.linspace(-1, 1, 14)
    results = []
    for fn in (KroneckerLinear.apply, lambda x, w1, w2: (x @ torch.kron(w1, w2).T)):
        out = fn(x, w1, w2)
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad.clone(), w1.grad.clone(), w2.grad.clone()])
        x.grad = w1.grad = w2.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
