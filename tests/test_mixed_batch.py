"""Mixed-adapter batches: each row with its own adapter equals running that adapter alone."""

from __future__ import annotations

import pytest
import torch

from peftkit import AdapterNameError, AdapterStateError, LoraConfig, get_peft_model
from tests.properties import assert_close, output_of
from tests.tiny_models import bert_seq_cls, cls_inputs, llama

NAMES = ["default", "big", "__base__", "small", "big", "default"]


def _config(**kw) -> LoraConfig:
    return LoraConfig(**{"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "init_lora_weights": False, **kw})


def _model():
    torch.manual_seed(0)
    model = get_peft_model(llama(), _config(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    model.add_adapter("big", _config(r=8, lora_alpha=4, lora_dropout=0.1))
    model.add_adapter("small", _config(r=2, lora_alpha=6, use_rslora=True, target_modules=["q_proj"]))
    return model.eval()


def _inputs(rows: int = len(NAMES)) -> dict:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 96, (rows, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _single(model, name: str, inputs: dict) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return output_of(model, inputs)
    model.set_adapter(name)
    return output_of(model, inputs)


def test_mixed_forward_equals_each_adapter_alone():
    model, inputs = _model(), _inputs()
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        single = _single(model, name, {k: v[row : row + 1] for k, v in inputs.items()})
        assert_close(mixed[row : row + 1], single)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3), "different adapters must give different rows"


def test_mixed_generate_equals_each_adapter_alone():
    model, inputs = _model(), _inputs(4)
    names = ["big", "__base__", "default", "small"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        row_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                expected = model.generate(**row_inputs, **kwargs)
        else:
            model.set_adapter(name)
            expected = model.generate(**row_inputs, **kwargs)
        produced = expected.shape[1]  # a row that met EOS early is padded in the batch
        assert torch.equal(mixed[row : row + 1, :produced], expected), name
        assert (mixed[row, produced:] == 0).all(), name


def test_rows_repeated_by_generate_keep_their_adapter():
    model, inputs = _model(), _inputs(2)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, num_beams=2, num_return_sequences=2)
    mixed = model.generate(**inputs, adapter_names=["big", "small"], **kwargs)
    model.set_adapter("small")
    expected = model.generate(**{k: v[1:] for k, v in inputs.items()}, **kwargs)
    assert torch.equal(mixed[2:], expected)


def test_mixed_seq_cls_uses_each_adapters_classifier():
    torch.manual_seed(0)
    model = get_peft_model(bert_seq_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(task_type="SEQ_CLS", target_modules=["value"], init_lora_weights=False))
    with torch.no_grad():
        for param in model.base_model.model.classifier.modules_to_save["other"].parameters():
            param.add_(torch.randn_like(param))
    inputs = cls_inputs()
    inputs.pop("labels")
    names = ["other", "default"]
    with torch.no_grad():
        mixed = model.eval()(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        assert_close(mixed[row : row + 1], _single(model, name, {k: v[row : row + 1] for k, v in inputs.items()}))


def test_mixed_batch_trains_every_adapter_present():
    model = _model().train()
    model.base_model.set_adapter(["default", "big", "small"])  # make all three trainable
    model(**_inputs(), labels=_inputs()["input_ids"], adapter_names=NAMES).loss.backward()
    for name in ("default", "big", "small"):
        grads = [p.grad for n, p in model.named_parameters() if f"lora_A.{name}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_cached_stack_follows_weight_updates():
    model, inputs = _model(), _inputs()
    with torch.no_grad():
        before = model(**inputs, adapter_names=NAMES).logits
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["big"].weight.mul_(3)
        after = model(**inputs, adapter_names=NAMES).logits
    assert not torch.allclose(before[1], after[1]) and torch.allclose(before[2], after[2])


def test_bad_adapter_names():
    model, inputs = _model(), _inputs()
    with pytest.raises(AdapterNameError, match="unknown adapters \\['nope'\\]"):
        model(**inputs, adapter_names=["nope"] * 6)
    with pytest.raises(AdapterStateError, match="one name per row"):
        model(**inputs, adapter_names=["default"] * 4)
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="merged"):
        model(**inputs, adapter_names=NAMES)


def test_adapter_modules_walk_lists_the_outermost_wrappers_in_module_order():
    """The pruned walk (it skips the wrappers' own adapter dicts) lists what a full walk lists."""
    from peftkit.tuners._core.layer import BaseTunerLayer
    from peftkit.tuners._core.modules_to_save import ModulesToSaveWrapper

    model = get_peft_model(llama(), _config(r=4, modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    model.add_adapter("other", _config(r=2))
    full = [(name, module) for name, module in model.base_model.model.named_modules()
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))]
    walked = list(model.base_model.adapter_modules())
    assert [name for name, _ in walked] == [name for name, _ in full]
    assert all(a is b for (_, a), (_, b) in zip(walked, full))
    assert any(isinstance(m, ModulesToSaveWrapper) for _, m in walked) and len(walked) > 4


def test_batch_of_one_adapter_runs_that_adapters_fused_forward_while_another_is_active(monkeypatch):
    """Every row on "big" (while "default" is the active adapter): the fused single-adapter call, same output."""
    from peftkit.tuners.lora import layer as lora_layer

    model, inputs = _model(), _inputs(3)
    model.set_adapter("default")
    calls = []
    fused = lora_layer.lora_linear
    monkeypatch.setattr(lora_layer, "lora_linear", lambda *a, **k: calls.append(a[3]) or fused(*a, **k))
    with torch.no_grad():
        out = model(**inputs, adapter_names=["big"] * 3).logits
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert any(weight_a is q_proj.lora_A["big"].weight for weight_a in calls)
        assert not any(weight_a is q_proj.lora_A["default"].weight for weight_a in calls)
        assert_close(out, _single(model, "big", inputs))
