"""Tokenizers behind one interface, and chat templates with assistant-turn boundaries.

Sources: an HF `tokenizer.json` (+ `tokenizer_config.json`), a SentencePiece `.model`, or the
vocabulary embedded in a GGUF file. `encode` never adds special tokens by itself: chat templates
put BOS and turn markers into the text, and special-token strings in text map to their ids.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Any, Optional, Sequence

import numpy as np

from models.errors import TokenizerError

# Pre-tokenizers of the GGUF `tokenizer.ggml.pre` values we know (the regexes are the models' own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass
class ChatEncoding:
    """Token ids of a rendered chat, with which tokens the assistant wrote.

    assistant_mask[i] is 1 where token i belongs to an assistant message's content or its
    end-of-turn marker (what a policy must learn to produce), else 0. turns lists
    (message_index, start, end) token spans of the assistant messages.
    """

    ids: list
    assistant_mask: list
    turns: list


class Tokenizer:
    """Common interface; subclasses implement `_encode_plain`, `decode`, `vocab_size`,
    `id_to_token` and `token_to_id`."""

    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    chat_template: Optional[str] = None
    special_tokens: dict  # string -> id, split out of text before encoding

    # --- to implement ---
    def _encode_plain(self, text: str) -> list:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    # --- shared ---
    @property
    def bos_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_bos: bool = False) -> list:
        """Token ids of `text`; special-token strings in it become their ids."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not self.special_tokens:
            return ids + self._encode_plain(text)
        pattern = self._special_pattern()
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids += self._encode_plain(text[pos:m.start()])
            ids.append(self.special_tokens[m.group(0)])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:])
        return ids

    def _special_pattern(self):
        key = tuple(sorted(self.special_tokens))
        if getattr(self, "_pattern_key", None) != key:
            # Longest first, so that a special token that prefixes another does not win.
            alts = sorted(self.special_tokens, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in alts))
            self._pattern_key = key
        return self._pattern

    # --- chat ---
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    **extra: Any) -> str:
        """The chat template applied to `messages` (list of {"role", "content"})."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (none in tokenizer_config.json"
                                 ", chat_template.jinja or the GGUF metadata)")
        template = _compile_template(self.chat_template)
        try:
            return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   **extra)
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    **extra: Any) -> ChatEncoding:
        """Tokenizes a chat and marks the assistant turns.

        Each assistant message's span is the text that rendering it adds after the generation
        prompt of the chat before it; trailing whitespace after the end-of-turn marker is left
        out of the mask. The pieces are tokenized one by one, so the prompt part of a turn has
        exactly the ids a sampler was given.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise TokenizerError(f"message {i} must be a dict with 'role' and string 'content'")
        pieces: list[tuple[str, int, int]] = []  # (text, is_assistant, message index)
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render_chat(messages[:i], add_generation_prompt=True, **extra)
            full = self.render_chat(messages[:i + 1], **extra)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TokenizerError("chat template is not prefix-stable: rendering a longer chat "
                                     "changes the text of earlier turns, so assistant turns cannot "
                                     "be located")
            turn = full[len(prompt):]
            body = turn.rstrip()
            pieces += [(prompt[len(done):], 0, -1), (body, 1, i), (turn[len(body):], 0, -1)]
            done = full
        final = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        if not final.startswith(done):
            raise TokenizerError("chat template is not prefix-stable")
        pieces.append((final[len(done):], 0, -1))
        ids, mask, turns = [], [], []
        for text, is_assistant, index in pieces:
            if not text:
                continue
            piece = self.encode(text)
            if is_assistant:
                turns.append((index, len(ids), len(ids) + len(piece)))
            ids += piece
            mask += [is_assistant] * len(piece)
        return ChatEncoding(ids=ids, assistant_mask=mask, turns=turns)


def _raise(message):
    raise TokenizerError(f"chat template raised: {message}")


_TEMPLATE_CACHE: dict = {}


def _compile_template(source: str):
    if source not in _TEMPLATE_CACHE:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            _TEMPLATE_CACHE[source] = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template is not valid Jinja: {e}") from None
    return _TEMPLATE_CACHE[source]


def _token_str(value) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) or value is None else _bad


_bad = object()


def _read_tokenizer_config(path: str) -> dict:
    """{"chat_template", "bos_token", "eos_token"} (None where absent) of a tokenizer_config.json,
    all {None} when there is no such file; a TokenizerError names what is malformed."""
    out = {"chat_template": None, "bos_token": None, "eos_token": None}
    if not os.path.exists(path):
        return out
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise TokenizerError(f"{path}: chat_template list entries need a 'name' and a 'template' text")
        named = {t.get("name"): t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{path}: chat_template must be text, got {type(template).__name__}")
    out["chat_template"] = template
    for key in ("bos_token", "eos_token"):
        value = _token_str(cfg.get(key))
        if value is _bad:
            raise TokenizerError(f"{path}: {key} must be a token's text (or {{'content': text}}), "
                                 f"got {cfg.get(key)!r:.80}")
        out[key] = value
    return out


class HFTokenizer(Tokenizer):
    """A `tokenizers` fast tokenizer (from tokenizer.json or built from a GGUF vocabulary)."""

    def __init__(self, tokenizer, bos_token=None, eos_token=None, chat_template=None):
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()
                               if t.special}

    @classmethod
    def from_dir(cls, path: str) -> "HFTokenizer":
        """Reads tokenizer.json, tokenizer_config.json and chat_template.jinja from `path`."""
        from tokenizers import Tokenizer as FastTokenizer

        tok_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        folder = os.path.dirname(tok_path)
        if not os.path.isfile(tok_path):
            raise TokenizerError(f"{tok_path}: no such tokenizer file")
        try:
            fast = FastTokenizer.from_file(tok_path)
        except Exception as e:
            raise TokenizerError(f"{tok_path}: not a valid tokenizer.json ({e})") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = _read_tokenizer_config(cfg_path)
        template = cfg["chat_template"]
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            try:
                with open(jinja_path, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja_path}: cannot be read as text ({e})") from None
        return cls(fast, cfg["bos_token"], cfg["eos_token"], template)

    def save(self, path: str) -> None:
        """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) to the
        directory `path`, which `from_dir` reads back to the same tokenizer."""
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token,
               "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)

    def _encode_plain(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_bos: bool = False) -> list:
        # The fast tokenizer splits out its own added tokens in one pass.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; its control pieces (e.g. <s>, </s>) are special tokens."""

    def __init__(self, path: str, chat_template: Optional[str] = None):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such SentencePiece model")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except Exception as e:
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from None
        self.special_tokens = {self._sp.IdToPiece(i): i for i in range(self._sp.GetPieceSize())
                               if self._sp.IsControl(i) and self._sp.IdToPiece(i)}
        bos, eos = self._sp.bos_id(), self._sp.eos_id()
        self.bos_token = self._sp.IdToPiece(bos) if bos >= 0 else None
        self.eos_token = self._sp.IdToPiece(eos) if eos >= 0 else None
        self.chat_template = chat_template

    def _encode_plain(self, text: str) -> list:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:  # SentencePiece drops control pieces on decode; keep them
            out, run = [], []
            for i in ids:
                if self._sp.IsControl(i):
                    out.append(self._sp.DecodeIds(run) + self._sp.IdToPiece(i))
                    run = []
                else:
                    run.append(i)
            return "".join(out) + self._sp.DecodeIds(run)
        return self._sp.DecodeIds(ids)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i


def from_gguf(gguf_file) -> HFTokenizer:
    """The tokenizer embedded in a GGUF file (BPE vocabularies: `tokenizer.ggml.model` = gpt2)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    path = gguf_file.path
    kind = gguf_file.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: "
                             "gpt2-style BPE); pass a tokenizer.json or .model file instead")
    tokens = gguf_file.field("tokenizer.ggml.tokens")
    merges = gguf_file.field("tokenizer.ggml.merges")
    types = gguf_file.field("tokenizer.ggml.token_type")
    if not tokens or merges is None:
        raise TokenizerError(f"{path}: GGUF has no tokenizer vocabulary or merges")
    pre = gguf_file.field("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3"):
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = byte_level
    else:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
                             "smollm, starcoder, refact, llama-bpe, gpt-2); pass a tokenizer.json")
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    fast = FastTokenizer(models.BPE(vocab, merge_pairs, fuse_unk=False, byte_fallback=False))
    fast.pre_tokenizer = pre_tok
    fast.decoder = decoders.ByteLevel()
    types = list(types) if types is not None else [1] * len(tokens)
    # GGUF token types: 3 = control, 4 = user-defined; both are matched whole in text.
    added = [AddedToken(tokens[i], special=(t == 3), normalized=False)
             for i, t in enumerate(types) if t in (3, 4)]
    fast.add_special_tokens([a for a in added if a.special])
    fast.add_tokens([a for a in added if not a.special])

    def name(key):
        i = gguf_file.field(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return HFTokenizer(fast, bos_token=name("tokenizer.ggml.bos_token_id"),
                       eos_token=name("tokenizer.ggml.eos_token_id"),
                       chat_template=gguf_file.field("tokenizer.chat_template"))


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a checkpoint directory, a tokenizer.json, a .model or a .gguf file."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return HFTokenizer.from_dir(path)
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            template = _read_tokenizer_config(os.path.join(path, "tokenizer_config.json"))["chat_template"]
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"), template)
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.endswith(".gguf"):
        from models.gguf_file import GGUFFile

        return from_gguf(GGUFFile(path))
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer.from_dir(path)
    raise TokenizerError(f"{path}: not a tokenizer (expected a directory, tokenizer.json, .model "
                         "or .gguf)")


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, length: Optional[int] = None,
              left: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads token lists to [B, length]: (tokens, positions, segment_ids); segment 0 = padding."""
    length = length or max(len(s) for s in seqs)
    tokens = np.full((len(seqs), length), pad_id, np.int32)
    segments = np.zeros((len(seqs), length), np.int32)
    positions = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than length {length}")
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        tokens[i, sl] = s
        segments[i, sl] = 1
        positions[i, sl] = np.arange(len(s))
    return tokens, positions, segments
