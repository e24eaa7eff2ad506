"""The property suite every layer-wrapping method must pass, written once and reused per method.

Each check takes a factory for a fresh base model, its inputs, and a config whose adapter is a
non-trivial function (e.g. LoRA with `init_lora_weights=False`), and asserts a property that
fails if the method breaks it: merged == unmerged, disabled == base, save -> load identical, only
adapter parameters train, adapters switch, a short training run lowers the loss.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from peftkit import PeftModel, get_peft_model

ATOL = 1e-5


def output_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The main output tensor (logits) of a forward pass in eval mode without grad."""
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert torch.allclose(a, b, atol=atol), f"max abs diff {float((a - b).abs().max()):.3g} > {atol}"


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert not torch.allclose(a, b, atol=ATOL), "the adapter did not change the output; the check would be vacuous"


def check_merge_equals_unmerged(make_model: Callable, inputs: dict, config) -> None:
    model = get_peft_model(make_model(), config)
    unmerged = output_of(model, inputs)
    assert_differs(unmerged, output_of(make_model(), inputs))
    model.merge_adapter()
    assert_close(output_of(model, inputs), unmerged)
    merged_model = model.merge_and_unload()
    assert not isinstance(merged_model, PeftModel)
    assert_close(output_of(merged_model, inputs), unmerged)


def check_merge_unmerge_restores_weights(make_model: Callable, config) -> None:
    base_state = {k: v.clone() for k, v in make_model().state_dict().items()}
    model = get_peft_model(make_model(), config)
    model.merge_adapter()
    changed = [k for k, v in model.unload().state_dict().items() if k in base_state and not torch.allclose(v, base_state[k], atol=1e-6)]
    assert not changed, f"unload() must unmerge first; changed: {changed[:3]}"
    model = get_peft_model(make_model(), config)
    originals = {name: layer.get_base_layer().weight.detach().clone() for name, layer in model.base_model.tuner_layers()}
    model.merge_adapter()
    merged = {name: layer.get_base_layer().weight for name, layer in model.base_model.tuner_layers()}
    assert any(not torch.equal(merged[name], originals[name]) for name in originals), "merge changed nothing"
    model.unmerge_adapter()
    for name, layer in model.base_model.tuner_layers():
        assert torch.allclose(layer.get_base_layer().weight, originals[name], atol=1e-6), name


def check_disable_gives_base(make_model: Callable, inputs: dict, config) -> None:
    base_out = output_of(make_model(), inputs)
    model = get_peft_model(make_model(), config)
    adapted = output_of(model, inputs)
    assert_differs(adapted, base_out)
    with model.disable_adapter():
        assert_close(output_of(model, inputs), base_out)
    assert_close(output_of(model, inputs), adapted)


def check_save_load_roundtrip(make_model: Callable, inputs: dict, config, tmp_path) -> None:
    model = get_peft_model(make_model(), config)
    expected = output_of(model, inputs)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path))
    assert_close(output_of(loaded, inputs), expected, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference-mode load must freeze everything"
    trainable = PeftModel.from_pretrained(make_model(), str(tmp_path), is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def check_only_adapter_params_train(make_model: Callable, inputs: dict, config) -> None:
    model = get_peft_model(make_model(), config)
    model.train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable, "no trainable parameters"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs).loss.backward()
    optimizer.step()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed, "an optimizer step changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    allowed = _adapter_param_ids(model)
    params = dict(model.named_parameters())
    assert all(id(params[name]) in allowed for name in changed), sorted(n for n in changed if id(params[n]) not in allowed)[:5]


def _adapter_param_ids(model: PeftModel) -> set[int]:
    """Parameters an adapter may train: adapter tensors, modules_to_save copies, opted-in biases, and
    the tensors the tuner holds itself, outside the wrapped model (e.g. ShadowPEFT's backbone)."""
    from peftkit.tuners._core import ModulesToSaveWrapper

    allowed = {id(p) for _, layer in model.base_model.tuner_layers() for p in layer.adapter_params()}
    in_model = {id(p) for p in model.base_model.model.parameters()}
    allowed |= {id(p) for p in model.base_model.parameters() if id(p) not in in_model}
    for _, module in model.base_model.adapter_modules():
        if isinstance(module, ModulesToSaveWrapper):
            allowed |= {id(p) for p in module.modules_to_save.parameters()}
    allowed |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    return allowed


def check_adapters_switch(make_model: Callable, inputs: dict, config_a, config_b) -> None:
    torch.manual_seed(1)
    only_a = get_peft_model(make_model(), config_a)
    out_a = output_of(only_a, inputs)
    torch.manual_seed(2)
    only_b = get_peft_model(make_model(), config_b)
    out_b = output_of(only_b, inputs)
    both = get_peft_model(make_model(), config_a, adapter_name="first")
    both.add_adapter("second", config_b)
    _copy_adapter(only_a, both, "default", "first")
    _copy_adapter(only_b, both, "default", "second")
    assert both.active_adapter == "first"
    assert_close(output_of(both, inputs), out_a)
    both.set_adapter("second")
    assert_close(output_of(both, inputs), out_b)
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable and all(".first" not in n for n in trainable), "the inactive adapter must be frozen"
    both.delete_adapter("second")
    assert both.active_adapter == "first"
    assert_close(output_of(both, inputs), out_a)


def _copy_adapter(source: PeftModel, target: PeftModel, source_name: str, target_name: str) -> None:
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(source, adapter_name=source_name)
    result = set_peft_model_state_dict(target, state, adapter_name=target_name)
    assert not result.missing_keys and not result.unexpected_keys, result


def training_losses(model: nn.Module, batches: list, steps: int, lr: float = 1e-2) -> list[float]:
    """The loss of each of `steps` AdamW steps on the trainable parameters, cycling through `batches`."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def check_training_lowers_loss(make_model: Callable, inputs: dict, config, steps: int = 20, lr: float = 1e-2) -> None:
    losses = training_losses(get_peft_model(make_model(), config), [inputs], steps, lr)
    assert losses[-1] < 0.95 * losses[0], f"loss did not fall enough: {losses[0]:.4f} -> {losses[-1]:.4f}"


def fresh_adapter_is_noop(make_model: Callable, inputs: dict, config) -> None:
    base_out = output_of(make_model(), inputs)
    assert_close(output_of(get_peft_model(make_model(), config), inputs), base_out)


def deepcopy_config(config):
    return copy.deepcopy(config)


# ------------------------------------------------------------------------ the suite of a method's test file
def _variants(overrides: tuple) -> Callable:
    """Parametrize a generated test over `overrides` (one dict of config overrides per case), if more than one."""
    def decorate(test: Callable) -> Callable:
        if len(overrides) == 1:
            return _bind(test, overrides[0])
        ids = [",".join(f"{k}={v}" for k, v in o.items()) or "default" for o in overrides]
        return pytest.mark.parametrize("overrides", list(overrides), ids=ids)(test)
    return decorate


def _bind(test: Callable, overrides: dict) -> Callable:
    """`test` with its `overrides` argument fixed (pytest then sees only the fixtures)."""
    def bound(case, tmp_path):
        return test(case, tmp_path, overrides)
    bound.__name__ = test.__name__
    return bound


def property_tests(
    config_for: Callable[..., Any],
    *,
    second: Optional[Callable[[str], dict]],
    fresh: tuple = ({"init_weights": True},),
    merge: tuple = ({},),
    restore: tuple = ({},),
    disable: tuple = ({},),
    roundtrip: tuple = ({},),
    only_adapter: tuple = ({},),
    train: tuple = ({"init_weights": True},),
    lr: float = 5e-2,
    mergeable: bool = True,
    leave_out: tuple[str, ...] = (),
) -> dict[str, Callable]:
    """The shared properties as test functions for a method's test file, which defines the `case` fixture
    ((model name, TinyCase)) and `config_for(name, **overrides)`:

        globals().update(prop.property_tests(config_for, second=lambda name: {"r": 2, ...}))

    Each tuple holds one dict of config overrides per variant of that test; `second(name)` gives the
    overrides of the second adapter for the switch test (None: not tested); `mergeable=False` leaves the
    merge properties out; `leave_out` names generated tests the file writes itself (or that do not apply).
    """
    def config(case, overrides):
        name, tiny = case
        return tiny, config_for(name, **overrides)

    def test_fresh_adapter_is_noop(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        fresh_adapter_is_noop(tiny.make_model, tiny.make_inputs(), cfg)

    def test_merge_equals_unmerged(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_merge_equals_unmerged(tiny.make_model, tiny.make_inputs(), cfg)

    def test_merge_unmerge_restores_weights(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_merge_unmerge_restores_weights(tiny.make_model, cfg)

    def test_disable_gives_base(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_disable_gives_base(tiny.make_model, tiny.make_inputs(), cfg)

    def test_save_load_roundtrip(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_save_load_roundtrip(tiny.make_model, tiny.make_inputs(), cfg, tmp_path)

    def test_only_adapter_params_train(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_only_adapter_params_train(tiny.make_model, tiny.make_inputs(), cfg)

    def test_adapters_switch(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_adapters_switch(tiny.make_model, tiny.make_inputs(), cfg, config_for(case[0], **second(case[0])))

    def test_training_lowers_loss(case, tmp_path, overrides):
        tiny, cfg = config(case, overrides)
        check_training_lowers_loss(tiny.make_model, tiny.make_inputs(), cfg, lr=lr)

    plan = [(test_fresh_adapter_is_noop, fresh), (test_disable_gives_base, disable),
            (test_save_load_roundtrip, roundtrip), (test_only_adapter_params_train, only_adapter),
            (test_training_lowers_loss, train)]
    if mergeable:
        plan += [(test_merge_equals_unmerged, merge), (test_merge_unmerge_restores_weights, restore)]
    if second is not None:
        plan.append((test_adapters_switch, ({},)))
    return {test.__name__: _variants(variants)(test) for test, variants in plan if test.__name__ not in leave_out}


def check_generate_equals_greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> None:
    """Greedy `generate` (no eos stop) gives the tokens of feeding the argmax back by hand, one step at a time."""
    model.generation_config.eos_token_id = None
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False)
    by_hand = ids
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=by_hand, attention_mask=torch.ones_like(by_hand)).logits
        by_hand = torch.cat((by_hand, logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(generated, by_hand)
