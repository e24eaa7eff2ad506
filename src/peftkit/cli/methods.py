"""CLI method names -> peft types, and building a config from flags / a YAML or JSON file.

Every method name, default and config class comes from the registry (`MethodSpec.cli_names`,
`cli_defaults`, `config_cls`), so a method is usable from the CLI as soon as it is known there
(built in, or registered with `peftkit.registry.register_method`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

from peftkit.registry import TRAIN_STEPS, method_spec, registered_methods

from .errors import CliError


def _normalised(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


class _MethodNames(Mapping):
    """CLI name -> peft type, read from the registry on every access (aliases share a type)."""

    def _table(self) -> dict[str, str]:
        return {_normalised(name): spec.peft_type for spec in registered_methods() for name in spec.cli_names}

    def __getitem__(self, name: str) -> str:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


#: CLI name -> peft type, e.g. {"lora": "LORA", "adapter": "BOTTLENECK", "bottleneck": "BOTTLENECK", ...}.
METHOD_NAMES: Mapping[str, str] = _MethodNames()
#: Used when a method's `cli_defaults` asks for the run's step count but the caller does not know it.
_FALLBACK_TRAIN_STEPS = 1000

#: Fields given as comma-separated lists on the command line.
_LIST_FIELDS = {"target_modules", "modules_to_save", "exclude_modules", "feedforward_modules", "layers_to_transform"}
#: Fields the CLI sets itself; a user value would conflict with the task.
_RESERVED = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "peft_version", "auto_mapping", "runtime_config"}


def available_methods() -> list[str]:
    """CLI names of every method the registry knows (built-in and registered)."""
    return list(METHOD_NAMES)


def one_name_per_method() -> list[str]:
    """The first CLI name of every method the registry knows (aliases left out), in registry order."""
    return [spec.cli_names[0] for spec in registered_methods() if spec.cli_names]


def peft_type_for(name: str) -> str:
    """The peft type of CLI method `name`; a one-line error lists the valid names."""
    names = dict(METHOD_NAMES)
    key = _normalised(name)
    if key not in names:
        raise CliError(f"unknown method {name!r}; choose one of: {', '.join(names)}")
    return names[key]


def cli_preset(peft_type: str) -> dict[str, Any]:
    """The method options `peftkit train` uses when the user gives none (e.g. LoRA r=8, alpha=16)."""
    return dict(method_spec(peft_type).cli_preset)


def config_fields(peft_type: str) -> dict[str, dataclasses.Field]:
    """Settable fields of the method's config class, by name."""
    cls = method_spec(peft_type).config_cls
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in _RESERVED}


def parse_value(field_name: str, text: str) -> Any:
    """A command-line string as a JSON value when it parses ("8", "0.1", "true"), else the string.

    List fields split on commas, so `--target-modules query,value` gives ["query", "value"].
    """
    if field_name in _LIST_FIELDS:
        if text == "all-linear":  # peft's keyword value, not a one-item list
            return text
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


def build_config(peft_type: str, task_type: Optional[str], values: Mapping[str, Any], train_steps: Optional[int] = None) -> Any:
    """Instantiate the method's config from its CLI defaults overridden by `values`.

    A default of `TRAIN_STEPS` (e.g. AdaLoRA's `total_step`) becomes `train_steps`, the run's number
    of optimizer steps (at least 1), or 1000 when the caller does not know it.
    """
    fields = config_fields(peft_type)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CliError(f"unknown option(s) for {peft_type}: {', '.join(unknown)}")
    spec = method_spec(peft_type)
    steps = _FALLBACK_TRAIN_STEPS if train_steps is None else max(train_steps, 1)
    defaults = {name: steps if value == TRAIN_STEPS else value for name, value in spec.cli_defaults.items()}
    kwargs = {**defaults, **values}
    try:
        return spec.config_cls(task_type=task_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CliError(f"bad {peft_type} option: {exc}") from exc
