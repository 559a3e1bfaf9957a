"""The OpenAI-compatible HTTP player, against a chat-completions server started on 127.0.0.1."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from models import remote

KEY = "sk-test-4b1d-secret"


class FakeServer:
    """/v1/chat/completions answering `reply(messages)`, after playing the scripted failures in
    `script` (a list of (status, headers, body) or ("sleep", seconds)) one per request."""

    def __init__(self, reply=lambda messages: "Blue."):
        self.reply = reply
        self.script: list = []
        self.requests: list = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body, "time": time.monotonic()})
                    step = server.script.pop(0) if server.script else None
                if step is not None and step[0] == "sleep":
                    time.sleep(step[1])
                    step = None
                if step is not None:
                    status, headers, text = step
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(text.encode())
                    return
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": server.reply(body["messages"])}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _policy(server, **kw):
    kw.setdefault("backoff", 0.01)
    return remote.RemotePolicy("openai:fake-model", base_url=server.url, api_key=KEY, **kw)


CHAT = [{"role": "user", "content": "Name a colour."}]


def test_sends_chat_completions_with_key_and_settings(server):
    p = _policy(server, max_new_tokens=7, temperature=0.5)
    longer = CHAT + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert p([CHAT, longer]) == ["Blue.", "Blue."]
    assert len(server.requests) == 2
    r = server.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}"
    assert r["body"]["model"] == "fake-model" and r["body"]["max_tokens"] == 7
    assert r["body"]["temperature"] == 0.5
    assert sorted(len(x["body"]["messages"]) for x in server.requests) == [1, 3]
    assert KEY not in repr(p)


def test_retries_429_and_5xx_then_answers(server):
    server.script = [(429, {"Retry-After": "0.2"}, "slow down"), (503, {}, "busy"), (500, {}, "oops")]
    p = _policy(server, retries=3)
    assert p([CHAT]) == ["Blue."]
    assert p.requests_sent == 4 and len(server.requests) == 4
    # the Retry-After of the 429 was waited for
    assert server.requests[1]["time"] - server.requests[0]["time"] >= 0.19


def test_gives_up_after_retries_with_one_clear_error(server):
    server.script = [(503, {}, "busy")] * 3
    with pytest.raises(remote.RemoteModelError, match=r"no answer after 3 tries; last: HTTP 503"):
        _policy(server, retries=2)([CHAT])


def test_client_errors_are_not_retried_and_hide_the_key(server):
    server.script = [(401, {}, json.dumps({"error": f"invalid key {KEY}"}))]
    with pytest.raises(remote.RemoteModelError) as e:
        _policy(server)([CHAT])
    assert "HTTP 401" in str(e.value) and KEY not in str(e.value) and "<OPENAI_API_KEY>" in str(e.value)
    assert len(server.requests) == 1


def test_timeouts_are_retried(server):
    server.script = [("sleep", 1.0)]
    p = _policy(server, timeout=0.3, retries=1)
    assert p([CHAT]) == ["Blue."] and p.requests_sent == 2


def test_unreachable_server():
    with socket.socket() as s:   # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = remote.RemotePolicy("openai:m", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, retries=1,
                            backoff=0.01)
    with pytest.raises(remote.RemoteModelError, match=r"at http://127\.0\.0\.1:\d+/v1/chat/completions: no "
                                                      r"answer after 2 tries; last: ConnectionRefusedError"):
        p([CHAT])


def test_malformed_replies(server):
    server.script = [(200, {}, "not json")]
    with pytest.raises(remote.RemoteModelError, match="not a chat completion"):
        _policy(server)([CHAT])
    server.script = [(200, {}, json.dumps({"choices": [{"message": {"content": None}}]}))]
    assert _policy(server)([CHAT]) == [""]   # an empty reply: the game scores it


def test_rate_limit_spaces_request_starts(server):
    p = _policy(server, requests_per_second=20, concurrency=4)
    p([CHAT] * 6)
    starts = sorted(r["time"] for r in server.requests)
    assert starts[-1] - starts[0] >= 5 / 20 * 0.9


@pytest.mark.parametrize("kw, needle", [({"name": "openai:"}, "openai:NAME"),
                                        ({"base_url": "ftp://x"}, "http:// or https://"),
                                        ({"retries": -1}, "retries must be >= 0")])
def test_bad_settings(kw, needle):
    kw = {"name": "openai:m", "base_url": "http://127.0.0.1:1/v1", **kw}
    with pytest.raises(remote.RemoteModelError, match=needle):
        remote.RemotePolicy(kw.pop("name"), **kw)


def test_environment_gives_url_and_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert remote.RemotePolicy("openai:m")([CHAT]) == ["Blue."]
    assert server.requests[0]["auth"] == f"Bearer {KEY}"


def test_games_eval_plays_the_http_model(server, monkeypatch, tmp_path, capsys):
    from games import eval as game_eval

    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "eval"
    assert game_eval.main(["--model=openai:fake-model", "--games=colourname", "--split=validation",
                           "--limit=3", f"--out={out}", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["games"]["colourname"]["clemscore"] == 100.0 and res["games"]["colourname"]["episodes"] == 3
    assert len(server.requests) == 3
    logged = capsys.readouterr()
    assert KEY not in logged.out + logged.err
    assert not any(KEY in p.read_text() for p in out.rglob("*.json"))
    # unreachable: one line, exit status 2 before anything is played
    monkeypatch.setenv("OPENAI_BASE_URL", "gopher://nowhere")
    argv = ["--model=openai:m", "--games=colourname", f"--out={tmp_path / 'x'}", "--quiet"]
    assert game_eval.main(argv) == 2
    assert "error: OPENAI_BASE_URL='gopher://nowhere'" in capsys.readouterr().err


def test_http_partner_in_a_training_run(monkeypatch, tmp_path, capsys):
    """GRPO on taboo: the tiny model guesses, the HTTP model describes (and in the evals)."""
    from tests.train.tiny_model import make_tiny_model
    from train import main as train_main

    clues = FakeServer(reply=lambda messages: "CLUE: a round fruit that keeps the doctor away")
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", clues.url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        tiny = make_tiny_model(str(tmp_path / "model"))
        run = tmp_path / "run"
        args = ["--config=configs/grpo.py", f"--config.model.name={tiny}", f"--config.run_dir={run}",
                "--config.games.names=taboo", "--config.eval.games=taboo", "--config.eval.limit=1",
                "--config.games.learner_roles=2", "--config.games.partner=openai:fake-describer",
                "--config.steps=1", "--config.grpo.group_size=2", "--config.grpo.groups_per_step=1",
                "--config.rollout.max_new_tokens=4", "--config.eval.max_new_tokens=4",
                "--config.log.progress=false", "--config.log.tensorboard=false",
                "--config.batch.max_seq_len=512"]
        assert train_main.main(args) == 0
        assert len(clues.requests) >= 4   # two episodes' first clues + the start and end evals'
        assert all(r["body"]["model"] == "fake-describer" for r in clues.requests)
        interactions = [json.loads(p.read_text()) for p in (run / "eval").rglob("interactions.json")]
        assert interactions and "keeps the doctor away" in json.dumps(interactions)
        assert KEY not in (run / "config.json").read_text()
        # the server goes away: the run stops with one clear line
        clues.close()
        args = [a for a in args if not a.startswith("--config.run_dir")]
        args += [f"--config.run_dir={tmp_path / 'r2'}", "--config.remote.retries=0"]
        assert train_main.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: remote model openai:fake-describer at http://127.0.0.1:")
        assert KEY not in err
    finally:
        try:
            clues.close()
        except Exception:  # noqa: BLE001 - closed above
            pass
