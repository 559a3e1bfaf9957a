"""Training metrics output: a JSON-lines log, TensorBoard event files and PNG learning curves.

`MetricWriter` appends one JSON object per `write` call to `run_dir/metrics.jsonl` and, optionally,
mirrors the numeric values as TensorBoard scalars under `run_dir/tensorboard/`. The JSONL file is the
record of truth: it is plain text, survives a killed process (at most the final line is cut short, and
`read_jsonl` ignores such a line) and is what `plot_curves` draws from.

Each line looks like

    {"step": 120, "split": "train", "time": 1716212345.12, "loss": 0.53, "reward": null}

Numpy and JAX scalars become Python numbers, NaN and infinities become `null` so that every line is
strict JSON, and arrays become nested lists. TensorBoard receives only the scalar numbers (NaN and
infinities included), tagged `"{split}/{key}"`.

Resuming: `MetricWriter(run_dir, resume_step=s)` drops the lines with step > s from an existing
`metrics.jsonl` (rewriting the file atomically) and starts the new TensorBoard event file with a purge
marker at step s + 1, so that TensorBoard hides the events that the interrupted run wrote after s.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
import tempfile
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Keys that every JSONL line carries; a metric may not use them.
RESERVED_KEYS = ("step", "split", "time")
# Metrics whose names contain one of these words come first in `plot_curves`, in this order.
PLOT_PRIORITY = ("reward", "clemscore", "loss")


class MetricsError(ValueError):
    """A metric, metrics file or argument that cannot be used."""


class _Unserialisable(Exception):
    """Internal: a value with no JSON form."""


def _to_json_value(value: Any) -> Any:
    """`value` as plain JSON data: numpy/JAX scalars to Python numbers, arrays to lists, NaN/Inf to None.

    Raises `_Unserialisable` for anything without a JSON form.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Unserialisable(f"non-string key {k!r}")
            out[k] = _to_json_value(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.dtype.kind == "b":
            return arr.tolist()
        if arr.dtype.kind in "iu":
            return arr.tolist()
        if arr.dtype.kind == "f" or arr.dtype.kind == "V":
            # "V" covers ml_dtypes types such as bfloat16, which numpy does not know as floats.
            try:
                arr = arr.astype(np.float64)
            except (TypeError, ValueError) as e:
                raise _Unserialisable(f"array of dtype {arr.dtype}") from e
            return _to_json_value(arr.tolist())
        if arr.dtype.kind == "U":
            return arr.tolist()
        raise _Unserialisable(f"array of dtype {arr.dtype}")
    if isinstance(value, numbers.Real):  # e.g. fractions.Fraction, decimal-like numbers
        return _to_json_value(float(value))
    raise _Unserialisable(f"type {type(value).__name__}")


def _raw_scalar(value: Any) -> Optional[float]:
    """The float behind a scalar metric before JSON conversion (NaN/Inf kept), or None if not a scalar."""
    if isinstance(value, (bool, numbers.Real)) and not isinstance(value, np.ndarray):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.ndim == 0 and arr.dtype.kind in "biufV":
            try:
                return float(arr.astype(np.float64))
            except (TypeError, ValueError):
                return None
    return None


def _parse_jsonl(path: str) -> list[tuple[int, str, dict]]:
    """(line number, line text with newline, record) for each non-blank line of `path`.

    A last line that has no terminating newline and is not valid JSON is left out: it is the
    remainder of a write that a killed process did not finish. Any other line that is not a JSON
    object raises `MetricsError` naming the file and line number.
    """
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    # lines with their newline; the last one has none when the file does not end with a newline
    lines = [x + b"\n" for x in raw[:-1]] + ([raw[-1]] if raw[-1] else [])
    out = []
    for i, data in enumerate(lines):
        lineno = i + 1
        is_unterminated_last = i == len(lines) - 1 and not data.endswith(b"\n")
        try:
            line = data.decode("utf-8")
            if not line.strip():
                continue
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if is_unterminated_last:
                break
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise MetricsError(f"{path}:{lineno}: corrupt metrics line ({reason})") from None
        if not isinstance(record, dict):
            if is_unterminated_last:
                break
            raise MetricsError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        out.append((lineno, line if line.endswith("\n") else line + "\n", record))
    return out


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics JSONL file, in file order.

    Blank lines are skipped. A cut-short final line (no newline at its end and not valid JSON, as a
    killed run leaves it) is ignored. Any other line that is not a JSON object raises `MetricsError`
    with the file name and the 1-based line number.
    """
    return [record for _, _, record in _parse_jsonl(path)]


def _atomic_write_text(path: str, text: str) -> None:
    """Replaces `path` by `text` so that readers see either the old or the new file, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_step(step: Any, what: str) -> int:
    if isinstance(step, bool):
        raise MetricsError(f"{what} must be an integer, got {step!r}")
    try:
        return operator.index(step)
    except TypeError:
        raise MetricsError(f"{what} must be an integer, got {step!r}") from None


class MetricWriter:
    """Writes training metrics to `run_dir/metrics.jsonl` and TensorBoard event files.

    Args:
      run_dir: folder of the run; created if missing.
      tensorboard: also write TensorBoard event files under `run_dir/tensorboard/`.
      enabled: when False (every process but the first in a multi-host run) nothing is created and
        every method does nothing.
      resume_step: the run continues after this step. Lines of an existing `metrics.jsonl` with a
        larger step are dropped (the file is rewritten atomically), and TensorBoard is told to hide
        events with a larger step from earlier event files.

    An existing `metrics.jsonl` is otherwise appended to; a cut-short last line left by a killed
    process is removed first so that new lines start on a line of their own.

    Usable as a context manager; `close` is called on exit.
    """

    def __init__(self, run_dir: str, *, tensorboard: bool = True, enabled: bool = True,
                 resume_step: Optional[int] = None):
        self.run_dir = run_dir
        self.enabled = bool(enabled)
        self.jsonl_path = os.path.join(run_dir, JSONL_NAME)
        self.tensorboard_dir = os.path.join(run_dir, TENSORBOARD_DIR) if tensorboard else None
        self._file = None
        self._tb = None
        self._closed = False
        self._warned: set[str] = set()
        if not self.enabled:
            return
        if resume_step is not None:
            resume_step = _check_step(resume_step, "resume_step")
        os.makedirs(run_dir, exist_ok=True)
        self._repair_jsonl(resume_step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from playpen_jax.events import EventFileWriter

            # The event file name holds the creation time to the second only; a nanosecond suffix keeps
            # two writers in the same second apart and in creation order (TensorBoard reads event files
            # in name order, which matters for the purge marker of a resumed run).
            self._tb = EventFileWriter(
                self.tensorboard_dir, filename_suffix=f".{time.time_ns():020d}",
                purge_step=None if resume_step is None else resume_step + 1)

    def _repair_jsonl(self, resume_step: Optional[int]) -> None:
        """Drops lines past `resume_step` and a cut-short last line from an existing JSONL file."""
        path = self.jsonl_path
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            ends_with_newline = f.read(1) == b"\n"
        if resume_step is None and ends_with_newline:
            return
        entries = _parse_jsonl(path)
        kept = []
        for lineno, line, record in entries:
            if resume_step is not None:
                step = record.get("step")
                if isinstance(step, bool) or not isinstance(step, int):
                    raise MetricsError(f"{path}:{lineno}: line has no integer 'step' (got {step!r})")
                if step > resume_step:
                    continue
            kept.append(line)
        if len(kept) != len(entries) or not ends_with_newline:
            _atomic_write_text(path, "".join(kept))

    def _check_open(self) -> None:
        if self._closed:
            raise MetricsError(f"MetricWriter for {self.run_dir!r} is closed")

    def _warn_once(self, key: str, reason: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"metric {key!r} has no JSON form ({reason}); it is not written", stacklevel=3)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Records `metrics` at `step` for `split` ("train", "eval", ...).

        Writes one JSONL line {"step", "split", "time" (Unix seconds), **metrics} and one TensorBoard
        scalar `"{split}/{key}"` per numeric value (bools as 0/1). Non-numeric values that have a JSON
        form (strings, lists, arrays, dicts) go to the JSONL line only; values with no JSON form are left
        out with a warning (once per key). TensorBoard replaces characters other than letters, digits,
        `_`, `-`, `.` and `/` in tags by `_`.
        """
        if not self.enabled:
            return
        self._check_open()
        step = _check_step(step, "step")
        if not isinstance(split, str) or not split:
            raise MetricsError(f"split must be a non-empty string, got {split!r}")
        line: dict[str, Any] = {"step": step, "split": split, "time": time.time()}
        scalars: list[tuple[str, float]] = []
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise MetricsError(f"metric names must be non-empty strings, got {key!r}")
            if key in RESERVED_KEYS:
                raise MetricsError(f"metric name {key!r} is reserved (every line has {RESERVED_KEYS})")
            try:
                converted = _to_json_value(value)
            except _Unserialisable as e:
                self._warn_once(key, str(e))
                continue
            line[key] = converted
            if self._tb is not None:
                raw = _raw_scalar(value)
                if raw is not None:
                    scalars.append((key, raw))
        self._file.write(json.dumps(line, allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()
        if scalars:
            self._tb.add_scalars(step, [(f"{split}/{key}", value) for key, value in scalars])

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Writes `text` as a TensorBoard text summary (shown under the tag `"{tag}/text_summary"`).

        TensorBoard renders the text as Markdown. Does nothing when TensorBoard output is off.
        """
        if not self.enabled:
            return
        self._check_open()
        step = _check_step(step, "step")
        if not isinstance(tag, str) or not tag:
            raise MetricsError(f"tag must be a non-empty string, got {tag!r}")
        if not isinstance(text, str):
            raise MetricsError(f"text for tag {tag!r} must be a string, got {type(text).__name__}")
        if self._tb is not None:
            self._tb.add_text(step, tag, text)

    def flush(self) -> None:
        """Pushes everything written so far to disk."""
        if not self.enabled or self._closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later calls to `close` do nothing, other methods raise."""
        if not self.enabled or self._closed:
            return
        self.flush()
        self._closed = True
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _priority(key: str) -> tuple:
    """Sort key for `plot_curves`: keys naming reward, clemscore or loss first, exact names leading."""
    words = re.split(r"[^0-9a-zA-Z]+", key.lower())
    for rank, word in enumerate(PLOT_PRIORITY):
        if word in words:
            return (rank, key.lower() != word, key)
    return (len(PLOT_PRIORITY), False, key)


def plot_curves(jsonl_path: str, png_path: str, keys: Optional[Sequence[str]] = None) -> list[str]:
    """Draws learning curves from a metrics JSONL file into a PNG; returns the plotted keys.

    One subplot per metric key, with the step on the x axis and one line per split that has the key
    (same colour for a split in every subplot). By default every key with at least one numeric value
    is drawn ("time" excepted), keys naming reward, clemscore or loss first. Null values leave gaps;
    points carry markers so that a single point shows. With `keys`, exactly those are drawn; a key
    absent from the file raises `MetricsError`. When there is nothing to draw the PNG says so and the
    returned list is empty. The PNG is written atomically with matplotlib's Agg renderer (no display
    and no change to pyplot's global state).
    """
    records = read_jsonl(jsonl_path)
    present: dict[str, bool] = {}  # key -> has a numeric value
    for record in records:
        for key, value in record.items():
            if key in ("step", "split"):
                continue
            present[key] = present.get(key, False) or _is_number(value)
    if keys is None:
        chosen = sorted((k for k, numeric in present.items() if numeric and k != "time"), key=_priority)
    else:
        if isinstance(keys, str):
            raise MetricsError(f"keys must be a sequence of metric names, got the string {keys!r}")
        chosen = list(dict.fromkeys(keys))
        for key in chosen:
            if key in ("step", "split") or key not in present:
                raise MetricsError(f"{jsonl_path}: no metric {key!r} to plot")

    splits: list[str] = []
    for record in records:
        split = str(record.get("split", "train"))
        if split not in splits:
            splits.append(split)
    order = {"train": 0, "eval": 1}
    splits.sort(key=lambda s: order.get(s, 2))  # stable: other splits keep their first-seen order

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(3, len(chosen)))
    nrows = max(1, math.ceil(len(chosen) / ncols))
    width, height = 5.0 * ncols, 3.4 * nrows
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    # Fixed margins in inches (room for tick labels, a title above and "step" below each plot):
    # a layout engine would fit them per plot, but takes seconds for a run's few dozen plots.
    left, right, top, bottom, hgap, vgap = 0.65, 0.2, 0.35, 0.5, 0.75, 0.85
    cell_w = (width - left - right - (ncols - 1) * hgap) / ncols
    cell_h = (height - top - bottom - (nrows - 1) * vgap) / nrows
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=hgap / cell_w, hspace=vgap / cell_h)
    colors = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    if not chosen:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"no numeric metrics in {os.path.basename(jsonl_path)}",
                ha="center", va="center")
    for index, key in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        drawn = False
        for split_index, split in enumerate(splits):
            points = []
            for record in records:
                if str(record.get("split", "train")) != split or key not in record:
                    continue
                step = record.get("step")
                if not _is_number(step):
                    continue
                value = record[key]
                points.append((step, float(value) if _is_number(value) else math.nan))
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=split, color=colors[split_index % len(colors)],
                    marker="o", markersize=3, linewidth=1.2)
            drawn = True
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small")

    directory = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(png_path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return chosen
