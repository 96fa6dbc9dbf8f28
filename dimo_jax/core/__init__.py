"""Pure JAX and NumPy, no I/O: masking, losses, divergences, samplers, optimisers, sharding."""
