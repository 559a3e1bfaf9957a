"""The rows SFT trains on: each learner's chat, and probe exchanges that the chat never holds."""

import pytest

from configs.sft import get_config
from models.tokenizer import load_tokenizer
from playpen_jax import buffers
from train import sft


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def _config(games: str, episodes: int, probe_rows: int):
    c = get_config()
    c.games.names = games
    c.sft.episodes_per_game = episodes
    c.sft.probe_rows = probe_rows
    c.batch.max_seq_len = 4096
    return c


def _trained_text(tok, row) -> str:
    return tok.decode([t for t, m in zip(row.tokens, row.loss_mask) if m])


@pytest.mark.parametrize("n, k, picks", [
    (5, 2, [0, 4]), (5, 3, [0, 2, 4]), (110, 2, [0, 109]), (3, 5, [0, 1, 2]), (4, 0, []),
    (4, 1, [0]), (0, 2, []),
])
def test_probe_picks_spread_from_the_first_to_the_last(n, k, picks):
    assert buffers.spread_picks(n, k) == picks


def test_probe_exchanges_become_rows_that_train_the_probe_reply_only(tok):
    """privateshared asks most of its questions as probes outside the answerer's chat ("ME: ...",
    answered "ASIDE: yes|no"); a chat row alone never trains one, so probe_rows of them per episode
    are rows of their own, with the chat as the probe saw it and the loss on its reply alone."""
    plain, info0 = sft.build_dataset(_config("privateshared", 3, 0), tok)
    rows, info = sft.build_dataset(_config("privateshared", 3, 2), tok)
    assert info0["probe_rows"] == 0 and len(plain) == 3
    assert info["probe_rows"] == 6 and len(rows) == 9 and info["rows"] == 9
    chats = [r for r in rows if any(r.tokens == p.tokens for p in plain)]
    probes = [r for r in rows if r not in chats]
    assert len(chats) == 3 and len(probes) == 6
    # the chat rows never train a probe reply; each probe row trains exactly "ASIDE: yes|no"
    assert not any("ASIDE" in _trained_text(tok, r) for r in chats)
    answers = [_trained_text(tok, r).replace(tok.eos_token or "", "").strip() for r in probes]
    assert set(answers) <= {"ASIDE: yes", "ASIDE: no"}, answers
    # the first and the last probe of an episode: "no" before anything is shared, "yes" at the end
    assert answers[0::2] == ["ASIDE: no"] * 3 and answers[1::2] == ["ASIDE: yes"] * 3
    for r in probes:
        context = tok.decode(r.tokens[:r.loss_mask.index(1)])
        assert "ME:" in context.rsplit("<|im_start|>user", 1)[-1]
        ones = [i for i, m in enumerate(r.loss_mask) if m]
        assert ones == list(range(ones[0], ones[-1] + 1))           # one contiguous span

