"""Arrow: `create_arrow_model` loads the experts and the router as peft does, the per-token routing by
hand, GenKnowSub, experts added later, the refusals, and the same outputs as peft's Arrow model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import peftkit
from peftkit import ArrowConfig, ConfigError, LoraConfig, create_arrow_model, get_peft_model
from peftkit.tuners.lora.arrow import top_right_singular_vector
from tests.tiny_models import VOCAB, llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, list[str]]:
    """Three task experts and two general adapters, random and different from each other."""
    folder = tmp_path_factory.mktemp("arrow")
    paths: dict[str, list[str]] = {"task": [], "general": []}
    for kind, count in (("task", 3), ("general", 2)):
        for index in range(count):
            model = llama()
            torch.manual_seed(100 * len(kind) + index)
            get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(
                str(folder / f"{kind}{index}"))
            paths[kind].append(str(folder / f"{kind}{index}"))
    return paths


def ids(shape=(2, 6)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))


def arrow(lib, adapters, **options):
    config = lib.ArrowConfig(**{"top_k": 2, "rng_seed": 7, **options})
    general = adapters["general"] if options.get("use_gks") else None
    return lib.create_arrow_model(llama(), adapters["task"], config, general_adapter_paths=general).eval()


def test_config_matches_peft_and_checks_values():
    peft = pytest.importorskip("peft")
    assert {f.name: (f.default, f.init) for f in dataclasses.fields(ArrowConfig)} == {
        f.name: (f.default, f.init) for f in dataclasses.fields(peft.ArrowConfig)}
    with pytest.raises(ValueError, match="top_k cannot be negative"):
        ArrowConfig(top_k=0)
    with pytest.raises(ValueError, match="router_temperature must be greater than 0"):
        ArrowConfig(router_temperature=0)
    saved = LoraConfig(target_modules=TARGETS, arrow_config=ArrowConfig(top_k=1)).to_dict()
    assert LoraConfig.from_dict(saved).arrow_config.top_k == 1


def test_the_router_mixes_the_top_k_experts_per_token(adapters):
    model = arrow(peftkit, adapters)
    assert model.active_adapter == "arrow_router"
    assert {"task_0", "task_1", "task_2", "arrow_router"} <= set(model.peft_config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    records = []
    handle = layer.register_forward_hook(lambda m, args, out: records.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        model(input_ids=ids())
    handle.remove()
    x, y = records[0]
    tokens = x.reshape(-1, x.shape[-1])
    names = ["task_0", "task_1", "task_2"]
    protos = torch.stack([top_right_singular_vector(layer.lora_A[n].weight, layer.lora_B[n].weight, 7) for n in names])
    # each prototype is the top right singular vector of B A (up to sign)
    delta0 = layer.lora_B["task_0"].weight @ layer.lora_A["task_0"].weight
    top = torch.linalg.svd(delta0.detach())[2][0]
    assert torch.nn.functional.cosine_similarity(protos[0], top, dim=0).abs() > 0.999  # 15 power iterations
    similarity = (tokens @ protos.T).abs()
    keep = similarity.topk(2, dim=1).indices
    scores = torch.full_like(similarity, float("-inf")).scatter(1, keep, similarity.gather(1, keep))
    weights = torch.softmax(scores, dim=1)
    expected = layer.base_layer(tokens)
    for e, name in enumerate(names):
        update = tokens @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T * layer.scaling[name]
        expected = expected + weights[:, e : e + 1] * update
    torch.testing.assert_close(y.reshape(-1, y.shape[-1]), expected, atol=1e-5, rtol=0)
    assert (weights == 0).sum(dim=1).eq(1).all()  # exactly one of three experts left out per token


def test_general_knowledge_subtraction_and_experts_added_later(adapters):
    plain = arrow(peftkit, adapters)
    model = arrow(peftkit, adapters, use_gks=True)
    with torch.no_grad():
        model(input_ids=ids())
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    reference = plain.base_model.model.model.layers[1].self_attn.v_proj
    mean_a = (layer.lora_A["gks_0"].weight + layer.lora_A["gks_1"].weight) / 2
    torch.testing.assert_close(layer.lora_A["task_1"].weight, reference.lora_A["task_1"].weight - mean_a)
    before = logits = plain(input_ids=ids()).logits.detach()
    plain.load_adapter(adapters["general"][0], adapter_name="extra_expert")  # a fourth expert joins the routing
    with torch.no_grad():
        logits = plain(input_ids=ids()).logits
    assert not torch.allclose(logits, before, atol=1e-4)
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.lora_variant["arrow_router"].prototypes.shape[0] == 4


def test_refusals(adapters):
    model = arrow(peftkit, adapters)
    with pytest.raises(Exception, match="Cannot merge an active Arrow router adapter"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="at least one adapter path"):
        create_arrow_model(llama(), [], ArrowConfig())
    with pytest.raises(ValueError, match="general LoRA paths"):
        create_arrow_model(llama(), adapters["task"], ArrowConfig(use_gks=True))
    with pytest.raises(ConfigError, match="Invalid or unsupported variant combination"):
        get_peft_model(llama(), LoraConfig(target_modules=TARGETS, arrow_config=ArrowConfig(), use_dora=True))


@pytest.mark.parametrize("options", [{}, {"use_gks": True}, {"top_k": 1, "router_temperature": 0.5}])
def test_same_outputs_as_pefts_arrow_model(adapters, options):
    peft = pytest.importorskip("peft")
    batch = ids()
    with torch.no_grad():
        ours = arrow(peftkit, adapters, **options)(input_ids=batch).logits
        theirs = arrow(peft, adapters, **options)(input_ids=batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, llama()(input_ids=batch).logits, atol=1e-3)
