"""Batched sampling: one jitted prefill and a jitted `lax.while_loop` decode over a KV cache.

Layout: prompts are LEFT-padded to a bucketed length P, so every row's prompt ends at slot P-1 and
the decode step writes all rows at the same cache slot; padding carries segment id 0 and is never
attended to. Batch size, P and the number of new tokens are rounded up to buckets, and each
distinct (shapes, sampling mode) pair is compiled once (`Sampler.compile_count` counts them). On
CPU the cache grows during decoding, `cache_block` slots at a time (see `Sampler`).

Sampling: temperature (0 = greedy), top-k, top-p, applied in that order. Each row draws from its
own key, `fold_in(fold_in(rng, seed_of_row), step)`, so a row's sample does not depend on which
other rows share the batch, and G copies of one prompt with different seeds differ.

Returned log-probs are those of the model's own distribution (log-softmax of the raw logits, before
temperature or truncation), the quantity GRPO's importance ratio needs as "old log-probs".

Stopping: a row ends at an EOS / stop token id (checked on device every step, token kept in the
output) or at a stop string (checked on the host every `stop_check_every` steps, and exactly at the
end: the output keeps the tokens up to the one that completes the string).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import llama
from models.config import LlamaConfig
from models.tokenizer import pad_batch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The host CPU's feature flags as Linux's /proc/cpuinfo lists them; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# XLA:CPU (jax 0.10) hands dots to YNNPACK by default. On an x86 CPU with AVX2 and no AVX-512 (AMD
# EPYC, 2 cores), the decode step's 32-row weight matmuls ran 1.4x faster with XLA's own dot
# kernels, and the whole decode at batch 8 and 32 11-14% faster (the same tokens); at batch 64
# YNNPACK's were 6% faster. With AVX-512 this is unmeasured, and XLA's default is kept.
_NO_YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_NO_YNN_MAX_BATCH = 32

# Prompt (and new-token) length buckets: steps of 64 up to 512, then 128, 256 and 512, so that a
# prompt is padded by at most a quarter of its length from 256 tokens on (powers of two pad by up to
# a half). Rollout prompts of dialogue games are a few hundred tokens; prefill is most of a rollout
# call's time, and its work and the decode's cache reads grow with the padded length.
LENGTH_BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                  2048, 2560, 3072, 3584, 4096)


def default_xla_options(batch: int, flags: Optional[frozenset] = None) -> dict:
    """XLA compile options for a decode executable of `batch` rows on this host's CPU (see above)."""
    flags = cpu_flags() if flags is None else flags
    if "avx2" in flags and "avx512f" not in flags and batch <= _NO_YNN_MAX_BATCH:
        return dict(_NO_YNN_DOTS)
    return {}


def _round_up(n: int, buckets: Sequence[int], step: int) -> int:
    for b in buckets:
        if n <= b:
            return b
    return -(-n // step) * step


@dataclasses.dataclass
class SampleOutput:
    """tokens/logprobs: [B, N] (pad_id / 0 past each row's length); lengths: [B] generated tokens;
    finish_reasons: "stop" (EOS/stop id), "stop_string" or "length"; texts if a tokenizer is set."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reasons: list
    texts: Optional[list] = None

    def row(self, i: int) -> list:
        return self.tokens[i, : self.lengths[i]].tolist()


def _filter_logits(logits, temperature, top_k: int, top_p: bool, top_p_value):
    """Scaled and truncated logits [B, V] to sample from (mode flags are static)."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(before < top_p_value, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _choose(logits, row_keys, step, temperature, top_p_value, *, greedy, top_k, top_p):
    """Next tokens [B] and their log-probs under the raw model distribution."""
    if jax.default_backend() == "cpu":
        # The log-normaliser over the vocabulary: on XLA:CPU, fused into the LM head or summed
        # by a reduction it costs several times more than as separate exp and matvec steps.
        logits_b = jax.lax.optimization_barrier(logits)
        peak = jnp.max(logits_b, axis=-1)
        shifted = jax.lax.optimization_barrier(jnp.exp(logits_b - peak[:, None]))
        ones = jnp.ones((logits.shape[-1],), jnp.float32)
        log_z = peak + jnp.log(jnp.matmul(shifted, ones, precision=jax.lax.Precision.HIGHEST))
    else:
        peak = None
        log_z = jax.nn.logsumexp(logits, axis=-1)
    if greedy and peak is not None:
        # argmax as the first index holding the peak: XLA:CPU's (value, index) reduction over
        # the vocabulary takes about 8x as long as the max already computed above.
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        token = jnp.min(jnp.where(logits == peak[:, None], iota, logits.shape[-1]), axis=-1)
    elif greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        filtered = _filter_logits(logits, temperature, top_k, top_p, top_p_value)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        token = jax.vmap(jax.random.categorical)(keys, filtered)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - log_z


class Sampler:
    """Samples continuations of token-id prompts with a fixed model config.

    mesh: optional; the batch is split over its ("data", "fsdp") axes, and the KV cache's heads
    over "tensor" where they divide. Params are used with whatever sharding they already have.
    unstack_layers: decode from per-layer copies of the weights, with the q/k/v and gate/up
    projections fused (`llama.fuse_projections`). Default: on CPU, and on GPU unless the mesh
    splits heads over a "tensor" axis; there a scan over the stacked layers decodes at about half
    the speed (H200, 1B shape, batch 32). Not on TPU, nor under tensor parallelism on GPU, where it
    is unmeasured (the fused weights' columns do not follow the per-head split). The copy holds
    the matmul weights a second time while params are live.
    With `config.matmul_dtype` narrower than the weights, the sampler decodes from a copy of the
    matmul weights in that dtype (made once per params object, like the per-layer copies).
    cache_block: the KV cache starts with room for `cache_block` new tokens after the prompt and
    grows by that many slots when decoding reaches its end, so that early steps attend over a
    shorter cache; each cache length has its own decode executable. 0: the cache is allocated at
    its full length at once, as it is for a batch of one. Default: 32 on CPU, where attention's
    reads of the cache are about a third of a decode step at batch 32; 0 elsewhere (on an H200 it
    was 4-12% slower than a full-length cache).
    split_prefill: prefill a batch whose prompts differ much in length in two or four chunks of
    rows, each padded to its own length bucket (`prefill_chunks`); bucket padding rows are not
    prefilled. Off, or under a mesh that splits the batch, every row is padded to the longest.
    xla_options: XLA compile options for the decode executables (e.g.
    {"xla_cpu_experimental_ynn_fusion_type": ""}); {}: none. Default: `default_xla_options` on
    CPU, which picks the dot kernels measured fastest for the host's vector extensions; none
    elsewhere. The options change kernels, not results beyond float rounding.
    """

    def __init__(self, config: LlamaConfig, *, mesh: Optional[Mesh] = None, pad_id: int = 0,
                 batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 length_buckets: Sequence[int] = LENGTH_BUCKETS,
                 stop_check_every: int = 32, unstack_layers: Optional[bool] = None,
                 cache_block: Optional[int] = None, xla_options: Optional[dict] = None,
                 split_prefill: bool = True):
        self.config = config
        # Decoding from per-layer arrays avoids slicing every layer's weights out of the stacked
        # arrays at each step (XLA:CPU materialises those slices).
        if unstack_layers is None:
            tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1
            backend = jax.default_backend()
            unstack_layers = backend == "cpu" or (backend == "gpu" and tensor == 1)
        self.unstack = unstack_layers
        unstack = self.unstack

        def prepare(params):
            if unstack:
                params = llama.fuse_projections(llama.unstack_layers(params))
            return llama.matmul_weights(params, config)

        self._prepare_fn = jax.jit(prepare)
        self._prepares = self.unstack or config.mixed_matmuls
        self.mesh = mesh
        self.pad_id = pad_id
        self.batch_buckets = tuple(batch_buckets)
        self.length_buckets = tuple(length_buckets)
        self.stop_check_every = stop_check_every
        if cache_block is None:
            cache_block = 32 if jax.default_backend() == "cpu" else 0
        if cache_block < 0:
            raise ValueError(f"sampler: cache_block must be >= 0, got {cache_block}")
        self.cache_block = cache_block
        self.xla_options = None if xla_options is None else dict(xla_options)
        self.split_prefill = split_prefill
        self._compiled: dict = {}

    @property
    def compile_count(self) -> int:
        """How many executables (prefill or decode, one per shape/mode bucket) were compiled."""
        return len(self._compiled)

    # --- shapes and shardings --------------------------------------------------------------
    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)

    def _batch_sharding(self, ndim: int):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))

    def _cache_shardings(self):
        if self.mesh is None:
            return None
        from playpen_jax import sharding  # the rule table lives with the mesh code

        c = self.config
        axes = {n: a[1:] for n, a in llama.cache_axes().items() if n in ("k", "v")}
        shapes = {"k": (self._batch_multiple(), c.num_kv_heads, c.head_dim, 1),
                  "v": (self._batch_multiple(), c.num_kv_heads, 1, c.head_dim)}
        ns = functools.partial(NamedSharding, self.mesh)
        kv_sharding = {}
        for n in ("k", "v"):
            if self.unstack:
                spec = sharding.logical_to_spec(axes[n], shapes[n], self.mesh)
                kv_sharding[n] = (ns(spec),) * c.num_layers
            else:
                spec = sharding.logical_to_spec(("layers",) + axes[n], (c.num_layers,) + shapes[n],
                                                self.mesh)
                kv_sharding[n] = ns(spec)
        seq_spec = PartitionSpec(("data", "fsdp"), None)
        return {"k": kv_sharding["k"], "v": kv_sharding["v"], "positions": ns(seq_spec),
                "segment_ids": ns(seq_spec), "index": ns(PartitionSpec())}

    def _put(self, x: np.ndarray):
        s = self._batch_sharding(x.ndim)
        return jax.device_put(x, s) if s is not None else jnp.asarray(x)

    def _prepared(self, params):
        """Per-layer copies of `params` and/or their matmul weights in `matmul_dtype`, made once per
        params object (a rollout calls generate many times with the same weights)."""
        leaves = jax.tree_util.tree_leaves(params)
        last = getattr(self, "_last_unstacked", None)
        if last is None or len(last[0]) != len(leaves) or any(
                a is not b for a, b in zip(last[0], leaves)):
            self._last_unstacked = None   # free the previous copy first
            self._last_unstacked = (leaves, self._prepare_fn(params))
        return self._last_unstacked[1]

    # --- compiled pieces -------------------------------------------------------------------
    def decode_options(self, batch: int) -> dict:
        """The XLA compile options of this sampler's decode executables for `batch` rows."""
        if self.xla_options is not None:
            return self.xla_options
        return default_xla_options(batch) if jax.default_backend() == "cpu" else {}

    def _compile(self, key, fn, *args, options: Optional[dict] = None, donate: tuple = ()):
        if key not in self._compiled:
            layout = None
            if self.mesh is not None:   # rows stay split over the data axes (see llama.activation_layout)
                from playpen_jax import sharding

                layout = sharding.constrain_activations(self.mesh)
            with llama.activation_layout(layout):
                lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
            try:
                self._compiled[key] = lowered.compile(compiler_options=options or None)
            except jax.errors.JaxRuntimeError as e:
                if not options:
                    raise
                if self.xla_options is not None:   # the caller's own options
                    raise ValueError(f"sampler: XLA could not compile with xla_options={options}: "
                                     f"{str(e).splitlines()[0]}") from None
                # a default option this XLA version does not know: its own defaults then
                self._compiled[key] = lowered.compile()
        return self._compiled[key]

    def _prefill_fn(self, cache_len: int):
        config, shardings = self.config, self._cache_shardings()

        def prefill(params, tokens, positions, segments):
            cache = llama.init_cache(config, tokens.shape[0], cache_len, per_layer=self.unstack)
            if shardings is not None:
                cache = jax.lax.with_sharding_constraint(cache, shardings)
            # the LM head at the last position only: at every position it is about a fifth of a
            # prefill's work (SmolLM2-135M, 49,152-token vocabulary)
            x, cache = llama.forward(params, tokens, positions, segments, cache, config=config,
                                     return_hidden=True)
            return llama.lm_head(params, x[:, -1], config), cache

        return prefill

    def _chunk_prefill_fn(self):
        """Prefills rows [row, row + b) of a cache for the whole batch from a chunk of prompts padded to
        their own length P_c: their keys go to slots [slot, slot + P_c), slot = P - P_c, so that they
        end where the longest chunk's do; the slots before stay empty. (cache, logits) are donated."""
        config, shardings = self.config, self._cache_shardings()

        def prefill(params, cache, logits, tokens, positions, segments, row, slot):
            b = tokens.shape[0]
            cache_len = cache["positions"].shape[1]
            sub = llama.init_cache(config, b, cache_len, per_layer=self.unstack)
            sub = dict(sub, index=slot)
            x, sub = llama.forward(params, tokens, positions, segments, sub, config=config,
                                   return_hidden=True)

            def put(full, part, axis):
                start = [jnp.int32(0)] * full.ndim
                start[axis] = row
                return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), start)

            batch_axis = 0 if self.unstack else 1
            out = {"k": jax.tree_util.tree_map(lambda f, q: put(f, q, batch_axis), cache["k"], sub["k"]),
                   "v": jax.tree_util.tree_map(lambda f, q: put(f, q, batch_axis), cache["v"], sub["v"]),
                   "positions": put(cache["positions"], sub["positions"], 0),
                   "segment_ids": put(cache["segment_ids"], sub["segment_ids"], 0),
                   "index": sub["index"]}
            if shardings is not None:
                out = jax.lax.with_sharding_constraint(out, shardings)
            logits = put(logits, llama.lm_head(params, x[:, -1], config), 0)
            return logits, out

        return prefill

    def _empty_fn(self, batch: int, cache_len: int):
        config, shardings = self.config, self._cache_shardings()

        def empty():
            cache = llama.init_cache(config, batch, cache_len, per_layer=self.unstack)
            if shardings is not None:
                cache = jax.lax.with_sharding_constraint(cache, shardings)
            return jnp.zeros((batch, config.vocab_size), jnp.float32), cache

        return empty

    def prefill_chunks(self, lengths: Sequence[int]) -> list:
        """How the prefill splits a batch whose prompt lengths (bucket padding rows 0) are
        `lengths`, longest first: [(first row, rows, padded length)], chunks of all-padding rows
        left out. One chunk unless halves or quarters, each padded to its own length bucket, save
        at least a fifth of the prefill's tokens (a left-padded batch otherwise pads every prompt
        to the longest)."""
        batch = len(lengths)
        top = self.length_buckets[-1]
        whole = [(0, batch, _round_up(max(lengths), self.length_buckets, top))]
        if not self.split_prefill or self._batch_multiple() != 1:   # (chunks would cut across the
            return whole                                             # data-parallel split)
        best, best_cost = whole, batch * whole[0][2]
        for k in (2, 4):
            size = batch // k
            if size < 1 or batch % k:
                break
            chunks = [(r, size, _round_up(max(lengths[r:r + size]), self.length_buckets, top))
                      for r in range(0, batch, size) if max(lengths[r:r + size]) > 0]
            cost = sum(size * p for _, size, p in chunks)
            if cost <= 0.8 * best_cost:
                best, best_cost = chunks, cost
        return best

    def _grow_fn(self, cache_len: int):
        """Pads a KV cache with empty slots (segment id 0, never attended to) to cache_len."""
        shardings = self._cache_shardings()

        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, cache_len - x.shape[axis])
            return jnp.pad(x, widths)

        def grow(cache):
            k = jax.tree_util.tree_map(lambda x: pad(x, x.ndim - 1), cache["k"])   # slots last
            v = jax.tree_util.tree_map(lambda x: pad(x, x.ndim - 2), cache["v"])
            cache = dict(cache, k=k, v=v, positions=pad(cache["positions"], 1),
                         segment_ids=pad(cache["segment_ids"], 1))
            if shardings is not None:
                cache = jax.lax.with_sharding_constraint(cache, shardings)
            return cache

        return grow

    def _decode_fn(self, *, greedy: bool, top_k: int, top_p: bool):
        config = self.config
        choose = functools.partial(_choose, greedy=greedy, top_k=top_k, top_p=top_p)

        def decode(params, state, stop_ids, row_keys, temperature, top_p_value, until):
            """Runs steps until step == until or every row is done; state is the loop carry."""

            def cond(s):
                return (s["step"] < until) & ~jnp.all(s["done"])

            def body(s):
                step = s["step"]
                token, logp = choose(s["logits"], row_keys, step, temperature, top_p_value)
                live = ~s["done"]
                token = jnp.where(live, token, self.pad_id)
                s = dict(s)
                s["tokens"] = s["tokens"].at[:, step].set(token)
                s["logprobs"] = s["logprobs"].at[:, step].set(jnp.where(live, logp, 0.0))
                s["lengths"] = s["lengths"] + live.astype(jnp.int32)
                hit_stop = jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
                s["stopped"] = s["stopped"] | (live & hit_stop)
                s["done"] = s["done"] | (live & hit_stop)
                positions = (s["prompt_lengths"] + step)[:, None]
                logits, s["cache"] = llama.forward(params, token[:, None], positions,
                                                   live[:, None].astype(jnp.int32), s["cache"],
                                                   config=config)
                s["logits"] = logits[:, -1]
                s["step"] = step + 1
                return s

            return jax.lax.while_loop(cond, body, state)

        return decode

    # --- public ----------------------------------------------------------------------------
    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 rng: Optional[jax.Array] = None, seeds: Optional[Sequence[int]] = None,
                 stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 tokenizer=None) -> SampleOutput:
        """Samples up to `max_new_tokens` for each prompt (lists of token ids)."""
        n = len(prompts)
        if n == 0:
            raise ValueError("sampler: no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("sampler: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"sampler: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"sampler: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{temperature}, {top_p}, {top_k}")
        if stop_strings and tokenizer is None:
            raise ValueError("sampler: stop_strings need a tokenizer")
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"sampler: {len(seeds)} seeds for {n} prompts")
        top_k = min(top_k, self.config.vocab_size)

        mult = self._batch_multiple()
        batch = _round_up(n, [b for b in self.batch_buckets if b % mult == 0], mult)
        longest = max(len(p) for p in prompts)
        plen = _round_up(longest, self.length_buckets, self.length_buckets[-1])
        new_len = _round_up(max_new_tokens, self.length_buckets, self.length_buckets[-1])
        # room: how many new tokens the cache holds now (it grows by cache_block, see the class doc)
        # (not at batch 1: there XLA:CPU runs the matmuls in f32 from an f32 copy of the weights
        # that it makes once per decode call, which costs more than the shorter cache saves)
        room = min(self.cache_block, new_len) if self.cache_block and batch > 1 else new_len

        # Rows run longest first when the prefill is split into chunks of similar lengths (see
        # `prefill_chunks`); the outputs are put back in the prompts' order at the end.
        lengths = np.array([len(p) for p in prompts] + [0] * (batch - n))
        chunks = self.prefill_chunks(sorted(lengths, reverse=True))
        chunked = chunks != [(0, batch, plen)]
        order = np.argsort(-lengths[:n], kind="stable") if chunked else np.arange(n)
        rows = [list(prompts[i]) for i in order] + [[]] * (batch - n)  # bucket rows are all padding
        tokens, positions, segments = pad_batch(rows, self.pad_id, plen, left=True)
        prompt_lengths = segments.sum(axis=1).astype(np.int32)

        if self._prepares:
            params = self._prepared(params)
        sig = (jax.tree_util.tree_structure(params),   # e.g. with or without LoRA adapters
               tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
                     for x in jax.tree_util.tree_leaves(params)))
        if not chunked:
            tokens, positions, segments = map(self._put, (tokens, positions, segments))
            prefill = self._compile(("prefill", batch, plen, plen + room, sig),
                                    self._prefill_fn(plen + room), params, tokens, positions, segments)
            logits, cache = prefill(params, tokens, positions, segments)
        else:
            empty = self._compile(("empty", batch, plen + room), self._empty_fn(batch, plen + room))
            logits, cache = empty()
            fn = self._chunk_prefill_fn()
            for row, size, clen in chunks:
                part = [self._put(np.ascontiguousarray(a[row:row + size, plen - clen:]))
                        for a in (tokens, positions, segments)]
                at = (jnp.int32(row), jnp.int32(plen - clen))
                prefill = self._compile(("prefill_chunk", batch, size, clen, plen + room, sig), fn,
                                        params, cache, logits, *part, *at, donate=(1, 2))
                logits, cache = prefill(params, cache, logits, *part, *at)

        rng = jax.random.PRNGKey(0) if rng is None else rng
        row_seeds = np.arange(batch, dtype=np.uint32)
        if seeds is not None:
            row_seeds[:n] = np.asarray(seeds, np.uint32)
        row_seeds[:n] = row_seeds[order]   # a row's seed follows its prompt
        row_keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.asarray(row_seeds))
        done = np.zeros((batch,), bool)
        done[n:] = True  # bucket padding rows
        state = {
            "logits": logits, "cache": cache, "step": jnp.zeros((), jnp.int32),
            "tokens": self._put(np.full((batch, new_len), self.pad_id, np.int32)),
            "logprobs": self._put(np.zeros((batch, new_len), np.float32)),
            "lengths": self._put(np.zeros((batch,), np.int32)),
            "prompt_lengths": self._put(prompt_lengths),
            "done": self._put(done), "stopped": self._put(np.zeros((batch,), bool)),
        }
        stop_arr = jnp.asarray(np.array(list(stop_ids) or [-1], np.int32))
        greedy = temperature == 0
        mode = dict(greedy=greedy, top_k=0 if greedy else top_k, top_p=(not greedy) and top_p < 1)
        string_stopped = np.zeros((batch,), bool)
        chunk = self.stop_check_every if stop_strings else max_new_tokens
        until = 0
        while until < max_new_tokens:
            if until == room:   # steps until-1 and before filled the cache: make room for more
                room = min(room + self.cache_block, new_len)
                grow = self._compile(("grow", batch, plen + until, plen + room),
                                     self._grow_fn(plen + room), state["cache"])
                state["cache"] = grow(state["cache"])
            until = min(until + chunk, max_new_tokens, room)
            decode = self._compile(("decode", batch, new_len, plen + room, sig,
                                    tuple(sorted(mode.items()))),
                                   self._decode_fn(**mode), params, state, stop_arr, row_keys,
                                   jnp.float32(temperature), jnp.float32(top_p), jnp.int32(0),
                                   options=self.decode_options(batch))
            state = decode(params, state, stop_arr, row_keys, jnp.float32(temperature),
                           jnp.float32(top_p), jnp.int32(until))
            if stop_strings:
                toks, lens = np.asarray(state["tokens"]), np.asarray(state["lengths"])
                newly = [i for i in range(n) if not string_stopped[i]
                         and _stop_cut(tokenizer, toks[i, :lens[i]], stop_strings) is not None]
                if newly:
                    string_stopped[newly] = True
                    state["done"] = self._put(np.asarray(state["done"]) | string_stopped)
            if bool(np.all(np.asarray(state["done"]))):
                break

        back = np.argsort(order)   # the prompts' order
        toks = np.array(state["tokens"])[:n][back]
        logps = np.array(state["logprobs"])[:n][back]
        lengths = np.asarray(state["lengths"])[:n][back]
        stopped = np.asarray(state["stopped"])[:n][back]
        reasons = ["stop" if s else "length" for s in stopped]
        texts = [] if tokenizer is not None else None
        for i in range(n):
            if stop_strings and not stopped[i]:
                cut = _stop_cut(tokenizer, toks[i, :lengths[i]], stop_strings)
                if cut is not None:
                    lengths[i], reasons[i] = cut[0], "stop_string"
            toks[i, lengths[i]:] = self.pad_id
            logps[i, lengths[i]:] = 0.0
            if texts is not None:
                row = toks[i, :lengths[i]].tolist()
                if reasons[i] == "stop" and row:
                    row = row[:-1]  # the stop token is not part of the reply text
                text = tokenizer.decode(row, skip_special_tokens=True)
                if reasons[i] == "stop_string":
                    text = text[: _first_stop(text, stop_strings)]
                texts.append(text)
        return SampleOutput(tokens=toks[:, :max_new_tokens], logprobs=logps[:, :max_new_tokens],
                            lengths=lengths, finish_reasons=reasons, texts=texts)


def _first_stop(text: str, stop_strings: Sequence[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def _stop_cut(tokenizer, row: np.ndarray, stop_strings: Sequence[str]) -> Optional[tuple]:
    """(number of tokens up to the one completing the first stop string,) or None."""
    text = tokenizer.decode(row.tolist())
    if _first_stop(text, stop_strings) is None:
        return None
    lo, hi = 1, len(row)  # smallest prefix whose text contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(tokenizer.decode(row[:mid].tolist()), stop_strings) is None:
            lo = mid + 1
        else:
            hi = mid
    return (lo,)
