"""Reading and checking run configs: one clear error for any bad value.

`parse(argv)` reads `--config=FILE` (an ml_collections `get_config()` file) with `--config.key=value`
overrides; `validate(config)` checks every value a run uses (types come from ml_collections, which
refuses an override of the wrong type) and raises `ConfigError` naming the key, the value and what
is allowed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

from ml_collections import ConfigDict

METHODS = ("sft", "dpo", "grpo", "eval")
PARTNERS = ("strong", "weak", "reference", "self")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A run config value is unknown, of the wrong type, or out of range."""


def load_file(path: str) -> ConfigDict:
    """The ConfigDict that a config file's `get_config()` returns."""
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist (try configs/grpo.py, sft.py, dpo.py or "
                          f"eval.py)")
    spec = importlib.util.spec_from_file_location(f"_run_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: report its error in one line
        raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"config file {path!r}: get_config() returned {type(config).__name__}, "
                          f"not an ml_collections ConfigDict")
    return config


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _convert(key: str, old: Any, text: str) -> Any:
    """An override's text as a value of the type the config already holds."""
    try:
        if isinstance(old, bool):
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, str) or old is None:
            return text
        if isinstance(old, (tuple, list)):
            value = json.loads(text) if text.startswith("[") else [s for s in text.split(",") if s]
            return type(old)(value)
    except (ValueError, json.JSONDecodeError):
        pass
    raise ConfigError(f"config.{key}={text!r}: expected a value of type {type(old).__name__}")


def apply_override(config: ConfigDict, key: str, text: str) -> None:
    import difflib

    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            known = list(node.keys()) if isinstance(node, ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else (
                f"; keys here: {', '.join(sorted(known))}" if known else "")
            raise ConfigError(f"unknown config key {key!r} ({part!r} is not in {where}){hint}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ConfigDict):
        raise ConfigError(f"config.{key} is a section; set one of its keys: {', '.join(sorted(old.keys()))}")
    try:
        node[parts[-1]] = _convert(key, old, text)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"config.{key}={text!r}: {e}") from None


def parse(argv: Sequence[str]) -> ConfigDict:
    """Config from command-line arguments: `--config=FILE` then any `--config.key=value`."""
    path, overrides = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config.") or a.startswith("--config="):
            name, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{a} needs a value")
                i += 1
                value = args[i]
        elif a == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file")
            name, value = "config", args[i + 1]
            i += 1
        else:
            raise ConfigError(f"unexpected argument {a!r}; use --config=FILE and --config.key=value")
        if name == "config":
            path = value
        else:
            overrides.append((name[len("config."):], value))
        i += 1
    if path is None:
        raise ConfigError("no config file given; use --config=configs/grpo.py (or sft.py, dpo.py, "
                          "eval.py), with optional --config.key=value overrides")
    config = load_file(path)
    for key, value in overrides:
        apply_override(config, key, value)
    return config


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: {what}")


def _num(c: ConfigDict, key: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
         lo_open: bool = False, integer: bool = False) -> None:
    value = c
    for part in key.split("."):
        value = value[part]
    _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "must be a number")
    _require(math.isfinite(value), key, value, "must be finite")
    if integer:
        _require(float(value).is_integer(), key, value, "must be an integer")
    if lo is not None:
        _require(value > lo if lo_open else value >= lo, key, value,
                 f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None:
        _require(value <= hi, key, value, f"must be <= {hi}")


def _choice(c: ConfigDict, key: str, allowed: Sequence[str]) -> None:
    value = c
    for part in key.split("."):
        value = value[part]
    _require(value in allowed, key, value, f"must be one of {', '.join(repr(a) for a in allowed)}")


def validate(c: ConfigDict) -> ConfigDict:
    """Checks a run config; returns it unchanged or raises ConfigError."""
    from games import registry
    from games.core import GameError

    _choice(c, "method", METHODS)
    if c.method in ("sft", "dpo", "grpo"):
        _require(c.method in c, c.method, None, f"method {c.method!r} needs a config.{c.method} section "
                 f"(start from configs/{c.method}.py)")
    _num(c, "seed", lo=0, integer=True)
    _require(isinstance(c.run_dir, str) and c.run_dir.strip() != "", "run_dir", c.run_dir,
             "must be a directory path")
    _num(c, "steps", lo=0, integer=True)
    if c.method != "eval":
        _num(c, "steps", lo=1, integer=True)
    _require(isinstance(c.model.name, str) and c.model.name != "", "model.name", c.model.name,
             "must be a model name or path")
    _choice(c, "model.param_dtype", DTYPES)
    if "lora" in c:
        _num(c, "lora.rank", lo=0, integer=True)
        _num(c, "lora.alpha", lo=0, lo_open=True)
        _num(c, "lora.dropout", lo=0, hi=1)
        _require(c.lora.dropout < 1, "lora.dropout", c.lora.dropout, "must be below 1")
        _choice(c, "lora.quantize", ("none", "int8", "int4"))
        _num(c, "lora.block", lo=2, integer=True)
        _require(c.lora.block % 2 == 0, "lora.block", c.lora.block, "must be even (two 4-bit values a byte)")
        _require(c.lora.rank > 0 or c.lora.quantize == "none", "lora.quantize", c.lora.quantize,
                 "a quantized base is frozen: set lora.rank > 0 to train adapters on it")
        _require(c.lora.rank == 0 or c.method != "eval", "lora.rank", c.lora.rank,
                 "adapters are trained by sft, dpo or grpo, not by eval")
        if c.lora.rank > 0:
            from models.lora import LoraSpec

            try:
                LoraSpec.parse(c.lora.rank, c.lora.alpha, c.lora.targets, c.lora.dropout)
            except ValueError as e:
                raise ConfigError(f"config.lora.targets={c.lora.targets!r}: {e}") from None
    _choice(c, "model.dtype", DTYPES)
    if "matmul_dtype" in c.model:
        _choice(c, "model.matmul_dtype", ("", "auto") + DTYPES)
    for axis in ("data", "fsdp", "tensor"):
        v = c.mesh[axis]
        _require(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{axis}", v, "must be >= 1 or -1")
    _require([c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) <= 1, "mesh", c.mesh.to_dict(),
             "at most one axis may be -1")
    o = c.optimizer
    _num(c, "optimizer.learning_rate", lo=0)
    _choice(c, "optimizer.schedule", SCHEDULES)
    _num(c, "optimizer.warmup_steps", lo=0, integer=True)
    _num(c, "optimizer.b1", lo=0, hi=1)
    _num(c, "optimizer.b2", lo=0, hi=1)
    _require(o.b1 < 1 and o.b2 < 1, "optimizer.b1/b2", (o.b1, o.b2), "must be < 1")
    _num(c, "optimizer.eps", lo=0, lo_open=True)
    _num(c, "optimizer.weight_decay", lo=0)
    _num(c, "optimizer.grad_clip", lo=0)
    _num(c, "batch.max_seq_len", lo=2, integer=True)
    _num(c, "batch.micro_batch", lo=1, integer=True)
    try:
        registry.resolve_names(c.games.names)
        registry.resolve_names(c.eval.games)
    except GameError as e:
        raise ConfigError(f"config.games.names / eval.games: {e}") from None
    _require(isinstance(c.games.learner_roles, str) and c.games.learner_roles.strip() != "",
             "games.learner_roles", c.games.learner_roles, "must be 'all' or player numbers / role names")
    p = c.games.partner
    _require(p in PARTNERS or (isinstance(p, str) and p.startswith("openai:") and p[7:].strip() != ""),
             "games.partner", p, f"must be one of {', '.join(repr(a) for a in PARTNERS)} or "
             "'openai:MODEL' (a model behind OPENAI_BASE_URL)")
    _require(isinstance(c.distributed.coordinator_address, str), "distributed.coordinator_address",
             c.distributed.coordinator_address, "must be host:port or empty")
    _num(c, "distributed.num_processes", lo=0, integer=True)
    _num(c, "distributed.process_id", lo=-1, integer=True)
    _num(c, "remote.timeout_s", lo=0, lo_open=True)
    _num(c, "remote.retries", lo=0, integer=True)
    _num(c, "remote.backoff_s", lo=0)
    _num(c, "remote.requests_per_second", lo=0)
    _num(c, "remote.concurrency", lo=1, integer=True)
    _choice(c, "games.reward", ("quality", "success"))
    _num(c, "games.abort_penalty")
    _num(c, "rollout.max_new_tokens", lo=1, integer=True)
    _num(c, "rollout.temperature", lo=0)
    _num(c, "rollout.top_k", lo=0, integer=True)
    _num(c, "rollout.top_p", lo=0, hi=1, lo_open=True)
    _num(c, "rollout.batch_size", lo=1, integer=True)
    _num(c, "rollout.prefix_cache_gb", lo=0)
    _choice(c, "rollout.cache_dtype", ("auto",) + DTYPES)
    _require(c.rollout.max_new_tokens < c.batch.max_seq_len, "rollout.max_new_tokens",
             c.rollout.max_new_tokens, f"must be below batch.max_seq_len ({c.batch.max_seq_len})")
    _num(c, "checkpoint.every", lo=0, integer=True)
    _num(c, "checkpoint.keep", lo=1, integer=True)
    _num(c, "eval.every", lo=0, integer=True)
    _choice(c, "eval.split", ("train", "validation", "test"))
    _num(c, "eval.limit", lo=0, integer=True)
    _num(c, "eval.max_new_tokens", lo=1, integer=True)
    _num(c, "log.every", lo=1, integer=True)
    _choice(c, "export.dtype", DTYPES)
    if c.method == "grpo":
        _num(c, "grpo.group_size", lo=2, integer=True)
        _num(c, "grpo.groups_per_step", lo=1, integer=True)
        _num(c, "grpo.clip_eps", lo=0, hi=1, lo_open=True)
        _num(c, "grpo.clip_eps_high", lo=0, lo_open=True)
        _num(c, "grpo.beta", lo=0)
        _choice(c, "grpo.kl", ("k1", "k2", "k3", "none"))
        _choice(c, "grpo.aggregation", ("token-mean", "sequence-mean", "sequence-sum-norm"))
        _choice(c, "grpo.advantage_scale", ("std", "none"))
        _num(c, "grpo.updates_per_batch", lo=1, integer=True)
        _choice(c, "grpo.ratio_level", ("token", "sequence"))
        _choice(c, "grpo.overlong", ("none", "filter", "penalty"))
        _choice(c, "grpo.credit", ("episode", "abort_turn"))
        _num(c, "grpo.probe_turns", lo=-1, integer=True)
        _num(c, "grpo.max_refill_rounds", lo=0, integer=True)
        _num(c, "grpo.overlong_buffer", lo=0, integer=True)
        _num(c, "grpo.overlong_penalty", lo=0)
        _require(c.grpo.overlong != "penalty" or c.grpo.overlong_buffer < c.rollout.max_new_tokens,
                 "grpo.overlong_buffer",
                 c.grpo.overlong_buffer, "must be below rollout.max_new_tokens")
        _require(not (c.grpo.ratio_level == "sequence" and c.grpo.aggregation == "token-mean"),
                 "grpo.ratio_level", c.grpo.ratio_level,
                 "'sequence' (GSPO) averages over sequences: use grpo.aggregation=sequence-mean")
        _num(c, "grpo.sft_coef", lo=0)
        _require(isinstance(c.grpo.sft_games, str), "grpo.sft_games", c.grpo.sft_games,
                 "must be '' (games.names) or game names")
        if c.grpo.sft_games.strip():
            try:
                registry.resolve_names(c.grpo.sft_games)
            except GameError as e:
                raise ConfigError(f"config.grpo.sft_games: {e}") from None
    if c.method == "sft" or (c.method == "grpo" and c.grpo.sft_coef > 0):
        _require(isinstance(c.sft.source, str) and c.sft.source != "", "sft.source", c.sft.source,
                 "must be 'strong' or a records directory")
        _num(c, "sft.episodes_per_game", lo=1, integer=True)
        _num(c, "sft.batch_size", lo=1, integer=True)
        _num(c, "sft.probe_rows", lo=0, integer=True)
    if c.method == "dpo":
        _num(c, "dpo.beta", lo=0, lo_open=True)
        _choice(c, "dpo.kind", ("sigmoid", "ipo", "orpo", "simpo"))
        _num(c, "dpo.gamma", lo=0)
        _num(c, "dpo.label_smoothing", lo=0)
        _require(c.dpo.label_smoothing < 0.5, "dpo.label_smoothing", c.dpo.label_smoothing, "must be < 0.5")
        _require(not (c.dpo.kind != "sigmoid" and c.dpo.label_smoothing), "dpo.label_smoothing",
                 c.dpo.label_smoothing, "applies to kind 'sigmoid' only")
        _num(c, "dpo.branches", lo=0, integer=True)
        _num(c, "dpo.teacher_branches", lo=0, integer=True)
        _require(c.dpo.branches + c.dpo.teacher_branches >= 2, "dpo.branches", c.dpo.branches,
                 "branches + teacher_branches must be at least 2 to form a pair")
        _num(c, "dpo.prefix_episodes", lo=1, integer=True)
        _num(c, "dpo.refresh_every", lo=0, integer=True)
        _num(c, "dpo.pairs_per_step", lo=1, integer=True)
    return c


def to_json(c: ConfigDict) -> str:
    return json.dumps(c.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))
