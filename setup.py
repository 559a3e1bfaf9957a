"""playpen_jax: post-training LLMs by playing dialogue games, in JAX."""

from setuptools import find_packages, setup

PACKAGES = ["playpen_jax", "models", "games", "train", "configs", "tpu", "benchmarks"]

setup(
    name="playpen_jax",
    version="0.1.0",
    description="Learning in interaction: post-training LLMs on dialogue games with JAX on TPU/GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, name + ".*")]),
    # Word lists, grids, maps and prompt templates the game generators read.
    package_data={"games": ["resources/*/*.json", "resources/*/*.template", "resources/*/*.md"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "tokenizers>=0.21",
        "gguf>=0.16",
        "jinja2>=3.1",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "absl-py>=2.1",
        "snowballstemmer>=2.2",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # Standard benchmarks (playpen_jax.tasks), read as array_record files without TensorFlow.
        "tensorflow-datasets>=4.9",
        "array_record>=0.5",
        "importlib_resources>=6.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6", "hypothesis>=6.100",
                 # Reads TensorBoard event files back in tests.
                 "tensorboard>=2.16",
                 # Executes notebooks/ in a Jupyter kernel in tests.
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # Reference implementations for parity tests (CPU torch; accelerate for GGUF loading).
        # peft: loads exported LoRA adapters onto the transformers model.
        "parity": ["torch>=2.4", "transformers>=4.50", "accelerate>=1.0", "peft>=0.13"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
        # Peers in benchmarks/ (llama.cpp); `make bench` builds it with portable CPU flags.
        "bench": ["llama-cpp-python>=0.3"],
    },
)
