"""No pickle anywhere: the project reads and writes safetensors, GGUF, JSON and orbax's own formats
only, so that loading a file never runs code from it."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "games", "playpen_jax", "train", "configs", "benchmarks", "tpu")
UNSAFE = re.compile(r"\bimport (c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b"
                    r"|\bfrom (c?pickle|dill|cloudpickle|joblib|shelve|marshal) import"
                    r"|allow_pickle\s*=\s*True|torch\.load\(|pd\.read_pickle|\.load\(.*pickle")


def test_no_module_loads_pickles():
    files = [p for f in FOLDERS for p in (REPO / f).rglob("*.py")]
    assert len(files) > 30
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert not hits, hits
    # the pattern does find what it looks for
    assert UNSAFE.search("import pickle") and UNSAFE.search("np.load(f, allow_pickle=True)")
