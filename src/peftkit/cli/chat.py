"""`peftkit chat` and `peftkit generate`: try a causal-LM adapter from the command line, output streamed.

    peftkit chat --adapter out/adapter                  # a conversation on stdin; /reset, /exit
    peftkit generate --adapter out/adapter --prompt "Tell me a joke"

The base model is the adapter's `base_model_name_or_path` (or `--base`); the tokenizer is the one
saved beside the adapter when there is one (`peftkit train` saves it), else the base model's. A
tokenizer with a chat template formats the conversation; without one, turns are written as
"User: ..." / "Assistant: ..." lines.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch

from .adapter_files import read_adapter
from .errors import CliError
from .features import has_chat_template
from .modeling import load_model, load_tokenizer, quiet_transformers

EXAMPLES = """examples:
  peftkit chat --adapter out/adapter
  peftkit chat --adapter out/adapter --base ./my-llama --system "You are terse." --temperature 0.7
  peftkit generate --adapter out/adapter --prompt "Write a haiku about rain" --max-new-tokens 64
  echo "hello" | peftkit chat --adapter out/adapter    # one turn per input line"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", help="adapter folder (default: the plain base model)")
    parser.add_argument("--base", help="base model folder or hub id (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per reply (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--system", help="system message put first in the conversation")
    parser.add_argument("--no-stream", action="store_true", help="print each reply at once instead of token by token")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def add_parser(subparsers: Any) -> None:
    """Register `peftkit chat` and `peftkit generate`."""
    chat = subparsers.add_parser("chat", help="chat with a causal-LM adapter (streamed)", description=__doc__.splitlines()[0],
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(chat)
    chat.set_defaults(handler=run_chat)
    generate = subparsers.add_parser("generate", help="generate one reply to --prompt (streamed)",
                                     description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(generate)
    generate.add_argument("--prompt", required=True, help="the user message")
    generate.set_defaults(handler=run_generate)


def load_for_chat(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer): base + adapter, on the GPU when there is one."""
    from peftkit import PeftModel

    quiet_transformers()
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    adapter = read_adapter(args.adapter) if args.adapter else None
    base_id = args.base or (adapter.base_model() if adapter else None)
    if not base_id:
        raise CliError("pass --base MODEL (the adapter does not name its base model)" if adapter else "pass --adapter DIR or --base MODEL")
    if adapter is not None and adapter.task not in (None, "causal-lm"):
        raise CliError(f"chat needs a causal-LM adapter; {args.adapter} is for {adapter.task}")
    has_own_tokenizer = adapter is not None and os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json"))
    tokenizer = load_tokenizer(args.adapter if has_own_tokenizer else base_id)
    model = load_model(base_id, "causal-lm", tokenizer=tokenizer)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> torch.Tensor:
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        text = "".join(f"{names.get(m['role'], m['role'])}: {m['content']}\n" for m in messages) + "Assistant:"
    return torch.tensor([tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]])


def reply(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    """Generate the assistant's next turn (streamed to stdout unless --no-stream) and return its text."""
    from transformers import TextStreamer

    ids = _prompt_ids(tokenizer, messages).to(next(model.parameters()).device)
    sampling = args.temperature > 0
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sampling,
                               "pad_token_id": tokenizer.pad_token_id, "attention_mask": torch.ones_like(ids)}
    if sampling:
        torch.manual_seed(args.seed)
        options.update(temperature=args.temperature, top_p=args.top_p)
    if not args.no_stream:
        options["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(input_ids=ids, **options)
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    if args.no_stream:
        print(text, flush=True)
    return text


def _start(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def run_generate(args: argparse.Namespace, extra: Sequence[str]) -> int:
    model, tokenizer = load_for_chat(args)
    reply(model, tokenizer, _start(args) + [{"role": "user", "content": args.prompt}], args)
    return 0


def run_chat(args: argparse.Namespace, extra: Sequence[str], stdin: Optional[Any] = None) -> int:
    """One user turn per input line; `/reset` starts over, `/exit` (or end of input) quits."""
    model, tokenizer = load_for_chat(args)
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    if interactive:
        print("type a message (/reset to start over, /exit to quit)")
    messages = _start(args)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = _start(args)
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, args)})
