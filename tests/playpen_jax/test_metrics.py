"""Metrics output: JSONL log, TensorBoard event files read back by TensorBoard's own reader, PNG curves."""

import json
import math
import os

import jax.numpy as jnp
import matplotlib.image
import ml_dtypes
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from playpen_jax.metrics import MetricsError, MetricWriter, plot_curves, read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _accumulator(run_dir):
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_read_back(tmp_path):
    run = str(tmp_path / "run")
    with MetricWriter(run) as w:
        for step in range(3):
            w.write(step, {"loss": np.float32(2.0 - 0.5 * step), "reward": jnp.asarray(0.25 * step),
                           "tokens": np.int64(100 * step), "note": "text stays out of TensorBoard"})
        w.write(2, {"reward": 0.75, "clemscore": 40.0}, split="eval")
        w.write_text(0, "config", "lr: **1e-5**")
    acc = _accumulator(run)
    assert sorted(acc.Tags()["scalars"]) == ["eval/clemscore", "eval/reward", "train/loss", "train/reward",
                                             "train/tokens"]
    assert _scalars(acc, "train/loss") == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert _scalars(acc, "train/reward") == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert _scalars(acc, "train/tokens") == [(0, 0.0), (1, 100.0), (2, 200.0)]
    assert _scalars(acc, "eval/clemscore") == [(2, 40.0)]
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0
    assert tensor_util.make_ndarray(text.tensor_proto).tolist() == [b"lr: **1e-5**"]


def test_jsonl_round_trip_with_nan_and_numpy_values(tmp_path):
    run = str(tmp_path / "run")
    with MetricWriter(run, tensorboard=False) as w:
        w.write(7, {"loss": float("nan"), "reward": np.float32(0.5), "kl": jnp.asarray(float("inf")),
                    "count": np.int32(3), "done": np.bool_(True), "bf16": jnp.asarray(1.5, jnp.bfloat16),
                    "hist": np.array([1.0, np.nan]), "name": "wordle", "nested": {"a": np.float64(-np.inf)}},
                split="eval")
    assert not os.path.exists(os.path.join(run, "tensorboard"))
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)  # strict JSON: one object on one line
    (record,) = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert isinstance(record.pop("time"), float)
    assert record == {"step": 7, "split": "eval", "loss": None, "reward": 0.5, "kl": None, "count": 3,
                      "done": True, "bf16": 1.5, "hist": [1.0, None], "name": "wordle", "nested": {"a": None}}
    assert type(record["count"]) is int and type(record["reward"]) is float


def test_nan_goes_to_tensorboard_and_unserialisable_values_are_skipped(tmp_path):
    run = str(tmp_path / "run")
    with MetricWriter(run) as w:
        with pytest.warns(UserWarning) as caught:
            w.write(1, {"loss": float("nan"), "obj": object(), "z": 1 + 2j})
        assert sorted(str(c.message).split()[1] for c in caught) == ["'obj'", "'z'"]
        w.write(2, {"obj": object()})  # warned once per key only
    acc = _accumulator(run)
    assert acc.Tags()["scalars"] == ["train/loss"]
    ((step, value),) = _scalars(acc, "train/loss")
    assert step == 1 and math.isnan(value)
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [sorted(r) for r in records] == [["loss", "split", "step", "time"], ["split", "step", "time"]]


def test_bad_arguments_raise_clear_errors(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        with pytest.raises(MetricsError, match="'step' is reserved"):
            w.write(0, {"step": 1})
        with pytest.raises(MetricsError, match="step must be an integer, got 1.5"):
            w.write(1.5, {"loss": 1.0})
        with pytest.raises(MetricsError, match="split must be a non-empty string"):
            w.write(0, {"loss": 1.0}, split="")
    with pytest.raises(MetricsError, match="is closed"):
        w.write(0, {"loss": 1.0})
    w.close()  # a second close is harmless
    assert read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) == []


def test_resume_step_drops_later_lines_and_hides_later_events(tmp_path):
    run = str(tmp_path / "run")
    with MetricWriter(run) as w:
        for step in range(6):
            w.write(step, {"loss": float(step)})
        w.write(4, {"reward": 1.0}, split="eval")
        w.write(2, {"reward": 0.5}, split="eval")
    with MetricWriter(run, resume_step=3) as w:
        on_disk = read_jsonl(os.path.join(run, "metrics.jsonl"))
        assert [(r["split"], r["step"]) for r in on_disk] == [("train", 0), ("train", 1), ("train", 2),
                                                            ("train", 3), ("eval", 2)]
        for step in range(4, 6):
            w.write(step, {"loss": 10.0 + step})
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert train == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    acc = _accumulator(run)
    assert _scalars(acc, "train/loss") == train
    assert _scalars(acc, "eval/reward") == [(2, 0.5)]


def test_resume_rejects_line_without_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1}\n{"loss": 2}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: line has no integer 'step'"):
        MetricWriter(str(tmp_path), tensorboard=False, resume_step=5)


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "split": "train", "loss": 1.0}\n\n'
                    '{"step": 1, "split": "train", "loss": 0.5}\n{"step": 2, "split": "tr')
    assert [r["step"] for r in read_jsonl(str(path))] == [0, 1]
    # An unterminated but complete last line is kept.
    other = tmp_path / "complete.jsonl"
    other.write_text('{"step": 0}\n{"step": 1}')
    assert read_jsonl(str(other)) == [{"step": 0}, {"step": 1}]
    # Appending after a killed run starts on a fresh line instead of gluing onto the partial one.
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        w.write(2, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_jsonl(str(path))] == [(0, 1.0), (1, 0.5), (2, 0.25)]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops}\n{"step": 2}\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: corrupt metrics line") as info:
        read_jsonl(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # A corrupt last line that does end with a newline was written whole, so it is corrupt too.
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(str(path))


def _read_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    return image


def test_plot_curves_train_and_eval(tmp_path):
    run = str(tmp_path / "run")
    with MetricWriter(run, tensorboard=False) as w:
        for step in range(5):
            w.write(step, {"accuracy": step / 4, "loss": 1.0 / (step + 1), "policy_loss": 0.1,
                           "reward_mean": float("nan") if step == 2 else step, "note": "x"})
            if step % 2 == 0:
                w.write(step, {"clemscore": 10.0 * step, "reward_mean": step}, split="eval")
    png = str(tmp_path / "plots" / "curves.png")
    keys = plot_curves(os.path.join(run, "metrics.jsonl"), png)
    assert keys == ["reward_mean", "clemscore", "loss", "policy_loss", "accuracy"]
    image = _read_png(png)
    assert image.std() > 0  # something was drawn
    assert not [f for f in os.listdir(tmp_path / "plots") if f != "curves.png"]

    assert plot_curves(os.path.join(run, "metrics.jsonl"), png, keys=["loss"]) == ["loss"]
    _read_png(png)
    with pytest.raises(MetricsError, match="no metric 'lose' to plot"):
        plot_curves(os.path.join(run, "metrics.jsonl"), png, keys=["lose"])


def test_plot_curves_single_point_nulls_and_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 3, "split": "eval", "time": 1.0, "reward": 0.5, "kl": null}\n')
    png = str(tmp_path / "one.png")
    assert plot_curves(str(path), png) == ["reward"]  # kl has no numeric value
    _read_png(png)
    assert plot_curves(str(path), png, keys=["kl", "reward"]) == ["kl", "reward"]
    _read_png(png)
    path.write_text("")
    assert plot_curves(str(path), png) == []
    _read_png(png)


def test_disabled_writer_creates_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricWriter(str(run), enabled=False, resume_step=2) as w:
        w.write(0, {"loss": 1.0})
        w.write_text(0, "config", "x")
        w.flush()
    w.write(1, {"loss": 1.0})  # no-op even after close
    assert not run.exists()
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_numpy_scalar(tmp_path):
    with MetricWriter(str(tmp_path)) as w:
        w.write(0, {"x": np.asarray(2.5, dtype=ml_dtypes.bfloat16)})
    assert read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))[0]["x"] == 2.5
    assert _scalars(_accumulator(str(tmp_path)), "train/x") == [(0, 2.5)]
