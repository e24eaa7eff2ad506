"""Multitask prompt tuning checkpoints move between peft and peftkit: same keys, shapes, config and
logits per task; equal seeds give equal tensors; source-task inits read each other's files.

peft is a test-only dependency; the module is skipped without it. The task factors are scaled far
from their N(0, 0.02) init and the shared prompt is perturbed, so a tensor that is not loaded, or is
loaded into the wrong place, changes the logits.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from tests.interop_helpers import (  # noqa: E402
    assert_same_tensors, make_inputs, make_model, output, read_config, read_weights, roundtrip_params, seeded_peft_model)
from tests.tiny_models import MODEL_FACTORIES  # noqa: E402

pytestmark = pytest.mark.filterwarnings(r"ignore::UserWarning")

LIBS = {"peft": peft, "peftkit": peftkit}
CASES = ["llama", "gpt2", "bert", "t5"]
TASK_IDS = torch.tensor([2, 0])


def wrap(lib_name: str, case: str, **overrides):
    kwargs = dict(task_type=MODEL_FACTORIES[case].task_type, num_virtual_tokens=3, num_tasks=3, num_ranks=2)
    kwargs.update(overrides)
    model = seeded_peft_model(LIBS[lib_name], "MultitaskPromptTuningConfig", kwargs, case)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prefix_task" in name:
                param.mul_(60.0)
            elif "prompt_encoder" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def inputs_of(case: str, task_ids=TASK_IDS) -> dict:
    return {**make_inputs(case), "task_ids": task_ids}


@pytest.mark.parametrize("case,src,dst", roundtrip_params(CASES))
def test_roundtrip_gives_the_same_logits_per_task(tmp_path, case, src, dst):
    model = wrap(src, case)
    inputs = inputs_of(case)
    expected = output(model, inputs)
    base = output(make_model(case), make_inputs(case))
    real = expected[:, -base.shape[1]:] if expected.dim() == 3 else expected  # LM / seq2seq: virtual positions first
    assert (real - base).abs().max() > 1e-3, "vacuous adapter"
    model.save_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftModel.from_pretrained(make_model(case), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs), expected, atol=1e-5, rtol=0)
    assert_same_tensors(LIBS[dst].get_peft_model_state_dict(loaded), read_weights(str(tmp_path)))
    # Another task assignment: still the same logits (each task's factors were loaded, not only these two).
    other = inputs_of(case, torch.tensor([1, 1]))
    with torch.no_grad():
        expected, actual = model(**other), loaded(**other)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_equal_seeds_give_equal_tensors_config_and_files(tmp_path, case):
    models = {name: seeded_peft_model(lib, "MultitaskPromptTuningConfig", dict(
        task_type=MODEL_FACTORIES[case].task_type, num_virtual_tokens=3, num_tasks=3, num_ranks=2), case)
        for name, lib in LIBS.items()}
    ours = models["peftkit"].base_model.prompt_encoder["default"].state_dict()
    theirs = models["peft"].prompt_encoder["default"].state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    files, configs = {}, {}
    for name, model in models.items():
        model.save_pretrained(str(tmp_path / name))
        files[name], configs[name] = read_weights(str(tmp_path / name)), read_config(str(tmp_path / name), comparable=True)
        configs[name]["modules_to_save"] = set(configs[name].get("modules_to_save") or ())  # peft lists heads twice
    assert_same_tensors(files["peftkit"], files["peft"])
    assert {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"} <= set(files["peftkit"])
    assert configs["peftkit"] == configs["peft"]
    assert models["peftkit"].get_nb_trainable_parameters() == models["peft"].get_nb_trainable_parameters()
    inputs = inputs_of(case)
    with torch.no_grad():
        torch.testing.assert_close(models["peftkit"](**inputs).logits, models["peft"](**inputs).logits, atol=1e-5, rtol=0)


def test_generate_gives_the_same_tokens(tmp_path):
    reference = wrap("peft", "llama")
    reference.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(make_model("llama"), str(tmp_path))
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, task_ids=TASK_IDS)
    for model in (loaded, reference):
        model.generation_config.eos_token_id = None
    assert torch.equal(loaded.generate(**kwargs), reference.generate(**kwargs))


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
@pytest.mark.parametrize("src,dst", [("peft", "peftkit"), ("peftkit", "peft")])
def test_source_inits_read_the_other_library_s_file(tmp_path, init, src, dst):
    wrap(src, "llama", num_tasks=4).save_pretrained(str(tmp_path / "source"))
    path = str(tmp_path / "source" / "adapter_model.safetensors")
    tasks = 3 if init == "ONLY_SOURCE_SHARED" else 1
    encoders = {}
    for name in (src, dst):
        torch.manual_seed(11)
        model = LIBS[name].get_peft_model(make_model("llama"), LIBS[name].MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=tasks, num_ranks=2, prompt_tuning_init=init,
            prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=3))
        encoders[name] = model.base_model.prompt_encoder["default"] if name == "peftkit" else model.prompt_encoder["default"]
    ours, theirs = encoders["peftkit"].state_dict(), encoders["peft"].state_dict()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-7, rtol=0, msg=key)
