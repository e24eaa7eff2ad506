"""AdaMSS: config defaults and checks, the subspace construction and the update by hand, merging with
biases, ASA masking, multiple adapters, and the shared property suite on tiny transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from peftkit import AdamssConfig, AdamssModel, ConfigError, PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.tuners.adamss.layer import AdamssLayer, seeded_svd  # noqa: E402
from tests import properties as prop  # noqa: E402
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "dense"], "t5": ["q", "v", "wo"]}


def config_for(name: str, **overrides) -> AdamssConfig:
    """A random (non-identity, B ~ 0.01 N(0, 1)) adapter with 2 subspaces of rank 2 on the case's targets."""
    kwargs = dict(target_modules=TARGETS[name], r=6, num_subspaces=2, subspace_rank=2, init_weights=None,
                  task_type=MODEL_FACTORIES[name].task_type)
    kwargs.update(overrides)
    return AdamssConfig(**kwargs)


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 4, bias=bias)
        self.emb = nn.Embedding(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f for f in dataclasses.fields(AdamssConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.AdamssConfig)}
    assert set(ours) == set(theirs)
    for name, their_field in theirs.items():
        if name != "peft_type":
            assert ours[name].default == their_field.default, name
    config = AdamssConfig()
    assert (config.r, config.num_subspaces, config.subspace_rank, config.init_weights) == (100, 5, 1, "orthogonal")
    assert config.peft_type == "ADAMSS"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"init_weights": "gaussian"}, "init_weights must be 'orthogonal' or None, got gaussian"),
        ({"use_asa": True, "mask_interval": 0}, "`mask_interval` must be a positive integer"),
        ({"use_asa": True, "init_warmup": 10, "final_warmup": 10}, "`init_warmup` must be smaller than `final_warmup`"),
        ({"use_asa": True, "asa_target_subspaces": 0}, "`asa_target_subspaces` must be a positive integer"),
        ({"use_asa": True, "asa_schedule_exponent": 0.0}, "`asa_schedule_exponent` must be a positive number"),
    ],
)
def test_bad_fields_raise_value_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AdamssConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)  # what peft raises


def test_asa_checks_only_with_asa():
    AdamssConfig(mask_interval=0, init_warmup=5, final_warmup=1, asa_target_subspaces=0)  # ignored without ASA


def test_init_weights_false_means_none():
    assert AdamssConfig(init_weights=False).init_weights is None


def test_json_roundtrip_dispatches_to_adamss(tmp_path):
    AdamssConfig(r=8, num_subspaces=3, target_modules=["q_proj"], use_asa=True).save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is AdamssConfig
    assert (loaded.r, loaded.num_subspaces, loaded.use_asa, loaded.target_modules) == (8, 3, True, {"q_proj"})


def test_non_linear_target_raises_type_error():
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        get_peft_model(MLP(), AdamssConfig(target_modules=["emb"], r=4))


# ---------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("bias", [True, False])
def test_layer_update_by_hand(bias):
    model = get_peft_model(MLP(bias), AdamssConfig(target_modules=["lin0"], r=4, num_subspaces=3, subspace_rank=2,
                                                   init_weights=None))
    layer = model.base_model.model.lin0
    assert isinstance(layer, AdamssLayer) and layer.num_subspaces["default"] == 3
    weight = layer.get_base_layer().weight
    full = torch.cat([weight, layer.get_base_layer().bias[:, None]], 1) if bias else weight
    newb = layer.adamss_newB["default"]
    assert newb.shape == (4, full.shape[1])
    _, expected_vt = seeded_svd(full.detach().float(), 4, 0)
    torch.testing.assert_close(newb, expected_vt)
    # The subspaces partition the output rows; every A_k has orthonormal rows.
    rows = torch.sort(layer.scatter_index["default"]).values
    assert torch.equal(rows, torch.arange(20))
    for a in layer.adamss_A["default"]:
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    # delta_W~[S_k] = B_k A_k newB
    delta = torch.zeros(20, full.shape[1])
    for k, (a, b) in enumerate(zip(layer.adamss_A["default"], layer.adamss_B["default"])):
        delta[layer.seg_result["default"][k]] = b @ a @ newb
    x = torch.randn(3, 10)
    x_full = torch.cat([x, torch.ones(3, 1)], 1) if bias else x
    expected = layer.get_base_layer()(x) + x_full @ delta.T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta[:, :10], atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(layer.get_delta_bias("default"), delta[:, 10], atol=1e-6, rtol=0)


def test_default_init_is_a_noop_with_zero_b():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0", "lin1"], r=4))
    for _, layer in model.base_model.tuner_layers():
        assert all(torch.equal(b, torch.zeros_like(b)) for b in layer.adamss_B["default"])
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), MLP()(x))


def test_ranks_are_clamped():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin1"], r=500, num_subspaces=10, subspace_rank=3))
    layer = model.base_model.model.lin1
    assert layer.adamss_newB["default"].shape == (4, 21)  # r' = min(r, out, in + 1)
    assert layer.num_subspaces["default"] == 4  # K' = min(K, out)
    assert all(b.shape == (1, 1) for b in layer.adamss_B["default"])


def test_dynamic_rank_caps_at_subspace_rank():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=8, num_subspaces=2, subspace_rank=3,
                                               use_dynamic_rank=True, svd_threshold=0.0))
    ranks = [a.shape[0] for a in model.base_model.model.lin0.adamss_A["default"]]
    assert all(1 <= rank <= 3 for rank in ranks)


def test_same_seed_same_subspaces_other_seed_may_differ():
    def build(seed):
        return get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, random_seed=seed)).base_model.model.lin0

    first, second = build(0), build(0)
    assert torch.equal(first.scatter_index["default"], second.scatter_index["default"])
    torch.testing.assert_close(first.adamss_newB["default"], second.adamss_newB["default"], atol=0, rtol=0)


def test_svd_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    seeded_svd(torch.randn(8, 6), 3, 0)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(3), expected)


def test_merge_with_bias_and_unmerge_restore():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0", "lin1"], r=4, init_weights=None))
    x = torch.randn(5, 10)
    before = model(x)
    weights = {n: (l.get_base_layer().weight.clone(), l.get_base_layer().bias.clone())
               for n, l in model.base_model.tuner_layers()}
    model.merge_adapter()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    assert any(not torch.equal(l.get_base_layer().bias, weights[n][1]) for n, l in model.base_model.tuner_layers())
    model.unmerge_adapter()
    for name, layer in model.base_model.tuner_layers():
        torch.testing.assert_close(layer.get_base_layer().weight, weights[name][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.get_base_layer().bias, weights[name][1], atol=1e-6, rtol=0)


def test_safe_merge_and_merge_and_unload():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, init_weights=None))
    x = torch.randn(5, 10)
    before = model(x)
    merged = model.merge_and_unload(safe_merge=True)
    assert isinstance(merged.lin0, nn.Linear)
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=0)


def test_multiple_adapters_add_up_and_delete():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, init_weights=None))
    model.add_adapter("other", AdamssConfig(target_modules=["lin0", "lin1"], r=3, num_subspaces=2, init_weights=None))
    x = torch.randn(5, 10)
    only_default = model(x)
    model.base_model.set_adapter(["default", "other"])
    both = model(x)
    lin0 = model.base_model.model.lin0
    assert set(lin0.adamss_A) == {"default", "other"}
    assert (both - only_default).abs().max() > 1e-4
    model.base_model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in lin0.adamss_newB and "other" not in lin0.num_subspaces
    torch.testing.assert_close(model(x), only_default)


def test_asa_freezes_all_but_the_target_subspaces():
    config = AdamssConfig(target_modules=["lin0", "lin1"], r=4, num_subspaces=3, init_weights=None, use_asa=True,
                          asa_target_subspaces=2, init_warmup=1, final_warmup=3, mask_interval=1)
    model = get_peft_model(MLP(), config)
    assert model.base_model._asa_total_subspaces["default"] == 6
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 10)
    for step in range(1, 5):
        model(x).square().mean().backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    active = sum(a.requires_grad for _, layer in model.base_model.tuner_layers() for a in layer.adamss_A["default"])
    # peft's rule: scores strictly above the target-th largest stay trainable (target - 1 when all differ).
    assert 1 <= active <= 2


def test_update_and_allocate_without_asa_does_nothing():
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, init_weights=None))
    model(torch.randn(2, 10)).sum().backward()
    model.base_model.update_and_allocate(100)
    assert all(p.requires_grad for n, p in model.named_parameters() if "adamss_" in n)


def test_loaded_checkpoint_rebuilds_subspaces(tmp_path):
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, init_weights=None))
    x = torch.randn(4, 10)
    expected = model(x)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(MLP(), str(tmp_path))
    assert isinstance(loaded.base_model, AdamssModel)
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- properties
CASES = list(TARGETS)


@pytest.fixture(params=CASES)
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 4, "num_subspaces": 3, "target_modules": TARGETS[name][:1]},
    fresh=({"init_weights": "orthogonal"},),
    train=({},),
))


def test_asa_callback_calls_update_and_allocate():
    pytest.importorskip("transformers")
    from peftkit.tuners.adamss.asa_callback import AdamssAsaCallback

    calls = []
    model = get_peft_model(MLP(), AdamssConfig(target_modules=["lin0"], r=4, use_asa=True, asa_target_subspaces=1))
    model.base_model.update_and_allocate = calls.append
    state = type("State", (), {"global_step": 7})()
    AdamssAsaCallback().on_optimizer_step(None, state, None, model=model)
    assert calls == [7]
