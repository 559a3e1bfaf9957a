"""The `python -m models.generate` CLI: replies from a model to one prompt or a JSONL batch.

    python -m models.generate --model=smollm2-135m-instruct --prompt="Name three fruits."
    python -m models.generate --batch_file=prompts.jsonl --output=replies.jsonl

A batch file has one JSON object per line: {"prompt": "...", "system": "..."} or
{"messages": [{"role": ..., "content": ...}, ...]}, with an optional "id". Each output line holds
the id (or line index), the reply, its finish reason and number of generated tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import jax

from models.errors import ModelError
from models.sampler import Sampler


def stop_ids(model) -> tuple:
    """Token ids that end a reply: the config's EOS ids and the tokenizer's EOS."""
    ids = set(model.config.eos_token_ids)
    if model.tokenizer.eos_id is not None:
        ids.add(model.tokenizer.eos_id)
    return tuple(sorted(ids))


def make_sampler(model) -> Sampler:
    """A sampler for `model` that pads with its EOS id (keep one per model: it holds the
    compiled executables)."""
    pad = model.tokenizer.eos_id if model.tokenizer.eos_id is not None else 0
    return Sampler(model.config, pad_id=pad)


def chat_batch(model, chats: Sequence[list], *, sampler: Optional[Sampler] = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_strings: Sequence[str] = ()):
    """Replies to many chats in one sampler call; returns the SampleOutput (with .texts)."""
    tok = model.tokenizer
    prompts = [tok.encode_chat(c, add_generation_prompt=True).ids for c in chats]
    sampler = sampler or make_sampler(model)
    return sampler.generate(model.params, prompts, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            rng=jax.random.PRNGKey(seed), stop_ids=stop_ids(model),
                            stop_strings=stop_strings, tokenizer=tok)


def chat(model, messages: list, **kwargs) -> str:
    """The model's reply to one chat (list of {"role", "content"})."""
    return chat_batch(model, [messages], **kwargs).texts[0]


def _read_batch(path: str) -> tuple[list, list]:
    ids, chats = [], []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise ValueError(f"--batch_file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object")
        if "messages" in item:
            msgs = item["messages"]
            if not isinstance(msgs, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in msgs):
                raise ValueError(f"{path}:{n}: 'messages' must be a list of "
                                 "{\"role\": str, \"content\": str}")
        elif isinstance(item.get("prompt"), str):
            msgs = ([{"role": "system", "content": item["system"]}] if item.get("system") else [])
            msgs.append({"role": "user", "content": item["prompt"]})
        else:
            raise ValueError(f"{path}:{n}: needs a string 'prompt' or a 'messages' list")
        ids.append(item.get("id", len(chats)))
        chats.append(msgs)
    if not chats:
        raise ValueError(f"{path}: no prompts in the file")
    return ids, chats


def main(argv: Optional[list] = None) -> int:
    from models import registry

    p = argparse.ArgumentParser(prog="python -m models.generate",
                                description="Replies from a model to a prompt or a JSONL batch.")
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help="a known name (%s), an HF checkpoint directory or a .gguf file"
                   % ", ".join(sorted(registry.KNOWN)))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--batch_file", help="JSONL of prompts (see the module docstring)")
    p.add_argument("--output", default=None, help="JSONL replies for --batch_file (default stdout)")
    p.add_argument("--system", default=None, help="an optional system message for --prompt")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="param and compute dtype")
    p.add_argument("--matmul_dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the weight matmuls' inputs (f32 accumulation); default: --dtype")
    p.add_argument("--tokenizer", default=None, help="tokenizer path, if not beside the model")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.batch_size < 1:
        p.error("need --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0, --batch_size >= 1")
    try:
        if args.batch_file:
            ids, chats = _read_batch(args.batch_file)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            ids, chats = [0], [msgs + [{"role": "user", "content": args.prompt}]]
        model = registry.load(args.model, tokenizer_path=args.tokenizer, param_dtype=args.dtype,
                              dtype=args.dtype, matmul_dtype=args.matmul_dtype)
        sampler = make_sampler(model)
        kw = dict(sampler=sampler, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, stop_strings=args.stop)
        out_file = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        for start in range(0, len(chats), args.batch_size):
            out = chat_batch(model, chats[start:start + args.batch_size],
                             seed=args.seed + start, **kw)
            for j, text in enumerate(out.texts):
                if not args.batch_file:
                    print(text)
                    continue
                record = {"id": ids[start + j], "reply": text,
                          "finish_reason": out.finish_reasons[j], "num_tokens": int(out.lengths[j])}
                out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_file.flush()
        if args.output:
            out_file.close()
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
