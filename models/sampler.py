"""Batched sampling: one jitted prefill and a jitted `lax.while_loop` decode over a KV cache.

Layout: prompts are LEFT-padded to a bucketed length P, so every row's prompt ends at slot P-1 and
the decode step writes all rows at the same cache slot; padding carries segment id 0 and is never
attended to. Batch size, P and the number of new tokens are rounded up to buckets, and each
distinct (shapes, sampling mode) pair is compiled once (`Sampler.compile_count` counts them); the
`max_executables` most recently used are kept. On
CPU the cache grows during decoding, `cache_block` slots at a time (see `Sampler`).

Sampling: temperature (0 = greedy), top-k, top-p, applied in that order. Each row draws from its
own key, `fold_in(fold_in(rng, seed_of_row), step)`, so a row's sample does not depend on which
other rows share the batch, and G copies of one prompt with different seeds differ.

Returned log-probs are those of the model's own distribution (log-softmax of the raw logits, before
temperature or truncation), the quantity GRPO's importance ratio needs as "old log-probs".

Stopping: a row ends at an EOS / stop token id (checked on device every step, token kept in the
output) or at a stop string (checked on the host every `stop_check_every` steps, and exactly at the
end: the output keeps the tokens up to the one that completes the string).

Turns of a chat: with a `PrefixCache`, a call keeps its KV cache, and a later call whose prompts
begin with what its rows hold (the earlier prompt and the reply sampled after it, as the next turn
of a dialogue game does) prefills only the rest of each prompt (see `PrefixCache`).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import os
import weakref
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


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_host_memory() -> bool:
    """Hands the free pages of the host's heap back to the OS (glibc's `malloc_trim(0)`); False
    where the C library has no such call.

    On CPU the KV caches, the decode state and the activations are host memory. A rollout
    allocates and frees caches of many sizes (batch, prompt and cache-length buckets, hundreds of MB
    each), and glibc keeps most freed pages mapped: an evaluation of 70 SmolLM2-135M episodes whose
    live arrays stayed within 2-4 GB grew to 8 GB of resident memory in four minutes, and a longer one
    was killed by the kernel at 19.5 GB. Trimmed every 15 s, the same evaluation stayed within
    3.3-5.9 GB; with a trim after every sampler call it finished at a peak of 8.7 GB, its long
    chats' caches included. A trim took 1-25 ms there, a sampler call seconds.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def memory_bytes(devices: Optional[Sequence] = None) -> Optional[int]:
    """Memory of `devices` (default: the first local device) together: each accelerator's allocator
    limit, summed; on CPU the host's physical memory, which its devices share. None if unknown."""
    devices = list(devices) if devices is not None else jax.local_devices()[:1]
    if devices and all(d.platform == "cpu" for d in devices):
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None
    total = 0
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:   # a backend without memory statistics
            stats = None
        if not stats or not stats.get("bytes_limit"):
            return None
        total += int(stats["bytes_limit"])
    return total


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


class PrefixCache:
    """KV caches of earlier `Sampler.generate` calls, for calls whose prompts continue them.

    In a dialogue game each turn's prompt is the chat so far: the previous turn's prompt, the
    reply sampled after it and the next message. Passed to `generate(prefix_cache=...)`, this keeps
    each call's cache with the token ids every row holds (prompt and sampled tokens), and a later
    call's prompt reuses the slots of its longest common prefix with any kept row (at least
    `min_tokens` of them; the prompt's last token is always prefilled, for its logits) and prefills
    only the tokens after it. Prompts are matched by token ids, whatever call or row they come from:
    in a game of two model players each continues its own chat from two calls back, and a new
    episode may share a game's instructions with another's row. A kept call is dropped once every
    row of it has been continued (the newer call holds all of it; dropped before the prefill, so its
    memory is free again then), and at most `max_entries` are kept, the least recently used dropped
    first (a policy keeps two per sampler call of its turns: two model players alternate), and at
    most `max_bytes` of caches (None: no bound), the least recently used dropped first, the call
    just made too if it alone is larger. A dropped call's rows are prefilled whole again.

    The reused keys and values are the ones the earlier call computed (its prefill, or its decode
    steps for the sampled tokens), so outputs equal a full prefill's up to float rounding. The cache
    holds weak references to the params it was made with, and a call with other params empties it;
    `clear()` frees the kept caches' memory (e.g. when a rollout ends).
    """

    def __init__(self, max_entries: int = 4, min_tokens: int = 16, max_bytes: Optional[int] = None):
        if max_entries < 1 or min_tokens < 1:
            raise ValueError(f"PrefixCache: need max_entries >= 1 and min_tokens >= 1, got "
                             f"{max_entries}, {min_tokens}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"PrefixCache: max_bytes must be >= 0 or None, got {max_bytes}")
        self.max_entries, self.min_tokens = int(max_entries), int(min_tokens)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        # [cache, token ids [R, L] padded with -1, rows not yet continued [R] bool, bytes of the
        # cache's arrays], oldest first
        self.entries: list = []
        self.dropped = 0              # kept calls dropped for max_entries or max_bytes, over all calls
        self._params: Optional[list] = None
        self.reused_tokens = 0        # prompt tokens taken from kept caches, over all calls
        self.prefilled_tokens = 0     # prompt tokens prefilled

    def clear(self) -> None:
        self.entries = []
        self._params = None

    def _follow(self, params) -> None:
        """Empties the cache unless `params` are (by identity) the ones its entries were made with."""
        leaves = jax.tree_util.tree_leaves(params)

        def ref(x):
            try:
                return weakref.ref(x)
            except TypeError:   # e.g. a Python scalar leaf: held as is
                return lambda: x

        if self._params is None or len(self._params) != len(leaves) or any(
                r() is not x for r, x in zip(self._params, leaves)):
            self.clear()
            self._params = [ref(x) for x in leaves]

    def match(self, prompts: Sequence[Sequence[int]]) -> tuple:
        """(kept call per prompt, its row, tokens reused) as arrays; -1, -1, 0 where none."""
        n = len(prompts)
        entry, src, keep = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
        for i, p in enumerate(prompts):
            p = np.asarray(p)
            for e, (_, seqs, _, _) in enumerate(self.entries):
                m = min(len(p) - 1, seqs.shape[1])
                if m < max(self.min_tokens, keep[i] + 1):
                    continue
                eq = seqs[:, :m] == p[:m]
                common = np.where(eq.all(axis=1), m, eq.argmin(axis=1))
                r = int(common.argmax())
                if common[r] >= self.min_tokens and common[r] > keep[i]:
                    entry[i], src[i], keep[i] = e, r, common[r]
        return entry, src, keep

    def release(self, continued: Sequence[tuple]) -> None:
        """Marks rows as continued ((entry, row) pairs, as `match` gave them) and drops the kept calls
        with no row left to continue; the calls used move to the back (the last dropped). Entry
        numbers change: match again before using any."""
        used = set()
        for e, r in continued:
            self.entries[e][2][r] = False
            used.add(e)
        order = [e for e in range(len(self.entries)) if e not in used] + sorted(used)
        self.entries = [self.entries[e] for e in order if self.entries[e][2].any()]

    @property
    def nbytes(self) -> int:
        """Bytes of the kept caches' arrays (over all devices where they are sharded)."""
        return sum(e[3] for e in self.entries)

    def add(self, cache, seqs: Sequence[Sequence[int]]) -> None:
        """Keeps `cache`, whose rows hold `seqs`, dropping the least recently used beyond max_entries
        and max_bytes."""
        width = max([len(s) for s in seqs] + [1])
        ids = np.full((len(seqs), width), -1, np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(cache))
        self.entries.append([cache, ids, np.array([len(s) > 0 for s in seqs]), size])
        while self.entries and (len(self.entries) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes)):
            del self.entries[0]
            self.dropped += 1


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


def _cache_dtype(name, config: LlamaConfig):
    """The KV cache dtype for `name` (None, "" or "auto": the activation dtype)."""
    if name is None or (isinstance(name, str) and name in ("", "auto")):
        return jnp.dtype(config.jnp_dtype)
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sampler: cache_dtype must be a floating dtype such as 'bfloat16' or "
                         f"'float32', got {name!r}")
    return dtype


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
    max_executables: how many compiled executables are kept, the least recently used dropped first
    (a dropped shape compiles again when it comes back). Rollouts of many turns meet many (batch,
    prompt, cache length) buckets; on CPU each executable of SmolLM2-135M maps 250-350 memory
    regions for its code, and a long process that kept them all reached Linux's default limit of
    65530 regions per process (`vm.max_map_count`), where compiling fails ("Cannot allocate
    memory"). The default, 96, keeps that under half the limit.
    """

    def __init__(self, config: LlamaConfig, *, mesh: Optional[Mesh] = None, pad_id: int = 0,
                 batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 length_buckets: Sequence[int] = LENGTH_BUCKETS,
                 stop_check_every: int = 32, unstack_layers: Optional[bool] = None,
                 cache_block: Optional[int] = None, xla_options: Optional[dict] = None,
                 split_prefill: bool = True, max_executables: int = 96, cache_dtype=None):
        if max_executables < 1:
            raise ValueError(f"sampler: max_executables must be >= 1, got {max_executables}")
        self.config = config
        self.cache_dtype = _cache_dtype(cache_dtype, config)
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
        self.max_executables = int(max_executables)
        self._compiled: collections.OrderedDict = collections.OrderedDict()   # least recently used first
        self._compiles = 0

    @property
    def compile_count(self) -> int:
        """How many executables (prefill, decode and cache moves, one per shape/mode bucket) were
        compiled, recompiles of dropped ones included."""
        return self._compiles

    @property
    def kept_executables(self) -> int:
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
        if key in self._compiled:
            self._compiled.move_to_end(key)
        else:
            while len(self._compiled) >= self.max_executables:
                self._compiled.popitem(last=False)
            self._compiles += 1
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
            cache = llama.init_cache(config, tokens.shape[0], cache_len, self.cache_dtype,
                                     per_layer=self.unstack)
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
        end where the longest chunk's do; the slots before keep what they hold (nothing, or a reused
        prefix). (cache, logits) are donated."""
        config, shardings = self.config, self._cache_shardings()

        def prefill(params, cache, logits, tokens, positions, segments, row, slot):
            b = tokens.shape[0]
            batch_axis = 0 if self.unstack else 1

            def rows(full, axis):
                start = [jnp.int32(0)] * full.ndim
                start[axis] = row
                size = list(full.shape)
                size[axis] = b
                return jax.lax.dynamic_slice(full, start, size)

            # the rows as they are (empty, or holding a kept prefix: see PrefixCache)
            sub = {"k": jax.tree_util.tree_map(lambda f: rows(f, batch_axis), cache["k"]),
                   "v": jax.tree_util.tree_map(lambda f: rows(f, batch_axis), cache["v"]),
                   "positions": rows(cache["positions"], 0),
                   "segment_ids": rows(cache["segment_ids"], 0), "index": slot}
            x, sub = llama.forward(params, tokens, positions, segments, sub, config=config,
                                   return_hidden=True)

            def put(full, part, axis):
                start = [jnp.int32(0)] * full.ndim
                start[axis] = row
                return jax.lax.dynamic_update_slice(full, part.astype(full.dtype), start)

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

    def _gather_fn(self, kept: int):
        """Writes into `into` (a cache of `kept` + more slots; donated) the rows that reuse a kept
        `cache`: row i with src[i] >= 0 gets, in its first `kept` slots, the slots of that cache's
        row src[i] at positions below keep[i], right-aligned in their order, and its other slots
        emptied; rows with src[i] = -1 stay as they are."""
        shardings, unstack = self._cache_shardings(), self.unstack

        def gather(into, cache, src, keep):
            cache_len = into["positions"].shape[1]
            old = cache["positions"].shape[1]
            take = jnp.maximum(src, 0)
            pos, seg = cache["positions"][take], cache["segment_ids"][take]
            valid = (seg != 0) & (pos < keep[:, None]) & (src >= 0)[:, None]
            width = min(kept, old)   # keep[i] <= the row's valid slots <= old
            idx = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)[:, old - width:]
            ok = jnp.take_along_axis(valid, idx, axis=1)
            lead, tail = kept - width, cache_len - kept

            def slots(x, batch_axis, slot_axis):
                x = jnp.take(x, take, axis=batch_axis)
                shape = [1] * x.ndim
                shape[batch_axis], shape[slot_axis] = idx.shape
                i = jnp.broadcast_to(idx.reshape(shape),
                                     x.shape[:slot_axis] + (width,) + x.shape[slot_axis + 1:])
                x = jnp.take_along_axis(x, i, axis=slot_axis)
                widths = [(0, 0)] * x.ndim
                widths[slot_axis] = (lead, tail)
                return jnp.pad(x, widths)

            b = 0 if unstack else 1
            mine = src >= 0

            def pick(new, base, batch_axis):   # the rows that reuse this cache: new; others: base
                shape = [1] * base.ndim
                shape[batch_axis] = mine.shape[0]
                return jnp.where(mine.reshape(shape), new.astype(base.dtype), base)

            out = {"k": jax.tree_util.tree_map(lambda x, o: pick(slots(x, b, x.ndim - 1), o, b),
                                               cache["k"], into["k"]),
                   "v": jax.tree_util.tree_map(lambda x, o: pick(slots(x, b, x.ndim - 2), o, b),
                                               cache["v"], into["v"]),
                   "positions": pick(jnp.pad(jnp.where(ok, jnp.take_along_axis(pos, idx, axis=1), 0),
                                             ((0, 0), (lead, tail))), into["positions"], 0),
                   "segment_ids": pick(jnp.pad(jnp.where(ok, jnp.take_along_axis(seg, idx, axis=1), 0),
                                               ((0, 0), (lead, tail))), into["segment_ids"], 0),
                   "index": into["index"]}
            if shardings is not None:
                out = jax.lax.with_sharding_constraint(out, shardings)
            return out

        return gather

    def _empty_fn(self, batch: int, cache_len: int):
        config, shardings = self.config, self._cache_shardings()

        def empty():
            cache = llama.init_cache(config, batch, cache_len, self.cache_dtype, per_layer=self.unstack)
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
                 tokenizer=None, prefix_cache: Optional[PrefixCache] = None) -> SampleOutput:
        """Samples up to `max_new_tokens` for each prompt (lists of token ids). prefix_cache: reuse
        the KV cache of earlier calls that the prompts continue, and keep this call's (see
        `PrefixCache`)."""
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
        # Tokens reused from kept caches (see PrefixCache): row i prefills prompts[i][keep[i]:]
        entry, src, keep = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
        if prefix_cache is not None:
            prefix_cache._follow(params)
            entry, src, keep = prefix_cache.match(prompts)
        reuse = bool(keep.any())
        kept = _round_up(int(keep.max()), self.length_buckets, self.length_buckets[-1]) if reuse else 0
        # the slots [kept, kept + plen) take the left-padded rest of each prompt
        longest = max(len(p) - k for p, k in zip(prompts, keep))
        plen = _round_up(longest, self.length_buckets, self.length_buckets[-1])
        new_len = _round_up(max_new_tokens, self.length_buckets, self.length_buckets[-1])
        # room: how many new tokens the cache holds now (it grows by cache_block, see the class doc)
        # (not at batch 1: there XLA:CPU runs the matmuls in f32 from an f32 copy of the weights
        # that it makes once per decode call, which costs more than the shorter cache saves)
        room = min(self.cache_block, new_len) if self.cache_block and batch > 1 else new_len

        # Rows run longest first when the prefill is split into chunks of similar lengths (see
        # `prefill_chunks`); the outputs are put back in the prompts' order at the end.
        lengths = np.array([len(p) - k for p, k in zip(prompts, keep)] + [0] * (batch - n))
        chunks = self.prefill_chunks(sorted(lengths, reverse=True))
        chunked = chunks != [(0, batch, plen)]
        order = np.argsort(-lengths[:n], kind="stable") if chunked else np.arange(n)
        rows = [list(prompts[i][keep[i]:]) for i in order] + [[]] * (batch - n)  # bucket rows: padding
        tokens, positions, segments = pad_batch(rows, self.pad_id, plen, left=True)
        row_keep = np.zeros((batch,), np.int32)
        row_keep[:n] = keep[order]
        positions = positions + row_keep[:, None] * segments   # the rest continues the kept prefix
        prompt_lengths = np.zeros((batch,), np.int32)
        prompt_lengths[:n] = [len(prompts[i]) for i in order]
        if prefix_cache is not None:
            prefix_cache.reused_tokens += int(keep.sum())
            prefix_cache.prefilled_tokens += int(lengths.sum())

        if self._prepares:
            params = self._prepared(params)
        sig = (jax.tree_util.tree_structure(params),   # e.g. with or without LoRA adapters
               tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
                     for x in jax.tree_util.tree_leaves(params)))
        if not chunked and not reuse:
            tokens, positions, segments = map(self._put, (tokens, positions, segments))
            prefill = self._compile(("prefill", batch, plen, plen + room, sig),
                                    self._prefill_fn(plen + room), params, tokens, positions, segments)
            logits, cache = prefill(params, tokens, positions, segments)
        else:
            total = kept + plen + room
            empty = self._compile(("empty", batch, total), self._empty_fn(batch, total))
            logits, cache = empty()
            for e in sorted(set(entry[entry >= 0].tolist())):   # each kept call's rows in turn
                row_src = np.full((batch,), -1, np.int32)
                row_src[:n] = np.where(entry[order] == e, src[order], -1)
                args = (cache, prefix_cache.entries[e][0], self._put(row_src), self._put(row_keep))
                gather = self._compile(("gather", args[1]["positions"].shape, batch, kept, total),
                                       self._gather_fn(kept), *args, donate=(0,))
                cache = gather(*args)
                del args
            if reuse:   # the kept calls now continued in full are freed before the prefill
                prefix_cache.release([(e, r) for e, r in zip(entry, src) if e >= 0])
            fn = self._chunk_prefill_fn()
            for row, size, clen in chunks:
                part = [self._put(np.ascontiguousarray(a[row:row + size, plen - clen:]))
                        for a in (tokens, positions, segments)]
                at = (jnp.int32(row), jnp.int32(kept + plen - clen))
                prefill = self._compile(("prefill_chunk", batch, size, clen, kept + plen + room, sig), fn,
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
        del logits, cache   # the state holds them (and each decode call donates it)
        stop_arr = jnp.asarray(np.array(list(stop_ids) or [-1], np.int32))
        greedy = temperature == 0
        mode = dict(greedy=greedy, top_k=0 if greedy else top_k, top_p=(not greedy) and top_p < 1)
        string_stopped = np.zeros((batch,), bool)
        chunk = self.stop_check_every if stop_strings else max_new_tokens
        until = 0
        base = kept + plen   # the slot the decode writes first
        while until < max_new_tokens:
            if until == room:   # steps until-1 and before filled the cache: make room for more
                room = min(room + self.cache_block, new_len)
                grow = self._compile(("grow", batch, base + until, base + room),
                                     self._grow_fn(base + room), state["cache"])
                state["cache"] = grow(state["cache"])
            until = min(until + chunk, max_new_tokens, room)
            decode = self._compile(("decode", batch, new_len, base + room, sig,
                                    tuple(sorted(mode.items()))),
                                   self._decode_fn(**mode), params, state, stop_arr, row_keys,
                                   jnp.float32(temperature), jnp.float32(top_p), jnp.int32(0),
                                   options=self.decode_options(batch), donate=(1,))
            state = decode(params, state, stop_arr, row_keys, jnp.float32(temperature),
                           jnp.float32(top_p), jnp.int32(until))
            if stop_strings:   # (copies: the next decode call donates the state's buffers)
                toks, lens = np.array(state["tokens"]), np.array(state["lengths"])
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
        if prefix_cache is not None:   # what each cache row holds: its prompt and the kept tokens
            prefix_cache.add(state["cache"], [list(prompts[i]) + toks[i, :lengths[i]].tolist()
                                              for i in order] + [[]] * (batch - n))
        del state
        if jax.default_backend() == "cpu":
            release_host_memory()
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
