"""GGUF: the embedded SmolLM2 against transformers' own GGUF loader, and files the tests write."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, loader
from models.config import preset
from models.errors import CheckpointError
from models.gguf_file import GGUFFile, unpermute_rows
from models.tokenizer import load_tokenizer, pad_batch
from tests.conftest import tiny_config

gguf = pytest.importorskip("gguf")


def llamacpp_permute(w, n_head):
    """llama.cpp's converter permutation of Q/K rows (written here from its definition)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute():
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    assert np.array_equal(unpermute_rows(llamacpp_permute(w, 3), 3), w)
    assert not np.array_equal(llamacpp_permute(w, 3), w)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return loader.load_gguf(smollm2_gguf)


def test_embedded_gguf_config(smollm2):
    cfg, _ = smollm2
    assert cfg.replace(rms_norm_eps=1e-5) == preset("smollm2-135m")


@pytest.mark.slow
def test_embedded_gguf_logits_match_transformers(smollm2, smollm2_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params = smollm2
    tok = load_tokenizer(smollm2_gguf)
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You play Taboo."},
         {"role": "user", "content": "Describe 'apple' without saying it."}],
        [{"role": "user", "content": "Guess a five-letter word: ⚡ crane?"}],
    ]
    seqs = [tok.encode_chat(m, add_generation_prompt=True).ids for m in prompts]
    tokens, positions, segments = pad_batch(seqs, pad_id=2)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
        dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                        attention_mask=torch.tensor(segments, dtype=torch.long),
                        position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.jit(llama.forward, static_argnames="config")(
        params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), config=cfg)[0])
    real = segments.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-3
    # and the model is a real instruct model: it starts its answer the same way in both
    assert (ours[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()


def write_gguf(path, cfg, params, quant=None, rope_freqs=None, truncate=None):
    """A llama.cpp-layout GGUF of `params` (Q/K permuted, optional Q8_0 weights)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, arr in loader.hf_tensors(params, cfg):
        arr = np.asarray(arr, np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest.rsplit('.', 1)[0]]}.weight"
        if name.endswith("q_proj.weight"):
            arr = llamacpp_permute(arr, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            arr = llamacpp_permute(arr, cfg.num_kv_heads)
        if quant and arr.ndim == 2:
            q = gguf.quants.quantize(arr, quant)
            writer.add_tensor(gname, q, raw_dtype=quant)
        else:
            writer.add_tensor(gname, arr)
    if rope_freqs is not None:
        ctx = cfg.rope_scaling.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(ctx)
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:truncate])


def test_written_gguf_loads_exactly_with_llama3_rope(tmp_path):
    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    plain = llama.rope_frequencies(cfg.replace(rope_scaling=None))
    factors = plain / llama.rope_frequencies(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, params, rope_freqs=factors)
    cfg2, params2 = loader.load_gguf(str(tmp_path / "m.gguf"))
    assert cfg2.rope_scaling == cfg.rope_scaling
    assert cfg2.replace(eos_token_ids=(2,), bos_token_id=1, rms_norm_eps=cfg.rms_norm_eps) == cfg
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_quantized_gguf_is_close(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, rope_scaling=None, hidden_size=64, head_dim=16)
    params = llama.init(cfg, jax.random.PRNGKey(1))
    write_gguf(tmp_path / "q.gguf", cfg, params, quant=gguf.GGMLQuantizationType.Q8_0)
    cfg2, params2 = loader.load_gguf(str(tmp_path / "q.gguf"))
    assert cfg2.tie_word_embeddings
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    a = np.asarray(llama.forward(params, tokens, config=cfg)[0])
    b = np.asarray(llama.forward(params2, tokens, config=cfg2)[0])
    wq_err = np.abs(np.asarray(params["layers"]["wq"]) - np.asarray(params2["layers"]["wq"])).max()
    assert 0 < wq_err < 1e-3  # really quantized, and in the right rows
    assert np.abs(a - b).max() < 0.02


def test_bad_gguf_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        loader.load_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        loader.load_gguf(str(tmp_path / "junk.gguf"))
    cfg = tiny_config(rope_scaling=None)
    params = llama.init(cfg, jax.random.PRNGKey(0))
    write_gguf(tmp_path / "full.gguf", cfg, params)
    size = os.path.getsize(tmp_path / "full.gguf")
    write_gguf(tmp_path / "cut.gguf", cfg, params, truncate=size - 1000)
    with pytest.raises(CheckpointError, match="cut.gguf"):
        loader.load_gguf(str(tmp_path / "cut.gguf"))
    assert isinstance(GGUFFile(str(tmp_path / "full.gguf")).config(), type(cfg))


def test_header_reader_agrees_with_the_gguf_package(smollm2_gguf):
    """The project's own GGUF header reader gives the gguf package's metadata and tensors."""
    from models.gguf_file import _read_gguf

    fields, tensors = _read_gguf(smollm2_gguf, gguf)
    ref = gguf.GGUFReader(smollm2_gguf, "r")
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert fields == expected and len(fields["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(tensors, ref.tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(theirs.shape.tolist())
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
    for i in (0, 1, len(tensors) - 1):
        np.testing.assert_array_equal(tensors[i].data, ref.tensors[i].data)


def test_unsupported_gguf_versions_are_named(tmp_path):
    cfg = tiny_config(rope_scaling=None)
    write_gguf(tmp_path / "m.gguf", cfg, llama.init(cfg, jax.random.PRNGKey(0)))
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    for version, needle in ((1, "GGUF version 1 is not"), (3 << 24, "big-endian")):
        data[4:8] = version.to_bytes(4, "little")
        (tmp_path / "v.gguf").write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=needle):
            loader.load_gguf(str(tmp_path / "v.gguf"))
