"""bnsynth_jax: releasable synthetic image datasets from BatchNorm statistics, in JAX."""

__version__ = "0.1.0"
