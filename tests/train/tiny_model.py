"""A tiny Llama checkpoint directory with a real word-level tokenizer, for end-to-end training tests.

The directory is what `models.registry.load` reads for any HF checkpoint: config.json, safetensors
weights, tokenizer.json and tokenizer_config.json with a chat template. The vocabulary covers the
colourname test game's colours and a few other words; all other prompt words become <unk>.
"""

from __future__ import annotations

import json
import os

import jax

from games import colourname
from models import llama, loader
from tests.conftest import tiny_config

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (["user", "assistant", "system", ".", ",", ":", "the", "a", "an", "of", "is", "word", "Think"]
         + list(colourname.COLOURS) + list(colourname.NON_COLOURS)
         + sorted({w for h in colourname.HINTS for w in h.split()}))
TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
            "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def write_tokenizer(path: str) -> int:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {}
    for w in SPECIALS + WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[1:]])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None}, f)
    return len(vocab)


def make_tiny_model(path: str, seed: int = 0, **overrides) -> str:
    """Writes the tiny model directory at `path` and returns it."""
    os.makedirs(path, exist_ok=True)
    n = write_tokenizer(path)
    eos = SPECIALS.index("<|im_end|>")
    cfg = tiny_config(vocab_size=n, bos_token_id=None, eos_token_ids=(eos,),
                      max_position_embeddings=512, **overrides)
    params = llama.init(cfg, jax.random.PRNGKey(seed))
    loader.save_hf(params, cfg, path)
    return path
