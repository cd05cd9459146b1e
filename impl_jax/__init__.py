"""The CNN as pure JAX functions over the canonical parameter pytree.

float64 is enabled so the cross-check can run in double precision (arrays keep the dtype they
are given, float32 in training), and matmul precision is pinned so results don't depend on
hardware defaults.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")
