"""The package layers of docs/ARCHITECTURE.md: each imports only from the layers below it.

    peft_model / mapping / auto / cli / integrations      (top)
    checkpoint
    registry
    tuners  (tuners/_core below the method folders)
    quantization                                          (weight formats)
    config / utils / errors                               (bottom)

Every `import` statement is read from the source (function-level ones too), so a lazy import
cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "peftkit"

#: What each layer may not import (prefixes of dotted module names inside peftkit).
ABOVE_TUNERS = ("peft_model", "mapping", "auto", "cli", "integrations", "checkpoint", "distributed", "demo",
                "hotswap", "merging", "optimizers", "routing", "functional")
FORBIDDEN = {
    "tuners": ABOVE_TUNERS,
    "quantization": ("tuners", "registry", *ABOVE_TUNERS),
    "utils": ("tuners", "quantization", "registry", *ABOVE_TUNERS),
    "registry": ("tuners", *ABOVE_TUNERS),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def peftkit_imports(path: Path) -> set[str]:
    """Dotted names (relative to the peftkit package) of the peftkit modules `path` imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("peftkit.") for alias in node.names if alias.name.startswith("peftkit."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("peftkit."):
                    found.add(node.module.removeprefix("peftkit."))
                continue
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None:  # `from . import x`
                found.update(f"{target}.{alias.name}".lstrip(".") for alias in node.names)
            else:
                found.add(target)
    return found


def layer_of(module: str) -> str:
    return module.split(".")[0]


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        layer = layer_of(_module_name(path)) if path != SRC / "__init__.py" else ""
        for imported in sorted(peftkit_imports(path)):
            if any(imported == bad or imported.startswith(bad + ".") for bad in FORBIDDEN.get(layer, ())):
                found.append(f"{path.relative_to(SRC)} imports peftkit.{imported}")
    return found


def test_no_layer_imports_from_a_layer_above_it():
    assert violations() == []


def test_the_scanner_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The check itself can fail: a lazy relative import from tuners/ up to peft_model is reported."""
    fake = tmp_path / "peftkit"
    (fake / "tuners" / "toy").mkdir(parents=True)
    (fake / "tuners" / "toy" / "model.py").write_text("def f():\n    from ...peft_model import PeftModel\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert violations() == ["tuners/toy/model.py imports peftkit.peft_model"]


@pytest.mark.parametrize("layer", ["tuners", "quantization"])
def test_core_layers_exist(layer):
    assert (SRC / layer / "__init__.py").is_file()
