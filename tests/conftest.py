"""Shared fixtures. Eight host devices are simulated so that sharding is tested on CPU, and XLA's
options for the tests are set; this must happen before jax is first imported."""

import os

# XLA:CPU compiles the tests' programs with LLVM's optimisation level 0: most of them run for
# milliseconds on tiny models, and compiling them is most of the suite's CPU time (on a 2-core VM its
# test time went from 25 to 15 minutes; the embedded model's tests ran no slower). The processes
# that tests start get it too (`xla_flags`), except those that run the embedded model as a user does
# (the notebook, the main job), which keep XLA's defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 0) -> str:
    """XLA_FLAGS for a process that a test starts: the tests' options, and `devices` simulated CPU
    devices (0: XLA's default of one)."""
    return TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")


os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " " + TEST_XLA_FLAGS
if "--xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = _flags.strip()

# A persistent compilation cache under .pytest_cache (kept between runs in one checkout; a fresh
# clone starts empty), shared by the xdist workers and the processes that tests start (multi-host,
# kill-and-resume, the CLIs): they compile the same steps.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_compilation"))
# Every executable is kept, not only those that took a second to compile: the tiny models' many
# small programs are compiled again by each process a test starts.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from models.config import LlamaConfig, RopeScaling  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides) -> LlamaConfig:
    """A small Llama-3-shaped config: GQA, llama3 RoPE scaling, untied head."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=16),
                max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                eos_token_ids=(2,))
    base.update(overrides)
    return LlamaConfig(**base)


@pytest.fixture
def tiny():
    return tiny_config()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from models import registry

    return registry.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
