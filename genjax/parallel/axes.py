"""Logical axis names and the default logical -> mesh rules.

Models annotate parameters (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with the logical names below; only this file maps them onto the
physical mesh axes `("data", "fsdp", "context", "tensor")`. Under `nn.logical_axis_rules(RULES)` (or
`nn.logical_to_mesh_sharding(..., rules=RULES)`) a logical name is sharded over the listed mesh
axis, or replicated where the rule says None.

Logical names:
  batch       examples in a batch                     -> ("data", "fsdp")
  length      tokens / sequence positions             -> "context" (sequence parallelism; size 1 =
                                                          replicated, see `genjax.parallel.context`)
  embed       model width D of activations/params     -> "fsdp" (params are FSDP-sharded on D)
  mlp         MLP hidden width                        -> "tensor"
  heads       attention heads N                       -> "tensor"
  kv          head dim K                              -> replicated
  vocab       text vocabulary                         -> "tensor"
  conv_in     conv input channels                     -> replicated
  conv_out    conv output channels                    -> "tensor"
  channels, norm, layers                              -> replicated
"""

from __future__ import annotations

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
VOCAB = "vocab"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
CHANNELS = "channels"
NORM = "norm"
LAYERS = "layers"

MESH_AXES = ("data", "fsdp", "context", "tensor")  # tensor innermost: on the fastest links
BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over
CONTEXT_AXIS = "context"  # mesh axis the token (length) dimension is split over
TENSOR_AXIS = "tensor"  # mesh axis heads / MLP width are split over

# (logical name, mesh axis or tuple of axes or None). Parameters' "embed" is sharded over fsdp;
# activations are constrained as (batch, length, None), so their width stays replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, CONTEXT_AXIS),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (VOCAB, "tensor"),
    (CONV_IN, None),
    (CONV_OUT, "tensor"),
    (CHANNELS, None),
    (NORM, None),
    (LAYERS, None),
)
