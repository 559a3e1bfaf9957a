"""End-to-end training runs on a tiny model with a real tokenizer, and the pieces they rely on."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from models import registry as model_registry
from playpen_jax import buffers, checkpoint
from playpen_jax import sharding as shd
from playpen_jax.config import ConfigError, apply_override, validate
from playpen_jax.config import load_file as load_config
from playpen_jax.metrics import read_jsonl
from tests.conftest import tiny_config, xla_flags
from tests.train.helpers import grpo_loss_fn, main_args, optimizer
from tests.train.tiny_model import make_tiny_model
from train import main as train_main
from train import step as train_step


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def _args(tiny_dir, run_dir, config="configs/grpo.py", **over):
    return main_args(tiny_dir, run_dir, config, **{"eval.limit": 3, **over})


def _metrics(run_dir, split="train"):
    return [m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if m["split"] == split]


# ----- configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    ([], "no config file"),
    (["--config=configs/nope.py"], "does not exist"),
    (["--config=configs/grpo.py", "--config.stps=3"], "did you mean 'steps'"),
    (["--config=configs/grpo.py", "--config.steps=abc"], "config.steps='abc'"),
    (["--config=configs/grpo.py", "--config.grpo.kl=k9"], "'k1', 'k2', 'k3', 'none'"),
    (["--config=configs/grpo.py", "--config.mesh.data=0"], "mesh.data"),
    (["--config=configs/grpo.py", "--config.model.matmul_dtype=int8"], "model.matmul_dtype"),
    (["--config=configs/sft.py", "--config.grpo.beta=0"], "'grpo' is not in config"),
    (["--config=configs/dpo.py", "--config.dpo.branches=1", "--config.dpo.teacher_branches=0"],
     "at least 2"),
    (["--config=configs/grpo.py", "--config.rollout.top_p=0"], "rollout.top_p"),
    (["--config=configs/grpo.py", "--config.rollout.prefix_cache_gb=-1"], "rollout.prefix_cache_gb"),
    (["--config=configs/grpo.py", "--config.rollout.cache_dtype=int8"], "rollout.cache_dtype"),
    (["--config=configs/grpo.py", "--config.games.names=nogame"], "unknown game"),
    (["--config=configs/grpo.py", "stray"], "unexpected argument"),
    (["--config=configs/grpo.py", "--config.grpo.sft_coef=-1"], "grpo.sft_coef"),
    (["--config=configs/grpo.py", "--config.grpo.sft_coef=0.5", "--config.sft.batch_size=0"],
     "sft.batch_size"),
    (["--config=configs/grpo.py", "--config.grpo.sft_coef=0.5", "--config.grpo.sft_games=nogame"],
     "grpo.sft_games"),
    (["--config=configs/sft.py", "--config.sft.probe_rows=-1"], "sft.probe_rows"),
])
def test_bad_configs_give_one_clear_error(argv, needle, capsys):
    assert train_main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_every_config_file_validates_and_overrides_keep_types():
    for name in ("grpo", "sft", "dpo", "eval"):
        c = validate(load_config(f"configs/{name}.py"))
        assert c.method == name
    c = load_config("configs/grpo.py")
    apply_override(c, "optimizer.learning_rate", "3e-4")
    apply_override(c, "eval.at_start", "false")
    apply_override(c, "mesh.fsdp", "-1")
    apply_override(c, "mesh.data", "1")
    assert c.optimizer.learning_rate == 3e-4 and c.eval.at_start is False and c.mesh.fsdp == -1
    with pytest.raises(ConfigError, match="section"):
        apply_override(c, "grpo", "1")


# ----- buffers ----------------------------------------------------------------------------------

def test_pack_layout_masks_and_weights():
    seqs = [buffers.completion([5, 6, 7], [8, 9], [-0.1, -0.2], advantage=1.0, group=3),
            buffers.completion([5], [4, 4, 4], [-1.0, -1.0, -1.0], advantage=-1.0, group=4),
            buffers.completion([1, 2], [3], [-0.5], advantage=0.5, group=3)]
    b = buffers.pack(seqs, micro_batch=2, rows_multiple=1, max_len=128, pad_id=0, weight_by="tokens")
    assert b["tokens"].shape == (2, 2, 64)          # 3 rows -> 2 micro-batches of 2, T bucket 64
    assert b["tokens"][0, 0, :5].tolist() == [5, 6, 7, 8, 9]
    assert b["loss_mask"][0, 0, :6].tolist() == [0, 0, 0, 1, 1, 0]
    assert b["old_logprobs"][0, 0, 3:5].tolist() == pytest.approx([-0.1, -0.2])
    assert b["segment_ids"][0, 0].sum() == 5 and b["positions"][0, 1, :4].tolist() == [0, 1, 2, 3]
    assert b["valid"].tolist() == [[1, 1], [1, 0]]
    assert b["weight"].tolist() == pytest.approx([5 / 6, 1 / 6])   # counted tokens 2 + 3 | 1
    s = buffers.pack(seqs, micro_batch=2, max_len=128, weight_by="sequences")
    assert s["weight"].tolist() == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="exceeds max_len"):
        buffers.pack(seqs, micro_batch=2, max_len=4)
    keep, dropped = buffers.split_fitting(seqs + [buffers.completion([1] * 200, [2])], 128)
    assert len(keep) == 3 and dropped == 1
    # a batch smaller than a micro-batch is padded to a power of two of rows (and to the data-parallel
    # multiple), not to the configured micro-batch
    assert buffers.pack(seqs, micro_batch=8, max_len=128)["valid"].tolist() == [[1, 1, 1, 0]]
    assert buffers.pack(seqs[:2], micro_batch=8, max_len=128)["tokens"].shape == (1, 2, 64)
    assert buffers.pack(seqs, micro_batch=8, rows_multiple=8, max_len=128)["tokens"].shape == (1, 8, 64)
    assert buffers.pack(seqs, micro_batch=4, rows_multiple=2, max_len=128)["tokens"].shape == (1, 4, 64)
    p = buffers.pack(seqs, micro_batch=2, max_len=128, packed=True)
    assert p["tokens"].shape == (1, 1, 64) and p["valid"].tolist() == [[1]]
    row = p["segment_ids"][0, 0]
    assert row[:5].tolist() == [1] * 5 and row[5:9].tolist() == [2] * 4 and row[9:12].tolist() == [3] * 3
    assert p["positions"][0, 0, 5:9].tolist() == [0, 1, 2, 3]
    assert p["loss_mask"][0, 0, :12].tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1]
    assert p["token_advantages"][0, 0, 5:9].tolist() == [-1.0] * 4
    assert p["weight"].tolist() == [1.0]


# ----- the train step ---------------------------------------------------------------------------

def _random_completions(cfg, seed=0):
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(6):
        p, r = rng.integers(3, cfg.vocab_size, 5 + i).tolist(), rng.integers(3, cfg.vocab_size, 3 + i % 3)
        seqs.append(buffers.completion(p, r.tolist(), (-rng.random(len(r))).tolist(),
                                       advantage=float(rng.normal()), group=i // 3))
    return seqs


def _run_step(mesh, cfg, params, ref, seqs, micro_batch, packed=False):
    opt = optimizer()
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    state = train_step.init_state(jax.device_put(params, p_sh), opt, sh)
    weight_by = "tokens" if packed else "sequences"
    batch = buffers.pack(seqs, micro_batch=micro_batch, rows_multiple=buffers.rows_multiple(mesh),
                         max_len=64, weight_by=weight_by, packed=packed)
    step = train_step.make_train_step(grpo_loss_fn(cfg, "token-mean" if packed else "sequence-mean"),
                                      opt, sh)
    state, metrics = step(state, buffers.to_device(batch, mesh), {"ref": jax.device_put(ref, p_sh)})
    state, metrics = step(state, buffers.to_device(batch, mesh), {"ref": jax.device_put(ref, p_sh)})
    return jax.device_get(state), jax.device_get(metrics), state


def _run_step_token_mean(mesh, cfg, params, ref, seqs):
    opt = optimizer()
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    state = train_step.init_state(jax.device_put(params, p_sh), opt, sh)
    batch = buffers.pack(seqs, micro_batch=8, max_len=64, weight_by="tokens")
    step = train_step.make_train_step(grpo_loss_fn(cfg, "token-mean"), opt, sh)
    for _ in range(2):  # as `_run_step`
        state, metrics = step(state, buffers.to_device(batch, mesh), {"ref": jax.device_put(ref, p_sh)})
    return jax.device_get(metrics)


def _params_close(a, b):
    """Params after two AdamW steps at lr 1e-2 agree to 1% of one step: Adam divides each
    gradient by its running RMS, so float rounding in a gradient near zero (summation order differs
    between micro-batchings, meshes and CPUs' dot kernels) reaches the params magnified; a wrong
    gradient or sharding shows up at the scale of the step itself."""
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4)


def test_micro_batches_sharding_and_donation():
    from models import llama

    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    ref = llama.init(cfg, jax.random.PRNGKey(1))
    seqs = _random_completions(cfg)
    one = shd.make_mesh({"data": 1}, jax.devices()[:1])
    full, m_full, _ = _run_step(one, cfg, params, ref, seqs, micro_batch=8)     # one micro-batch
    micro, m_micro, _ = _run_step(one, cfg, params, ref, seqs, micro_batch=2)   # three (+1 skipped)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, m_sh, live = _run_step(mesh, cfg, params, ref, seqs, micro_batch=2)
    # The embedding is sharded over fsdp and the MLP over tensor on the 8-device mesh.
    assert live["params"]["layers"]["w_gate"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor")
    assert int(full["step"]) == 2
    for other, m in ((micro, m_micro), (sharded, m_sh)):
        assert m["loss"] == pytest.approx(m_full["loss"], rel=1e-4, abs=1e-6)
        jax.tree_util.tree_map(_params_close, full["params"], other["params"])
    changed = np.abs(full["params"]["embed"] - np.asarray(params["embed"])).max()
    assert changed > 1e-4
    # token-mean over packed rows (several sequences per row) equals one sequence per row
    packed, m_packed, _ = _run_step(one, cfg, params, ref, seqs, micro_batch=1, packed=True)
    rows = buffers.pack(seqs, micro_batch=1, max_len=64, packed=True)
    assert rows["valid"].sum() < len(seqs)
    unpacked_tm = _run_step_token_mean(one, cfg, params, ref, seqs)
    assert m_packed["loss"] == pytest.approx(unpacked_tm["loss"], rel=1e-4, abs=1e-6)


# The mesh layouts the configs and tpu/README.md use, on 8 simulated devices.
MESH_LAYOUTS = [{"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2},
                {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 1, "tensor": 8}]


@pytest.fixture(scope="module")
def one_device_step():
    from models import llama

    cfg = tiny_config()
    params, ref = llama.init(cfg, jax.random.PRNGKey(0)), llama.init(cfg, jax.random.PRNGKey(1))
    seqs = _random_completions(cfg)
    one = shd.make_mesh({"data": 1}, jax.devices()[:1])
    full, m_full, _ = _run_step(one, cfg, params, ref, seqs, micro_batch=8)
    return cfg, params, ref, seqs, full, m_full


@pytest.mark.parametrize("layout", MESH_LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_each_mesh_layout_trains_like_one_device(layout, one_device_step):
    cfg, params, ref, seqs, full, m_full = one_device_step
    mesh = shd.make_mesh(layout)
    got, m, _ = _run_step(mesh, cfg, params, ref, seqs, micro_batch=8)
    assert m["loss"] == pytest.approx(m_full["loss"], rel=1e-4, abs=1e-6)
    jax.tree_util.tree_map(_params_close, full["params"], got["params"])


def _step_temp_bytes(mesh, cfg) -> int:
    """Temporary memory per device of the compiled train step on 16 rows x 128 tokens."""
    from models import llama

    opt = optimizer()
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.eval_shape(lambda: llama.init(cfg, jax.random.PRNGKey(0)))
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    state = train_step.abstract_state(sh, abstract, opt)
    rng = np.random.default_rng(0)
    seqs = [buffers.TokenSequence(rng.integers(3, cfg.vocab_size, 128).tolist(), [1] * 128,
                                  old_logprobs=[0.0] * 128, advantage=1.0) for _ in range(16)]
    batch = buffers.pack(seqs, micro_batch=16, rows_multiple=buffers.rows_multiple(mesh), max_len=128,
                         packed=False)
    device_batch = buffers.to_device(batch, mesh)
    step = train_step.make_train_step(grpo_loss_fn(cfg, "token-mean"), opt, sh)
    ref = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, p_sh)
    return step.lower(state, device_batch, {"ref": ref}).compile().memory_analysis().temp_size_in_bytes


def test_fsdp_splits_the_activations_by_rows():
    """With the weights split over "fsdp", the rows stay split over it too (hidden states are laid
    out by the rule table): an FSDP step needs no more activation memory per device than a
    data-parallel one, where XLA left alone computes every row on every device (2.8x here)."""
    cfg = tiny_config(hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=4, head_dim=32,
                      vocab_size=512, max_position_embeddings=256)
    data = _step_temp_bytes(shd.make_mesh({"data": 8}), cfg)
    fsdp = _step_temp_bytes(shd.make_mesh({"fsdp": 8}), cfg)
    assert fsdp <= 1.2 * data, (fsdp, data)


def test_nonfinite_loss_skips_the_update():
    from models import llama

    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    opt = optimizer()
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    state = train_step.init_state(jax.device_put(params, p_sh), opt, sh)
    before = jax.device_get(state["params"])
    step = train_step.make_train_step(lambda p, mb, e: (jnp.sum(p["embed"]) * jnp.nan, {}), opt, sh)
    batch = buffers.pack([buffers.completion([1, 2], [3])], micro_batch=1, max_len=64)
    state, metrics = step(state, buffers.to_device(batch, mesh), None)
    assert float(metrics["skipped_nonfinite"]) == 1.0
    np.testing.assert_array_equal(jax.device_get(state["params"])["embed"], before["embed"])


def test_auxiliary_objective_adds_its_scaled_gradient():
    """With plain SGD (lr 1, no clipping) an update is minus its gradient: the update with an
    auxiliary objective is the main objective's update plus coef times the auxiliary one's, and the
    losses it reports are the two parts and their weighted sum."""
    import optax

    from models import llama
    from train import sft

    cfg = tiny_config()
    params = llama.init(cfg, jax.random.PRNGKey(0))
    ref = llama.init(cfg, jax.random.PRNGKey(1))
    opt = optax.sgd(1.0)
    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    p_sh = train_step.param_shardings(cfg, mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    sh = train_step.state_shardings(p_sh, opt, abstract, mesh)
    main_batch = buffers.to_device(buffers.pack(_random_completions(cfg), micro_batch=2, max_len=64), mesh)
    rng = np.random.default_rng(5)
    demos = [buffers.TokenSequence(rng.integers(3, cfg.vocab_size, n).tolist(), [0] * 4 + [1] * (n - 4))
             for n in (12, 20, 9)]
    aux_batch = buffers.to_device(buffers.pack(demos, micro_batch=2, max_len=64), mesh)
    extra = {"ref": jax.device_put(ref, p_sh)}
    main_fn, aux_fn = grpo_loss_fn(cfg, "token-mean"), sft.make_loss_fn(cfg)

    def run(loss_fn, batch, with_aux=None):
        state = train_step.init_state(jax.device_put(params, p_sh), opt, sh)
        kw = {} if with_aux is None else {"aux_loss_fn": aux_fn, "aux_coef": 0.5}
        step = train_step.make_train_step(loss_fn, opt, sh, **kw)
        state, m = step(state, batch, extra, *([] if with_aux is None else [with_aux]))
        delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                       jax.device_get(state["params"]), params)
        return delta, jax.device_get(m)

    d_main, m_main = run(main_fn, main_batch)
    d_aux, m_aux = run(aux_fn, aux_batch)
    d_both, m_both = run(main_fn, main_batch, aux_batch)
    assert m_aux["loss"] > 1.0   # random tokens: the NLL is large
    assert float(m_both["main_loss"]) == pytest.approx(float(m_main["loss"]), rel=1e-5, abs=1e-6)
    assert float(m_both["aux_loss"]) == pytest.approx(float(m_aux["loss"]), rel=1e-5)
    assert float(m_both["aux_nll"]) == pytest.approx(float(m_aux["nll"]), rel=1e-5)
    combined = float(m_main["loss"]) + 0.5 * float(m_aux["loss"])
    assert float(m_both["loss"]) == pytest.approx(combined, rel=1e-5)
    jax.tree_util.tree_map(lambda a, b, c: np.testing.assert_allclose(c, a + 0.5 * b, rtol=1e-4, atol=1e-6),
                           d_main, d_aux, d_both)
    assert np.abs(d_aux["embed"]).max() > 1e-3   # the auxiliary term does move the weights
    step = train_step.make_train_step(main_fn, opt, sh)
    with pytest.raises(ValueError, match="aux_batch"):
        step(train_step.init_state(jax.device_put(params, p_sh), opt, sh), main_batch, extra, aux_batch)


# ----- runs ---------------------------------------------------------------------------------------

def test_grpo_run_learns_the_test_game_and_writes_its_run_dir(tiny_dir, tmp_path):
    run = tmp_path / "grpo"
    argv = _args(tiny_dir, run, **{"steps": 16, "grpo.group_size": 8, "grpo.groups_per_step": 4,
                                   "optimizer.learning_rate": 0.03, "checkpoint.every": 8,
                                   "eval.every": 8, "log.plots": True})
    assert train_main.main(argv) == 0
    train = _metrics(run)
    assert [m["step"] for m in train] == list(range(1, 17))
    first = np.mean([m["reward"] for m in train[:3]])
    last = np.mean([m["reward"] for m in train[-3:]])
    assert last > first + 0.3, (first, last)
    evals = _metrics(run, "eval")
    assert [m["step"] for m in evals] == [0, 8, 16]
    assert evals[-1]["clemscore"] > evals[0]["clemscore"]
    updated = [m for m in train if "loss" in m]   # a step whose groups all tie has no update
    assert len(updated) >= 8
    for key in ("loss", "kl", "clip_fraction", "tokens_per_second", "mfu", "played", "quality",
                "rollout_seconds", "update_seconds", "learning_rate", "grad_norm"):
        assert key in updated[-1], key
    assert all(m["rows"] + m["dropped_long"] + m["dropped_zero_variance"] == m["learner_turns"]
               for m in train)
    # run directory contents
    assert json.loads((run / "config.json").read_text())["grpo"]["group_size"] == 8
    assert sorted(os.listdir(run / "checkpoints")) == ["16", "8"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "eval" / "step_16" / "clemscore.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((run / "eval" / "step_16" / "results.json").read_text())
    assert res["games"]["colourname"]["episodes"] == 3
    assert list((run / "eval" / "step_16").rglob("interactions.json"))
    # the exported HF directory loads and holds the trained weights
    exported = model_registry.load(str(run / "hf"))
    start = model_registry.load(tiny_dir)
    assert exported.tokenizer.encode("red blue") == start.tokenizer.encode("red blue")
    assert np.abs(np.asarray(exported.params["embed"]) - np.asarray(start.params["embed"])).max() > 1e-3
    # a second run in the same directory without resume is refused (nothing overwritten)
    assert train_main.main(argv) == 1


def test_grpo_with_auxiliary_sft_fits_the_demonstrations(tiny_dir, tmp_path):
    """grpo.sft_coef > 0: every update also trains on strong-player chats; their NLL is reported
    and falls as the run goes on, and the combined loss is GRPO's plus coef times it."""
    run = tmp_path / "grpo_sft"
    argv = _args(tiny_dir, run, **{"steps": 12, "grpo.group_size": 4, "grpo.groups_per_step": 2,
                                   "optimizer.learning_rate": 0.01, "grpo.sft_coef": 2.0,
                                   "sft.episodes_per_game": 4, "sft.batch_size": 4,
                                   "eval.at_start": False, "export.hf": False})
    assert train_main.main(argv) == 0
    updated = [m for m in _metrics(run) if "loss" in m]
    assert len(updated) >= 6
    for m in updated:
        assert m["loss"] == pytest.approx(m["main_loss"] + 2.0 * m["aux_loss"], rel=1e-4, abs=1e-5)
        assert m["aux_tokens"] > 0
    assert updated[-1]["aux_nll"] < 0.5 * updated[0]["aux_nll"], [round(m["aux_nll"], 3) for m in updated]


def test_grpo_sft_games_choose_the_demonstrations_apart_from_the_played_games(tiny_dir, tmp_path, capsys):
    """grpo.sft_games: the SFT term's chats come from those games while GRPO plays games.names;
    empty, they come from games.names."""
    common = {"steps": 1, "grpo.group_size": 2, "grpo.groups_per_step": 1, "grpo.sft_coef": 1.0,
              "sft.episodes_per_game": 3, "sft.batch_size": 2, "eval.at_start": False, "export.hf": False,
              "batch.max_seq_len": 1024}
    assert train_main.main(_args(tiny_dir, tmp_path / "own", **common)) == 0
    err = capsys.readouterr().err
    assert "from 3 of 3 episodes" in err, err[-2000:]
    argv = _args(tiny_dir, tmp_path / "more", **common, **{"grpo.sft_games": "colourname,referencegame"})
    assert train_main.main(argv) == 0
    err = capsys.readouterr().err
    assert "from 6 of 6 episodes" in err, err[-2000:]
    assert [m["step"] for m in _metrics(tmp_path / "more")] == [1]


def test_grpo_step_metrics_break_the_episodes_down_by_game(tiny_dir, tmp_path):
    """A step's rollout metrics give each game's episodes, % played and success rate beside the
    overall ones, which they add up to."""
    run = tmp_path / "two_games"
    argv = _args(tiny_dir, run, **{"steps": 2, "grpo.group_size": 2, "grpo.groups_per_step": 4,
                                   "games.names": "colourname,wordle", "eval.at_start": False,
                                   "export.hf": False, "rollout.temperature": 1.0})
    assert train_main.main(argv) == 0
    ms = _metrics(run)
    seen = set()
    for m in ms:
        games = sorted(k[len("episodes_"):] for k in m if k.startswith("episodes_"))
        assert games and set(games) <= {"colourname", "wordle"}, sorted(m)
        seen.update(games)
        n = [m[f"episodes_{g}"] for g in games]
        assert sum(n) == m["episodes"] and all(x % 2 == 0 for x in n)   # whole groups of 2
        for key in ("played", "success"):
            mean = sum(m[f"{key}_{g}"] * k for g, k in zip(games, n)) / m["episodes"]
            assert mean == pytest.approx(m[key]), (m["step"], key)
        assert all(0 <= m[f"played_{g}"] <= 100 and 0 <= m[f"success_{g}"] <= 1 for g in games)
    assert seen == {"colourname", "wordle"}


def test_rollout_only_grpo_is_a_control_on_the_same_draws(tiny_dir, tmp_path):
    """grpo.rollout_only: each step's rollouts are played and logged as in training, from the
    starting weights, which it never changes; a training run with the same seed plays the same
    first step (same policy, same draws and keys) and then moves away from it."""
    common = {"steps": 3, "grpo.group_size": 4, "grpo.groups_per_step": 2, "optimizer.learning_rate": 0.03,
              "eval.at_start": False, "export.hf": True, "games.learner_roles": "all"}
    control, trained = tmp_path / "control", tmp_path / "trained"
    assert train_main.main(_args(tiny_dir, control, **common, **{"grpo.rollout_only": True})) == 0
    assert train_main.main(_args(tiny_dir, trained, **common)) == 0
    c, t = _metrics(control), _metrics(trained)
    assert [m["step"] for m in c] == [1, 2, 3]
    assert all("loss" not in m and "episodes" in m for m in c) and all("loss" in m for m in t)
    for k in ("reward", "played", "episodes", "learner_turns", "sampled_tokens"):
        assert c[0][k] == t[0][k], k
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    kept = load_file(str(control / "hf" / "model.safetensors"))
    moved = load_file(str(trained / "hf" / "model.safetensors"))
    assert start.keys() == kept.keys() == moved.keys()
    for k in start:
        np.testing.assert_array_equal(kept[k], start[k])
    assert any(not np.array_equal(moved[k], start[k]) for k in start)


def test_resume_continues_exactly(tiny_dir, tmp_path):
    common = {"grpo.group_size": 4, "grpo.groups_per_step": 2, "optimizer.learning_rate": 0.03,
              "checkpoint.every": 2, "eval.at_start": False, "export.hf": True}
    straight = tmp_path / "straight"
    assert train_main.main(_args(tiny_dir, straight, steps=4, **common)) == 0
    split = tmp_path / "split"
    assert train_main.main(_args(tiny_dir, split, steps=2, **common)) == 0
    assert train_main.main(_args(tiny_dir, split, steps=4, resume=True, **common)) == 0
    a = load_file(str(straight / "hf" / "model.safetensors"))
    b = load_file(str(split / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3, 4]
    assert [m["reward"] for m in _metrics(split)] == [m["reward"] for m in _metrics(straight)]
    # a finished run holding more checkpoints than `keep` (as one killed between a checkpoint's commit
    # and the deletion of the oldest does) is pruned on resume, with nothing trained again
    assert sorted(os.listdir(split / "checkpoints")) == ["2", "4"]
    assert train_main.main(_args(tiny_dir, split, steps=4, resume=True, **common,
                                 **{"checkpoint.keep": 1})) == 0
    assert os.listdir(split / "checkpoints") == ["4"]
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3, 4]
    # log.plots off (the tests' default): no curves.png, no per-evaluation clemscore.png
    assert not (split / "curves.png").exists() and not list(split.rglob("clemscore.png"))


def test_sft_overfits_strong_player_records(tiny_dir, tmp_path):
    run = tmp_path / "sft"
    argv = _args(tiny_dir, run, config="configs/sft.py", **{
        "steps": 60, "sft.episodes_per_game": 4, "sft.batch_size": 4, "optimizer.learning_rate": 0.005,
        "eval.at_start": False, "export.hf": False})
    assert train_main.main(argv) == 0
    train = _metrics(run)
    assert train[0]["loss"] > 1.0
    assert train[-1]["loss"] < 0.1, [round(m["loss"], 3) for m in train]


def test_dpo_run_pairs_branches_and_learns(tiny_dir, tmp_path):
    run = tmp_path / "dpo"
    argv = _args(tiny_dir, run, config="configs/dpo.py", **{
        "steps": 8, "dpo.prefix_episodes": 8, "dpo.branches": 3, "dpo.teacher_branches": 1,
        "dpo.pairs_per_step": 4, "optimizer.learning_rate": 0.003, "eval.at_start": False,
        "export.hf": False, "checkpoint.every": 3})
    assert train_main.main(argv) == 0
    rounds = json.loads((run / "dpo_pairs" / "round_0.json").read_text())
    assert rounds["metrics"]["pairs"] == len(rounds["pairs"]) > 0
    for chosen, rejected in rounds["pairs"]:
        assert sum(chosen["loss_mask"]) > 0 and sum(rejected["loss_mask"]) > 0
        assert chosen["ref_logprob"] < 0 and rejected["ref_logprob"] < 0
    train = _metrics(run)
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)   # policy == reference at step 1
    assert train[-1]["reward_margin"] > 0.1 and train[-1]["accuracy"] == 1.0
    assert train[-1]["loss"] < train[0]["loss"] - 0.05
    # a resumed run trains on the saved round of pairs instead of collecting a new one
    assert train_main.main(argv[:1] + [a for a in argv[1:] if "steps" not in a]
                           + ["--config.steps=9", "--config.resume=true"]) == 0
    assert [m["step"] for m in _metrics(run)] == list(range(1, 10))


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_preference_runs_learn(tiny_dir, tmp_path, kind):
    """SimPO and ORPO by config: no reference log-probs are computed (the pairs keep 0) and the
    chosen replies' per-token log-prob rises above the rejected ones'."""
    run = tmp_path / kind
    argv = _args(tiny_dir, run, config="configs/dpo.py", **{
        "steps": 6, "dpo.kind": kind, "dpo.beta": 2.0 if kind == "simpo" else 0.5, "dpo.gamma": 0.5,
        "dpo.prefix_episodes": 8, "dpo.branches": 3, "dpo.teacher_branches": 1, "dpo.pairs_per_step": 4,
        "optimizer.learning_rate": 0.003, "eval.at_start": False, "export.hf": False,
        "checkpoint.every": 0})
    assert train_main.main(argv) == 0
    rounds = json.loads((run / "dpo_pairs" / "round_0.json").read_text())
    assert rounds["pairs"] and all(x["ref_logprob"] == 0.0 for p in rounds["pairs"] for x in p)
    train = _metrics(run)
    assert train[-1]["loss"] < train[0]["loss"] - 0.05
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] and train[-1]["accuracy"] == 1.0
    if kind == "orpo":
        assert "sft_loss" in train[-1] and train[-1]["log_odds_ratio"] > train[0]["log_odds_ratio"]


def test_gspo_run(tiny_dir, tmp_path):
    run = tmp_path / "gspo"
    argv = _args(tiny_dir, run, **{"steps": 2, "grpo.ratio_level": "sequence", "grpo.group_size": 8,
                                   "grpo.groups_per_step": 2, "grpo.aggregation": "sequence-mean",
                                   "eval.at_start": False, "export.hf": False, "checkpoint.every": 0})
    assert train_main.main(argv) == 0
    updated = [m for m in _metrics(run) if "loss" in m]
    assert updated and all(np.isfinite(m["loss"]) and 0 <= m["clip_fraction"] <= 1 for m in updated)
    bad = _args(tiny_dir, tmp_path / "bad", **{"grpo.ratio_level": "sequence"})
    assert train_main.main(bad) == 2   # GSPO with token-mean aggregation: one clear line


def test_checkpoint_written_by_a_run_restores(tiny_dir, tmp_path):
    run = tmp_path / "ck"
    assert train_main.main(_args(tiny_dir, run, steps=1, **{"grpo.group_size": 2, "grpo.groups_per_step": 1,
                                                            "eval.at_start": False})) == 0
    ck = checkpoint.Checkpointer(str(run / "checkpoints"))
    assert ck.latest_step() == 1
    ck.close()


@pytest.mark.parametrize("partner", ["reference", "self"])
def test_model_partners_play_the_other_role(tiny_dir, tmp_path, partner):
    run = tmp_path / partner
    argv = _args(tiny_dir, run, **{"steps": 1, "games.names": "taboo", "eval.games": "taboo",
                                   "games.partner": partner, "games.learner_roles": "2",
                                   "grpo.group_size": 2, "grpo.groups_per_step": 1, "eval.limit": 1,
                                   "eval.at_start": False, "export.hf": False})
    assert train_main.main(argv) == 0
    inter = json.loads(next((run / "eval" / "step_1").rglob("interactions.json")).read_text())
    names = [p["model_name"] for k, p in sorted(inter["players"].items()) if k.startswith("Player")]
    if partner == "reference":
        assert names == ["reference", "model"]
    else:
        assert names == ["model", "model"]
    assert _metrics(run)[0]["episodes"] == 2


def test_sft_from_clembench_records_and_eval_config(tiny_dir, tmp_path):
    from games import eval as game_eval

    records_dir = tmp_path / "records"
    assert game_eval.main(["--players=strong", "--games=colourname", "--split=train", "--limit=6",
                           "--quiet", f"--out={records_dir}"]) == 0
    run = tmp_path / "sft"
    argv = _args(tiny_dir, run, config="configs/sft.py", **{
        "steps": 3, "sft.source": str(records_dir), "sft.batch_size": 2, "eval.at_start": False,
        "export.hf": False})
    assert train_main.main(argv) == 0
    assert _metrics(run)[0]["rows_total"] == 6
    bad = _args(tiny_dir, tmp_path / "sft2", config="configs/sft.py",
                **{"sft.source": str(tmp_path / "missing")})
    assert train_main.main(bad) == 1
    ev = tmp_path / "ev"
    assert train_main.main(_args(tiny_dir, ev, config="configs/eval.py")) == 0
    res = json.loads((ev / "eval" / "step_0" / "results.json").read_text())
    assert res["games"]["colourname"]["episodes"] == 3 and not (ev / "checkpoints" / "0").exists()


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "term"
    argv = _args(tiny_dir, run, **{"steps": 400, "grpo.group_size": 2, "grpo.groups_per_step": 1,
                                   "checkpoint.every": 0, "eval.at_start": False, "export.hf": False})
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    proc = subprocess.Popen([sys.executable, "-m", "train.main"] + argv, env=env, stderr=subprocess.PIPE,
                            text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: saved step" in err
    saved = checkpoint.Checkpointer(str(run / "checkpoints"))
    step = saved.latest_step()
    saved.close()
    assert 2 <= step < 400
    assert max(m["step"] for m in _metrics(run)) == step
    resumed = _args(tiny_dir, run, **{"steps": step + 1, "grpo.group_size": 2, "grpo.groups_per_step": 1,
                                      "checkpoint.every": 0, "eval.at_start": False, "export.hf": False,
                                      "resume": True})
    assert train_main.main(resumed) == 0
    assert [m["step"] for m in _metrics(run)] == list(range(1, step + 2))


def test_rollout_prefix_cache_gb_and_cache_dtype_reach_every_policy(tiny_dir, tmp_path):
    from playpen_jax.config import parse
    from train import loop

    run = loop.Run(validate(parse(_args(tiny_dir, str(tmp_path / "run"), **{
        "games.partner": "reference", "rollout.prefix_cache_gb": 0.5,
        "rollout.cache_dtype": "bfloat16"}))))
    try:
        for policy in (run.policy, run.partner_policy, run.make_policy(max_new_tokens=4)):
            assert policy.prefix_cache.max_bytes == 2 ** 29
        assert run.sampler.cache_dtype == jnp.dtype("bfloat16")   # every policy samples with it
        assert {id(p.sampler) for p in (run.policy, run.partner_policy)} == {id(run.sampler)}
    finally:
        run.close()


def test_two_policies_that_play_at_once_share_the_default_prefix_cache_bound(tiny_dir, tmp_path):
    """prefix_cache_gb=0: a quarter of the host's memory for the learner alone; with a frozen
    partner model, whose caches live beside the learner's, an eighth each."""
    from models.sampler import memory_bytes
    from playpen_jax.config import parse
    from train import loop

    total = memory_bytes(None)
    assert total
    bounds = {}
    for partner in ("strong", "reference"):
        argv = _args(tiny_dir, str(tmp_path / partner), **{"games.partner": partner})
        run = loop.Run(validate(parse(argv)))
        try:
            policies = [run.policy] + ([run.partner_policy] if partner == "reference" else [])
            bounds[partner] = {p.prefix_cache.max_bytes for p in policies}
        finally:
            run.close()
    assert bounds == {"strong": {int(total * 0.25)}, "reference": {int(total * 0.125)}}
