"""CLI method names -> registered peft types, and building a config from flags / a YAML or JSON file.

The one table below is the only place the CLI names methods; the config classes come from the
registry, so a method that registers itself is usable from the CLI once it has a name here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import peftkit  # noqa: F401  (importing registers every method)
from peftkit.registry import method_spec, registered_methods

from .errors import CliError

#: CLI name -> peft type. Aliases share a type.
METHOD_NAMES: dict[str, str] = {
    "lora": "LORA",
    "adalora": "ADALORA",
    "ia3": "IA3",
    "loha": "LOHA",
    "lokr": "LOKR",
    "adapter": "BOTTLENECK",
    "bottleneck": "BOTTLENECK",
    "prompt": "PROMPT_TUNING",
    "prefix": "PREFIX_TUNING",
    "ptuning": "P_TUNING",
}

#: Defaults the CLI adds when the user leaves them out (peft requires them or has no model default).
_CLI_DEFAULTS: dict[str, dict[str, Any]] = {
    "PROMPT_TUNING": {"num_virtual_tokens": 8},
    "PREFIX_TUNING": {"num_virtual_tokens": 8},
    "P_TUNING": {"num_virtual_tokens": 8, "encoder_hidden_size": 32},
    "ADALORA": {"total_step": 1000},
}

#: Fields given as comma-separated lists on the command line.
_LIST_FIELDS = {"target_modules", "modules_to_save", "exclude_modules", "feedforward_modules", "layers_to_transform"}
#: Fields the CLI sets itself; a user value would conflict with the task.
_RESERVED = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "peft_version", "auto_mapping"}


def available_methods() -> list[str]:
    """CLI names whose peft type is registered in this install."""
    registered = {spec.peft_type for spec in registered_methods()}
    return [name for name, peft_type in METHOD_NAMES.items() if peft_type in registered]


def peft_type_for(name: str) -> str:
    """The peft type of CLI method `name`; a one-line error lists the valid names."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in METHOD_NAMES or key not in available_methods():
        raise CliError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return METHOD_NAMES[key]


def config_fields(peft_type: str) -> dict[str, dataclasses.Field]:
    """Settable fields of the method's config class, by name."""
    cls = method_spec(peft_type).config_cls
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _RESERVED}


def parse_value(field_name: str, text: str) -> Any:
    """A command-line string as a JSON value when it parses ("8", "0.1", "true"), else the string.

    List fields split on commas, so `--target-modules query,value` gives ["query", "value"].
    """
    if field_name in _LIST_FIELDS:
        if text.startswith("["):
            return json.loads(text)
        items = [item.strip() for item in text.split(",") if item.strip()]
        return [int(item) if item.isdigit() else item for item in items]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_flags(peft_type: str, extra: Sequence[str]) -> dict[str, Any]:
    """`--lora-alpha 16 --r 8` (or `--r=8`) -> {"lora_alpha": 16, "r": 8}, checked against the config."""
    fields = config_fields(peft_type)
    values: dict[str, Any] = {}
    tokens = list(extra)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--"):
            raise CliError(f"unexpected argument {token!r}; method options look like --name value")
        name, _, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise CliError(f"unknown option --{name.replace('_', '-')} for this method; see `peftkit train --help`")
        if not value:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise CliError(f"option --{name.replace('_', '-')} needs a value")
            index += 1
            value = tokens[index]
        values[name] = parse_value(name, value)
        index += 1
    return values


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping (by extension; YAML also reads JSON)."""
    if not os.path.isfile(path):
        raise CliError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # any parse error becomes one line
        raise CliError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise CliError(f"config file {path} must hold a mapping of option: value")
    return data


def build_config(peft_type: str, task_type: Optional[str], values: Mapping[str, Any]) -> Any:
    """Instantiate the method's config from CLI defaults overridden by `values`."""
    fields = config_fields(peft_type)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CliError(f"unknown option(s) for {peft_type}: {', '.join(unknown)}")
    kwargs = {**_CLI_DEFAULTS.get(peft_type, {}), **values}
    cls = method_spec(peft_type).config_cls
    try:
        return cls(task_type=task_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CliError(f"bad {peft_type} option: {exc}") from exc
