"""Saves are atomic: a process killed mid-save leaves the old adapter or the new one, never a mix."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.checkpoint.io import load_adapter_weights
from peftkit.utils.files import commit_files, recover_interrupted_save, text_writer
from tests.tiny_models import llama

# Saves version k of a ~40 MB adapter forever: every weight equals k and lora_alpha == k, so a
# folder mixing two versions is detectable by comparing the config with the weights.
SAVER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from peftkit import LoraConfig, get_peft_model
    out = sys.argv[1]
    base = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    version = 1
    print("ready", flush=True)
    while True:
        model = get_peft_model(base, LoraConfig(r=1200, lora_alpha=version, target_modules=["0", "1", "2", "3"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.fill_(float(version))
        model.save_pretrained(out)
        base = model.unload()
        version += 1
    """
)


def _consistent_version(folder: str) -> int:
    config = PeftConfig.from_pretrained(folder)
    weights = load_adapter_weights(folder)
    values = {float(tensor.flatten()[0]) for tensor in weights.values()}
    assert values == {float(config.lora_alpha)}, f"mixed adapter: config alpha {config.lora_alpha}, weights {values}"
    return config.lora_alpha


@pytest.mark.slow
def test_killing_a_process_mid_save_never_leaves_a_mix(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    out = tmp_path / "adapter"
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, cwd=os.getcwd())
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        proc.wait()
        if (out / "adapter_config.json").exists():
            seen.add(_consistent_version(str(out)))
    assert seen, "no save completed; the test would be vacuous"
    assert not [name for name in os.listdir(out) if "pending" in name or name.startswith(".tmp-")]


def test_interrupted_commit_is_rolled_forward_and_uncommitted_one_dropped(tmp_path):
    folder = str(tmp_path)
    commit_files(folder, {"a.txt": text_writer("old-a"), "b.txt": text_writer("old-b")})
    # Crash after the commit point: pending files and journal exist, one rename happened.
    (tmp_path / "b.txt.peftkit-pending").write_text("new-b")
    (tmp_path / "a.txt").write_text("new-a")
    (tmp_path / ".peftkit-commit.json").write_text(json.dumps(["a.txt", "b.txt"]))
    recover_interrupted_save(folder)
    assert (tmp_path / "a.txt").read_text() == "new-a" and (tmp_path / "b.txt").read_text() == "new-b"
    # Crash before the commit point: only pending files, no journal -> old files stay.
    (tmp_path / "a.txt.peftkit-pending").write_text("newer-a")
    recover_interrupted_save(folder)
    assert (tmp_path / "a.txt").read_text() == "new-a"
    assert sorted(os.listdir(folder)) == ["a.txt", "b.txt"]


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peftkit.utils.files.save_file", broken_save)
    other = get_peft_model(llama(), LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    assert loaded.peft_config["default"].r == 2
