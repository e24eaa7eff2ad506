"""Poly / MHR: config checks, the routed skill mixture by hand, how `task_ids` reach the layers
(forward, generate, the tuner, the layer, per call), the errors for bad ids, and the shared
property suite on tiny transformers (merging does not apply: the update depends on each row's task)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch import nn

from peftkit import ConfigError, PeftConfig, PeftModel, PolyConfig, PolyModel, get_peft_model, get_peft_model_state_dict
from peftkit.errors import PeftkitError
from peftkit.quantization import QuantizationConfig, quantize_model
from peftkit.registry import MERGE, method_spec
from peftkit.tuners._core import call_state
from peftkit.tuners.poly.layer import Linear, TaskIdsError
from peftkit.tuners.poly.model import PolyMergeError
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, gpt2, llama, lm_inputs

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}
N_TASKS = 3


def config_for(name: str, **overrides) -> PolyConfig:
    """Rank 2, 3 skills in 2 splits over 3 tasks, random B (init_weights=False): non-trivial, with the case's targets."""
    kwargs = dict(r=2, n_tasks=N_TASKS, n_skills=3, n_splits=2, target_modules=TARGETS[name], init_weights=False,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return PolyConfig(**kwargs)


def randomize_routers(model: nn.Module, seed: int = 7) -> nn.Module:
    """Router logits ~ N(0, 1) (they start within 1e-3 of each other): tasks then route visibly differently."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "poly_router" in name:
                param.normal_()
    return model


def inputs_for(name: str, task_ids=(2, 0)) -> dict:
    return {**MODEL_FACTORIES[name].make_inputs(), "task_ids": torch.tensor(task_ids)}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def mlp_model(**overrides) -> PeftModel:
    kwargs = dict(r=3, n_tasks=N_TASKS, n_skills=2, n_splits=2, target_modules=["lin0"], init_weights=False)
    kwargs.update(overrides)
    return get_peft_model(MLP(), PolyConfig(**kwargs)).eval()


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(PolyConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.PolyConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    config = PolyConfig()
    assert (config.r, config.n_tasks, config.n_skills, config.n_splits, config.poly_type) == (8, 1, 4, 1, "poly")
    assert config.init_weights is True and str(config.peft_type) == "POLY"


def test_default_targets_are_pefts():
    constants = pytest.importorskip("peft.utils.constants")
    from peftkit.tuners.poly.model import POLY_TARGET_MODULES_BY_MODEL_TYPE, TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING is POLY_TARGET_MODULES_BY_MODEL_TYPE
    assert POLY_TARGET_MODULES_BY_MODEL_TYPE == dict(constants.TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING)
    wrapped = get_peft_model(llama(), PolyConfig(r=2))
    assert sorted(wrapped.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid"),
        ({"r": 2.5}, "r=2.5 is invalid"),
        ({"n_tasks": 0}, "n_tasks=0 is invalid"),
        ({"n_skills": True}, "n_skills=True is invalid"),
        ({"n_splits": "2"}, "n_splits='2' is invalid"),
        ({"poly_type": "mhr"}, "Unsupported poly_type: 'mhr'"),
        ({"init_weights": "zeros"}, "init_weights='zeros' is invalid"),
        ({"target_modules": 3}, "Module names must be"),
        ({"modules_to_save": 3}, "modules_to_save=3 is invalid"),
    ],
)
def test_bad_fields_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PolyConfig(**kwargs)


def test_json_roundtrip_dispatches_to_poly(tmp_path):
    PolyConfig(r=6, n_tasks=5, n_skills=3, n_splits=4, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is PolyConfig
    assert (loaded.r, loaded.n_tasks, loaded.n_skills, loaded.n_splits, loaded.target_modules) == (6, 5, 3, 4, {"q_proj"})


def test_n_splits_must_divide_the_features_and_the_model_is_left_unchanged():
    model = MLP()
    with pytest.raises(ConfigError, match=r"n_splits=3 must divide the in_features \(10\) and out_features \(8\) of 'lin0'"):
        get_peft_model(model, PolyConfig(r=2, n_splits=3, target_modules=["lin1", "lin0"]))
    assert not any(isinstance(m, Linear) for m in model.modules())


def test_implausible_sizes_are_refused_before_allocating():
    with pytest.raises(ConfigError, match="n_skills=100000, .* as implausible"):
        get_peft_model(MLP(), PolyConfig(r=64, n_skills=100_000, target_modules=["lin0"]))


def test_only_linear_layers_are_wrapped():
    model = gpt2()
    with pytest.raises(TypeError, match="only the following modules are supported: `torch.nn.Linear`"):
        get_peft_model(model, PolyConfig(r=2, target_modules=["c_attn"]))
    assert not any(isinstance(m, Linear) for m in model.modules())
    with pytest.raises(TypeError, match="only the following modules are supported"):
        get_peft_model(quantize_model(llama(), QuantizationConfig(load_in_4bit=True)), PolyConfig(r=2, target_modules=["q_proj"]))


# ---------------------------------------------------------------------------------------------- the maths
def test_shapes_keys_and_init():
    model = mlp_model(init_weights=True)
    layer = model.base_model.model.lin0
    A, B = layer.poly_lora_A["default"], layer.poly_lora_B["default"]
    logits = layer.poly_router["default"].module_logits
    assert A.shape == (2, 2, 5, 3) and B.shape == (2, 2, 3, 4) and logits.shape == (N_TASKS, 4)
    assert torch.equal(B, torch.zeros_like(B)) and A.abs().max() <= 1 / 5**0.5 and A.abs().min() > 0
    assert logits.abs().max() <= 1e-3
    keys = sorted(k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(model))
    assert keys == ["lin0.poly_lora_A", "lin0.poly_lora_B", "lin0.poly_router.module_logits"]
    x = torch.randn(2, 6, 10)
    prop.assert_close(model(x, task_ids=torch.tensor([0, 1])), MLP()(x))  # B = 0: a no-op


def test_routed_update_by_hand():
    model = mlp_model()
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.poly_router["default"].module_logits.normal_()  # routers that differ visibly per task
    A, B = layer.poly_lora_A["default"].detach(), layer.poly_lora_B["default"].detach()
    logits = layer.poly_router["default"].module_logits.detach()
    x, ids = torch.randn(3, 4, 10), torch.tensor([2, 0, 2])
    expected = []
    for row, task in enumerate(ids.tolist()):
        probs = torch.sigmoid(logits[task]).view(2, 2)  # (split, skill)
        w = probs / probs.sum(dim=-1, keepdim=True)
        A_t = torch.cat([sum(w[q, s] * A[q, s] for s in range(2)) for q in range(2)], dim=0)  # (10, 3)
        B_t = torch.cat([sum(w[q, s] * B[q, s] for s in range(2)) for q in range(2)], dim=1)  # (3, 8)
        expected.append(layer.base_layer(x[row]) + x[row] @ A_t @ B_t / 3)
    with torch.no_grad():
        prop.assert_close(layer(x, task_ids=ids), torch.stack(expected))
        # 2-d input (rows, in): one token per row
        prop.assert_close(layer(x[:, 0], task_ids=ids), torch.stack(expected)[:, 0])
    assert not torch.allclose(expected[0], expected[1]), "tasks 2 and 0 must route differently"


def test_training_router_samples_relaxed_bernoulli_weights():
    model = mlp_model()
    layer = model.base_model.model.lin0
    router = layer.poly_router["default"].train()
    torch.manual_seed(3)
    weights = router(torch.tensor([0, 1, 1]))
    assert weights.shape == (3, 2, 2)
    prop.assert_close(weights.sum(-1), torch.ones(3, 2))
    assert not torch.allclose(weights[1], weights[2]), "training weights are sampled, row by row"
    weights.square().sum().backward()
    assert router.module_logits.grad is not None and router.module_logits.grad[:2].abs().sum() > 0
    assert torch.equal(router.module_logits.grad[2], torch.zeros(4)), "only the tasks in the batch get gradients"
    router.eval()
    prop.assert_close(router(torch.tensor([1])), router(torch.tensor([1])), atol=0)


def test_rows_are_routed_independently():
    model = randomize_routers(get_peft_model(llama(), config_for("llama"))).eval()
    inputs = lm_inputs()
    with torch.no_grad():
        mixed = model(**inputs, task_ids=torch.tensor([1, 2])).logits
        first = model(**inputs, task_ids=torch.tensor([1, 1])).logits
        second = model(**inputs, task_ids=torch.tensor([2, 2])).logits
    prop.assert_close(mixed[0], first[0])
    prop.assert_close(mixed[1], second[1])
    prop.assert_differs(first[1], second[1])


# ---------------------------------------------------------------------------------------------- task ids
def test_task_ids_reach_the_layers_through_every_entry_point():
    model = get_peft_model(llama(), config_for("llama")).eval()
    inputs, ids = lm_inputs(), torch.tensor([2, 0])
    with torch.no_grad():
        via_peft_model = model(**inputs, task_ids=ids).logits
        via_tuner = model.base_model(**inputs, task_ids=ids).logits
        positional = model(inputs["input_ids"], task_ids=ids).logits
        listed = model(**inputs, task_ids=[2, 0]).logits
    prop.assert_close(via_tuner, via_peft_model, atol=0)
    prop.assert_close(positional, via_peft_model, atol=0)
    prop.assert_close(listed, via_peft_model, atol=0)
    assert call_state.task_ids() is None, "the ids live for one call only"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        with call_state.task_ids_scope(ids):
            from_scope = layer(x)
        prop.assert_close(layer(x, task_ids=ids), from_scope, atol=0)


def test_generate_routes_every_step_by_the_calls_task_ids():
    model = randomize_routers(get_peft_model(llama(), config_for("llama"))).eval()
    ids = lm_inputs()["input_ids"]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = {t: model.generate(input_ids=ids, task_ids=torch.tensor([t, t]), **kwargs) for t in range(N_TASKS)}
    assert not torch.equal(out[0], out[2]), "tasks 0 and 2 must generate differently, or the check is vacuous"
    mixed = model.generate(input_ids=ids, task_ids=torch.tensor([0, 2]), **kwargs)
    assert torch.equal(mixed[0], out[0][0]) and torch.equal(mixed[1], out[2][1])
    # greedy decoding by hand, one forward per token with the same ids: the same tokens
    tokens = ids
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=tokens, task_ids=torch.tensor([0, 2])).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(mixed, tokens)
    with pytest.raises(TaskIdsError, match="task_ids should not be None"):
        model.generate(input_ids=ids, **kwargs)


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, "task_ids should not be None. .*pass task_ids=torch.tensor"),
        (torch.tensor([0, 3]), "Only 3 tasks available. Found task id = 3"),
        (torch.tensor([-1, 0]), "Found task id = -1; task ids must be >= 0"),
        (torch.tensor([0.0, 1.0]), "task_ids must hold integers"),
        (torch.tensor([0, 1, 2]), "Got 3 task ids for a batch of 2 rows"),
    ],
)
def test_bad_task_ids_are_explained(task_ids, message):
    model = get_peft_model(llama(), config_for("llama"))
    with pytest.raises(TaskIdsError, match=message) as info:
        model(**lm_inputs(), task_ids=task_ids)
    assert isinstance(info.value, ValueError) and isinstance(info.value, PeftkitError)


def test_disabled_adapters_need_no_task_ids():
    model = get_peft_model(llama(), config_for("llama"))
    with model.disable_adapter(), torch.no_grad():
        prop.assert_close(model(**lm_inputs()).logits, prop.output_of(llama(), lm_inputs()))


def test_concurrent_calls_keep_their_own_task_ids():
    model = randomize_routers(get_peft_model(llama(), config_for("llama"))).eval()
    inputs = lm_inputs()
    expected = {t: prop.output_of(model, {**inputs, "task_ids": torch.tensor([t, t])}) for t in range(N_TASKS)}
    prop.assert_differs(expected[0], expected[1])
    results, errors, barrier = {}, [], threading.Barrier(N_TASKS)

    def worker(task: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    results[task] = model(**inputs, task_ids=torch.tensor([task, task])).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_TASKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for task in range(N_TASKS):
        prop.assert_close(results[task], expected[task])


# ---------------------------------------------------------------------------------------------- adapters, merging
def test_merging_is_refused_as_the_capabilities_say():
    assert MERGE not in method_spec("POLY").capabilities
    model = get_peft_model(llama(), config_for("llama"))
    for call in (model.merge_adapter, model.merge_and_unload, model.unmerge_adapter):
        with pytest.raises(PolyMergeError, match="cannot be merged") as info:
            call()
        assert isinstance(info.value, NotImplementedError)
    assert type(model.base_model) is PolyModel
    unloaded = model.unload()
    prop.assert_close(prop.output_of(unloaded, lm_inputs()), prop.output_of(llama(), lm_inputs()))


def test_second_adapter_is_frozen_until_active_and_both_can_be_active():
    model = get_peft_model(llama(), config_for("llama", target_modules=["q_proj"]))
    model.add_adapter("other", config_for("llama", target_modules=["q_proj", "v_proj"], n_tasks=5))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    inputs = inputs_for("llama")
    one = prop.output_of(model, inputs)
    model.base_model.set_adapter(["default", "other"])
    both = prop.output_of(model, inputs)
    prop.assert_differs(both, one)
    with pytest.raises(TaskIdsError, match="Only 3 tasks available. Found task id = 4"):
        model(**{**inputs, "task_ids": torch.tensor([4, 0])})


def test_bf16_base_keeps_fp32_adapter():
    base = MLP().to(torch.bfloat16)
    layer = get_peft_model(base, PolyConfig(r=2, n_splits=2, target_modules=["lin0"], init_weights=False)).base_model.model.lin0
    assert layer.poly_lora_A["default"].dtype == torch.float32
    assert layer.poly_router["default"].module_logits.dtype == torch.float32
    out = layer(torch.randn(3, 10, dtype=torch.bfloat16), task_ids=torch.tensor([0, 0, 0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_low_cpu_mem_usage_load(tmp_path):
    model = get_peft_model(llama(), config_for("llama"))
    inputs = inputs_for("llama")
    expected = prop.output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    prop.assert_close(prop.output_of(loaded, inputs), expected, atol=0)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=list(TARGETS))
def case(request):
    """The case with its inputs carrying task ids."""
    name = request.param
    return name, dataclasses.replace(MODEL_FACTORIES[name], make_inputs=lambda: inputs_for(name))


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 3, "n_splits": 1, "target_modules": TARGETS[name][:1]},
    train=({"init_weights": True}, {"init_weights": False}),
    lr=2e-2,
    mergeable=False,
))
