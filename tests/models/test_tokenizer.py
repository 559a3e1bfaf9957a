"""Tokenizers and chat templates against transformers' implementations."""

import json
import os

import pytest

from models.errors import TokenizerError
from models.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\tand\n\nblank lines  \n",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🤖🎲 and ZWJ 👩‍💻",
    "numbers 1234567, 3.14159 and 2026-11-26",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n",
    "def f(x):\n    return {'a': x ** 2}  # code",
    "TABOO: the word is 'apple' — GUESS: banana",
    "",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf),
                                                      gguf_file=os.path.basename(smollm2_gguf))


CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a Wordle player."},
     {"role": "user", "content": "GUESS:"},
     {"role": "assistant", "content": "GUESS: crane"},
     {"role": "user", "content": "feedback: c<yellow> r<green>"},
     {"role": "assistant", "content": "GUESS: brick\nEXPLANATION: r is green"}],
]


def test_gguf_tokenizer_matches_transformers(ours, reference):
    assert ours.vocab_size == len(reference)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids) == text
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)


def test_chat_template_matches_apply_chat_template(ours, reference):
    for chat in CHATS:
        for gen in (False, True):
            text = ours.render_chat(chat, add_generation_prompt=gen)
            assert text == reference.apply_chat_template(chat, add_generation_prompt=gen,
                                                         tokenize=False)
            ids = reference.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert ours.encode_chat(chat, add_generation_prompt=gen).ids == ids


def test_assistant_mask_covers_exactly_the_assistant_turns(ours):
    chat = CHATS[1]
    enc = ours.encode_chat(chat)
    assert len(enc.ids) == len(enc.assistant_mask)
    assert [t[0] for t in enc.turns] == [2, 4]
    for (index, start, end) in enc.turns:
        assert all(enc.assistant_mask[start:end])
        assert ours.decode(enc.ids[start:end]) == chat[index]["content"] + "<|im_end|>"
    learned = [i for i, m in zip(enc.ids, enc.assistant_mask) if m]
    assert len(learned) == sum(e - s for _, s, e in enc.turns)
    # no user or system text leaks into the mask
    assert "feedback" not in ours.decode(learned) and "Wordle" not in ours.decode(learned)


def test_hf_tokenizer_dir_matches_transformers(tmp_path, reference):
    reference.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert tok.chat_template  # from tokenizer_config.json or chat_template.jinja
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    for chat in CHATS:
        assert tok.render_chat(chat, add_generation_prompt=True) == reference.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False)
    assert tok.eos_id == reference.eos_token_id


def test_template_errors_are_clear(tmp_path, reference, ours):
    reference.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if (tmp_path / "chat_template.jinja").exists():
        os.remove(tmp_path / "chat_template.jinja")
    cfg["chat_template"] = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                            "{% endif %}{{ messages[0]['content'] }}")
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="user first"):
        tok.render_chat([{"role": "system", "content": "x"}])
    # A template that rewrites earlier turns cannot have its assistant turns located.
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TokenizerError, match="prefix-stable"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        tok.render_chat([{"role": "user", "content": "a"}])
    with pytest.raises(TokenizerError, match="message 0 must be a dict"):
        ours.encode_chat([{"role": "user", "content": None}])


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="no such SentencePiece model"):
        load_tokenizer(str(tmp_path / "x.model"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    lines = [f"the guesser says word number {i} is close to {i * 7 % 13} but not quite" for i in range(300)]
    lines += ["Taboo is a game where the describer avoids the forbidden words.",
              "Wordle asks for five letter words like crane, brick, and plumb."] * 50
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=120,
                                   model_type="bpe", user_defined_symbols=["<|turn|>"],
                                   minloglevel=2)
    return str(folder / "sp.model")


def test_sentencepiece_tokenizer(sp_model):
    import sentencepiece as spm

    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    text = "the describer avoids the forbidden words"
    assert tok.encode(text) == sp.encode(text)
    ids = tok.encode("<s>guess crane</s>")
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id()
    assert tok.decode(ids) == "<s>guess crane</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "guess crane"
    assert tok.encode(text, add_bos=True)[0] == tok.bos_id == sp.bos_id()
    assert tok.vocab_size == 120


def test_llama3_style_gguf_tokenizer_matches_transformers(tmp_path, smollm2_gguf):
    """A GGUF with Llama 3's pre-tokenizer (`llama-bpe`), read by us and by transformers."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from models.gguf_file import GGUFFile

    src = GGUFFile(smollm2_gguf)
    writer = gguf.GGUFWriter(str(tmp_path / "l3.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(src.field("tokenizer.ggml.tokens"))
    writer.add_token_types(src.field("tokenizer.ggml.token_type"))
    writer.add_token_merges(src.field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((src.config().vocab_size, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_tokenizer(str(tmp_path / "l3.gguf"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="l3.gguf")
    differs = False
    smollm = load_tokenizer(smollm2_gguf)
    for text in TEXTS + ["don't WE'LL\r\nsee  \n x", "year 2026 and 1234567"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        differs |= ours.encode(text) != smollm.encode(text)
    assert differs  # the llama-bpe pre-tokenizer really is a different one
