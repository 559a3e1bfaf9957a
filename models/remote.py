"""A model behind an OpenAI-compatible HTTP API, as a player: a partner, an evaluated model, or the
source of teacher episodes (evaluate it with `python -m games.eval --model=openai:NAME`, then train
on its records with `configs/sft.py --config.sft.source=DIR`).

A player is named `openai:NAME`, where NAME is the server's model id. The server is read from the
environment at run time, never from a config file or the command line, so that neither lands in a
run directory or a log:

- `OPENAI_BASE_URL`: the API's base URL, up to and including the version path
  (default `https://api.openai.com/v1`; a local vLLM, llama.cpp or TGI server works the same way);
- `OPENAI_API_KEY`: sent as `Authorization: Bearer ...` (may be empty for local servers). It is never
  printed: errors show the URL, the HTTP status and the server's own message with the key removed.

Each request is one POST to `{base}/chat/completions` with the chat messages, `max_tokens` and
`temperature`. A batch of requests is sent by `concurrency` threads, and request starts are spaced
to at most `requests_per_second` (0: no limit). A connection error, a timeout, HTTP 408, 409, 429 or
5xx is retried up to `retries` times with exponential backoff (`backoff` x 2^k seconds, capped at
60 s, or the server's Retry-After when it gives one); any other status, or a reply that is not a chat
completion, stops with one `RemoteModelError` naming the problem. A reply with empty content is
returned as "" and scored by the game's rules, as any model reply.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence

PREFIX = "openai:"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class RemoteModelError(RuntimeError):
    """The HTTP model could not be reached, refused the request, or answered something unusable."""


def is_remote(name: Optional[str]) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def model_id(name: str) -> str:
    """NAME of `openai:NAME` (a clear error when it is empty)."""
    if not is_remote(name) or not name[len(PREFIX):].strip():
        raise RemoteModelError(f"{name!r}: a remote model is named {PREFIX}NAME, with the server's model id")
    return name[len(PREFIX):].strip()


class _Pacer:
    """Spaces request starts at least 1 / rate seconds apart, across threads."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.lock = threading.Lock()
        self.next = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


class RemotePolicy:
    """Callable like `playpen_jax.rollout.ModelPolicy`: a list of env requests (or chats, lists of
    {"role", "content"} messages) in, their reply texts out (surrounding whitespace stripped)."""

    def __init__(self, name: str, *, max_new_tokens: int = 200, temperature: float = 0.0,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 1.0,
                 requests_per_second: float = 0.0, concurrency: int = 8,
                 base_url: Optional[str] = None, api_key: Optional[str] = None):
        self.name = name
        self.model = model_id(name)
        base = (base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL", "")).strip()
        self.base_url = (base or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise RemoteModelError(f"OPENAI_BASE_URL={self.base_url!r}: expected an http:// or https:// URL")
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        for label, value, low in (("max_new_tokens", max_new_tokens, 1), ("retries", retries, 0),
                                  ("concurrency", concurrency, 1)):
            if int(value) < low:
                raise RemoteModelError(f"remote model: {label} must be >= {low}, got {value}")
        if timeout <= 0 or backoff < 0 or requests_per_second < 0 or temperature < 0:
            raise RemoteModelError("remote model: timeout must be > 0 and backoff, requests_per_second, "
                                   "temperature >= 0")
        self.max_new_tokens, self.temperature = int(max_new_tokens), float(temperature)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency = int(concurrency)
        self._pacer = _Pacer(float(requests_per_second))
        self.requests_sent = 0      # HTTP requests, retries included
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:   # no key
        return f"RemotePolicy({self.name!r}, base_url={self.base_url!r})"

    def player(self):
        """A single-episode player for `games.core.run_episode`: messages -> reply text."""
        return lambda messages: self([list(messages)])[0]

    def __call__(self, requests: Sequence[Any], seeds=None) -> list:
        chats = [list(r.messages) if hasattr(r, "messages") else list(r) for r in requests]
        if len(chats) <= 1 or self.concurrency == 1:
            return [self.complete(c) for c in chats]
        with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(chats))) as pool:
            return list(pool.map(self.complete, chats))

    # ----- one chat completion ------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<OPENAI_API_KEY>") if self._api_key else text

    def complete(self, messages: Sequence[dict]) -> str:
        body = json.dumps({"model": self.model, "max_tokens": self.max_new_tokens,
                           "temperature": self.temperature,
                           "messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
        url = self.base_url + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = "Bearer " + self._api_key
        last = ""
        for attempt in range(self.retries + 1):
            self._pacer.wait()
            with self._count_lock:
                self.requests_sent += 1
            wait = min(60.0, self.backoff * 2 ** attempt)
            try:
                req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                return self._content(payload)
            except urllib.error.HTTPError as e:
                detail = self._redact(" ".join(e.read().decode("utf-8", "replace").split())[:300])
                last = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code not in RETRY_STATUS:
                    raise RemoteModelError(f"remote model {self.name} at {url}: {last}") from None
                after = _retry_after(e.headers.get("Retry-After"))
                if after is not None:
                    wait = min(60.0, after)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                name = type(reason).__name__
                last = self._redact(f"{name}: {reason}" if str(reason) else name)
            if attempt < self.retries:
                time.sleep(wait)
        raise RemoteModelError(f"remote model {self.name} at {url}: no answer after {self.retries + 1} "
                               f"tries; last: {last}")

    def _content(self, payload: bytes) -> str:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text = self._redact(" ".join(payload.decode("utf-8", "replace").split())[:200])
            raise RemoteModelError(f"remote model {self.name}: the reply is not a chat completion: "
                                   f"{text!r}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise RemoteModelError(f"remote model {self.name}: the reply's content is "
                                   f"{type(content).__name__}, not text")
        return content.strip()


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds of a Retry-After header given in seconds (an HTTP date is ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
