"""Real 2-process runs (gloo, CPU) of DDP, FSDP1 and FSDP2 on tiny models, checked against one process.

One `torch.distributed.run` launch runs every scenario (imports dominate the cost); this file is
also the worker (`python -m torch.distributed.run ... tests/test_distributed.py OUT`). Each
scenario trains a few steps with each rank on its own batch; the single-process reference trains
the same model on both batches concatenated, which has the same averaged gradient.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models  # noqa: E402

from peftkit import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

WORLD = 2
STEPS = 4
LR = 0.02
REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("ddp_llama", "ddp_bert", "fsdp2_llama", "fsdp1_llama")


# ------------------------------------------------------------------------------- shared recipe
def rank_batch(rank: int, task: str) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(2, tiny_models.VOCAB, (2, 8), generator=generator)
    labels = ids if task == "lm" else torch.randint(0, 3, (2,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def full_batch(task: str) -> dict:
    parts = [rank_batch(rank, task) for rank in range(WORLD)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def build(scenario: str, init_dir: str) -> torch.nn.Module:
    """The peftkit model of a scenario, identical on every rank and in the reference."""
    if scenario == "ddp_bert":  # SEQ_CLS: the classifier is a modules_to_save copy
        bert = tiny_models.bert_seq_cls()
        for module in bert.modules():  # dropout draws differ between ranks and the reference
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return get_peft_model(bert, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    if scenario == "fsdp1_llama":  # an adapter loaded before wrapping
        return PeftModel.from_pretrained(tiny_models.llama(), init_dir, is_trainable=True)
    model = get_peft_model(tiny_models.llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if scenario == "ddp_llama":  # several adapters, one active, with gradient checkpointing
        model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"))
        model.set_adapter("default")
        model.gradient_checkpointing_enable()
    return model


def train(model: torch.nn.Module, batch: dict) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def task_of(scenario: str) -> str:
    return "cls" if scenario == "ddp_bert" else "lm"


# ------------------------------------------------------------------------------- worker side
def _wrap(scenario: str, model: torch.nn.Module) -> torch.nn.Module:
    from peftkit.distributed import fsdp_auto_wrap_policy, shard_peft_model

    if scenario.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)  # no find_unused_parameters needed
    if scenario == "fsdp2_llama":
        return shard_peft_model(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))


def worker(out: Path) -> None:
    import torch.distributed as dist

    from peftkit.distributed import gather_adapter_state_dict, save_pretrained_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for scenario in SCENARIOS:
        model = _wrap(scenario, build(scenario, str(out / "init")))
        losses = train(model, rank_batch(rank, task_of(scenario)))
        state = gather_adapter_state_dict(model)
        torch.save(state, out / f"{scenario}_rank{rank}.pt")
        (out / f"{scenario}_losses{rank}.json").write_text(json.dumps(losses))
        save_pretrained_distributed(model, str(out / scenario))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------- test side
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, *args: str, timeout: float = 120, attempts: int = 2) -> subprocess.CompletedProcess:
    """Run `script` in 2 gloo processes on 127.0.0.1; a hang fails after `timeout` seconds.

    A hung launch is killed with every process it started (torchrun's workers may sit in their own
    sessions, out of reach of the launcher's process group, and would keep the output pipes open) and
    tried once more: gloo can deadlock at a rank's teardown on a loaded machine, which says nothing
    about the code under test. A second hang fails the test with both ranks' output.
    """
    for attempt in range(1, attempts + 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", script, *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            stdout, stderr = proc.communicate(timeout=30)
            if attempt == attempts:
                pytest.fail(f"torchrun hung for {timeout} s ({attempts} attempts):\n{stdout[-3000:]}\n{stderr[-6000:]}")
            continue
        assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    raise AssertionError("unreachable")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant (found before any is killed), then its process group."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Launch the workers once for every scenario; the folder holds what they wrote."""
    out = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(3)
    init = get_peft_model(
        tiny_models.llama(),
        LoraConfig(r=4, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM", init_lora_weights=False),
    )
    init.save_pretrained(str(out / "init"))
    torchrun(__file__, str(out))
    return out


def reference(scenario: str, out: Path) -> tuple[torch.nn.Module, list[float]]:
    model = build(scenario, str(out / "init"))
    losses = train(model, full_batch(task_of(scenario)))
    return model.eval(), losses


def _check_scenario(scenario: str, out: Path) -> None:
    from safetensors.torch import load_file

    ranks = [torch.load(out / f"{scenario}_rank{rank}.pt") for rank in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{scenario}: ranks differ at {key}"
    losses = [json.loads((out / f"{scenario}_losses{rank}.json").read_text()) for rank in range(WORLD)]
    assert all(rank_losses[-1] < rank_losses[0] for rank_losses in losses), losses

    ref_model, ref_losses = reference(scenario, out)
    assert ref_losses[-1] < ref_losses[0]
    expected = get_peft_model_state_dict(ref_model)
    saved = load_file(out / scenario / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(saved[key], tensor, atol=1e-5, rtol=1e-4, msg=f"{scenario}: {key}")
        torch.testing.assert_close(ranks[0][key], tensor, atol=1e-5, rtol=1e-4, msg=f"{scenario}: {key}")

    # This process did not train: loading here is a fresh-process load of what rank 0 wrote.
    base = tiny_models.bert_seq_cls() if scenario == "ddp_bert" else tiny_models.llama()
    loaded = PeftModel.from_pretrained(base, str(out / scenario))
    batch = full_batch(task_of(scenario))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref_model(**batch).logits, atol=1e-4, rtol=1e-4)


def test_ddp_gradient_checkpointing_several_adapters(run_dir):
    out = run_dir
    _check_scenario("ddp_llama", out)
    # The inactive adapter is saved too, untouched by training.
    other = json.loads((out / "ddp_llama" / "other" / "adapter_config.json").read_text())
    assert other["r"] == 2


def test_ddp_modules_to_save(run_dir):
    out = run_dir
    _check_scenario("ddp_bert", out)
    saved = (out / "ddp_bert_rank0.pt")
    assert any("classifier" in key for key in torch.load(saved)), "modules_to_save copy missing"


def test_fsdp2_fully_shard(run_dir):
    _check_scenario("fsdp2_llama", run_dir)


def test_fsdp1_auto_wrap_policy_adapter_loaded_before_wrapping(run_dir):
    _check_scenario("fsdp1_llama", run_dir)


def test_inactive_adapter_is_frozen():
    model = build("ddp_llama", "")
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(".default." in name for name in trainable)


def test_fsdp_auto_wrap_policy_picks_layers_and_trainable_leaves():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from peftkit import fsdp_auto_wrap_policy

    model = build("fsdp2_llama", "")
    policy = fsdp_auto_wrap_policy(model)
    wrapped = {name for name, module in model.named_modules() if policy(module=module, recurse=False, nonwrapped_numel=0)}
    layers = {name for name, module in model.named_modules() if isinstance(module, LlamaDecoderLayer)}
    assert layers <= wrapped
    assert any(name.endswith("q_proj.lora_A.default") for name in wrapped)
    assert not any(name.endswith("q_proj.base_layer") for name in wrapped)


def test_example_script_runs_under_torchrun(tmp_path):
    torchrun("examples/train_distributed.py", "--output-dir", str(tmp_path / "adapter"), "--max-steps", "2")
    loaded = PeftModel.from_pretrained(tiny_models.llama(), str(tmp_path / "adapter"))
    assert any(param.abs().sum() > 0 for name, param in loaded.named_parameters() if "lora_B" in name)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # skip teardown: gloo's process-group destructor can deadlock on the GIL at exit
