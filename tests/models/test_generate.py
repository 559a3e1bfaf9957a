"""Cached decoding, the registry, and the generate CLI on the embedded model."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from models import generate, llama, registry
from models.errors import UnknownModelError
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_greedy_decoding_equals_stepwise_argmax_of_full_forward():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0), init_std=0.3)  # peaked enough to vary
    prompt = [5, 17, 33, 8, 61]
    out = generate.generate_ids(params, cfg, prompt, max_new_tokens=12)
    seq = list(prompt)
    for _ in range(12):
        logits = llama.forward(params, jnp.asarray([seq]), config=cfg)[0]
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]
    assert len(set(out)) > 1


def test_stop_ids_and_sampling_seed():
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0), init_std=0.3)
    greedy = generate.generate_ids(params, cfg, [3, 4], max_new_tokens=8)
    stopped = generate.generate_ids(params, cfg, [3, 4], max_new_tokens=8, stop_ids=(greedy[2],))
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    a = generate.generate_ids(params, cfg, [3, 4], max_new_tokens=8, temperature=1.0, seed=1)
    b = generate.generate_ids(params, cfg, [3, 4], max_new_tokens=8, temperature=1.0, seed=1)
    c = generate.generate_ids(params, cfg, [3, 4], max_new_tokens=8, temperature=1.0, seed=2)
    assert a == b and a != c
    with pytest.raises(ValueError, match="no tokens"):
        generate.generate_ids(params, cfg, [], max_new_tokens=4)


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
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
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
