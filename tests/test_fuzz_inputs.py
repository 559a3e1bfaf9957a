"""Every loader of outside input, fed malformed input (hypothesis): it loads or it raises the
project's one clear error type for that input, with a one-line message; it writes nothing.

Game masters are fuzzed with arbitrary replies in tests/games/test_all_games.py."""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from games.core import GameError
from models.errors import ModelError
from playpen_jax.checkpoint import CheckpointError
from playpen_jax.config import ConfigError
from playpen_jax.metrics import MetricsError
from tests.conftest import tiny_config

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=5),
                    max_leaves=12)


def _mutations(data: bytes):
    """Strategies for damaged copies of `data`: cut short, bytes overwritten, junk spliced in."""
    n = len(data)
    cut = st.integers(0, n - 1).map(lambda k: data[:k])
    flip = st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=16)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0] + len(t[1]):])
    splice = st.tuples(st.integers(0, n), st.binary(max_size=64)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0]:])
    return cut | flip | splice | st.binary(max_size=256)


def _one_line(err: Exception) -> None:
    text = str(err)
    assert text and "\n" not in text.strip() and len(text) < 2000, text


class _Unchanged:
    """Asserts that nothing in `root` changed: no file written, removed or modified."""

    def __init__(self, root: Path):
        self.root = root
        self.before = self._scan()

    def _scan(self):
        return {p: p.stat().st_mtime_ns for p in self.root.rglob("*")}

    def check(self):
        assert self._scan() == self.before


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from models import llama, loader
    from tests.train.tiny_model import write_tokenizer

    path = tmp_path_factory.mktemp("hf")
    cfg = tiny_config(vocab_size=64)
    loader.save_hf(llama.init(cfg, jax.random.PRNGKey(0)), cfg, str(path))
    write_tokenizer(str(path))
    return path


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _load_model(path: str):
    from models import registry

    try:
        registry.load(path)
    except ModelError as e:
        _one_line(e)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"])
def test_hf_checkpoint_files(hf_dir, tmp_path, name):
    good = (hf_dir / name).read_bytes()

    @FUZZ
    @given(_mutations(good))
    def run(data):
        d = _copy(hf_dir, tmp_path / "m")
        (d / name).write_bytes(data)
        guard = _Unchanged(d)
        _load_model(str(d))
        guard.check()

    run()


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_hf_json_files_with_other_values(hf_dir, tmp_path, name):
    base = json.loads((hf_dir / name).read_text())

    @FUZZ
    @given(st.sampled_from(sorted(base)), JSON)
    def run(key, value):
        d = _copy(hf_dir, tmp_path / "m")
        (d / name).write_text(json.dumps({**base, key: value}))
        _load_model(str(d))

    run()


def test_gguf_files(tmp_path):
    from models import llama
    from tests.models.test_gguf import write_gguf

    cfg = tiny_config(rope_scaling=None, vocab_size=64)
    write_gguf(tmp_path / "good.gguf", cfg, llama.init(cfg, jax.random.PRNGKey(0)))
    good = (tmp_path / "good.gguf").read_bytes()

    @FUZZ
    @given(_mutations(good))
    def run(data):
        (tmp_path / "bad.gguf").write_bytes(data)
        _load_model(str(tmp_path / "bad.gguf"))

    run()


def test_instance_files(tmp_path):
    from games import registry

    good = json.dumps({"experiments": [{"name": "x", "game_instances": [
        {"game_id": 0, "target_word": "apple", "related_word": ["fruit", "tree", "red"]}]}]}).encode()

    @FUZZ
    @given(_mutations(good) | JSON.map(lambda v: json.dumps(v).encode()))
    def run(data):
        (tmp_path / "instances.json").write_bytes(data)
        try:
            for ep in registry.load_instances_file(tmp_path / "instances.json", "taboo"):
                registry.make_master(ep)
        except GameError as e:
            _one_line(e)

    run()


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    from games import eval as game_eval

    out = tmp_path_factory.mktemp("records")
    assert game_eval.main(["--players=strong", "--games=taboo,wordle", "--split=validation", "--limit=1",
                           f"--out={out}", "--quiet"]) == 0
    return out


def test_record_folders_for_sft(records_dir, tmp_path):
    from games import records
    from train import sft

    episodes = sorted(records.find_episodes(records_dir))
    files = [p for e in episodes for p in sorted(e.glob("*.json"))]

    @FUZZ
    @given(st.sampled_from(files), _mutations(b"{}") | JSON.map(lambda v: json.dumps(v).encode()),
           st.booleans())
    def run(path, data, mutate_good):
        d = _copy(records_dir, tmp_path / "r")
        target = d / path.relative_to(records_dir)
        if mutate_good:
            good = path.read_bytes()
            data = data if len(data) % 2 else good[:len(good) * len(data) // (len(data) + 1)]
        target.write_bytes(data)
        guard = _Unchanged(d)
        try:
            sft.record_episodes(str(d), {"taboo", "wordle"})
        except (GameError, ConfigError) as e:   # ConfigError: no usable episode for sft.source
            _one_line(e)
        guard.check()

    run()


def test_config_overrides():
    from playpen_jax.config import apply_override, load_file, validate

    c0 = load_file("configs/grpo.py")
    keys = sorted(k for k in _flat(c0.to_dict()))

    @FUZZ
    @given(st.sampled_from(keys) | st.text(max_size=20), st.text(max_size=20) | JSON.map(json.dumps))
    def run(key, value):
        c = load_file("configs/grpo.py")
        try:
            apply_override(c, key, value)
            validate(c)
        except ConfigError as e:
            _one_line(e)

    run()


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + k + ".")
        else:
            yield prefix + k


def test_metrics_file_on_resume(tmp_path):
    from playpen_jax.metrics import MetricWriter

    good = b"".join(json.dumps({"step": i, "split": "train", "loss": 1.0 / (i + 1)}).encode() + b"\n"
                    for i in range(1, 5))

    @FUZZ
    @given(_mutations(good), st.integers(-1, 6))
    def run(data, step):
        run_dir = tmp_path / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_bytes(data)
        try:
            with MetricWriter(str(run_dir), tensorboard=False, resume_step=step) as w:
                w.write(step + 1, {"loss": 0.5})
        except MetricsError as e:
            _one_line(e)
            assert (run_dir / "metrics.jsonl").read_bytes() == data   # nothing lost
        assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]

    run()


def test_checkpoint_files(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec

    from playpen_jax import sharding as shd
    from playpen_jax.checkpoint import Checkpointer, abstract_like

    mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])
    rep = NamedSharding(mesh, PartitionSpec())
    state = {"w": jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8), rep),
             "step": jax.device_put(np.int32(3), rep)}
    src = tmp_path / "src"
    with Checkpointer(str(src)) as ck:
        ck.save(1, state, {"note": "first"})
        ck.save(2, state, {"note": "second"})
    files = sorted(p for p in (src / "2").rglob("*") if p.is_file())
    assert files

    @FUZZ
    @given(st.sampled_from(files), st.data())
    def run(path, data):
        d = _copy(src, tmp_path / "ck")
        target = d / path.relative_to(src)
        good = target.read_bytes()
        target.write_bytes(data.draw(_mutations(good)) if good else data.draw(st.binary(min_size=1)))
        with Checkpointer(str(d)) as ck:
            try:
                got, meta, step = ck.restore(abstract_like(state))
            except CheckpointError as e:
                _one_line(e)
                return
        # restored: the undamaged step 2, or step 1 when step 2 was found damaged
        assert step in (1, 2) and meta["note"] == ("first" if step == 1 else "second")
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))

    run()


def test_dpo_pairs_file_on_resume(tmp_path):
    from train import dpo

    seq = {"tokens": [5, 6, 7], "loss_mask": [0, 1, 1], "ref_logprob": -1.5}
    good = {"metrics": {"pairs": 1}, "pairs": [[seq, {**seq, "tokens": [5, 6, 8]}]]}
    pair = tuple(dpo.buffers.TokenSequence(x["tokens"], x["loss_mask"], ref_logprob=x["ref_logprob"])
                 for x in good["pairs"][0])
    dpo._save_round(str(tmp_path / "good.json"), [pair], good["metrics"])
    data = (tmp_path / "good.json").read_bytes()
    assert dpo._load_round(str(tmp_path / "good.json"), 97)[1] == {"pairs": 1}

    @FUZZ
    @given(_mutations(data) | JSON.map(lambda v: json.dumps(v).encode())
           | st.tuples(st.sampled_from(sorted(seq)), JSON).map(
               lambda kv: json.dumps({**good, "pairs": [[{**seq, kv[0]: kv[1]}, seq]]}).encode()))
    def run(blob):
        (tmp_path / "round_0.json").write_bytes(blob)
        try:
            pairs, _ = dpo._load_round(str(tmp_path / "round_0.json"), 97)
        except CheckpointError as e:
            _one_line(e)
            return
        assert all(max(s.tokens) < 97 for p in pairs for s in p)

    run()
