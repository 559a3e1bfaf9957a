import json

import pytest

from models.config import LlamaConfig, preset
from models.errors import ConfigError

# The published config.json of Llama-3.1-8B-Instruct (fields the model reads).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def test_llama31_8b_config_json_matches_preset_and_size(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    cfg = LlamaConfig.from_hf_file(str(tmp_path))
    assert cfg == preset("llama-3.1-8b")
    assert cfg.head_dim == 128 and cfg.rope_scaling.factor == 8.0
    assert abs(cfg.num_params() - 8.03e9) < 0.01e9  # 8,030,261,248 published


def test_presets_sizes():
    assert abs(preset("llama-3.2-1b").num_params() - 1.236e9) < 0.01e9
    assert abs(preset("llama-3.2-3b").num_params() - 3.213e9) < 0.01e9
    assert abs(preset("smollm2-135m").num_params() - 134.5e6) < 1e6


def test_to_hf_round_trip():
    cfg = preset("llama-3.2-1b")
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 5}, "not a multiple"),
    ({"hidden_size": -3}, "hidden_size must be a positive integer"),
    ({"hidden_size": "big"}, "bad value"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"model_type": "gpt2"}, "not a Llama-family"),
])
def test_bad_config_values_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf({**LLAMA31_8B, **change})


def test_missing_key_and_file(tmp_path):
    bad = dict(LLAMA31_8B)
    del bad["vocab_size"]
    with pytest.raises(ConfigError, match="lacks the key 'vocab_size'"):
        LlamaConfig.from_hf(bad)
    with pytest.raises(ConfigError, match="no config.json"):
        LlamaConfig.from_hf_file(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_hf_file(str(tmp_path))


def test_bad_dtype():
    with pytest.raises(ConfigError, match="param_dtype must be one of"):
        preset("smollm2-135m", param_dtype="int4")
    with pytest.raises(ConfigError, match="unknown preset 'llama-9'"):
        preset("llama-9")
