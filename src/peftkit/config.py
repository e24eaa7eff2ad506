"""`PeftConfig`: the fields every adapter config shares, as plain data.

`to_dict` gives every dataclass field as JSON-ready values (sets as lists, enums as strings);
`adapter_config.json` is written and read by `checkpoint.adapter_folder` (keys sorted, indent 2,
`inference_mode: true`, plus `peft_version` -- the layout Hugging Face peft reads and writes).
Loading ignores unknown keys with a warning, so files from newer peft versions still load.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .errors import ConfigError
from .utils.constants import PEFT_FORMAT_VERSION
from .utils.peft_types import PeftType, TaskType

# Keys peft writes or reads that are never dataclass fields of ours.
_IGNORED_KEYS = frozenset({"runtime_config"})


@dataclass
class PeftConfig:
    """Base config of every method: task, method and provenance fields.

    Args:
        task_type: Which task wrapper to build (`TaskType` value or its string), or None.
        peft_type: The method; set by each subclass.
        auto_mapping: Written by peft for models without a task type; kept as read.
        peft_version: The peft checkpoint-format version this config was written for.
        base_model_name_or_path: The base model the adapter was trained on.
        revision: Hub revision of the base model.
        inference_mode: When True, adapter weights are frozen.
    """

    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "Task type"})
    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "PEFT method"})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Auto mapping written by peft"})
    peft_version: Optional[str] = field(default=None, metadata={"help": "Checkpoint format version"})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model"})
    revision: Optional[str] = field(default=None, metadata={"help": "Base model revision"})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter"})

    # Fields that must keep their default: peft features peftkit does not implement yet.
    unsupported_fields: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if self.task_type is not None:
            self.task_type = _as_enum(TaskType, self.task_type, "task_type")
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        for name in ("peft_version", "base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}={value!r} is invalid; it must be a string or null.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ConfigError(f"auto_mapping={self.auto_mapping!r} is invalid; it must be an object or null.")
        if not isinstance(self.inference_mode, bool):
            raise ConfigError(f"inference_mode={self.inference_mode!r} is invalid; it must be true or false.")
        for name, default in self.unsupported_fields.items():
            if getattr(self, name) not in (default, None, {}, False):
                raise ConfigError(
                    f"{type(self).__name__}.{name}={getattr(self, name)!r} is a peft feature that "
                    f"peftkit does not support yet; leave `{name}` at its default ({default!r})."
                )

    # ------------------------------------------------------------------ properties
    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that learn virtual tokens instead of wrapping layers."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values (sets become lists, enums their strings);
        run-time-only fields (`runtime_config`) are left out, as peft leaves them out."""
        return {
            f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in _IGNORED_KEYS
        }

    def to_json_string(self) -> str:
        """The fields as `adapter_config.json` text (keys sorted, indent 2)."""
        from .checkpoint.adapter_folder import config_text

        return config_text(self.to_dict())

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write `adapter_config.json` into `save_directory` (atomically; see `checkpoint.adapter_folder`)."""
        from .checkpoint.adapter_folder import write_adapter_config

        output = self.to_dict()
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        write_adapter_config(save_directory, output)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "PeftConfig":
        """Build the config subclass named by `kwargs["peft_type"]`."""
        from .registry import config_class_for

        if "peft_type" not in kwargs:
            raise ConfigError("The adapter config has no `peft_type`; add e.g. \"peft_type\": \"LORA\".")
        return config_class_for(kwargs["peft_type"]).from_dict(kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build from a dict as read from JSON: unknown keys are warned about and dropped."""
        if not isinstance(data, dict):
            raise ConfigError(f"An adapter config must be a JSON object, got {type(data).__name__}.")
        if cls.peft_type_default() is None:
            return cls.from_peft_type(**data)
        expected = cls.peft_type_default()
        if "peft_type" in data and data["peft_type"] is not None and str(data["peft_type"]) != str(expected):
            raise ConfigError(
                f"This config is for peft_type {data['peft_type']!r}, not {expected}; "
                f"load it with PeftConfig.from_pretrained, which picks the right class."
            )
        if "runtime_config" in data:
            warnings.warn(
                "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations "
                "are only valid at runtime.",
                stacklevel=3,
            )
        names = {f.name for f in dataclasses.fields(cls)} - _IGNORED_KEYS
        unknown = sorted(set(data) - names - _IGNORED_KEYS)
        if unknown:
            warnings.warn(
                f"Ignoring unknown keys {unknown} in the {cls.__name__} config "
                "(probably written by a newer peft version).",
                stacklevel=3,
            )
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"Bad {cls.__name__} fields: {exc}") from exc

    @classmethod
    def peft_type_default(cls) -> Optional[str]:
        """The peft_type a subclass fixes, or None for the base class."""
        for f in dataclasses.fields(cls):
            if f.name == "peft_type" and f.default is not dataclasses.MISSING:
                return None if f.default is None else str(f.default)
        return None

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict[str, Any]:
        """Read a config JSON file into a dict, with a clear error for a damaged file."""
        from .checkpoint.adapter_folder import read_config_file

        return read_config_file(path_json_file)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> "PeftConfig":
        """Load `adapter_config.json` from a local directory or a hub repo id."""
        from .checkpoint.adapter_folder import read_adapter_config

        return cls.from_dict(read_adapter_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs))


def _as_enum(enum_cls: type, value: Any, field_name: str) -> Any:
    try:
        return enum_cls(str(value.value if isinstance(value, enum_cls) else value))
    except ValueError:
        choices = ", ".join(member.value for member in enum_cls)
        raise ConfigError(f"Invalid {field_name} {value!r}; use one of: {choices}.") from None


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (PeftType, TaskType)):
        return value.value
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
