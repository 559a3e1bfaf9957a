"""Cached decoding, the registry, and the generate CLI on the embedded model."""

import json
import os
import subprocess
import sys

import jax
import pytest

from models import llama, registry
from models.errors import UnknownModelError
from tests.conftest import tiny_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_registry_resolves_embedded_model_and_rejects_unknown(tmp_path):
    path = registry.resolve("smollm2-135m-instruct")
    assert path.endswith(".gguf") and os.path.getsize(path) > 50e6
    with pytest.raises(UnknownModelError, match="Known names: smollm2-135m-instruct"):
        registry.resolve("llama-7")
    with pytest.raises(UnknownModelError, match="directory without config.json"):
        registry.resolve(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="not .gguf"):
        registry.resolve(str(tmp_path / "w.bin"))


@pytest.mark.slow
def test_generate_cli_on_embedded_model():
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-m", "models.generate", "--prompt",
                          "What is the capital of France? Answer in one word.",
                          "--max_new_tokens", "12"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "models.generate", "--prompt", "x",
                          "--model", "/no/such/model"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: model '/no/such/model'")
    assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_generate_cli_batch_file(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONPATH": REPO}
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join([
        json.dumps({"id": "france", "prompt": "What is the capital of France? One word."}),
        json.dumps({"messages": [{"role": "system", "content": "Answer with one word."},
                                 {"role": "user", "content": "What is the capital of Italy?"}]}),
        "",
        json.dumps({"prompt": "Count from 1 to 50, separated by commas."}),
    ]))
    out = tmp_path / "replies.jsonl"
    run = subprocess.run([sys.executable, "-m", "models.generate", "--batch_file", str(batch),
                          "--output", str(out), "--max_new_tokens", "16", "--stop", "10,"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    replies = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in replies] == ["france", 1, 2]
    assert "Paris" in replies[0]["reply"] and "Rome" in replies[1]["reply"]
    assert replies[0]["finish_reason"] == "stop"
    assert replies[2]["finish_reason"] in ("stop_string", "length")
    assert all(0 < r["num_tokens"] <= 16 for r in replies)
    batch.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    bad = subprocess.run([sys.executable, "-m", "models.generate", "--batch_file", str(batch)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and f"{batch}:2: needs a string 'prompt'" in bad.stderr


def test_load_hf_dir_with_tokenizer_and_vocab_mismatch(tmp_path, smollm2_gguf):
    from models import loader
    from models.errors import CheckpointError
    from models.tokenizer import load_tokenizer

    smol_tok = load_tokenizer(smollm2_gguf)
    cfg = tiny_config(vocab_size=smol_tok.vocab_size + 3)  # padded vocab, as Llama checkpoints have
    loader.save_hf(llama.init(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path))
    smol_tok._tok.save(str(tmp_path / "tokenizer.json"))
    model = registry.load(str(tmp_path))
    assert model.config == cfg and model.tokenizer.encode("Hello") == smol_tok.encode("Hello")
    small = tiny_config(vocab_size=1000)
    loader.save_hf(llama.init(small, jax.random.PRNGKey(0)), small, str(tmp_path))
    with pytest.raises(CheckpointError, match="has 49152 tokens, but the model's vocabulary has only 1000"):
        registry.load(str(tmp_path))
