"""The quickstart notebook runs top to bottom in a fresh kernel, as a user on a CPU would run it."""

import json
import os
import sys
from pathlib import Path

import pytest

from playpen_jax.metrics import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO_ROOT / "notebooks" / "playpen_quickstart.ipynb"
KERNEL_NAME = "playpen-jax-test-python"


def _kernel_env(run_dir: Path) -> dict:
    """The kernel's environment: this one without the simulated devices and the plotting backend
    that the test process may have, plus the notebook's quick switch and run directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PLAYPEN_NOTEBOOK_QUICK"] = "1"
    env["PLAYPEN_NOTEBOOK_RUN_DIR"] = str(run_dir)
    return env


def _outputs(nb, output_type=None):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            if output_type is None or out.output_type == output_type]


def _stdout(nb) -> str:
    return "".join(out.text for out in _outputs(nb, "stream") if out.name == "stdout")


def test_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_notebook_runs_on_cpu(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # A kernel spec that starts this interpreter (the project's virtual environment), found
    # before any python3 spec that the machine may have elsewhere.
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "playpen_jax test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    run_dir = tmp_path / "run"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=1200,
                            resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}})
    client.execute(env=_kernel_env(run_dir))

    assert not _outputs(nb, "error")
    out = _stdout(nb)
    # The kernel ran this interpreter on one CPU device, from the repository root.
    assert f"working directory: {REPO_ROOT}" in out
    assert "CpuDevice(id=0)" in out and "CpuDevice(id=1)" not in out
    # The transcript: the partner's clue and the model's reply, then the episode's scores.
    assert "=== Transcript ===" in out and "=== Episode scores ===" in out
    assert "Describer (Player 1, strong programmatic partner)" in out
    assert "Guesser (Player 2, the model)" in out
    assert "[message]\n" in out and "CLUE:" in out
    assert "Main Score" in out and "reward used for training:" in out
    # The learning curve was drawn inline.
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data"))

    rows = read_jsonl(str(run_dir / "metrics.jsonl"))
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["episodes"] == 2 and r["learner_turns"] >= 2 for r in train)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2]
    assert (run_dir / "checkpoints" / "2").is_dir() and not (run_dir / "hf").exists()
