"""Converters from released checkpoints to dimo_jax's layouts, one module per source format."""
