"""X-LoRA: the per-token mixture by hand, top-k and its softmax, layer-wise scalings, the classifier as
the only trained part, disable / save / load, generate, the refusals, and the same model and checkpoints
as peft both ways."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import peftkit
from peftkit import ConfigError, LoraConfig, PeftModel, get_peft_model
from peftkit.tuners.xlora.layer import layer_scalings
from tests.properties import training_losses
from tests.tiny_models import VOCAB, llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, str]:
    """Two saved LoRA experts with random (non-trivial) factors, named as peft names them."""
    folder = tmp_path_factory.mktemp("experts")
    for index in range(2):
        model = llama()  # (seeds itself)
        torch.manual_seed(20 + index)  # then a different random expert each
        get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(
            str(folder / str(index)))
    return {str(index): str(folder / str(index)) for index in range(2)}


def base():
    model = llama()
    model.config.use_cache = False
    return model


def xlora(lib, experts, seed: int = 0, **overrides):
    kwargs = dict(task_type="CAUSAL_LM", hidden_size=32, adapters=experts, xlora_depth=2, xlora_size=8,
                  xlora_dropout_p=0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return lib.get_peft_model(base(), lib.XLoraConfig(**kwargs)).eval()


def ids(shape=(2, 7), seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_config_matches_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(peftkit.XLoraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.XLoraConfig)}
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}
    with pytest.warns(UserWarning, match="`hidden_size`. This will be set to 4096"):
        assert peftkit.XLoraConfig(adapters={}).hidden_size == 4096
    with pytest.raises(ConfigError, match="depth must be strictly positive"):
        peftkit.XLoraConfig(hidden_size=8, adapters={}, xlora_depth=0)


def test_each_lora_layer_adds_its_experts_weighted_per_token(experts):
    model = xlora(peftkit, experts)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.lora_B["0"].weight, q.lora_B["1"].weight)  # two different experts
    records = []
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    handle = layer.register_forward_hook(lambda m, args, out: records.append((args[0].detach(), out.detach())))
    logits(model, ids())
    handle.remove()
    (x_base, y_base), (x, y) = records  # the scaling pass (base model), then the real pass
    torch.testing.assert_close(y_base, layer.base_layer(x_base))
    scalings = model.get_latest_scalings()
    assert scalings.shape == (2, 7, 4, 2)  # 4 LoRA layers, 2 experts; softmax over experts
    torch.testing.assert_close(scalings.sum(-1), torch.ones(2, 7, 4))
    expected = layer.base_layer(x)
    for e, name in enumerate(experts):
        delta = x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T * layer.scaling[name]
        expected = expected + scalings[:, :, 3, e : e + 1] * delta
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_top_k_and_its_softmax_keep_the_largest_scalings():
    config = peftkit.XLoraConfig(hidden_size=8, adapters={}, top_k_lora=1, enable_softmax_topk=True, enable_softmax=False)
    scalings = torch.tensor([[[[0.2, 0.7, 0.1]]]])
    chosen = layer_scalings(scalings, 0, config)
    torch.testing.assert_close(chosen, torch.tensor([[[0.0, 1.0, 0.0]]]))
    config.enable_softmax_topk, config.top_k_lora = False, 2
    torch.testing.assert_close(layer_scalings(scalings, 0, config), torch.tensor([[[0.2, 0.7, 0.0]]]))


def test_layerwise_scalings_differ_per_layer(experts):
    model = xlora(peftkit, experts, layerwise_scalings=True)
    logits(model, ids())
    scalings = model.get_latest_scalings()
    assert not torch.allclose(scalings[:, :, 0], scalings[:, :, 1])
    assert model.base_model.internal_xlora_classifier.layers[-1].out_features == 4 * 2


def test_only_the_classifier_trains_and_the_loss_goes_down(experts):
    model = xlora(peftkit, experts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("internal_xlora_classifier" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = ids((4, 8), seed=3)
    losses = training_losses(model, [{"input_ids": batch, "labels": batch}], steps=10, lr=5e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trainable_experts = xlora(peftkit, experts, use_trainable_adapters=True)
    assert any(".lora_A." in n for n, p in trainable_experts.named_parameters() if p.requires_grad)


def test_disable_save_load_and_generate(experts, tmp_path):
    model = xlora(peftkit, experts)
    batch = ids()
    expected = logits(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(base(), batch))
    assert not torch.allclose(expected, logits(base(), batch), atol=1e-3)
    model.save_pretrained(str(tmp_path))
    assert {"0", "1", "adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    # the experts come from the saved subfolders (a self-contained folder), or from `adapters=`
    for loaded in (PeftModel.from_pretrained(base(), str(tmp_path)),
                   PeftModel.from_pretrained(base(), str(tmp_path), adapters=experts)):
        torch.testing.assert_close(logits(loaded, batch), expected)
    out = model.generate(input_ids=batch[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)
    greedy = batch[:1]
    for _ in range(3):  # generate's every step routes through the classifier, as a plain forward does
        greedy = torch.cat([greedy, logits(model, greedy)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, greedy)


def test_refusals(experts):
    cached = llama()
    cached.config.use_cache = True
    with pytest.raises(ValueError, match="`use_cache` must be False"):
        get_peft_model(cached, peftkit.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=experts))
    model = xlora(peftkit, experts)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert type(unloaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(unloaded, ids()), logits(base(), ids()))


def test_same_model_as_peft_and_checkpoints_both_ways(experts, tmp_path):
    peft = pytest.importorskip("peft")
    ours, theirs = xlora(peftkit, experts), xlora(peft, experts)
    batch = ids()
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.get_latest_scalings(), theirs.get_latest_scalings())
    with torch.no_grad():  # a trained-looking classifier
        for param in ours.base_model.internal_xlora_classifier.parameters():
            param.add_(0.3 * torch.randn_like(param))
    expected = logits(ours, batch)
    ours.save_pretrained(str(tmp_path / "ours"))
    in_peft = peft.PeftModel.from_pretrained(base(), str(tmp_path / "ours"),
                                             adapters={n: str(tmp_path / "ours" / n) for n in experts})
    torch.testing.assert_close(logits(in_peft, batch), expected, atol=1e-5, rtol=0)

    theirs.save_pretrained(str(tmp_path / "theirs"))
    torch.manual_seed(5)  # peft leaves classifier layers out of its file (their keys hold an expert name, "0"):
    reference = peft.PeftModel.from_pretrained(base(), str(tmp_path / "theirs"), adapters=experts)
    torch.manual_seed(5)  # both libraries then keep the same freshly initialised values for them
    with pytest.warns(UserWarning, match="lacks classifier tensors"):
        loaded = PeftModel.from_pretrained(base(), str(tmp_path / "theirs"), adapters=experts)
    torch.testing.assert_close(logits(loaded, batch), logits(reference, batch), atol=1e-5, rtol=0)
