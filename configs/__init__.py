"""The bundled configs (installed as bnsynth_jax.configs; see main.bundled_config)."""
