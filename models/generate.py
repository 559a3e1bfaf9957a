"""Plain cached decoding and the `python -m models.generate` CLI.

    python -m models.generate --model=smollm2-135m-instruct --prompt="Name three fruits."

Prompts are left-padded to a multiple of 64 tokens so that prompts of similar length share one
compiled prefill; decoding is one jitted step per token.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import LlamaConfig
from models.errors import ModelError
from models.tokenizer import pad_batch

_BUCKET = 64


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _step(params, tokens, positions, segments, cache, *, config: LlamaConfig):
    logits, cache = llama.forward(params, tokens, positions, segments, cache, config=config)
    return logits[:, -1], cache


def generate_ids(params, config: LlamaConfig, prompt_ids: Sequence[int], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, stop_ids: Sequence[int] = (), seed: int = 0,
                 pad_id: int = 0) -> list:
    """Token ids that continue `prompt_ids`: greedy at temperature 0, else sampled."""
    if not prompt_ids:
        raise ValueError("generate: the prompt has no tokens")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    padded = -(-len(prompt_ids) // _BUCKET) * _BUCKET
    cache_len = padded + -(-max_new_tokens // _BUCKET) * _BUCKET
    tokens, positions, segments = pad_batch([list(prompt_ids)], pad_id, padded, left=True)
    cache = llama.init_cache(config, 1, cache_len)
    logits, cache = _step(params, tokens, positions, segments, cache, config=config)
    rng = jax.random.PRNGKey(seed)
    out, pos = [], len(prompt_ids)
    one = np.ones((1, 1), np.int32)
    for _ in range(max_new_tokens):
        if temperature > 0:
            rng, key = jax.random.split(rng)
            token = int(jax.random.categorical(key, logits[0] / temperature))
        else:
            token = int(jnp.argmax(logits[0]))
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        logits, cache = _step(params, one * token, one * pos, one, cache, config=config)
        pos += 1
    return out


def chat(model, messages: list, **kwargs) -> str:
    """The model's reply to a chat (list of {"role", "content"}), decoded to text."""
    tok = model.tokenizer
    prompt = tok.encode_chat(messages, add_generation_prompt=True).ids
    stop = set(model.config.eos_token_ids)
    if tok.eos_id is not None:
        stop.add(tok.eos_id)
    pad = tok.eos_id if tok.eos_id is not None else 0
    ids = generate_ids(model.params, model.config, prompt, stop_ids=tuple(stop), pad_id=pad,
                       **kwargs)
    if ids and ids[-1] in stop:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


def main(argv: Optional[list] = None) -> int:
    import argparse

    from models import registry

    p = argparse.ArgumentParser(prog="python -m models.generate",
                                description="Reply to one prompt with a model.")
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help="a known name (%s), an HF checkpoint directory or a .gguf file"
                   % ", ".join(sorted(registry.KNOWN)))
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="param and compute dtype")
    p.add_argument("--tokenizer", default=None, help="tokenizer path, if not beside the model")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    try:
        model = registry.load(args.model, tokenizer_path=args.tokenizer, param_dtype=args.dtype,
                              dtype=args.dtype)
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        reply = chat(model, messages, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, seed=args.seed)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
