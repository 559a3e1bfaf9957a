"""GRPO's episode rows: the turns of one player's chat laid out as one sequence
(`buffers.chat_sequences`) train exactly like one sequence per turn, at the cost of the last turn's."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from models import llama
from models.tokenizer import load_tokenizer
from playpen_jax import buffers
from tests.conftest import tiny_config
from tests.train.helpers import grpo_loss_fn


def _chain(rng, vocab, turns=3, first=20, reply=6, added=9):
    """(prompt, reply, logprobs, True) turns of one chat: each prompt continues the last row."""
    out, row = [], list(rng.integers(3, vocab, first))
    for _ in range(turns):
        r = list(rng.integers(3, vocab, reply))
        out.append((list(row), r, list(-rng.random(reply)), True))
        row = row + r + list(rng.integers(3, vocab, added))
    return out


def test_a_continued_chat_is_one_row_with_every_reply_counted():
    rng = np.random.default_rng(0)
    turns = _chain(rng, 50)
    (row,) = buffers.chat_sequences(turns, advantage=0.5, reward=1.0, group=3)
    last_prompt, last_reply = turns[-1][0], turns[-1][1]
    assert row.tokens == last_prompt + last_reply
    assert (row.turns, row.advantage, row.reward, row.group) == (3, 0.5, 1.0, 3)
    for prompt, reply, lp, _ in turns:   # each reply where its own row has it, with its log-probs
        span = slice(len(prompt), len(prompt) + len(reply))
        assert row.tokens[span] == reply and row.loss_mask[span] == [1] * len(reply)
        np.testing.assert_allclose(row.old_logprobs[span], lp)
    assert sum(row.loss_mask) == sum(len(t[1]) for t in turns)


def test_what_does_not_continue_the_chat_starts_a_new_row():
    rng = np.random.default_rng(1)
    a, b, c = _chain(rng, 50)
    other = (list(rng.integers(3, 50, 30)), [7, 8], [-0.1, -0.2], True)   # a rebuilt context
    rows = buffers.chat_sequences([a, b, other, c])
    # c continues a and b's row, not the other one
    assert [r.turns for r in rows] == [3, 1]
    assert rows[1].tokens == other[0] + other[1] and rows[0].tokens == c[0] + c[1]
    # a turn the model did not play is skipped; the rest still continue their row
    assert [r.turns for r in buffers.chat_sequences([a, None, b, c])] == [3]
    # two players' chats, interleaved as in self-play: one row each
    x, y, z = _chain(np.random.default_rng(9), 50)
    rows = buffers.chat_sequences([a, x, b, y, c, z])
    assert [(r.turns, r.tokens) for r in rows] == [(3, c[0] + c[1]), (3, z[0] + z[1])]
    # a row never grows past max_len: the turn that would make it longer starts its own row
    # (which the trainer leaves out when that alone is too long)
    limit = len(b[0]) + len(b[1])
    rows = buffers.chat_sequences([a, b, c], max_len=limit)
    assert [r.turns for r in rows] == [2, 1] and len(rows[0].tokens) == limit
    assert rows[1].tokens == c[0] + c[1]


def test_a_reply_left_out_stays_as_context_only():
    rng = np.random.default_rng(2)
    a, b, c = _chain(rng, 50)
    b = (*b[:3], False)   # e.g. cut at max_new_tokens under grpo.overlong=filter
    (row,) = buffers.chat_sequences([a, b, c])
    span = slice(len(b[0]), len(b[0]) + len(b[1]))
    assert row.turns == 2 and row.tokens[span] == b[1] and row.loss_mask[span] == [0] * len(b[1])
    assert sum(row.loss_mask) == len(a[1]) + len(c[1])
    with pytest.raises(ValueError, match="log-probs"):
        buffers.chat_sequences([(a[0], a[1], a[2][:-1], True)])


def test_the_chat_template_of_the_embedded_model_continues_sampled_replies(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    end = tok.token_to_id("<|im_end|>")
    chat = [{"role": "user", "content": "Let us play Wordle. Guess a five-letter word."}]
    replies = ["guess: crane\nexplanation: common letters", "guess: sloth", "guess: month"]
    turns = []
    for k, text in enumerate(replies):
        prompt = tok.encode_chat(chat, add_generation_prompt=True).ids
        reply = list(tok.encode(text)) + [end]   # as sampled: the stop token is kept
        turns.append((list(prompt), reply, [-1.0] * len(reply), True))
        chat = chat + [{"role": "assistant", "content": text},
                       {"role": "user", "content": f"guess_feedback: attempt {k + 1} was wrong"}]
    (row,) = buffers.chat_sequences(turns)
    assert row.turns == 3
    assert row.tokens[:len(turns[-1][0])] == turns[-1][0]
    decoded = tok.decode([t for t, m in zip(row.tokens, row.loss_mask) if m])
    assert all(r in decoded for r in replies)


def test_merged_rows_give_the_loss_and_gradient_of_one_row_per_turn():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    ref = llama.init(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(3)
    per_turn, merged = [], []
    for episode, adv in enumerate([1.2, -0.7, 0.4]):
        turns = _chain(rng, cfg.vocab_size, turns=2 + episode, first=12 + 5 * episode)
        kw = dict(advantage=adv, reward=adv, group=episode)
        merged += buffers.chat_sequences(turns, **kw)
        per_turn += [buffers.completion(p, r, lp, **kw) for p, r, lp, _ in turns]   # built apart
    assert len(merged) == 3 and len(per_turn) == 9
    assert sum(len(s.tokens) for s in merged) < sum(len(s.tokens) for s in per_turn) / 2
    loss_fn = grpo_loss_fn(cfg, "token-mean")

    def loss_and_grad(seqs, packed):
        batch = buffers.pack(seqs, micro_batch=16, max_len=256, packed=packed)
        mb = {k: v[0] for k, v in batch.items()}
        assert batch["weight"].shape == (1,)
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, {"ref": ref})
        return float(loss), g

    want, g_want = loss_and_grad(per_turn, packed=False)
    for packed in (False, True):
        got, g_got = loss_and_grad(merged, packed)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        for x, y in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)
