"""Saves are atomic and readers never write (utils/commits.py).

A process killed mid-save leaves the old adapter or the new one, never a mix; a reader polling a
folder while another process saves there reads one whole save every time and changes nothing;
two writers each commit whole. The concurrency tests use real processes, bounded in time.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peftkit.checkpoint.adapter_folder import read_adapter
from peftkit.errors import CheckpointError
from peftkit.utils import commits
from peftkit.utils.commits import AREA, commit_files, recover_interrupted_save
from peftkit.utils.files import text_writer
from tests.tiny_models import llama

# Saves version k of an adapter (k = start, start + step, ...): every weight equals k and
# lora_alpha == k, so a folder mixing two versions is detectable by comparing config and weights.
SAVER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from peftkit import LoraConfig, get_peft_model
    out, start, step, count, width, rank = sys.argv[1], *map(int, sys.argv[2:7])
    base = nn.Sequential(*[nn.Linear(width, width) for _ in range(4)])
    print("ready", flush=True)
    version = start
    for _ in range(count) if count > 0 else iter(int, 1):
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=version, target_modules=["0", "1", "2", "3"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.fill_(float(version))
        model.save_pretrained(out, safe_serialization=version % 3 != 0)  # .bin now and then: a stale file to drop
        base = model.unload()
        version += step
    """
)

# Reads the folder until it is told to stop (a file appears), checking every read is one whole save.
READER = textwrap.dedent(
    """
    import os, sys, time
    from peftkit import PeftConfig
    from peftkit.checkpoint.adapter_folder import read_adapter
    folder, stop = sys.argv[1], sys.argv[2]
    reads = 0
    print("ready", flush=True)
    while not os.path.exists(stop):
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            continue
        PeftConfig.from_pretrained(folder)  # a config-only read never disturbs the writer
        checkpoint = read_adapter(folder)
        values = {float(t.flatten()[0]) for t in checkpoint.weights.values()}
        if values != {float(checkpoint.config["lora_alpha"])}:
            print(f"MIXED alpha={checkpoint.config['lora_alpha']} weights={values}", flush=True)
            sys.exit(3)
        reads += 1
    print(f"reads {reads}", flush=True)
    """
)


def _start(tmp_path, script: str, *args: object) -> subprocess.Popen:
    path = tmp_path / f"{script}-{random.random()}.py"
    path.write_text(SAVER if script == "saver" else READER)
    proc = subprocess.Popen(
        [sys.executable, str(path), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd()
    )
    assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()[-2000:]
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err).decode()[-3000:]
    return out.decode()


def _consistent_version(folder: str) -> int:
    checkpoint = read_adapter(folder)
    values = {float(tensor.flatten()[0]) for tensor in checkpoint.weights.values()}
    alpha = checkpoint.config["lora_alpha"]
    assert values == {float(alpha)}, f"mixed adapter: config alpha {alpha}, weights {values}"
    return alpha


def _snapshot(folder) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` (relative path -> bytes, mtime): what 'reading never writes' compares."""
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = (handle.read(), os.stat(path).st_mtime_ns)
    return found


def _visible(folder) -> set[str]:
    return {name for name in os.listdir(folder) if name != AREA}


def _leftovers(folder) -> list[str]:
    """What the lock area holds besides its lock file: stages or a journal left by dead saves."""
    area = os.path.join(folder, AREA)
    return sorted(set(os.listdir(area)) - {"lock"}) if os.path.isdir(area) else []


@pytest.mark.slow
def test_killing_a_process_mid_save_never_leaves_a_mix(tmp_path):
    out = tmp_path / "adapter"
    rng = random.Random(0)
    seen = set()
    for _ in range(6):
        proc = _start(tmp_path, "saver", out, 1, 1, 0, 1024, 1200)  # ~40 MB per save, forever
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        proc.wait()
        if (out / "adapter_config.json").exists():
            seen.add(_consistent_version(str(out)))
    assert seen, "no save completed; the test would be vacuous"
    # What the kills left (a stage, safetensors' own temporary files inside it) goes with the next save.
    _finish(_start(tmp_path, "saver", out, 7, 1, 1, 64, 4))
    assert _leftovers(out) == [] and _consistent_version(str(out)) == 7
    assert _visible(out) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.mark.slow
def test_a_reader_polling_during_saves_sees_whole_saves_and_the_writer_never_fails(tmp_path):
    out, stop = tmp_path / "adapter", tmp_path / "stop"
    _finish(_start(tmp_path, "saver", out, 1, 1, 1, 256, 64))
    reader = _start(tmp_path, "reader", out, stop)
    writer = _start(tmp_path, "saver", out, 2, 1, 60, 256, 64)  # ~1 MB per save
    try:
        _finish(writer)
    finally:
        stop.write_text("")
    reads = int(_finish(reader).split()[-1])
    assert reads > 0
    assert _consistent_version(str(out)) == 61 and _leftovers(out) == []


@pytest.mark.slow
def test_two_writers_each_commit_whole_and_the_later_wins(tmp_path):
    out, stop = tmp_path / "adapter", tmp_path / "stop"
    reader = _start(tmp_path, "reader", out, stop)
    odd = _start(tmp_path, "saver", out, 1, 2, 30, 256, 64)
    even = _start(tmp_path, "saver", out, 2, 2, 30, 256, 64)
    try:
        _finish(odd)
        _finish(even)
    finally:
        stop.write_text("")
    _finish(reader)
    assert _consistent_version(str(out)) in {59, 60} and _leftovers(out) == []


def _saved(folder, r: int = 2) -> PeftModel:
    model = get_peft_model(llama(), LoraConfig(r=r, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(folder))
    return model


def test_loading_never_writes_and_never_prefers_hidden_files(tmp_path):
    """An older peftkit's hidden journal + pending weights, and user files named `.tmp-*`, stay as they are;
    the visible weights are what loads."""
    model = _saved(tmp_path)
    hidden = {name: torch.full_like(t, 7.0) for name, t in read_adapter(str(tmp_path)).weights.items()}
    from safetensors.torch import save_file

    save_file(hidden, str(tmp_path / "adapter_model.safetensors.peftkit-pending"))
    (tmp_path / ".peftkit-commit.json").write_text(json.dumps(["adapter_model.safetensors"]))
    (tmp_path / ".tmp-notes").write_text("mine")
    (tmp_path / ".tmp-cache").mkdir()
    before = _snapshot(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    PeftConfig.from_pretrained(str(tmp_path))
    assert _snapshot(tmp_path) == before
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # The next save is the writer's step: it drops the old peftkit's pending files, never the user's.
    model.save_pretrained(str(tmp_path))
    assert {".tmp-notes", ".tmp-cache"} <= set(os.listdir(tmp_path))
    assert not {".peftkit-commit.json", "adapter_model.safetensors.peftkit-pending"} & set(os.listdir(tmp_path))


def test_a_folder_without_a_lock_is_read_as_is(tmp_path):
    """A folder with no lock area (peft's folders, copies) is read without creating one."""
    model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path))
    import shutil

    shutil.rmtree(tmp_path / AREA)
    before = _snapshot(tmp_path)
    assert PeftModel.from_pretrained(llama(), str(tmp_path)).peft_config["default"].r == 2
    assert _snapshot(tmp_path) == before


def _stage_interrupted_commit(folder, renamed: list[str], staged: dict[str, str], remove=()):
    """What a writer killed inside its commit leaves: a journal, its stage, some renames done."""
    area = folder / AREA
    stage = area / "stage-dead"
    stage.mkdir(parents=True)
    for name, text in staged.items():
        if name not in renamed:
            (stage / name).write_text(text)
        else:
            (folder / name).write_text(text)
    (area / "journal.json").write_text(
        json.dumps({"stage": "stage-dead", "replace": sorted(staged), "remove": list(remove)})
    )


def test_a_commit_torn_by_a_crash_is_refused_by_readers_and_finished_by_the_next_writer(tmp_path):
    commit_files(str(tmp_path), {"a.txt": text_writer("old-a"), "b.txt": text_writer("old-b")})
    read_both = lambda: ((tmp_path / "a.txt").read_text(), (tmp_path / "b.txt").read_text())  # noqa: E731
    _stage_interrupted_commit(tmp_path, renamed=["a.txt"], staged={"a.txt": "new-a", "b.txt": "new-b"})
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="interrupted while it replaced its files"):
        commits.read_snapshot(str(tmp_path), read_both)
    assert _snapshot(tmp_path) == before  # the reader repaired nothing
    recover_interrupted_save(str(tmp_path))
    assert commits.read_snapshot(str(tmp_path), read_both) == ("new-a", "new-b")
    assert _leftovers(tmp_path) == []


def test_a_crashed_commit_before_or_after_its_renames_reads_whole(tmp_path):
    commit_files(str(tmp_path), {"a.txt": text_writer("old-a"), "b.txt": text_writer("old-b")})
    read_both = lambda: ((tmp_path / "a.txt").read_text(), (tmp_path / "b.txt").read_text())  # noqa: E731
    _stage_interrupted_commit(tmp_path, renamed=[], staged={"a.txt": "new-a", "b.txt": "new-b"})
    assert commits.read_snapshot(str(tmp_path), read_both) == ("old-a", "old-b")  # the commit point passed, no rename
    # The next commit finishes the crashed one first, then commits its own.
    commit_files(str(tmp_path), {"b.txt": text_writer("newer-b")})
    assert commits.read_snapshot(str(tmp_path), read_both) == ("new-a", "newer-b")
    assert _leftovers(tmp_path) == []


def test_a_failed_save_keeps_the_previous_adapter_and_leaves_nothing(tmp_path, monkeypatch):
    _saved(tmp_path)
    before = _snapshot(tmp_path)

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")  # half a file, then the disk is full
        raise OSError("disk full")

    monkeypatch.setattr("peftkit.utils.files.save_file", broken_save)
    other = get_peft_model(llama(), LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(str(tmp_path))
    assert _snapshot(tmp_path) == before and _leftovers(tmp_path) == []
    assert PeftModel.from_pretrained(llama(), str(tmp_path)).peft_config["default"].r == 2


@pytest.mark.parametrize("first_safe", [True, False])
def test_a_save_in_the_other_format_removes_the_stale_weights(tmp_path, first_safe):
    get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path), safe_serialization=first_safe
    )
    newer = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    newer.save_pretrained(str(tmp_path), safe_serialization=not first_safe)
    expected = "adapter_model.safetensors" if not first_safe else "adapter_model.bin"
    assert {n for n in _visible(tmp_path) if n.startswith("adapter_model")} == {expected}
    loaded = PeftModel.from_pretrained(llama(), str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, newer(input_ids=ids).logits)


def test_oversized_or_deeply_nested_configs_are_refused_before_reading_them_whole(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_config.json"
    with open(path, "wb") as handle:  # a sparse 3 GiB file: reading it whole would need 3 GiB
        handle.write(b"{")
        handle.truncate(3 * 2**30)
    with pytest.raises(CheckpointError, match="larger than 16 MiB"):
        PeftConfig.from_pretrained(str(tmp_path))
    for depth in (100, 100_000):
        path.write_text("[" * depth + "]" * depth)
        with pytest.raises(CheckpointError, match="nests JSON more than 32 levels"):
            PeftConfig.from_pretrained(str(tmp_path))
    path.write_text("null")
    with pytest.raises(CheckpointError, match="must hold a JSON object, found NoneType"):
        PeftConfig.from_pretrained(str(tmp_path))


def test_commit_refuses_names_outside_the_folder(tmp_path):
    for name in ("../x", AREA, "", "a/b"):
        with pytest.raises(CheckpointError, match="plain file names"):
            commit_files(str(tmp_path), {name: text_writer("x")})
    assert os.listdir(tmp_path) == []
