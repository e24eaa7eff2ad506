"""`peftkit train` settings: defaults <- YAML/JSON config file <- command-line flags, checked.

A config file may use three kinds of keys (as LLaMA-Factory and axolotl users write them):

- the CLI's own option names (`lr`, `epochs`, `batch_size`, `load_in_4bit`, ...);
- any `transformers.TrainingArguments` field (`learning_rate`, `num_train_epochs`, `report_to`,
  `lr_scheduler_type`, `eval_steps`, ...); the ones the CLI has options for are the same setting;
- any field of the method's config (`r`, `lora_alpha`, `target_modules`), or under `method_args:`.

Values are converted to the option's type ("1e-4" from YAML becomes 1e-4); an unknown key or a
value of the wrong type is one clear error naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import CliError
from .methods import config_fields, load_config_file, parse_method_flags, peft_type_for


@dataclass(frozen=True)
class Option:
    """One `peftkit train` setting: its type, default, and the TrainingArguments field it is (if any)."""

    type: type
    default: Any
    hf: Optional[str] = None


#: The CLI's settings. Defaults suit supervised fine-tuning of an LLM; the embedded MiniLM demo run
#: has its own (`EMBEDDED_DEFAULTS`).
OPTIONS: dict[str, Option] = {
    "model": Option(str, None), "data": Option(str, None), "eval_data": Option(str, None),
    "task": Option(str, None), "method": Option(str, "lora"), "out": Option(str, "out/adapter"),
    "output_dir": Option(str, None, "output_dir"),
    "epochs": Option(float, 3.0, "num_train_epochs"), "max_steps": Option(int, -1, "max_steps"),
    "lr": Option(float, 2e-4, "learning_rate"), "batch_size": Option(int, 4, "per_device_train_batch_size"),
    "eval_batch_size": Option(int, None, "per_device_eval_batch_size"),
    "grad_accum": Option(int, 1, "gradient_accumulation_steps"),
    "warmup": Option(float, 0.03, "warmup_steps"), "lr_scheduler_type": Option(str, "cosine", "lr_scheduler_type"),
    "weight_decay": Option(float, 0.0, "weight_decay"), "max_grad_norm": Option(float, 1.0, "max_grad_norm"),
    "bf16": Option(bool, False, "bf16"), "fp16": Option(bool, False, "fp16"),
    "gradient_checkpointing": Option(bool, False), "logging_steps": Option(float, 10, "logging_steps"),
    "save_strategy": Option(str, "epoch", "save_strategy"), "save_steps": Option(float, 500, "save_steps"),
    "save_total_limit": Option(int, 2, "save_total_limit"), "eval_strategy": Option(str, None, "eval_strategy"),
    "report_to": Option(list, ["none"], "report_to"), "seed": Option(int, 0, "seed"),
    "resume": Option(str, None), "max_length": Option(int, 1024), "eval_fraction": Option(float, 0.1),
    "load_in_4bit": Option(bool, False), "load_in_8bit": Option(bool, False), "packing": Option(bool, False),
    "completion_only": Option(bool, False), "verify": Option(bool, None), "chat_template": Option(str, None),
    "text_field": Option(str, "text"), "label_field": Option(str, "label"),
    "prompt_field": Option(str, "prompt"), "completion_field": Option(str, "completion"),
}

#: The embedded default run (`peftkit train` with no model and no data; `make demo`): MiniLM on the
#: bundled sentiment data trains in a few minutes on a CPU with these.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "task": "seq-cls", "epochs": 4.0, "lr": 3e-3, "batch_size": 16, "max_length": 64, "eval_fraction": 0.2,
    "warmup": 0.0, "lr_scheduler_type": "linear", "save_strategy": "no", "verify": True,
}

_BY_HF_NAME = {option.hf: name for name, option in OPTIONS.items() if option.hf}
_BY_HF_NAME.update({"warmup_ratio": "warmup", "gradient_checkpointing": "gradient_checkpointing",
                    "activation_checkpointing": "gradient_checkpointing", "max_seq_length": "max_length"})
#: TrainingArguments fields the CLI sets itself from other options.
_MANAGED = {"do_train", "do_eval", "overwrite_output_dir", "resume_from_checkpoint", "use_cpu"}


@dataclass
class TrainSettings:
    """Everything one `peftkit train` run needs: CLI options, extra TrainingArguments, method fields."""

    options: dict[str, Any]
    training_args: dict[str, Any] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["options"][name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def _training_argument_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def _scalar_type(annotation: Any) -> Optional[type]:
    """bool / int / float / str of a TrainingArguments annotation (`float`, `int | None`, ...), else None."""
    if isinstance(annotation, str):
        for name, kind in (("bool", bool), ("float", float), ("int", int), ("str", str)):
            if annotation.split("|")[0].strip() == name:
                return kind
        return None
    if annotation in (bool, int, float, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return next((a for a in args if a in (bool, int, float, str)), None)


def coerce(key: str, value: Any, kind: Optional[type]) -> Any:
    """`value` as `kind` (numbers from strings such as YAML's "1e-4", booleans from true/false)."""
    if value is None or kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise CliError(f"{key} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise CliError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError as exc:
            raise CliError(f"{key} must be a number, got {value!r}") from exc
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise CliError(f"{key} must be a finite number, got {value!r}")
        if kind is int:
            if float(number) != int(number):
                raise CliError(f"{key} must be a whole number, got {value!r}")
            return int(number)
        return float(number)
    if kind is list:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)):
            return [str(item) for item in value]
        raise CliError(f"{key} must be a list or a comma-separated string, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise CliError(f"{key} must be a string, got {value!r}")
    return value


def _unknown(key: str, known: Sequence[str], source: str) -> CliError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return CliError(f"unknown option {key!r} in {source}{hint} (options: `peftkit train --help`, TrainingArguments "
                    "fields, or the method's config fields)")


def _place(key: str, value: Any, settings: TrainSettings, method_fields: Mapping[str, Any], source: str) -> None:
    """Put one config-file entry where it belongs (CLI option, TrainingArguments field, method field)."""
    if key in OPTIONS:
        settings.options[key] = coerce(key, value, OPTIONS[key].type)
    elif key in _BY_HF_NAME:
        name = _BY_HF_NAME[key]
        settings.options[name] = coerce(key, value, OPTIONS[name].type)
    elif key in method_fields:
        settings.method_args[key] = value
    else:
        hf_fields = _training_argument_fields()
        if key in hf_fields and key not in _MANAGED:
            settings.training_args[key] = coerce(key, value, _scalar_type(hf_fields[key].type))
        else:
            raise _unknown(key, [*OPTIONS, *hf_fields, *method_fields], source)


def resolve_settings(flags: Mapping[str, Any], extra: Sequence[str]) -> TrainSettings:
    """Defaults <- `--config` file <- flags (`flags` holds argparse's values, None when not given)."""
    from_file: dict[str, Any] = {}
    if flags.get("config"):
        from_file = load_config_file(flags["config"])
    given = {k: v for k, v in flags.items() if k in OPTIONS and v is not None}
    method = given.get("method") or from_file.get("method") or OPTIONS["method"].default
    peft_type = peft_type_for(method)
    method_fields = config_fields(peft_type)
    embedded = (given.get("model") or from_file.get("model")) is None and (given.get("data") or from_file.get("data")) is None
    settings = TrainSettings({name: option.default for name, option in OPTIONS.items()}, embedded=embedded)
    if embedded:
        settings.options.update(EMBEDDED_DEFAULTS)
    method_args = from_file.pop("method_args", None) or {}
    if not isinstance(method_args, dict):
        raise CliError(f"method_args in {flags['config']} must be a mapping of field: value")
    for key, value in from_file.items():
        _place(str(key), value, settings, method_fields, str(flags.get("config")))
    settings.method_args.update(method_args)
    settings.options.update({k: coerce(k, v, OPTIONS[k].type) for k, v in given.items()})
    settings.options["method"] = method
    settings.method_args.update(parse_method_flags(peft_type, extra))
    check_settings(settings)
    return settings


def check_settings(settings: TrainSettings) -> None:
    """Refuse settings that would train nothing or crash later (before anything is loaded)."""
    o = settings.options
    if o["max_steps"] is not None and o["max_steps"] == 0:
        raise CliError("--max-steps 0 trains nothing; give a positive number (or leave it out to use --epochs)")
    if o["max_steps"] < 0 and not o["epochs"] > 0:
        raise CliError(f"--epochs must be > 0 (got {o['epochs']:g}); or set --max-steps")
    for name in ("batch_size", "grad_accum", "max_length"):
        if o[name] < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {o[name]}")
    if o["eval_batch_size"] is not None and o["eval_batch_size"] < 1:
        raise CliError(f"--eval-batch-size must be at least 1, got {o['eval_batch_size']}")
    if not o["lr"] > 0:
        raise CliError(f"--lr must be > 0, got {o['lr']}")
    if not 0.0 <= o["eval_fraction"] < 1.0:
        raise CliError(f"--eval-fraction must be in [0, 1), got {o['eval_fraction']}")
    if o["bf16"] and o["fp16"]:
        raise CliError("--bf16 and --fp16 exclude each other; pick one")
    if o["load_in_4bit"] and o["load_in_8bit"]:
        raise CliError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
    if o["warmup"] < 0:
        raise CliError(f"--warmup must be >= 0 (a fraction of the steps below 1, else a step count), got {o['warmup']}")
    if o["chat_template"] and not os.path.isfile(o["chat_template"]):
        raise CliError(f"chat template file not found: {o['chat_template']}")
    if o["resume"] not in (None, "latest") and not os.path.isdir(o["resume"]):
        raise CliError(f"--resume: checkpoint folder not found: {o['resume']} (or use --resume with no value for the latest)")
