"""genjax: the Sora technical stack in JAX and Flax Linen.

Importing `genjax` is cheap on purpose: it pulls in no model code and no JAX.
Import what you need from the subpackages (`genjax.models.dit`, `genjax.diffusion.samplers`, ...).
"""

__version__ = "0.1.0"
