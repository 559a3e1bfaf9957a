"""playpen_jax: learning in interaction — post-training LLMs on dialogue games, in JAX."""

__version__ = "0.1.0"
