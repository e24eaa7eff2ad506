"""Every built-in method that peft also has: the same top-level names, config fields and defaults.

Code written for peft constructs configs by keyword and reads their fields; a field peft has and we
lack, or a different default, silently changes what that code trains. The check runs over the
registry, so a new method folder is covered as soon as it exists. peft is a test-only dependency.
"""

from __future__ import annotations

import dataclasses

import pytest

import peftkit
from peftkit.registry import registered_methods

peft = pytest.importorskip("peft")

#: peftkit-only methods (no peft counterpart to compare with).
PEFTKIT_ONLY = {"BOTTLENECK"}
SPECS = sorted((s for s in registered_methods() if s.peft_type not in PEFTKIT_ONLY), key=lambda s: s.peft_type)


def _peft_config_cls(peft_type: str) -> type:
    return peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(peft_type)]


def _defaults(cls: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.peft_type)
def test_config_has_peft_fields_and_defaults(spec):
    theirs = _peft_config_cls(spec.peft_type)
    ours = spec.config_cls
    assert ours.__name__ == theirs.__name__
    missing = sorted({f.name for f in dataclasses.fields(theirs)} - {f.name for f in dataclasses.fields(ours)})
    assert not missing, f"{ours.__name__} lacks peft's fields {missing}"
    our_defaults, their_defaults = _defaults(ours), _defaults(theirs)
    differ = {
        name: (our_defaults.get(name), value)
        for name, value in their_defaults.items()
        if name not in ("peft_type", "revision", "peft_version")
        and str(getattr(our_defaults.get(name), "value", our_defaults.get(name))) != str(getattr(value, "value", value))
    }
    assert not differ, f"{ours.__name__} defaults (ours, peft's) differ: {differ}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.peft_type)
def test_top_level_names_match_peft(spec):
    config_name = spec.config_cls.__name__
    assert getattr(peftkit, config_name) is spec.config_cls
    model_name = _peft_config_cls(spec.peft_type).__name__.replace("Config", "Model")
    if hasattr(peft, model_name):
        assert getattr(peftkit, model_name) is spec.tuner_cls
    assert config_name in dir(peftkit)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.peft_type)
def test_shared_state_methods_are_flagged_as_in_peft(spec):
    """peft refuses `inject_adapter_in_model` for tuners that keep adapter tensors on themselves."""
    theirs = peft.PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType(spec.peft_type)]
    assert spec.tuner_cls.uses_shared_state == getattr(theirs, "uses_shared_state", False)
    if spec.tuner_cls.uses_shared_state:
        from tests.tiny_models import llama

        config = spec.config_cls(target_modules=["q_proj", "v_proj"])
        with pytest.raises(ValueError, match="does not support .* because it uses shared state"):
            peftkit.inject_adapter_in_model(config, llama())
