"""ShadowPEFT: config checks, the injection / update equations by hand, the auxiliary loss, the dual
KV cache (generate with and without cache agree), the standalone shadow network, refusals that leave
the model as it was, peft parity (same seed -> same adapter, logits, losses and generate; checkpoints
both ways) and the shared property suite on tiny Llama and GPT-2."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

from peftkit import ConfigError, PeftModel, ShadowConfig, get_peft_model
from peftkit.errors import NotMergeableError, TargetModulesError
from peftkit.tuners.shadow import DetachedShadowModel, ShadowCache, ShadowLayer
from tests import properties as prop
from tests.tiny_models import MODEL_FACTORIES, VOCAB, gpt2, llama, lm_inputs

NARROW = {"shadow_hidden_size": 16, "shadow_intermediate_size": 24, "shadow_num_attention_heads": 2}


def config_for(name: str = "llama", **overrides) -> ShadowConfig:
    """A non-trivial adapter (W_up random) without dropout, so eval and train outputs agree."""
    kwargs = dict(task_type="CAUSAL_LM", r=4, init_weights=False, shadow_dropout=0.0)
    kwargs.update(overrides)
    return ShadowConfig(**kwargs)


def llama_seq_cls() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, num_labels=3, pad_token_id=0, initializer_range=0.2)
    return LlamaForSequenceClassification(config).eval()


def cls_batch() -> dict:
    inputs = lm_inputs()
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0: pooling must find the last real token
    return {**inputs, "labels": torch.tensor([0, 2])}


# ---------------------------------------------------------------------------------------------- config
def test_fields_and_defaults_match_peft():
    peft = pytest.importorskip("peft")
    ours = {f.name: f.default for f in dataclasses.fields(ShadowConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.ShadowConfig)}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_type"} == {k: v for k, v in theirs.items() if k != "peft_type"}
    config = ShadowConfig()
    assert (config.r, config.shadow_alpha, config.shadow_dropout, config.auxiliary_loss_weight) == (8, 0.1, 0.2, 0.05)
    assert str(config.peft_type) == "SHADOW"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers_pattern": "layers"}, "layers_to_transform"),
        ({"target_modules": ".*layers.*", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"shadow_model": "some/model", "shadow_hidden_size": 8}, "shadow_hidden_size"),
        ({"r": 0}, "r"),
        ({"auxiliary_loss_weight": -1.0}, "auxiliary_loss_weight"),
        ({"shadow_dropout": 1.5}, "shadow_dropout"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShadowConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- the equations
def test_layer_computes_injection_and_gated_update_by_hand():
    model = get_peft_model(llama(), config_for())
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer, ShadowLayer)
    h, s = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    down, up = layer.shadow_down["default"].weight, layer.shadow_up["default"].weight
    expected = h + 0.1 * ((h - s) @ down.T @ up.T)
    prop.assert_close(layer.inject(h, s, "default"), expected)
    out = torch.randn(2, 3, 32)
    t, g = layer.shadow_update_transform["default"], layer.shadow_update_gate["default"]
    gate = torch.sigmoid(g[2](torch.nn.functional.gelu(g[0](out))))
    candidate = t[2](torch.nn.functional.gelu(t[0](out)))
    prop.assert_close(layer.advance(out, s, "default"), (1 - gate) * s + gate * candidate)


def test_default_targets_every_block_and_backbone_reads_base_embeddings():
    model = get_peft_model(llama(), config_for())
    assert model.peft_config["default"].target_modules == {"model.layers.0", "model.layers.1"}
    backbone = model.base_model.shadow_backbone["default"]
    assert isinstance(backbone, LlamaModel) and len(backbone.layers) == 1
    assert not hasattr(backbone, "embed_tokens"), "a same-width mirror is fed the frozen base embeddings"
    assert isinstance(model.base_model.shadow_projection["default"], torch.nn.Identity)
    narrow = get_peft_model(llama(), config_for(**NARROW))
    projection = narrow.base_model.shadow_projection["default"]
    assert projection.weight.shape == (32, 16) and projection.bias is None
    assert narrow.base_model.shadow_backbone["default"].embed_tokens.weight.shape == (VOCAB, 16)


def test_auxiliary_loss_is_added_with_its_weight():
    inputs = lm_inputs()
    torch.manual_seed(3)
    model = get_peft_model(llama(), config_for(auxiliary_loss_weight=0.5)).eval()
    output = model(**inputs)
    task = torch.nn.functional.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), inputs["labels"][:, 1:].reshape(-1))
    assert output.shadow_loss is not None and model.base_model.last_shadow_loss is output.shadow_loss
    prop.assert_close(output.loss, task + 0.5 * output.shadow_loss)
    torch.manual_seed(3)
    unweighted = get_peft_model(llama(), config_for(auxiliary_loss_weight=0.0)).eval()
    prop.assert_close(unweighted(**inputs).loss, task)


def test_standalone_shadow_network_computes_the_auxiliary_loss():
    inputs = lm_inputs()
    for overrides in ({}, NARROW):
        model = get_peft_model(llama(), config_for(**overrides)).eval()
        shadow_loss = model(**inputs).shadow_loss
        for copy in (False, True):
            detached = model.unload_shadow(copy=copy)
            assert isinstance(detached, DetachedShadowModel)
            prop.assert_close(detached(**inputs).loss, shadow_loss)
        assert len(list(model.base_model.model.model.layers[0].shadow_down)) == 1, "unload_shadow leaves the model as it was"


def test_standalone_shadow_network_saves_and_generates(tmp_path):
    model = get_peft_model(llama(), config_for()).eval()
    detached = model.unload_shadow(copy=True)
    ids = lm_inputs()["input_ids"]
    cached = detached.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    uncached = detached.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 10)
    detached.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any("embed_tokens" in key for key in saved), "copy=True gives the backbone its own embedding table"


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("make_model", [llama, gpt2], ids=["llama", "gpt2"])
def test_generate_with_dual_cache_equals_generate_without_cache(make_model):
    model = get_peft_model(make_model(), config_for(**(NARROW if make_model is llama else {}))).eval()
    inputs = lm_inputs()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False)
    with_cache = model.generate(**kwargs)
    without = model.generate(**kwargs, use_cache=False)
    assert torch.equal(with_cache, without)
    with model.disable_adapter():
        base = model.generate(**kwargs)
    assert not torch.equal(base, with_cache), "the adapter must change the generation for the check to mean anything"


def test_forward_with_cache_returns_a_shadow_cache():
    model = get_peft_model(llama(), config_for()).eval()
    ids = lm_inputs()["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, ShadowCache) and cache.get_seq_length() == 5 and cache.shadow.get_seq_length() == 5
        step = model(input_ids=ids[:, 5:], past_key_values=cache, use_cache=True)
        full = model(input_ids=ids, use_cache=False)
    prop.assert_close(step.logits, full.logits[:, 5:], atol=1e-5)


def test_inputs_embeds_feed_a_sharing_backbone_and_a_narrow_one_asks_for_ids():
    inputs = lm_inputs()
    model = get_peft_model(llama(), config_for()).eval()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        by_ids = model(input_ids=inputs["input_ids"]).logits
        by_embeds = model(inputs_embeds=embeds).logits
    prop.assert_close(by_embeds, by_ids)
    narrow = get_peft_model(llama(), config_for(**NARROW)).eval()
    with pytest.raises(ValueError, match="pass `input_ids`"):
        narrow(inputs_embeds=embeds)


def test_inject_adapter_in_model_runs_the_shadow_path():
    from peftkit import inject_adapter_in_model

    inputs = lm_inputs()
    torch.manual_seed(2)
    expected = prop.output_of(get_peft_model(llama(), config_for()), inputs)
    torch.manual_seed(2)
    injected = inject_adapter_in_model(config_for(), llama())
    prop.assert_close(prop.output_of(injected, inputs), expected, atol=0)


# ---------------------------------------------------------------------------------------------- refusals
def _unchanged(model) -> None:
    assert not any(isinstance(m, ShadowLayer) for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize(
    "overrides",
    [{"layers_to_transform": [0, 2], "layers_pattern": "layers"}, {"target_modules": ["q_proj"]}],
    ids=["gap", "linear"],
)
def test_targets_that_are_not_consecutive_blocks_are_refused_before_any_change(overrides):
    torch.manual_seed(0)
    base = llama()
    base.model.layers.append(type(base.model.layers[0])(base.config, 2))
    base.config.num_hidden_layers = 3
    with pytest.raises(TargetModulesError, match="consecutive"):
        get_peft_model(base, config_for(**overrides))
    _unchanged(base)


def test_layers_to_transform_picks_blocks_of_the_default_targets():
    """peft 0.21.2 wraps every block here (exact target names skip its layer filter); peftkit wraps the ones asked for."""
    model = get_peft_model(llama(), config_for(layers_to_transform=[1], layers_pattern="layers"))
    wrapped = [name for name, module in model.named_modules() if isinstance(module, ShadowLayer)]
    assert wrapped == ["base_model.model.model.layers.1"]
    inputs = lm_inputs()
    with model.disable_adapter():
        base = prop.output_of(model, inputs)
    prop.assert_differs(prop.output_of(model, inputs), base)


def test_merge_is_refused_and_unload_restores_the_base():
    inputs = lm_inputs()
    expected = prop.output_of(llama(), inputs)
    model = get_peft_model(llama(), config_for())
    adapted = prop.output_of(model, inputs)
    with pytest.raises(NotMergeableError, match="cannot be merged") as error:
        model.merge_and_unload()
    assert isinstance(error.value, NotImplementedError)
    with pytest.raises(NotImplementedError):
        model.merge_adapter()
    prop.assert_close(prop.output_of(model, inputs), adapted)
    base = model.unload()
    _unchanged(base)
    prop.assert_close(prop.output_of(base, inputs), expected)


def test_one_active_adapter_and_no_second_classification_adapter():
    model = get_peft_model(llama(), config_for())
    model.add_adapter("other", config_for(r=2))
    with pytest.raises(ValueError, match="exactly one active adapter"):
        model.base_model.set_adapter(["default", "other"])
    classifier = get_peft_model(llama_seq_cls(), config_for(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="sequence classification"):
        classifier.add_adapter("other", config_for(task_type="SEQ_CLS"))
    assert set(classifier.base_model.shadow_backbone) == {"default"}, "the refused adapter left nothing behind"


def test_delete_adapter_drops_its_backbone_and_the_other_keeps_working():
    inputs = lm_inputs()
    torch.manual_seed(5)
    alone = get_peft_model(llama(), config_for())
    expected = prop.output_of(alone, inputs)
    model = get_peft_model(llama(), config_for(), adapter_name="first")
    model.add_adapter("second", config_for(r=2))
    prop._copy_adapter(alone, model, "default", "first")
    model.set_adapter("second")
    model.delete_adapter("second")
    assert set(model.base_model.shadow_backbone) == {"first"} and model.active_adapter == "first"
    prop.assert_close(prop.output_of(model, inputs), expected)


# ---------------------------------------------------------------------------------------------- training
def test_pretrained_backbone_loads_from_a_folder_with_frozen_embeddings(tmp_path):
    torch.manual_seed(7)
    small = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=VOCAB))
    small.save_pretrained(tmp_path)
    model = get_peft_model(llama(), config_for(shadow_model=str(tmp_path)))
    backbone = model.base_model.shadow_backbone["default"]
    assert torch.equal(backbone.layers[0].mlp.up_proj.weight, small.layers[0].mlp.up_proj.weight)
    assert not backbone.embed_tokens.weight.requires_grad and backbone.layers[0].mlp.up_proj.weight.requires_grad
    assert model.base_model.shadow_projection["default"].weight.shape == (32, 16)


def test_projected_backbone_checkpoint_brings_its_trained_projection(tmp_path):
    """The "causal_lm_with_hidden_projection" layout: `shadow_model.*` backbone tensors plus the projection."""
    from safetensors.torch import save_file

    torch.manual_seed(8)
    inner = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=VOCAB)
    small = LlamaModel(inner)
    projection = torch.randn(32, 16)
    tensors = {f"shadow_model.{k}": v.contiguous() for k, v in small.state_dict().items()}
    save_file({**tensors, "shadow_hidden_projection.weight": projection}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "causal_lm_with_hidden_projection", "shadow_model_config": inner.to_dict()}))
    model = get_peft_model(llama(), config_for(shadow_model=str(tmp_path)))
    assert torch.equal(model.base_model.shadow_projection["default"].weight, projection)
    backbone = model.base_model.shadow_backbone["default"]
    assert torch.equal(backbone.layers[0].self_attn.q_proj.weight, small.layers[0].self_attn.q_proj.weight)
    (tmp_path / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="shadow_hidden_projection.weight"):
        get_peft_model(llama(), config_for(shadow_model=str(tmp_path)))


def test_activation_checkpointing_gives_the_same_gradients():
    inputs = lm_inputs()

    def grads(checkpointing: bool) -> dict:
        torch.manual_seed(4)
        model = get_peft_model(llama(), config_for())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**inputs).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and any("shadow_backbone" in n for n in plain)
    unused = {n for n, g in plain.items() if g is None}
    assert unused == {n for n, g in checkpointed.items() if g is None}
    assert all(".layers.1.shadow_update" in n for n in unused), "only the last block's update is unused"
    for name in plain.keys() - unused:
        prop.assert_close(checkpointed[name], plain[name], atol=1e-5)


def test_sequence_classification_trains_a_copy_of_the_classifier():
    model = get_peft_model(llama_seq_cls(), config_for(task_type="SEQ_CLS"))
    head = model.base_model.shadow_head["default"]
    assert head is not model.base_model.model.score and head.weight.requires_grad
    output = model(**cls_batch())
    assert output.shadow_loss is not None
    losses = prop.training_losses(model, [cls_batch()], steps=15, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------------------------------------- peft parity
def _pair(make_model, config: ShadowConfig, seed: int = 1):
    peft = pytest.importorskip("peft")
    theirs_base = make_model()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(theirs_base, _peft_config(peft, config))
    ours_base = make_model()
    torch.manual_seed(seed)
    ours = get_peft_model(ours_base, config)
    return peft, theirs.eval(), ours.eval()


def _peft_config(peft, config: ShadowConfig):
    fields = {f.name for f in dataclasses.fields(peft.ShadowConfig)} - {"peft_type"}
    values = {name: getattr(config, name) for name in fields}
    values["task_type"] = str(config.task_type) if config.task_type is not None else None
    return peft.ShadowConfig(**values)


PARITY = [("llama", llama, {}, lm_inputs), ("llama-narrow", llama, NARROW, lm_inputs), ("gpt2", gpt2, {}, lm_inputs),
          ("seq-cls", llama_seq_cls, {"task_type": "SEQ_CLS"}, cls_batch)]


@pytest.mark.parametrize("name, make_model, overrides, make_inputs", PARITY, ids=[p[0] for p in PARITY])
def test_same_seed_gives_peft_adapter_outputs_and_losses(name, make_model, overrides, make_inputs):
    _, theirs, ours = _pair(make_model, config_for(**overrides))
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert their_params.keys() == our_params.keys()
    assert all(torch.equal(their_params[k], our_params[k]) for k in their_params)
    assert {k for k, p in their_params.items() if p.requires_grad} == {k for k, p in our_params.items() if p.requires_grad}
    inputs = make_inputs()
    their_out, our_out = theirs(**inputs), ours(**inputs)
    prop.assert_close(our_out.logits, their_out.logits, atol=1e-6)
    prop.assert_close(our_out.loss, their_out.loss, atol=1e-6)
    prop.assert_close(our_out.shadow_loss, their_out.shadow_loss, atol=1e-6)


@pytest.mark.parametrize("make_model", [llama, gpt2], ids=["llama", "gpt2"])
def test_generate_matches_peft(make_model):
    from peftkit.utils.hf_compat import cache_argument

    _, theirs, ours = _pair(make_model, config_for(**(NARROW if make_model is llama else {})))
    if cache_argument(ours.get_base_model()) == "cache":
        pytest.skip("peft 0.21.2 unpacks its ShadowCache from `past_key_values` only; transformers >= 5.24 passes `cache`")
    inputs = lm_inputs()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**kwargs), theirs.generate(**kwargs))


@pytest.mark.parametrize("name, make_model, overrides, make_inputs", PARITY, ids=[p[0] for p in PARITY])
def test_checkpoints_load_both_ways_with_the_same_logits(name, make_model, overrides, make_inputs, tmp_path):
    peft, theirs, ours = _pair(make_model, config_for(**overrides))
    torch.manual_seed(9)
    for module in (theirs, ours):  # different adapters, so each direction is a real transfer
        with torch.no_grad():
            for param in module.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
    inputs = make_inputs()
    their_logits, our_logits = theirs(**inputs).logits, ours(**inputs).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert load_file(str(tmp_path / "peft/adapter_model.safetensors")).keys() == load_file(
        str(tmp_path / "ours/adapter_model.safetensors")).keys()
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert saved["peft_type"] == "SHADOW" and saved["r"] == 4
    loaded_ours = PeftModel.from_pretrained(make_model(), str(tmp_path / "peft")).eval()
    prop.assert_close(loaded_ours(**inputs).logits, their_logits, atol=1e-6)
    loaded_theirs = peft.PeftModel.from_pretrained(make_model(), str(tmp_path / "ours")).eval()
    prop.assert_close(loaded_theirs(**inputs).logits, our_logits, atol=1e-6)


def test_low_cpu_mem_usage_load_gives_the_same_logits(tmp_path):
    inputs = lm_inputs()
    model = get_peft_model(llama(), config_for(**NARROW))
    expected = prop.output_of(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path), low_cpu_mem_usage=True)
    prop.assert_close(prop.output_of(loaded, inputs), expected, atol=0)


# ---------------------------------------------------------------------------------------------- properties
@pytest.fixture(params=["llama", "gpt2"])
def case(request):
    return request.param, MODEL_FACTORIES[request.param]


globals().update(prop.property_tests(
    config_for,
    second=lambda name: {"r": 2},
    mergeable=False,
))


# ---------------------------------------------------------------------------------------------- training stack
def test_trainer_saves_adapter_only_checkpoints_that_reload_and_resume(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (16, 8), generator=generator).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 16, "labels": ids})

    def args(steps: int) -> TrainingArguments:
        return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, save_steps=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100)

    model = get_peft_model(llama(), config_for())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "shadow_backbone" in n}
    Trainer(model=model, args=args(2), train_dataset=data).train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before), "backbone trained"
    files = set((tmp_path / "checkpoint-2").iterdir())
    names = {f.name for f in files}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    keys = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors")).keys()
    assert any(k.startswith("base_model.shadow_backbone.default.") for k in keys) and all("shadow_" in k for k in keys)
    inputs = lm_inputs()
    reloaded = PeftModel.from_pretrained(llama(), str(tmp_path / "checkpoint-2"))
    prop.assert_close(prop.output_of(reloaded, inputs), prop.output_of(model, inputs), atol=1e-6)
    resumed = Trainer(model=get_peft_model(llama(), config_for()), args=args(3), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_cli_inspect_checks_a_shadow_folder(tmp_path):
    """The backbone's tensors sit on the tuner (`base_model.shadow_backbone...`), on no target module."""
    from peftkit.cli.adapter_files import read_adapter
    from peftkit.cli.inspect import check, describe

    get_peft_model(llama(), config_for(**NARROW)).save_pretrained(tmp_path)
    adapter = read_adapter(str(tmp_path))
    assert describe(adapter)["modules_with_weights"] == 2
    assert check(adapter) == []
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["model.layers.0"]}))
    problems = check(read_adapter(str(tmp_path)))
    assert problems and all("model.layers.1" in p and "matches no target_modules" in p for p in problems)
