"""Train a LoRA adapter in several processes with DDP, FSDP2 or FSDP1, then save it from rank 0.

    torchrun --nproc_per_node 2 examples/train_distributed.py --strategy ddp --output-dir out/adapter
    accelerate launch --num_processes 2 examples/train_distributed.py --strategy fsdp2

Runs on CPU (gloo) with a tiny Llama built from a config, so it needs no download; on GPUs it
uses nccl. Swap `build_model` for `AutoModelForCausalLM.from_pretrained(...)` for real work.
See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, fsdp_auto_wrap_policy, get_peft_model
from peftkit.distributed import save_pretrained_distributed, shard_peft_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2", "fsdp1"], default="ddp")
    parser.add_argument("--output-dir", default="distributed-adapter")
    parser.add_argument("--resume-from", default=None, help="an adapter folder to keep training (loaded before wrapping)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args()


def build_model(resume_from: str | None) -> torch.nn.Module:
    """A tiny Llama with a LoRA adapter; every rank builds the same one (same seed)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, initializer_range=0.2,
    )
    base = LlamaForCausalLM(config)
    if resume_from is not None:  # load first, wrap second: the engines shard what is already there
        return PeftModel.from_pretrained(base, resume_from, is_trainable=True)
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def wrap(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        return shard_peft_model(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=device)


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    model = build_model(args.resume_from).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant: fine under DDP
    model = wrap(model, args.strategy, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the data
    input_ids = torch.randint(2, 96, (2, 8), generator=generator).to(device)
    for step in range(args.max_steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    # Every rank joins the gather; only rank 0 writes.
    save_pretrained_distributed(model, args.output_dir)
    if rank == 0:
        print(f"saved adapter to {args.output_dir}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: freeing a DDP Reducer after the gloo group can deadlock in
    # ProcessGroupGloo's destructor (it joins a worker thread that waits for the GIL).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
