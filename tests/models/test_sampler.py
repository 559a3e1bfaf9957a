"""The batched sampler against the plain forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.sampler import PrefixCache, Sampler, _filter_logits
from models.tokenizer import HFTokenizer
from playpen_jax import sharding
from tests.conftest import tiny_config

CFG = tiny_config(vocab_size=260)


@pytest.fixture(scope="module")
def params():
    return llama.init(CFG, jax.random.PRNGKey(0), init_std=0.3)


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real byte-level BPE tokenizer (no merges) over the model's 260-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i + 3 for i, ch in enumerate(alphabet)}
    vocab.update({"<pad>": 0, "<bos>": 1, "<eos>": 2})
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return HFTokenizer(tok, bos_token="<bos>", eos_token="<eos>")


PROMPTS = [[5, 17, 33, 8, 61], [9], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80], [3, 4]]


_full_forward = jax.jit(lambda p, t, s: llama.forward(p, t, segment_ids=s, config=CFG)[0])


def reference_greedy(params, prompt, steps):
    """Greedy decoding by full recomputation (right-padded to 32 tokens: one compile)."""
    seq, out, logps = list(prompt), [], []
    for _ in range(steps):
        tokens = np.zeros((1, 32), np.int32)
        tokens[0, : len(seq)] = seq
        segments = (np.arange(32) < len(seq)).astype(np.int32)[None]
        logits = _full_forward(params, jnp.asarray(tokens), jnp.asarray(segments))[0, len(seq) - 1]
        token = int(jnp.argmax(logits))
        out.append(token)
        logps.append(float(jax.nn.log_softmax(logits)[token]))
        seq.append(token)
    return out, logps


def test_greedy_equals_stepwise_argmax_for_mixed_lengths(params):
    sampler = Sampler(CFG)
    out = sampler.generate(params, PROMPTS, max_new_tokens=10, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        tokens, logps = reference_greedy(params, prompt, 10)
        assert out.row(i) == tokens
        assert np.abs(out.logprobs[i] - np.array(logps)).max() <= 1e-4
    assert list(out.lengths) == [10] * 4 and out.finish_reasons == ["length"] * 4
    assert len({tuple(out.row(i)) for i in range(4)}) > 1


def test_stacked_and_unstacked_layers_sample_the_same(params):
    kw = dict(max_new_tokens=10, temperature=0.8, rng=jax.random.PRNGKey(5))
    scan = Sampler(CFG, unstack_layers=False).generate(params, PROMPTS, **kw)
    loop = Sampler(CFG, unstack_layers=True).generate(params, PROMPTS, **kw)
    assert np.array_equal(scan.tokens, loop.tokens)
    assert np.abs(scan.logprobs - loop.logprobs).max() <= 1e-5


def test_sampled_logprobs_equal_recomputed_forward(params):
    sampler = Sampler(CFG)
    out = sampler.generate(params, PROMPTS, max_new_tokens=12, temperature=1.3, top_k=50,
                           rng=jax.random.PRNGKey(7))
    for i, prompt in enumerate(PROMPTS):
        seq = prompt + out.row(i)
        logits = llama.forward(params, jnp.asarray([seq]), config=CFG)[0][0]
        logp = jax.nn.log_softmax(logits[len(prompt) - 1:-1], axis=-1)
        expected = np.asarray(jnp.take_along_axis(logp, jnp.asarray(out.row(i))[:, None], 1)[:, 0])
        assert np.abs(out.logprobs[i, : out.lengths[i]] - expected).max() <= 1e-4


def test_stop_ids_end_rows_independently(params):
    sampler = Sampler(CFG)
    free = sampler.generate(params, PROMPTS, max_new_tokens=10, temperature=0)
    stop = free.row(0)[3]  # row 0 stops at its 4th token; others only if they produce it
    out = sampler.generate(params, PROMPTS, max_new_tokens=10, temperature=0, stop_ids=[stop])
    for i in range(len(PROMPTS)):
        row = free.row(i)
        expected = row[: row.index(stop) + 1] if stop in row else row
        assert out.row(i) == expected
        assert (out.tokens[i, len(expected):] == 0).all()  # finished rows stop growing
        assert (out.logprobs[i, len(expected):] == 0).all()
        assert out.finish_reasons[i] == ("stop" if stop in row else "length")
    assert out.lengths[0] <= 4 and max(out.lengths) == 10


def test_stop_strings(params, byte_tokenizer):
    sampler = Sampler(CFG, stop_check_every=4)
    free = sampler.generate(params, PROMPTS, max_new_tokens=16, temperature=0,
                            tokenizer=byte_tokenizer)
    target = byte_tokenizer.decode(free.row(1)[5:7])
    assert target
    out = sampler.generate(params, PROMPTS, max_new_tokens=16, temperature=0,
                           stop_strings=[target], tokenizer=byte_tokenizer)
    for i in range(len(PROMPTS)):
        text = free.texts[i]
        if target in text:
            assert out.finish_reasons[i] == "stop_string"
            assert out.texts[i] == text[: text.index(target)]
            assert target in byte_tokenizer.decode(out.row(i))
            assert target not in byte_tokenizer.decode(out.row(i)[:-1])
        else:
            assert out.row(i) == free.row(i) and out.finish_reasons[i] == "length"
    assert out.finish_reasons[1] == "stop_string" and out.lengths[1] <= 7


@pytest.mark.parametrize("unstack", [False, True])
def test_growing_cache_equals_full_cache(params, byte_tokenizer, unstack):
    """A cache grown 4 slots at a time gives the same tokens and log-probs as one allocated at its
    full length, also when stop-string checks (every 3 steps) fall between growth points."""
    kw = dict(max_new_tokens=14, temperature=0.8, rng=jax.random.PRNGKey(5))
    full = Sampler(CFG, cache_block=0, unstack_layers=unstack).generate(params, PROMPTS, **kw)
    grown_sampler = Sampler(CFG, cache_block=4, unstack_layers=unstack, stop_check_every=3)
    grown = grown_sampler.generate(params, PROMPTS, **kw)
    assert np.array_equal(full.tokens, grown.tokens) and np.array_equal(full.lengths, grown.lengths)
    assert np.abs(full.logprobs - grown.logprobs).max() <= 1e-5
    # prefill + 4 cache lengths (room for 4, 8, 12, 16 new tokens) x (decode, and grow after the first)
    assert grown_sampler.compile_count == 1 + 4 + 3
    greedy, _ = reference_greedy(params, PROMPTS[0], 14)
    out = grown_sampler.generate(params, PROMPTS, max_new_tokens=14, temperature=0,
                                 stop_strings=["\x00never"], tokenizer=byte_tokenizer)
    assert out.row(0) == greedy


@pytest.mark.parametrize("matmul_dtype", [None, "bfloat16"])
def test_decode_loop_copies_no_weights(params, matmul_dtype):
    """The decode loop reads the weights where they are: XLA makes no per-call copy (e.g. a
    transpose into the layout its dot kernels take), which would cost each decode call a pass
    over the whole model."""
    import re

    cfg = CFG.replace(matmul_dtype=matmul_dtype) if matmul_dtype else CFG
    sampler = Sampler(cfg, cache_block=0)
    sampler.generate(params, PROMPTS, max_new_tokens=4, temperature=0)
    (decode,) = [ex for key, ex in sampler._compiled.items() if key[0] == "decode"]
    prepared = sampler._prepared(params)
    weight_shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(prepared) if x.ndim == 2}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    copied = [tuple(int(d) for d in m.group(1).split(","))
              for m in re.finditer(r"= \w+\[([\d,]+)\]\{[\d,]*\} copy\(", decode.as_text())]
    assert not [s for s in copied if s in weight_shapes]


def test_bad_cache_block():
    with pytest.raises(ValueError, match="cache_block"):
        Sampler(CFG, cache_block=-1)


def test_same_bucket_does_not_recompile(params):
    sampler = Sampler(CFG)
    sampler.generate(params, [[1, 2, 3]], max_new_tokens=8, temperature=0)
    assert sampler.compile_count == 2  # prefill + decode
    sampler.generate(params, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=8, temperature=0)
    sampler.generate(params, [[4] * 40, [5]], max_new_tokens=20, temperature=0)  # batch 2 bucket
    assert sampler.compile_count == 4
    sampler.generate(params, [[4] * 30, [5, 6]], max_new_tokens=30, temperature=0)
    assert sampler.compile_count == 4
    sampler.generate(params, [[1, 2]], max_new_tokens=8, temperature=0.7)  # new sampling mode
    assert sampler.compile_count == 5


def test_least_recently_used_executables_are_dropped(params):
    """max_executables bounds what a sampler keeps; a dropped shape compiles again and samples
    the same tokens as a sampler that kept everything."""
    calls = [([[1, 2, 3]], 8), ([[4] * 40, [5]], 20), ([[1, 2, 3]], 8), ([[6] * 70, [7], [8, 9]], 8)]
    small, full = Sampler(CFG, max_executables=3), Sampler(CFG)
    for prompts, n in calls:
        a = small.generate(params, prompts, max_new_tokens=n, temperature=0)
        b = full.generate(params, prompts, max_new_tokens=n, temperature=0)
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
        assert small.kept_executables <= 3
    # the third call's shapes had been dropped by the second's and were compiled again
    assert small.compile_count > full.compile_count == full.kept_executables
    with pytest.raises(ValueError, match="max_executables"):
        Sampler(CFG, max_executables=0)


def test_new_token_buckets_do_not_share_decode_executables(params):
    """Two calls whose prompts and first cache block agree but whose max_new_tokens fall in
    different buckets hold output buffers of different lengths: each gets its own decode
    executable, and the second call's result is that of a fresh sampler."""
    prompts = [[4] * 10, [5, 6]]
    sampler = Sampler(CFG, cache_block=8)
    short = sampler.generate(params, prompts, max_new_tokens=6, temperature=0)
    long = sampler.generate(params, prompts, max_new_tokens=70, temperature=0)
    fresh = Sampler(CFG, cache_block=8).generate(params, prompts, max_new_tokens=70, temperature=0)
    assert long.tokens.shape == (2, 70) and np.array_equal(long.tokens, fresh.tokens)
    assert np.array_equal(short.tokens, long.tokens[:, :6])


def test_prompts_pad_to_fine_buckets():
    """Prompts of a few hundred tokens are padded by at most a quarter of their length."""
    from models.sampler import LENGTH_BUCKETS, _round_up

    for n in range(256, 4097):
        assert _round_up(n, LENGTH_BUCKETS, LENGTH_BUCKETS[-1]) - n < n / 4


def test_prefill_chunks_follow_the_lengths():
    """Halves or quarters, each padded to its own bucket, when they save a fifth of the tokens;
    chunks of bucket padding rows (length 0) are not prefilled."""
    s = Sampler(CFG)
    assert s.prefill_chunks([100, 90, 3, 2]) == [(0, 2, 128), (2, 2, 64)]
    assert s.prefill_chunks([100, 90, 80, 70]) == [(0, 4, 128)]
    assert s.prefill_chunks([100, 3, 0, 0]) == [(0, 1, 128), (1, 1, 64)]
    assert s.prefill_chunks([60, 50, 40, 0]) == [(0, 1, 64), (1, 1, 64), (2, 1, 64)]
    assert s.prefill_chunks([7]) == [(0, 1, 64)]
    assert Sampler(CFG, split_prefill=False).prefill_chunks([100, 3, 2, 1]) == [(0, 4, 128)]
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})   # chunks would cut the data split
    assert Sampler(CFG, mesh=mesh).prefill_chunks([100, 3, 2, 1]) == [(0, 4, 128)]


@pytest.mark.parametrize("unstack", [False, True])
def test_split_prefill_samples_what_one_prefill_does(params, byte_tokenizer, unstack):
    """Prompts of 3 to 100 tokens prefilled in chunks of their own lengths (the rows reordered,
    longest first, and put back) give the tokens and log-probs of one prefill padded to the
    longest, with per-row seeds and stop strings too."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 250, size=n)) for n in (3, 100, 7, 90, 20)]
    kw = dict(max_new_tokens=12, temperature=0.9, rng=jax.random.PRNGKey(2), seeds=[11, 3, 5, 7, 9],
              stop_strings=["e"], tokenizer=byte_tokenizer)
    split = Sampler(CFG, unstack_layers=unstack, cache_block=4, stop_check_every=5)
    whole = Sampler(CFG, unstack_layers=unstack, cache_block=4, stop_check_every=5, split_prefill=False)
    a, b = split.generate(params, prompts, **kw), whole.generate(params, prompts, **kw)
    assert any(k[0] == "prefill_chunk" for k in split._compiled)
    assert not any(k[0] == "prefill_chunk" for k in whole._compiled)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.lengths, b.lengths)
    assert a.finish_reasons == b.finish_reasons and a.texts == b.texts
    assert np.abs(a.logprobs - b.logprobs).max() <= 1e-5
    # greedy, one row at a time: what a batch of one (never split) gives
    g = split.generate(params, prompts, max_new_tokens=6, temperature=0)
    for i, p in enumerate(prompts):
        one = whole.generate(params, [p], max_new_tokens=6, temperature=0)
        assert g.row(i) == one.row(0)
        assert np.abs(g.logprobs[i] - one.logprobs[0]).max() <= 1e-4


def _next_turns(prompts, out, rng, drop: int, fresh: int):
    """Each prompt followed by its reply and a few more tokens, as a chat's next turn is; the first
    `drop` episodes ended and `fresh` new prompts joined."""
    turns = [list(p) + out.row(i) + list(rng.integers(3, 250, size=3 + i % 4)) for i, p in enumerate(prompts)]
    return turns[drop:] + [list(rng.integers(3, 250, size=n)) for n in (25, 6)[:fresh]]


@pytest.mark.parametrize("unstack", [False, True])
def test_prefix_cache_samples_what_a_full_prefill_does(params, byte_tokenizer, unstack):
    """Three turns of five chats (one ends and a new one joins after each turn, a reply cut at a
    stop string, rows reordered for the split prefill): the calls that reuse the kept caches
    sample the tokens and log-probs of calls that prefill every prompt whole, and prefill less."""
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 250, size=n)) for n in (30, 100, 7, 90, 20)]
    kw = dict(max_new_tokens=10, temperature=0.9, rng=jax.random.PRNGKey(2), seeds=[11, 3, 5, 7, 9],
              tokenizer=byte_tokenizer)
    cache = PrefixCache(min_tokens=4)
    reusing = Sampler(CFG, unstack_layers=unstack, cache_block=4, stop_check_every=3)
    whole = Sampler(CFG, unstack_layers=unstack, cache_block=4, stop_check_every=3)
    free = whole.generate(params, prompts, **kw)
    kw["stop_strings"] = [byte_tokenizer.decode(free.row(1)[4:5])]   # a character row 1 samples
    reused, expected, reasons, a = [], [0], set(), None
    for turn in range(3):
        if turn:   # each continuing chat reuses its prompt and its reply (to the stop string)
            expected.append(sum(len(p) + int(n) for p, n in zip(prompts[1:], a.lengths[1:])))
            prompts = _next_turns(prompts, a, rng, drop=1, fresh=1)
        before = cache.reused_tokens
        a = reusing.generate(params, prompts, prefix_cache=cache, **kw)
        b = whole.generate(params, prompts, **kw)
        reused.append(cache.reused_tokens - before)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.lengths, b.lengths), turn
        assert a.finish_reasons == b.finish_reasons and a.texts == b.texts
        assert np.abs(a.logprobs - b.logprobs).max() <= 1e-5
        assert len(cache.entries) == turn + 1   # each kept call holds the row of a chat that ended
        reasons.update(a.finish_reasons)
    assert "stop_string" in reasons   # the cache holds tokens past the cut: not reused
    assert reused == expected and min(expected[1:]) > 100
    assert sum(k[0] == "gather" for k in reusing._compiled) >= 1
    # a prompt that is exactly a kept row still prefills its last token (for its logits)
    last = [list(p) + a.row(i) for i, p in enumerate(prompts)]
    entry, src, keep = cache.match(last)
    assert list(entry) == [len(cache.entries) - 1] * len(last) and len(set(src)) == len(last)
    assert list(keep) == [len(p) - 1 for p in last]


def test_prefix_cache_matches_the_longest_common_prefix():
    cache = PrefixCache(max_entries=3, min_tokens=3)
    cache.add("a", [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9], []])
    entry, src, keep = cache.match([[1, 2, 3, 4, 7], [1, 2, 3, 9, 9, 9], [1, 2, 7, 7], [1, 2, 3, 4]])
    assert list(entry) == [0, 0, -1, 0] and list(src) == [0, 1, -1, 0] and list(keep) == [4, 4, 0, 3]
    # a later call: each prompt takes the longest match over all kept calls
    cache.release([(0, 0)])
    cache.add("b", [[1, 2, 3, 4, 7, 8], [5, 5, 5, 5]])
    entry, src, keep = cache.match([[1, 2, 3, 4, 7, 8, 1], [1, 2, 3, 9, 9], [5, 5, 5, 5, 5]])
    assert list(entry) == [1, 0, 1] and list(src) == [0, 1, 1] and list(keep) == [6, 4, 4]
    # once every row of a kept call has been continued, the call is dropped
    cache.release([(0, 1)])
    cache.add("c", [[1, 2, 3, 9, 9, 1]])
    assert [e[0] for e in cache.entries] == ["b", "c"]
    cache.release([(0, 1)])   # "b" used: the least recently used is now "c"
    assert [e[0] for e in cache.entries] == ["c", "b"]
    cache.add("d", [[6]])
    cache.add("e", [[7]])
    assert [e[0] for e in cache.entries] == ["b", "d", "e"]   # at most max_entries: "c" dropped
    assert list(cache.match([[8, 8, 8, 8]])[0]) == [-1]
    with pytest.raises(ValueError, match="max_entries"):
        PrefixCache(max_entries=0)


def test_a_long_prefill_takes_its_queries_in_blocks_and_samples_the_same(params, monkeypatch):
    """With a bound on the attention scores' bytes that the prompts exceed, the prefill (whole,
    chunked and continuing a kept cache) attends block by block and samples what it does whole."""
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(3, 250, size=n)) for n in (150, 40, 90)]
    kw = dict(max_new_tokens=5, temperature=0.8, rng=jax.random.PRNGKey(4))
    whole = Sampler(CFG).generate(params, prompts, **kw)
    calls = []
    attention = llama._attention

    def counted(q, *a, **k):
        calls.append((q.shape[1], k.get("split", True)))
        return attention(q, *a, **k)

    monkeypatch.setattr(llama, "_attention", counted)
    monkeypatch.setattr(llama, "SCORES_BYTES", 1 << 12)
    cache = PrefixCache(min_tokens=4)
    blocked = Sampler(CFG, cache_block=4)
    a = blocked.generate(params, prompts, prefix_cache=cache, **kw)
    assert np.array_equal(a.tokens, whole.tokens) and np.abs(a.logprobs - whole.logprobs).max() <= 1e-5
    assert any(not split and t > 1 for t, split in calls)   # attended in blocks
    follow = [p + a.row(i) + [5, 6, 7] for i, p in enumerate(prompts)]
    b = blocked.generate(params, follow, prefix_cache=cache, **kw)
    monkeypatch.setattr(llama, "SCORES_BYTES", 1 << 40)
    c = Sampler(CFG).generate(params, follow, **kw)
    assert cache.reused_tokens > 250
    assert np.array_equal(b.tokens, c.tokens) and np.abs(b.logprobs - c.logprobs).max() <= 1e-5


def test_prefix_cache_keeps_within_max_bytes(params):
    """A bound in bytes drops the least recently used kept calls, the new one too when it alone is
    larger; a prompt whose kept rows were dropped is prefilled whole and samples the same."""
    sampler = Sampler(CFG)
    kw = dict(max_new_tokens=4, temperature=0)
    prompts = [list(range(3, 40)), list(range(50, 60))]
    others = [list(range(100, 130)), list(range(140, 150))]   # a call nobody continues
    probe = PrefixCache(min_tokens=2)
    out = sampler.generate(params, prompts, prefix_cache=probe, **kw)
    one = probe.nbytes
    assert one == sum(x.nbytes for x in jax.tree_util.tree_leaves(probe.entries[0][0])) > 0
    follow = [p + out.row(i) + [7, 8] for i, p in enumerate(prompts)]
    full = sampler.generate(params, follow, **kw)

    roomy = PrefixCache(min_tokens=2, max_bytes=2 * one)
    tight = PrefixCache(min_tokens=2, max_bytes=one + one // 2)
    for cache in (roomy, tight):
        sampler.generate(params, prompts, prefix_cache=cache, **kw)
        sampler.generate(params, others, prefix_cache=cache, **kw)
    assert (len(roomy.entries), roomy.dropped, roomy.nbytes) == (2, 0, 2 * one)
    assert (len(tight.entries), tight.dropped, tight.nbytes) == (1, 1, one)   # the first call's went
    for cache, reused in ((roomy, sum(len(p) - 2 for p in follow)), (tight, 0)):
        a = sampler.generate(params, follow, prefix_cache=cache, **kw)
        assert cache.reused_tokens == reused
        assert np.array_equal(a.tokens, full.tokens) and np.abs(a.logprobs - full.logprobs).max() <= 1e-5
    nothing = PrefixCache(min_tokens=2, max_bytes=0)
    a = sampler.generate(params, prompts, prefix_cache=nothing, **kw)
    assert not nothing.entries and nothing.dropped == 1 and np.array_equal(a.tokens, out.tokens)
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=-1)


@pytest.mark.parametrize("unstack", [True, False])
def test_a_bfloat16_cache_halves_the_kept_bytes_and_samples_within_its_rounding(params, unstack):
    """cache_dtype=bfloat16 under float32 activations: the cache is stored in bfloat16 (half the
    bytes kept for a prefix), greedy decoding follows the float32 forward's argmax wherever its top
    two logits are not within the rounding, and the log-probs stay close to the float32 forward's;
    continuing from a kept bfloat16 prefix samples what the same sampler does without it."""
    kw = dict(max_new_tokens=8, temperature=0)
    kv_bytes, outs = {}, {}
    for dtype in ("float32", "bfloat16"):
        sampler = Sampler(CFG, cache_dtype=dtype, unstack_layers=unstack)
        assert sampler.cache_dtype == jnp.dtype(dtype)
        cache = PrefixCache(min_tokens=2)
        outs[dtype] = sampler.generate(params, PROMPTS, prefix_cache=cache, **kw)
        kv = jax.tree_util.tree_leaves((cache.entries[0][0]["k"], cache.entries[0][0]["v"]))
        assert {x.dtype for x in kv} == {jnp.dtype(dtype)}
        kv_bytes[dtype] = sum(x.nbytes for x in kv)
    assert kv_bytes["bfloat16"] * 2 == kv_bytes["float32"]
    f32, bf16 = outs["float32"], outs["bfloat16"]
    assert np.array_equal(bf16.lengths, f32.lengths)
    # up to the first token where the two differ, each row's log-probs agree closely
    for i, p in enumerate(PROMPTS):
        ref, ref_lp = reference_greedy(params, p, 8)
        row = bf16.row(i)
        same = next((j for j, (a, b) in enumerate(zip(row, ref)) if a != b), len(row))
        assert same >= 1, (i, row, ref)
        np.testing.assert_allclose(bf16.logprobs[i, :same], ref_lp[:same], atol=0.05)
    # a turn continuing a kept bfloat16 prefix samples what the bfloat16 sampler does from scratch
    sampler = Sampler(CFG, cache_dtype="bfloat16", unstack_layers=unstack)
    cache = PrefixCache(min_tokens=2)
    out = sampler.generate(params, PROMPTS, prefix_cache=cache, **kw)
    follow = [p + out.row(i) + [7, 8] for i, p in enumerate(PROMPTS)]
    a = sampler.generate(params, follow, prefix_cache=cache, **kw)
    b = sampler.generate(params, follow, **kw)
    assert cache.reused_tokens > 0
    assert np.array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_cache_dtype_is_checked():
    assert Sampler(CFG).cache_dtype == jnp.dtype(CFG.jnp_dtype)
    assert Sampler(CFG, cache_dtype="auto").cache_dtype == jnp.dtype(CFG.jnp_dtype)
    for bad in ("int8", "float64x", 3):
        with pytest.raises(ValueError, match="cache_dtype"):
            Sampler(CFG, cache_dtype=bad)


def test_prefix_cache_is_emptied_by_other_params(params):
    cache = PrefixCache(min_tokens=2)
    sampler = Sampler(CFG)
    prompts = [list(range(3, 40)), list(range(50, 60))]
    out = sampler.generate(params, prompts, max_new_tokens=4, temperature=0, prefix_cache=cache)
    follow = [p + out.row(i) + [7, 8] for i, p in enumerate(prompts)]
    changed = jax.tree_util.tree_map(lambda x: x * 1.5, params)
    a = sampler.generate(changed, follow, max_new_tokens=4, temperature=0, prefix_cache=cache)
    assert cache.reused_tokens == 0   # the kept cache came from other weights
    b = Sampler(CFG).generate(changed, follow, max_new_tokens=4, temperature=0)
    assert np.array_equal(a.tokens, b.tokens)
    sampler.generate(changed, [p + [9] for p in follow], max_new_tokens=4, temperature=0,
                     prefix_cache=cache)
    assert cache.reused_tokens == sum(len(p) for p in follow)   # the same weights again: reused
    cache.clear()
    assert not cache.entries


def test_prefix_cache_under_a_mesh(params):
    """Rows split over the data axes and heads over the tensor axis: reused caches are gathered
    across devices and sample what the unsharded sampler does."""
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    shardings = sharding.tree_shardings(llama.param_axes(CFG), llama.param_shapes(CFG), mesh)
    sharded = jax.device_put(params, shardings)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(3, 250, size=n)) for n in (40, 12, 33)]
    kw = dict(max_new_tokens=6, temperature=0.9, rng=jax.random.PRNGKey(1))
    cache, sampler, plain = PrefixCache(min_tokens=4), Sampler(CFG, mesh=mesh, cache_block=3), Sampler(CFG)
    for turn in range(2):
        a = sampler.generate(sharded, prompts, prefix_cache=cache, **kw)
        b = plain.generate(params, prompts, **kw)
        assert np.array_equal(a.tokens, b.tokens), turn
        assert np.abs(a.logprobs - b.logprobs).max() <= 1e-4
        prompts = [prompts[2] + a.row(2) + [4, 5]] + [p + a.row(i) + [6] for i, p in enumerate(prompts[:2])]
    assert cache.reused_tokens > 80


def test_deterministic_and_per_row_seeds(params):
    sampler = Sampler(CFG)
    prompt = [5, 6, 7]
    kw = dict(max_new_tokens=12, temperature=1.0, rng=jax.random.PRNGKey(3))
    a = sampler.generate(params, [prompt] * 4, **kw)
    b = sampler.generate(params, [prompt] * 4, **kw)
    assert np.array_equal(a.tokens, b.tokens)
    assert len({tuple(a.row(i)) for i in range(4)}) == 4  # a group of samples differs
    # a row's sample depends on its seed, not on the rest of the batch
    c = sampler.generate(params, [[9, 9], prompt], seeds=[11, 2], **kw)
    assert c.row(1) == a.row(2)
    d = sampler.generate(params, [prompt] * 4, max_new_tokens=12, temperature=1.0,
                         rng=jax.random.PRNGKey(4))
    assert not np.array_equal(a.tokens, d.tokens)


def test_top_k_one_and_tiny_top_p_are_greedy(params):
    sampler = Sampler(CFG)
    greedy = sampler.generate(params, PROMPTS, max_new_tokens=6, temperature=0)
    k1 = sampler.generate(params, PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1)
    p0 = sampler.generate(params, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-6)
    assert np.array_equal(greedy.tokens, k1.tokens) and np.array_equal(greedy.tokens, p0.tokens)


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40)).astype(np.float32) * 3
    out = np.asarray(_filter_logits(jnp.asarray(logits), 0.5, 5, True, 0.8))
    for row, got in zip(logits, out):
        scaled = row / 0.5
        keep = scaled >= np.sort(scaled)[-5]  # top-k
        masked = np.where(keep, scaled, -np.inf)
        order = np.argsort(-masked)
        probs = np.exp(masked[order] - masked[order][0])
        probs /= probs.sum()
        n_keep = int(np.sum(np.cumsum(probs) - probs < 0.8))
        kept = set(order[:n_keep])
        assert {i for i in range(40) if np.isfinite(got[i])} == kept
        assert np.allclose(got[list(kept)], scaled[list(kept)])


def test_sharded_equals_unsharded(params):
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    shardings = sharding.tree_shardings(llama.param_axes(CFG), llama.param_shapes(CFG), mesh)
    sharded = jax.device_put(params, shardings)
    prompts = PROMPTS + [[11, 12, 13]]
    plain = Sampler(CFG, cache_block=0).generate(params, prompts, max_new_tokens=8, temperature=0.9,
                                                 rng=jax.random.PRNGKey(1))
    sampler = Sampler(CFG, mesh=mesh, cache_block=3)   # the cache grows twice, sharded
    out = sampler.generate(sharded, prompts, max_new_tokens=8, temperature=0.9,
                           rng=jax.random.PRNGKey(1))
    assert np.array_equal(plain.tokens, out.tokens)
    assert np.abs(plain.logprobs - out.logprobs).max() <= 1e-4
    assert out.tokens.shape == (5, 8)


def test_split_prefill_under_tensor_parallelism(params):
    """With heads split over a tensor axis and the batch whole, the prefill is split into chunks
    and writes them into the sharded cache; the samples are the unsharded ones."""
    mesh = sharding.make_mesh({"data": 1, "tensor": 2}, jax.devices()[:2])
    shardings = sharding.tree_shardings(llama.param_axes(CFG), llama.param_shapes(CFG), mesh)
    prompts = [list(range(3, 103)), [5, 6, 7], list(range(10, 100)), [9]]
    kw = dict(max_new_tokens=6, temperature=0.9, rng=jax.random.PRNGKey(4))
    plain = Sampler(CFG, cache_block=0).generate(params, prompts, **kw)
    sampler = Sampler(CFG, mesh=mesh, cache_block=3)
    out = sampler.generate(jax.device_put(params, shardings), prompts, **kw)
    assert any(k[0] == "prefill_chunk" for k in sampler._compiled)
    assert np.array_equal(plain.tokens, out.tokens)
    assert np.abs(plain.logprobs - out.logprobs).max() <= 1e-4


def test_bad_arguments(params):
    sampler = Sampler(CFG)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate(params, [[1], []])
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate(params, [[1]], top_p=0)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        sampler.generate(params, [[1]], stop_strings=["x"])


@pytest.mark.parametrize("unstack", [False, True])
def test_bf16_weight_matmuls_decode_like_their_forward(params, unstack):
    """With matmul_dtype=bfloat16 the sampler decodes from a bf16 copy of the matmul weights and its
    greedy tokens and log-probs are those of the same mixed-precision model's full forward."""
    mixed = CFG.replace(matmul_dtype="bfloat16")
    full = jax.jit(lambda p, t, s: llama.forward(p, t, segment_ids=s, config=mixed)[0])
    sampler = Sampler(mixed, unstack_layers=unstack)
    out = sampler.generate(params, PROMPTS, max_new_tokens=8, temperature=0)
    copy = sampler._last_unstacked[1]
    wq = copy["layers"][0]["wqkv"] if unstack else copy["layers"]["wq"]   # fused when unstacked
    assert wq.dtype == jnp.bfloat16
    for i, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for j in range(8):
            tokens = np.zeros((1, 32), np.int32)
            tokens[0, : len(seq)] = seq
            segments = (np.arange(32) < len(seq)).astype(np.int32)[None]
            logits = full(params, jnp.asarray(tokens), jnp.asarray(segments))[0, len(seq) - 1]
            token = out.row(i)[j]
            assert logits[token] >= logits.max() - 1e-4   # the argmax, up to ties within rounding
            assert abs(out.logprobs[i][j] - float(jax.nn.log_softmax(logits)[token])) <= 1e-3
            seq.append(token)


def test_unstacked_copy_is_reused_until_params_change(params):
    sampler = Sampler(CFG, unstack_layers=True)
    a = sampler.generate(params, [[1, 2]], max_new_tokens=4, temperature=0)
    first = sampler._last_unstacked[1]
    sampler.generate(params, [[3, 4]], max_new_tokens=4, temperature=0)
    assert sampler._last_unstacked[1] is first
    changed = jax.tree_util.tree_map(lambda x: x * 1.5, params)
    b = sampler.generate(changed, [[1, 2]], max_new_tokens=4, temperature=0)
    assert sampler._last_unstacked[1] is not first
    assert not np.array_equal(a.logprobs, b.logprobs)  # the new weights were used


def test_default_xla_options_follow_the_cpu_and_the_batch():
    from models.sampler import default_xla_options

    avx2 = frozenset({"sse2", "avx", "avx2", "fma"})
    no_ynn = {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert default_xla_options(8, avx2) == no_ynn
    assert default_xla_options(32, avx2) == no_ynn
    assert default_xla_options(64, avx2) == {}
    assert default_xla_options(8, avx2 | {"avx512f", "avx512_bf16"}) == {}
    assert default_xla_options(8, frozenset()) == {}   # not x86, or no /proc/cpuinfo


def test_xla_options_change_kernels_not_results(params):
    kw = dict(max_new_tokens=10, temperature=0)
    ynn = Sampler(CFG, xla_options={}).generate(params, PROMPTS, **kw)
    eigen = Sampler(CFG, xla_options={"xla_cpu_experimental_ynn_fusion_type": ""}).generate(
        params, PROMPTS, **kw)
    np.testing.assert_array_equal(ynn.tokens, eigen.tokens)
    np.testing.assert_allclose(ynn.logprobs, eigen.logprobs, atol=1e-4)


def test_a_bad_xla_option_is_one_clear_error(params):
    sampler = Sampler(CFG, xla_options={"xla_cpu_experimental_ynn_fusion_type": "no_such_kind"})
    with pytest.raises(ValueError, match="xla_options"):
        sampler.generate(params, PROMPTS, max_new_tokens=2, temperature=0)


def test_a_default_option_this_xla_does_not_know_falls_back_to_its_defaults(params, monkeypatch):
    import models.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "default_xla_options",
                        lambda batch: {"xla_cpu_experimental_ynn_fusion_type": "no_such_kind"})
    kw = dict(max_new_tokens=6, temperature=0)
    out = Sampler(CFG).generate(params, PROMPTS, **kw)
    plain = Sampler(CFG, xla_options={}).generate(params, PROMPTS, **kw)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
