"""Reliability round 2 (issue 20): resource limits on untrusted configs, and clear errors.

Each case was a raw RuntimeError / TypeError / IndexError / re.error / hang before; each must now be
a PeftkitError naming the field and the fix, raised before anything is allocated or changed.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from peftkit import (
    AdaLoraConfig,
    BottleneckConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.errors import AdapterNameError, ConfigError, TargetModulesError
from peftkit.tuners._core.matching import key_matches
from peftkit.utils.adapter_names import validate_adapter_name

from .tiny_models import VOCAB, bert_seq_cls, llama

MAX_NAME = 100  # peftkit.utils.adapter_names.MAX_ADAPTER_NAME_CHARS


def _snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [name for name, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    names, state = before
    assert [name for name, _ in model.named_modules()] == names
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)


# ---------------------------------------------------------------------- 1. sizes from untrusted configs
def test_absurd_lora_rank_is_refused_against_the_layer_before_allocating() -> None:
    model = llama()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"r=1000000000 for 'model\.layers\.0\.self_attn\.q_proj'.*smaller r"):
        get_peft_model(model, LoraConfig(r=10**9, target_modules=["q_proj"]))
    _assert_unchanged(model, before)


def test_absurd_rank_in_rank_pattern_leaves_every_module_untouched() -> None:
    model = llama()
    before = _snapshot(model)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 10**8})
    with pytest.raises(ConfigError, match=r"rank_pattern\[.v_proj.\]=100000000 for .model\.layers\.0\.self_attn\.v_proj."):
        get_peft_model(model, config)
    _assert_unchanged(model, before)  # q_proj (which comes first) was not wrapped either


def test_rank_beyond_int64_is_refused_at_config_creation() -> None:
    with pytest.raises(ConfigError, match=r"r=1000000000000000000000000000000 is larger than any tensor dimension"):
        LoraConfig(r=10**30)


def test_ranks_above_the_layer_dims_stay_allowed() -> None:
    """Tiny models with ranks above their features (peft's own tests do this) are not 'absurd'."""
    model = get_peft_model(llama(), LoraConfig(r=64, target_modules=["q_proj"]))  # q_proj is 32 x 32
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (64, 32)
    from peftkit.tuners._core.size_limits import MIN_ELEMENTS_LIMIT, element_limit

    assert element_limit(1024) == MIN_ELEMENTS_LIMIT == 2**26
    assert element_limit(2**22) == 64 * 2**22


@pytest.mark.parametrize(
    ("make_config", "field"),
    [
        (lambda: AdaLoraConfig(init_r=10**9, total_step=10, target_modules=["q_proj"]), "init_r"),
        (lambda: LoHaConfig(r=10**9, target_modules=["q_proj"]), "r"),
        (lambda: LoKrConfig(r=10**9, target_modules=["q_proj"]), "r"),
    ],
    ids=["adalora", "loha", "lokr"],
)
def test_absurd_sizes_of_other_layer_methods_are_refused(make_config, field) -> None:
    model = llama()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=rf"{field}=1000000000 for 'model\.layers\.0\.self_attn\.q_proj'"):
        get_peft_model(model, make_config())
    _assert_unchanged(model, before)


def test_absurd_bottleneck_adapter_dim_is_refused() -> None:
    model = bert_seq_cls()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match="adapter_dim=1000000000"):
        get_peft_model(model, BottleneckConfig(adapter_dim=10**9, task_type="SEQ_CLS"))
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("make_config", "field"),
    [
        (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, token_dim=10**9), "token_dim=1000000000"),
        (lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_hidden_size=10**6), "encoder_hidden_size"),
        (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10**7), "num_virtual_tokens=10000000"),
    ],
    ids=["prompt-tuning", "p-tuning", "prefix-tuning"],
)
def test_absurd_prompt_learning_sizes_are_refused_before_allocating(make_config, field) -> None:
    model = llama()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=rf"{field}.*prompt elements for a model of"):
        get_peft_model(model, make_config())
    _assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("make_config", "field"),
    [
        (lambda: PromptTuningConfig(num_virtual_tokens=True), "num_virtual_tokens"),
        (lambda: PromptTuningConfig(num_virtual_tokens=1e10), "num_virtual_tokens"),
        (lambda: PromptTuningConfig(num_virtual_tokens=8, token_dim=32.0), "token_dim"),
        (lambda: PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=1.5), "encoder_hidden_size"),
        (lambda: PromptEncoderConfig(num_virtual_tokens=8, encoder_num_layers=True), "encoder_num_layers"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=8, encoder_hidden_size=True), "encoder_hidden_size"),
        (lambda: BottleneckConfig(adapter_dim=10**12), "adapter_dim"),
        (lambda: AdaLoraConfig(total_step=10, target_r=10**12), "target_r"),
    ],
)
def test_size_fields_must_be_bounded_ints_at_config_creation(make_config, field) -> None:
    with pytest.raises(ConfigError, match=field):
        make_config()


@pytest.mark.parametrize(
    ("make_config", "field"),
    [
        (lambda: LoraConfig(lora_alpha=math.inf), "lora_alpha"),
        (lambda: LoraConfig(alpha_pattern={"q_proj": math.inf}), "alpha_pattern"),
        (lambda: LoHaConfig(alpha=math.inf), "alpha"),
        (lambda: AdaLoraConfig(total_step=10, lora_alpha=math.inf), "lora_alpha"),
        (lambda: AdaLoraConfig(total_step=10, orth_reg_weight=math.nan), "orth_reg_weight"),
        (lambda: AdaLoraConfig(total_step=10, beta1=math.inf), "beta1"),
    ],
)
def test_infinite_and_nan_floats_are_refused_at_config_creation(make_config, field) -> None:
    with pytest.raises(ConfigError, match=rf"{field}.*finite number"):
        make_config()


def test_infinity_in_a_json_config_is_refused() -> None:
    data = json.loads('{"peft_type": "LORA", "lora_alpha": Infinity, "target_modules": ["q_proj"]}')  # valid for json
    with pytest.raises(ConfigError, match="lora_alpha=inf is invalid; it must be a finite number"):
        PeftConfig.from_dict(data)


# ---------------------------------------------------------------------- 2. regexes from untrusted configs
@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a*)*b", r"(a|a)*c", r"(\w+\.)*q_proj", r".*.*.*q_proj", r"(a|ab)+c"])
def test_catastrophic_target_regexes_are_refused_at_config_creation(pattern) -> None:
    with pytest.raises(ConfigError, match=r"target_modules=.* is refused: .*exponential time"):
        LoraConfig(target_modules=pattern)


def test_catastrophic_regex_from_a_saved_config_is_refused_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="exclude_modules"):
        PeftConfig.from_dict({"peft_type": "LORA", "target_modules": ["q_proj"], "exclude_modules": "(x+x+)+y"})
    with pytest.raises(ConfigError, match="rank_pattern key"):
        LoraConfig(target_modules=["q_proj"], rank_pattern={"(a+)+$": 4})
    with pytest.raises(ConfigError, match="target_modules"):
        key_matches("a" * 40 + "!", r"(a+)+$")  # would backtrack ~2**40 steps unguarded
    assert time.perf_counter() - start < 2


def test_overlong_regex_is_refused() -> None:
    with pytest.raises(ConfigError, match="regex of 5,000 characters"):
        LoraConfig(target_modules="q" * 5000)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(q_proj|v_proj)",
        r"^(?!.*vision).*(q_proj|k_proj)$",
        r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
        r"^(?:(?!lm_head).)*proj$",
        r".*layers\.(1[0-9]|2[0-3])\..*",
        r"(?:.*\.)?q_proj",
        r".*.*q_proj",  # sloppy but quadratic at worst; peft accepts it
    ],
)
def test_realistic_target_regexes_still_work(pattern) -> None:
    LoraConfig(target_modules=pattern)
    assert key_matches("model.layers.12.self_attn.q_proj", pattern)


def test_invalid_regex_is_a_config_error_naming_the_pattern() -> None:
    model = llama()
    with pytest.raises(ConfigError, match=r"target_modules='q_proj\[' is not a valid regex \(unterminated character set"):
        get_peft_model(model, LoraConfig(target_modules="q_proj["))


# ---------------------------------------------------------------------- 3. nothing targeted
def test_unmatched_regex_is_shown_as_a_regex() -> None:
    with pytest.raises(TargetModulesError) as info:
        get_peft_model(llama(), LoraConfig(target_modules=r".*\.foo_proj"))
    message = str(info.value)
    assert "target_modules regex '.*\\\\.foo_proj'" in message and "whole dotted module path" in message
    assert "['.*" not in message  # not shown as a one-item list


def test_unmatched_after_exclude_modules_names_the_filter() -> None:
    with pytest.raises(TargetModulesError, match=r"target_modules alone selects 2 module\(s\), but exclude_modules=\['q_proj'\] removed"):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


def test_unmatched_after_layers_to_transform_names_the_filter() -> None:
    with pytest.raises(TargetModulesError, match=r"layers_to_transform=\[5\].*removed all of them; relax layers_to_transform"):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))


# ---------------------------------------------------------------------- 4. set_adapter(None)
def test_set_adapter_none_is_an_adapter_name_error() -> None:
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    for target in (model, model.base_model):
        with pytest.raises(AdapterNameError, match=r"set_adapter needs an adapter name .* got None; this model has \['default'\]"):
            target.set_adapter(None)
        with pytest.raises(AdapterNameError, match="got 3"):
            target.set_adapter(3)
    assert model.active_adapter == "default"


def test_prompt_learning_set_adapter_none_is_an_adapter_name_error() -> None:
    model = get_peft_model(llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(AdapterNameError, match="got None"):
        model.set_adapter(None)


# ---------------------------------------------------------------------- 5. TEXT init with a foreign tokenizer
def _foreign_tokenizer(path) -> str:
    """A word-level tokenizer whose ids (500+) lie beyond the tiny models' 96 embedding rows."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 500, "the": 501, "sentiment": 502}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


def test_text_init_with_ids_outside_the_vocabulary_is_a_config_error(tmp_path) -> None:
    model = llama()
    before = _snapshot(model)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the sentiment", tokenizer_name_or_path=_foreign_tokenizer(tmp_path / "tok"),
    )
    with pytest.raises(ConfigError, match=rf"vocabulary of 4 tokens.*\[500, 501, 502\].*\({VOCAB} rows\).*not this model's tokenizer"):
        get_peft_model(model, config)
    _assert_unchanged(model, before)


# ---------------------------------------------------------------------- 6. `peftkit inspect` on damaged configs
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", "must hold a JSON object, found list"),
        ('"LORA"', "must hold a JSON object, found str"),
        ("[" * 5000 + "]" * 5000, "nests JSON more than"),
        (json.dumps({"peft_type": "LORA", "target_modules": [1, 2], "modules_to_save": 7}), None),
    ],
    ids=["array", "string", "deep", "wrong-field-types"],
)
def test_inspect_damaged_config_is_one_line_and_nonzero(tmp_path, text, expected) -> None:
    from safetensors.torch import save_file

    from .cli_helpers import peftkit

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(text)
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    result = peftkit("inspect", folder)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    if expected is not None:
        assert result.stderr.strip().startswith("peftkit: error:") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    else:
        assert "config does not validate" in result.stdout


# ---------------------------------------------------------------------- 7. adapter names
@pytest.mark.parametrize("name", ["a" * (MAX_NAME + 1), "name\n", "training", "_modules", "_parameters", "_buffers"])
def test_unsafe_adapter_names_are_refused(name) -> None:
    with pytest.raises(AdapterNameError):
        validate_adapter_name(name)


def test_longest_allowed_name_passes() -> None:
    assert validate_adapter_name("a" * MAX_NAME) == "a" * MAX_NAME


@pytest.mark.parametrize("name", ["a" * 300, "name\n", "training", "_modules", "_parameters"])
def test_bad_names_fail_at_add_adapter_and_get_peft_model(name) -> None:
    with pytest.raises(AdapterNameError):
        get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]), adapter_name=name)
    model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    before = _snapshot(model)
    with pytest.raises(AdapterNameError, match="Adapter name"):
        model.add_adapter(name, LoraConfig(target_modules=["q_proj"]))
    _assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_a_million_bad_token_indices_give_a_short_error_and_change_nothing() -> None:
    model = llama()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"token indices \[96, 97, .*105\] \(and 999990 more\) are not rows") as info:
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=list(range(96, 96 + 10**6))))
    assert len(str(info.value)) < 300
    _assert_unchanged(model, before)


@pytest.mark.parametrize("second", [False, True])
def test_absurd_rank_on_target_parameters_is_refused_before_allocating(second) -> None:
    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)
            self.moe = torch.nn.Module()
            self.moe.experts = torch.nn.Parameter(torch.randn(4, 16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    model = get_peft_model(Experts(), LoraConfig(target_parameters=["proj.weight", "moe.experts"], target_modules=[], r=2))
    before = _snapshot(model)
    huge = LoraConfig(target_parameters=["proj.weight", "moe.experts"], target_modules=[], r=10**9)
    with pytest.raises(ConfigError, match=r"r=1000000000 for 'proj\.weight' would add about .* parameter of 256 elements"):
        if second:
            model.add_adapter("huge", huge)
        else:
            get_peft_model(Experts(), huge)
    _assert_unchanged(model, before)
