"""The registry is the one place a method is known outside its folder: specs, lazy lookup, explicit registration.

Every built-in method declares `METHOD = MethodSpec(...)` in `peftkit/tuners/<peft_type.lower()>/__init__.py`;
the CLI, `peftkit inspect`, the FSDP wrap policy and `PeftModel` read what they need from there, and
each declared capability is checked against what the method actually does.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit import (
    AdaLoraConfig,
    BottleneckConfig,
    ConfigError,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    LoraModel,
    PeftkitError,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit import registry
from peftkit.checkpoint.state_dict import get_peft_model_state_dict
from peftkit.registry import CAPABILITIES, MethodSpec, method_spec, register_method, registered_methods
from tests import properties as prop
from tests.tiny_models import llama, lm_inputs

SRC = pathlib.Path(peftkit.__file__).parent
ATTENTION = ["q_proj", "v_proj"]

#: A small, non-trivial adapter (random init) of every built-in method on the tiny Llama.
CONFIGS = {
    "LORA": lambda: LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False),
    "ADALORA": lambda: AdaLoraConfig(init_r=4, target_r=2, lora_alpha=0.5, target_modules=ATTENTION,
                                     init_lora_weights=False, total_step=10),
    "IA3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "LOHA": lambda: LoHaConfig(r=2, alpha=4, target_modules=ATTENTION, init_weights=False),
    "LOKR": lambda: LoKrConfig(r=2, alpha=4, target_modules=ATTENTION, init_weights=False),
    "BOTTLENECK": lambda: BottleneckConfig(),
    "PROMPT_TUNING": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    "PREFIX_TUNING": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    "P_TUNING": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=16),
    "MULTITASK_PROMPT_TUNING": lambda: peftkit.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_tasks=2),
    "CPT": lambda: peftkit.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7], cpt_tokens_type_mask=[1, 2, 4]),
    "CARTRIDGE": lambda: peftkit.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
    "OFT": lambda: peftkit.OFTConfig(oft_block_size=8, target_modules=ATTENTION, init_weights=False),
    "BOFT": lambda: peftkit.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False,
                                       target_modules=ATTENTION),
    "HRA": lambda: peftkit.HRAConfig(r=4, init_weights=False, target_modules=ATTENTION),
    "ROAD": lambda: peftkit.RoadConfig(target_modules=ATTENTION, group_size=8, variant="road_2", init_weights=False),
    "PSOFT": lambda: peftkit.PsoftConfig(target_modules=ATTENTION, r=4, psoft_alpha=8, init_weights=False),
    "VERA": lambda: peftkit.VeraConfig(r=8, target_modules=ATTENTION, init_weights=False),
    "PVERA": lambda: peftkit.PveraConfig(r=8, target_modules=ATTENTION, init_weights=False),
    "TINYLORA": lambda: peftkit.TinyLoraConfig(r=2, u=8, init_weights="uniform", init_v_bound=0.5, target_modules=ATTENTION),
    "C3A": lambda: peftkit.C3AConfig(block_size=16, target_modules=ATTENTION),
    "FOURIERFT": lambda: peftkit.FourierFTConfig(n_frequency=50, scaling=100.0, target_modules=ATTENTION),
    "WAVEFT": lambda: peftkit.WaveFTConfig(n_frequency=50, scaling=100.0, init_weights=False, wavelet_family="sym2",
                                           target_modules=ATTENTION),
    "HIRA": lambda: peftkit.HiraConfig(r=2, target_modules=ATTENTION, init_weights=False),
    "MISS": lambda: peftkit.MissConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "VBLORA": lambda: peftkit.VBLoRAConfig(r=4, num_vectors=12, vector_length=16, init_vector_bank_bound=0.3,
                                           target_modules=ATTENTION),
    "UNILORA": lambda: peftkit.UniLoraConfig(r=2, theta_d_length=64, init_weights=False, target_modules=ATTENTION),
    "RANDLORA": lambda: peftkit.RandLoraConfig(r=4, randlora_alpha=8, init_weights=False, target_modules=ATTENTION),
    "GRALORA": lambda: peftkit.GraloraConfig(r=4, alpha=8, target_modules=ATTENTION, init_weights=False),
    "SHIRA": lambda: peftkit.ShiraConfig(r=2, target_modules=ATTENTION, init_weights=False),
    "PEANUT": lambda: peftkit.PeanutConfig(r=4, depth=1, target_modules=ATTENTION, init_weights=False),
    "DELORA": lambda: peftkit.DeloraConfig(r=2, delora_lambda=4, target_modules=ATTENTION, init_weights=False),
    "LILY": lambda: peftkit.LilyConfig(r=4, num_B=2, target_modules=ATTENTION, init_weights=False),
    "OSF": lambda: peftkit.OSFConfig(target_modules=ATTENTION, effective_rank=0.75, init_weights=False),
    "LN_TUNING": lambda: peftkit.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
    "DEFT": lambda: peftkit.DeftConfig(r=2, decomposition_method="qr", target_modules=ATTENTION, init_weights=False),
    "GLORA": lambda: peftkit.GloraConfig(r=2, target_modules=ATTENTION, init_weights=False),
    "BEFT": lambda: peftkit.BeftConfig(target_modules=ATTENTION, init_weights=False),
    "FROD": lambda: peftkit.FrodConfig(target_modules=ATTENTION, init_weights=False, sparse_rate=0.05, progressbar=False),
    "SUPERTUNING": lambda: peftkit.SupertuningConfig(target_modules=ATTENTION, init_weights=False, sparsity=0.9),
    "TRAINABLE_TOKENS": lambda: peftkit.TrainableTokensConfig(token_indices=[7, 13, 14, 25, 49], init_weights=False),
    "ADAMSS": lambda: peftkit.AdamssConfig(r=4, num_subspaces=2, subspace_rank=2, target_modules=ATTENTION, init_weights=None),
    "POLY": lambda: peftkit.PolyConfig(r=2, n_tasks=2, n_skills=2, target_modules=ATTENTION, init_weights=False),
    "XLORA": lambda: xlora_config(),
    "ADAPTION_PROMPT": lambda: peftkit.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1),
    "SHADOW": lambda: peftkit.ShadowConfig(task_type="CAUSAL_LM", r=4, init_weights=False, shadow_dropout=0.0),
}
BUILTIN = [member.value for member in PeftType]


def llama_with_bias() -> nn.Module:
    """The tiny Llama with biased attention projections (BEFT trains, and merges into, those biases)."""
    model = llama()
    torch.manual_seed(1)
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            proj.bias = nn.Parameter(0.1 * torch.randn(proj.out_features))
    return model


def llama_without_cache() -> nn.Module:
    """The tiny Llama with `use_cache=False`, which X-LoRA requires."""
    model = llama()
    model.config.use_cache = False
    return model


_EXPERTS: dict[str, str] = {}


def xlora_config():
    """X-LoRA over two saved (random, non-trivial) LoRA experts, written once per test session."""
    if not _EXPERTS:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="peftkit-xlora-experts-")
        atexit.register(shutil.rmtree, folder, True)
        for index in range(2):
            model = llama()  # (seeds itself)
            torch.manual_seed(10 + index)  # then a different random expert each
            expert = get_peft_model(model, LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False))
            expert.save_pretrained(f"{folder}/{index}")
            _EXPERTS[str(index)] = f"{folder}/{index}"
    return peftkit.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=dict(_EXPERTS), xlora_depth=2,
                               xlora_size=8, xlora_dropout_p=0.0)


#: Bases other than the tiny Llama, where a method needs something it lacks.
BASES = {"BEFT": llama_with_bias, "XLORA": llama_without_cache}
#: Methods whose fresh adapter is the identity whatever the init (LN tuning copies the norms it tunes).
IDENTITY_AT_INIT = {"LN_TUNING"}


def _peft_model(peft_type: str, base: nn.Module = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base if base is not None else BASES.get(peft_type, llama)(), CONFIGS[peft_type]())
    if peft_type in IDENTITY_AT_INIT:  # a trained-looking adapter, so the properties below can fail
        torch.manual_seed(2)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.5 * torch.randn_like(param))
    return model


@pytest.fixture
def isolated_registry(monkeypatch):
    """Explicit registrations made in a test vanish after it."""
    monkeypatch.setattr(registry, "_REGISTERED", {})


# ---------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("peft_type", BUILTIN)
def test_every_peft_type_resolves_to_its_folders_spec(peft_type):
    spec = method_spec(PeftType(peft_type))
    assert spec is method_spec(peft_type)  # cached, and the enum and its value agree
    assert spec is importlib.import_module(f"peftkit.tuners.{peft_type.lower()}").METHOD
    assert spec.peft_type == peft_type
    assert str(spec.config_cls.peft_type_default()) == peft_type
    assert issubclass(spec.tuner_cls, peftkit.tuners._core.BaseTuner)
    assert spec.capabilities <= CAPABILITIES and spec.cli_names and spec.prefix
    if spec.default_targets:  # the tuner resolves target_modules=None from the very same table
        assert spec.tuner_cls.default_target_modules is spec.default_targets
    model = _peft_model(peft_type)
    assert type(model.base_model) is spec.tuner_cls
    assert model.peft_config["default"].is_prompt_learning == spec.is_prompt_learning


def test_the_tests_know_every_builtin_method():
    assert {spec.peft_type for spec in registered_methods()} == set(BUILTIN) == set(CONFIGS)


@pytest.mark.parametrize("peft_type", BUILTIN)
def test_prefix_is_how_the_checkpoint_keys_start(peft_type):
    spec = method_spec(peft_type)
    keys = list(get_peft_model_state_dict(_peft_model(peft_type)))
    assert keys
    if spec.is_prompt_learning:
        assert keys[0] == spec.prefix and all("." not in key for key in keys)  # + encoder tensors (multitask)
    else:
        # tensors shared by every layer live on the tuner: `base_model.<name>` (VeRA's `vera_A`, as peft saves it)
        shared = [key for key in keys if key.startswith("base_model.") and key.count(".") == 1]
        assert shared == [] or spec.tuner_cls.uses_shared_state or spec.peft_type == "RANDLORA", shared
        assert all(f".{spec.prefix}" in key for key in keys if key not in shared), keys[:3]


def test_unknown_peft_type_lists_the_known_ones():
    with pytest.raises(ConfigError, match="Unknown peft_type 'NOPE'; peftkit supports: .*ADALORA.*LORA"):
        method_spec("NOPE")


def test_no_method_registers_itself_on_import():
    offenders = [str(path) for path in (SRC / "tuners").rglob("*.py") if "register_method(" in path.read_text()]
    assert not offenders


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_importing_the_registry_alone_imports_and_registers_nothing():
    """Without `peftkit/__init__` (which imports every method for the public API), the registry pulls in no
    method; inside the full package nothing is registered until a method is asked for, and then only it."""
    _run(f"""
import sys, types
package = types.ModuleType("peftkit")
package.__path__ = [{str(SRC)!r}]
sys.modules["peftkit"] = package
import peftkit.registry as registry
assert not [name for name in sys.modules if name.startswith("peftkit.tuners")], sorted(sys.modules)
assert registry._REGISTERED == {{}} and registry._BUILTIN == {{}}
""")
    _run("""
import peftkit.registry as registry
assert registry._REGISTERED == {} and registry._BUILTIN == {}, "a method registered itself on import"
spec = registry.method_spec("IA3")
assert list(registry._BUILTIN) == ["IA3"] and registry._REGISTERED == {}
assert spec.tuner_cls.__module__ == "peftkit.tuners.ia3.model"
""")


# ---------------------------------------------------------------------------------------------- explicit registration
class _ToyEncoder(nn.Module):
    pass


def _register_toy(**overrides) -> MethodSpec:
    fields = dict(prefix="toy_", cli_names=("toy", "toy-method"), cli_defaults={"r": 3},
                  fsdp_wrap_classes=(_ToyEncoder,), rank_dims={"toy_A.weight": 0}, capabilities={"merge"})
    fields.update(overrides)
    return register_method("TOY", LoraConfig, LoraModel, **fields)


def test_a_registered_method_reaches_cli_inspect_and_fsdp(isolated_registry, tmp_path):
    from peftkit.cli.inspect import _module_of, check, describe
    from peftkit.cli.adapter_files import read_adapter
    from peftkit.cli.methods import METHOD_NAMES, available_methods, build_config, peft_type_for
    from peftkit.distributed import _layer_classes_to_wrap

    assert "toy" not in METHOD_NAMES
    spec = _register_toy()
    assert method_spec("TOY") is spec and spec in registered_methods()
    # CLI: names (normalised like user input), defaults
    assert METHOD_NAMES["toy"] == "TOY" and METHOD_NAMES["toymethod"] == "TOY"
    assert peft_type_for("Toy-Method") == "TOY" and "toy" in available_methods()
    assert build_config("TOY", "CAUSAL_LM", {}).r == 3
    assert build_config("TOY", "CAUSAL_LM", {"r": 5}).r == 5
    # inspect: module paths from the prefix, rank check from rank_dims
    assert _module_of("base_model.model.model.layers.0.self_attn.q_proj.toy_A.weight") == "model.layers.0.self_attn.q_proj"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "TOY", "r": 4, "target_modules": ["q_proj"]}))
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj.toy_A.weight"
    save_file({key: torch.zeros(3, 8)}, str(tmp_path / "adapter_model.safetensors"))
    adapter = read_adapter(str(tmp_path))
    assert describe(adapter)["modules_with_weights"] == 1
    problems = check(adapter)
    assert f"{key} has rank 3, config r=4" in problems
    assert not [p for p in problems if "matches no target_modules" in p]
    # FSDP: the spec's wrap classes join the policy
    assert _ToyEncoder in _layer_classes_to_wrap(llama())


def test_duplicate_and_malformed_registrations_are_refused(isolated_registry):
    _register_toy()
    with pytest.raises(ConfigError, match="'TOY' is registered already"):
        _register_toy(cli_names=("other",))
    with pytest.raises(ConfigError, match="'IA3' is registered already .*IA3Config.*peft_type of its own"):
        register_method(PeftType.IA3, LoraConfig, LoraModel, prefix="x_")
    with pytest.raises(ConfigError, match=r"CLI name\(s\) \['lora'\]"):
        register_method("TOY2", LoraConfig, LoraModel, prefix="toy2_", cli_names=("lora",))
    with pytest.raises(ConfigError, match="unknown capabilities \\['merging'\\]"):
        register_method("TOY3", LoraConfig, LoraModel, prefix="toy3_", capabilities={"merging"})
    with pytest.raises(ConfigError, match="MethodSpec or its fields, not both"):
        register_method(MethodSpec("TOY4", LoraConfig, LoraModel, "t_"), LoraConfig)
    assert {spec.peft_type for spec in registered_methods()} == set(BUILTIN) | {"TOY"}


# ---------------------------------------------------------------------------------------------- capabilities
@pytest.mark.parametrize("peft_type", BUILTIN)
def test_merge_capability_matches_behaviour(peft_type):
    if "merge" in method_spec(peft_type).capabilities and peft_type in IDENTITY_AT_INIT:
        model, inputs = _peft_model(peft_type), lm_inputs()
        unmerged = prop.output_of(model, inputs)
        prop.assert_differs(unmerged, prop.output_of(BASES.get(peft_type, llama)(), inputs))
        model.merge_adapter()
        prop.assert_close(prop.output_of(model, inputs), unmerged)
        prop.assert_close(prop.output_of(model.merge_and_unload(), inputs), unmerged)
    elif "merge" in method_spec(peft_type).capabilities:
        prop.check_merge_equals_unmerged(BASES.get(peft_type, llama), lm_inputs(), CONFIGS[peft_type]())
    else:
        with pytest.raises(PeftkitError, match="cannot be merged"):
            _peft_model(peft_type).merge_adapter()


@pytest.mark.parametrize("peft_type", BUILTIN)
def test_mixed_batch_capability_matches_behaviour(peft_type):
    model = _peft_model(peft_type).eval()
    inputs = lm_inputs()
    if "mixed_batch" not in method_spec(peft_type).capabilities:
        with pytest.raises(ConfigError, match="adapter_names .* not supported for"):
            model(**inputs, adapter_names=["default", "default"])
        return
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["default", "__base__"]).logits
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    prop.assert_close(mixed[0], adapted[0])
    prop.assert_close(mixed[1], base[1])
    prop.assert_differs(adapted[0], base[0])


@pytest.mark.parametrize("peft_type", BUILTIN)
def test_weighted_combination_capability_matches_behaviour(peft_type):
    model = _peft_model(peft_type)
    if "weighted_combination" not in method_spec(peft_type).capabilities:
        with pytest.raises((AttributeError, TypeError, ConfigError)):
            model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
        return
    inputs = lm_inputs()
    model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    model.set_adapter("combined")
    combined = prop.output_of(model, inputs)
    model.set_adapter("default")
    prop.assert_close(combined, prop.output_of(model, inputs))


@pytest.mark.parametrize("peft_type", [t for t in BUILTIN if "quantized_base" in method_spec(t).capabilities])
def test_quantized_base_capability_wraps_quantized_layers(peft_type):
    from peftkit.quantization import Linear8bit, QuantizationConfig, quantize_model

    model = _peft_model(peft_type, quantize_model(llama(), QuantizationConfig(load_in_8bit=True)))
    layers = list(model.base_model.tuner_layers())
    assert layers and all(isinstance(layer.get_base_layer(), Linear8bit) for _, layer in layers)
    assert torch.isfinite(prop.output_of(model, lm_inputs())).all()
