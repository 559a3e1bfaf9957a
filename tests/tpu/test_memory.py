"""tpu.memory: per-chip byte counts checked against sums done by hand for small shapes, and the
Llama-3.1-8B figures the README quotes."""

import pytest

from models.config import LlamaConfig, preset
from tpu import memory

# vocab 64, hidden 32, mlp 64, 2 layers, 4 heads of 8, 2 kv heads, untied head: every weight's
# hidden dimension (32) divides by 8, the norms ([2, 32] x 2 and [32]) are left whole.
TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8)
TINY_PARAMS = 64 * 32 + 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64 + 2 * 32) + 32 + 32 * 64  # 22688
TINY_NORMS = 2 * 2 * 32 + 32
LAYER = 32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64 + 2 * 32  # one decoder layer's weights, norms included


def tiny(**kw):
    args = dict(chips=8, fsdp=8, param_dtype="bfloat16", micro_batch_rows=8, seq_len=16)
    args.update(kw)
    return memory.estimate(TINY, **args)


def test_tiny_param_count_matches_the_config():
    assert TINY.num_params() == TINY_PARAMS == 22688


def test_params_split_over_fsdp_where_the_dimension_divides():
    est = tiny()
    per_chip = (TINY_PARAMS - TINY_NORMS) // 8 + TINY_NORMS
    assert est["params"] == per_chip * 2 == 5952
    assert est["optimizer"] == 2 * est["params"] + 4  # AdamW mu + nu in bf16, int32 count
    assert est["reference"] == est["params"]
    assert est["gradients"] == per_chip * 4 + per_chip * 2  # f32 accumulator + one bf16 gradient
    assert est["rollout_params"] == 0  # one host
    assert tiny(reference=False)["reference"] == 0
    assert tiny(optimizer="sgd")["optimizer"] == 0
    assert tiny(param_dtype="float32")["params"] == per_chip * 4


def test_a_dimension_that_does_not_divide_stays_whole():
    odd = TINY.replace(hidden_size=36)  # 36 % 8 != 0: every weight is replicated
    est = memory.estimate(odd, chips=8, fsdp=8, micro_batch_rows=8, seq_len=16)
    assert est["params"] == odd.num_params() * 2


def test_tensor_axis_splits_heads_mlp_and_vocab():
    est = tiny(fsdp=4, tensor=2)
    # every weight has a hidden dim (split 4 ways) and a heads / kv_heads / mlp / vocab dim (split 2
    # ways); norms stay whole.
    assert est["params"] == ((TINY_PARAMS - TINY_NORMS) // 8 + TINY_NORMS) * 2


def test_activations_with_and_without_remat():
    rows, T, D, F, H, K, Dh, L = 1, 16, 32, 64, 4, 2, 8, 2
    layer_fwd = rows * T * (3 * D + (2 * H + 2 * K) * Dh + 3 * F) * 2
    layer_attn = rows * H * T * T * (4 + 2)
    assert (layer_fwd, layer_attn) == (12288, 6144)
    assert tiny()["activations"] == L * rows * T * D * 2 + 2 * (layer_fwd + layer_attn) == 38912
    assert tiny(remat=False)["activations"] == (L + 1) * (layer_fwd + layer_attn)
    # rows per chip: micro-batch rows over data x fsdp, or as given
    assert tiny(micro_batch_rows=16)["activations"] == 2 * 38912
    assert tiny(rows_per_chip=8)["activations"] == 8 * 38912


def test_lm_head_and_gathered_weights():
    assert tiny()["lm_head"] == 2 * 1 * 15 * 64 * 4  # 15 positions (< one chunk) x vocab, f32, x2
    assert tiny(seq_len=600)["lm_head"] == 2 * 1 * 256 * 64 * 4  # one chunk of 256
    assert tiny()["gathered_weights"] == 2 * max(LAYER, 64 * 32) * 2


def test_sampler_cache_and_prefill():
    est = tiny(rollout_batch=5, prompt_len=30, new_tokens=10)
    # 5 prompts -> batch bucket 8 (a multiple of the 8 batch shards): 1 row per chip; cache length
    # 64 (prompt bucket) + 64 (new-token bucket) = 128.
    assert est["kv_cache"] == 2 * 2 * 1 * 2 * 128 * 8 * 2 + 2 * 1 * 128 * 4 == 17408
    assert est["prefill"] == 1 * 4 * 64 * 128 * (4 + 2) + 3 * 1 * 64 * 64 * 2 + LAYER * 2
    assert tiny()["kv_cache"] == tiny()["prefill"] == tiny()["kept_cache"] == 0
    # the previous turn's cache, kept for the prefix cache, counts as large as this call's
    assert est["kept_cache"] == est["kv_cache"]
    assert tiny(rollout_batch=5, prompt_len=30, new_tokens=10, prefix_cache=False)["kept_cache"] == 0


def test_totals():
    est = tiny(rollout_batch=64, prompt_len=30, new_tokens=10)
    assert est["persistent"] == sum(est[k] for k in memory.PERSISTENT)
    assert est["train_peak"] == sum(est[k] for k in memory.TRAIN)
    # two kept calls while the rows are copied, then one of them and the prefill
    assert est["rollout_peak"] == est["kv_cache"] + est["kept_cache"] + max(est["kept_cache"], est["prefill"])
    off = tiny(rollout_batch=64, prompt_len=30, new_tokens=10, prefix_cache=False)
    assert off["rollout_peak"] == off["kv_cache"] + off["prefill"]
    assert est["total"] == est["persistent"] + max(est["train_peak"], est["rollout_peak"])


def test_llama_8b_params_per_chip_fsdp8_bf16():
    est = memory.estimate("llama-3.1-8b", chips=8, fsdp=8, param_dtype="bfloat16",
                          micro_batch_rows=8, seq_len=1024)
    assert est["params"] == pytest.approx(16.06e9 / 8, rel=0.01)
    assert preset("llama-3.1-8b").num_params() * 2 == pytest.approx(16.06e9, rel=0.001)


def test_several_hosts_keep_a_sampling_copy_per_host():
    acc = memory.accelerator("v5p-64")
    est = memory.estimate("llama-3.1-8b", chips=acc.chips, data=1, fsdp=-1, micro_batch_rows=32,
                          seq_len=1024, chips_per_host=acc.chips_per_host)
    assert est["params"] == pytest.approx(16.06e9 / 32, rel=0.01)
    assert est["rollout_params"] == pytest.approx(16.06e9 / 4, rel=0.01)


def test_accelerator_types():
    assert memory.accelerator("v5p-64") == memory.Accelerator("v5p-64", 32, 4, 95 * 2**30)
    assert memory.accelerator("v5p-8").hosts == 1 and memory.accelerator("v5p-8").chips == 4
    assert memory.accelerator("v5litepod-8") == memory.Accelerator("v5litepod-8", 8, 8, 16 * 2**30)
    assert memory.accelerator("v5litepod-16").hosts == 2
    for bad in ("v5p-7", "v9-8", "v5litepod"):
        with pytest.raises(memory.MemoryEstimateError, match="accelerator type"):
            memory.accelerator(bad)


def test_mesh_resolution_and_errors():
    assert memory.resolve_mesh(8, fsdp=8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert memory.resolve_mesh(32, data=1, fsdp=-1) == {"data": 1, "fsdp": 32, "tensor": 1}
    assert memory.resolve_mesh(8, fsdp=2) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis"):
        memory.resolve_mesh(8, fsdp=-1)  # data defaults to -1 too
    with pytest.raises(ValueError, match="needs 16 chips"):
        memory.resolve_mesh(8, data=2, fsdp=8)
    with pytest.raises(ValueError, match="optimizer"):
        tiny(optimizer="lion")
    with pytest.raises(ValueError, match="chips_per_host"):
        tiny(chips_per_host=3)
    with pytest.raises(ValueError, match="unknown-model"):
        memory.estimate("unknown-model", chips=8, fsdp=8, micro_batch_rows=8, seq_len=16)


def test_cli_prints_the_table_and_a_verdict(capsys):
    assert memory.main(["--preset", "llama-3.1-8b", "--accelerator", "v5litepod-8", "--fsdp", "8",
                        "--micro-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=1 fsdp=8 tensor=1" in out
    assert "KV cache" in out and "total" in out
    assert "verdict: does not fit" in out
    assert memory.main(["--accelerator", "v5p-64", "--data", "1", "--fsdp", "-1", "--micro-batch", "32",
                        "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| persistent | params | 0.47 |" in out and "verdict: fits" in out


def test_cli_error_is_one_line(capsys):
    assert memory.main(["--chips", "8", "--fsdp", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mesh") and "\n" not in err


# LoRA rank 4 on every target of TINY, per layer: A is [in, 4], B is [4, out]; wq 32->32, wk/wv
# 32->16, wo 32->32, gate/up 32->64, down 64->32.
LORA_LAYER = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 64) + (64 + 32))


def test_lora_trains_and_keeps_state_for_the_adapters_only():
    full = tiny(fsdp=1, chips=1)
    est = tiny(fsdp=1, chips=1, lora_rank=4)
    adapters = 2 * LORA_LAYER
    assert est["params"] == full["params"] == TINY_PARAMS * 2   # the frozen base, bf16
    assert est["adapters"] == adapters * 2
    assert est["optimizer"] == 2 * adapters * 2 + 4
    assert est["gradients"] == adapters * 4 + adapters * 2
    assert est["reference"] == 0 and est["dequantized"] == 0   # the base is the reference
    assert est["activations"] == full["activations"] + 2 * 8 * 16 * 4 * 7 * 2   # x A per target
    only_q = tiny(fsdp=1, chips=1, lora_rank=4, lora_targets="q_proj")
    assert only_q["adapters"] == 2 * 4 * (32 + 32) * 2


def test_qlora_holds_the_projections_quantized():
    proj = 2 * (32 * 8 * (2 * 4 + 2 * 2) + 3 * 32 * 64)   # projection weights, both layers
    rest = TINY_PARAMS - proj
    est8 = tiny(fsdp=1, chips=1, lora_rank=4, quantize="int8")
    # int8: one byte each plus a float32 scale per channel of the contraction axis (D=32 for q/k/v,
    # gate, up; Dh=8 for o; F=64 for down)
    per_layer_scales = 4 * (32 * 8 * (4 + 2 + 2) // 32 + 4 * 32 + 2 * 64 + 32)
    assert est8["params"] == rest * 2 + proj + 2 * per_layer_scales
    est4 = tiny(fsdp=1, chips=1, lora_rank=4, quantize="int4", block=8)
    assert est4["params"] == rest * 2 + proj // 2 + proj * 4 // 8   # 4 bits + f16 scale and zero per 8
    assert est4["dequantized"] == (LAYER - 2 * 32) * 2   # one layer's projections in bf16
    with pytest.raises(memory.MemoryEstimateError, match="lora_rank > 0"):
        tiny(quantize="int4")
    with pytest.raises(memory.MemoryEstimateError, match="lora targets"):
        tiny(lora_rank=4, lora_targets="lm_head")
