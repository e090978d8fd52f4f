"""The text encoder of a text-conditioned task (today `video_dit`), chosen by task.text_encoder:

    task.text_encoder                 kind            tokenizer                encoder (hidden states)
    "" (default, offline demo)        "joint"         `tokenizer.ByteTokenizer`  `clip_towers.TextTransformer`
                                                                               (task.text), trained with the
                                                                               model: params["text"]
    a genjax CLIP workdir             "clip_workdir"  `ByteTokenizer`          its frozen (EMA) text tower
    a transformers T5 / mT5 / umT5    "t5"            its tokenizer.json       frozen `t5.T5Encoder`
      folder (config.json model_type                  (`tokenizer.HFTokenizer`)  (`t5.load_transformers`)
      t5 / mt5 / umt5, safetensors,
      tokenizer.json)
    a transformers CLIP folder        "clip"          its tokenizer.json       frozen CLIP text tower
      (model_type clip / clip_text_model)                                      (`clip.load_transformers`)

The kind is read from the folder (`kind_of`: a genjax workdir's config.json has a model section,
a transformers one a model_type), in the task's `validate`, before anything is built. Every kind
gives the last hidden states `(B, L, D)` of task.text_length tokens (padded / truncated to it), as
PixArt-alpha and Wan condition on a frozen encoder's last hidden states.

Frozen encoders are never trained: their params are `TextEncoder.frozen` (`{FROZEN: params}`),
which the task returns as `Task.frozen`; the trainer passes them to the compiled step as an
argument (not a closed-over constant, which jit would embed, replicated, in the program) and the
loss sees `{**params, **frozen}`. T5 and transformers CLIP params are placed on the mesh by their
logical axis names (`place`: sharded over fsdp / tensor, so a 4.7B encoder is not replicated);
a CLIP workdir's are replicated (`tasks.load_frozen`). task.text_dtype ("float32" default,
"bfloat16") is the frozen encoder's param and compute dtype (unset: float32, a CLIP workdir its
run's model.dtype); the joint tower uses model.dtype.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from genjax.errors import check, fail
from genjax.tasks import DTYPES, load_frozen, model_kwargs, replicated

FIELD = "task.text_encoder"
FROZEN = "frozen_text"  # the key of a frozen encoder's params in Task.frozen
T5_TYPES = ("t5", "mt5", "umt5")
CLIP_TYPES = ("clip", "clip_text_model")
ACCEPTED = ("must be empty (a text tower trained jointly, byte tokenizer), a genjax CLIP workdir, or a "
            "transformers folder (config.json, safetensors, tokenizer.json) of a T5 / mT5 / umT5 encoder or "
            f"a CLIP text model (model_type one of {T5_TYPES + CLIP_TYPES})")


class TextEncoder(NamedTuple):
    """What a task needs of its text encoder.

    Fields:
      kind: "joint", "clip_workdir", "t5" or "clip" (see the module docstring).
      tokenizer: `ByteTokenizer` or `HFTokenizer` (encode / fits / check_fits / limit).
      length: L = task.text_length, tokens per text (padded / truncated).
      width: D of the hidden states.
      init: `key -> params` of the joint tower (boxed), or None (frozen).
      encode: `(params, ids (B, L) int32, mask (B, L) bool) -> hidden (B, L, D) float32`; params
        the dict the loss sees: the joint tower's under "text", a frozen encoder's under FROZEN.
      frozen: `{FROZEN: params}` placed on the mesh, or {} (joint).
      meta: what token ids cached in a latent cache depend on (empty for the byte tokenizer).
    """

    kind: str
    tokenizer: Any
    length: int
    width: int
    init: Callable[[jax.Array], Any] | None
    encode: Callable[[Any, jax.Array, jax.Array], jax.Array]
    frozen: dict
    meta: dict

    def tokenize(self, texts) -> tuple[Any, Any]:
        """`list[str] -> (ids int32 (B, L), mask bool (B, L))`."""
        return self.tokenizer.encode(list(texts), self.length)


def kind_of(path: str) -> str:
    """The kind of text encoder `path` (task.text_encoder) names, from its files alone.

    Raises:
      UserError: one line naming task.text_encoder, its value and the accepted kinds: not a
        folder, no config.json, a genjax workdir of another model than clip, an unknown
        transformers model_type; a transformers folder without tokenizer.json.
    """
    if not path:
        return "joint"
    cfg_file = os.path.join(path, "config.json")
    check(os.path.isfile(cfg_file), FIELD, path, f"holds no config.json; {ACCEPTED}")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        fail(FIELD, path, f"config.json is not readable JSON ({' '.join(str(e).split())}); {ACCEPTED}")
    check(isinstance(cfg, dict), FIELD, path, f"config.json is not a JSON object; {ACCEPTED}")
    if isinstance(cfg.get("model"), dict):  # a genjax workdir (genjax train)
        name = cfg["model"].get("name")
        check(name == "clip", FIELD, path, f"is a genjax workdir of model.name={name!r}; {ACCEPTED}")
        return "clip_workdir"
    model_type = cfg.get("model_type")
    check(model_type in T5_TYPES + CLIP_TYPES, FIELD, path, f"config.json has model_type={model_type!r}; {ACCEPTED}")
    check(os.path.isfile(os.path.join(path, "tokenizer.json")), FIELD, path,
          f"is a transformers {model_type!r} folder without tokenizer.json (write one where transformers is "
          "installed: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    return "t5" if model_type in T5_TYPES else "clip"


def validate(t) -> None:
    """task.text_encoder's kind (`kind_of`), task.text_length >= 2 and task.text_dtype.

    Raises:
      UserError: see `kind_of`; text_length < 2; text_dtype not in DTYPES."""
    kind_of(t.get("text_encoder", ""))
    length = t.get("text_length", 0)
    check(isinstance(length, int) and length >= 2, "task.text_length", length, "must be an int >= 2 (bos and eos)")
    dtype = t.get("text_dtype", "float32")
    check(dtype in DTYPES, "task.text_dtype", dtype, f"must be one of {tuple(DTYPES)}")


def place(module: nn.Module, params: Any, mesh: Mesh | None, *init_args) -> Any:
    """Frozen `params` of `module` on `mesh`, sharded by their logical axis names
    (`parallel.axes.RULES`: embed over fsdp, heads / mlp / vocab over tensor); a dimension that
    the mesh axes do not divide stays whole. Replicated when `mesh` is None or lacks the axes
    ("data", "fsdp", "context", "tensor"). `init_args` are example inputs of `module.init`
    (shapes only: `jax.eval_shape`)."""
    from genjax.parallel.axes import MESH_AXES, RULES

    if mesh is None or not set(MESH_AXES) <= set(mesh.axis_names):
        return replicated(params, mesh)
    boxed = jax.eval_shape(module.init, jax.random.key(0), *init_args)["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)

    def put(x, sharding):
        spec = []
        for size, axes in zip(x.shape, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            spec.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(put, params, shardings)


def build(t, *, mesh: Mesh | None = None, dtype=jnp.float32) -> TextEncoder:
    """The `TextEncoder` of config.task `t` (task.text_encoder, text_length, text, text_dtype).

    dtype: the joint tower's compute dtype (model.dtype). Frozen params are placed on `mesh`.

    Raises:
      UserError: `validate`'s; text_length above a CLIP's context_length; unreadable weights or
        tokenizer (`t5.load_transformers`, `clip.load_transformers`, `HFTokenizer.from_file`,
        `tasks.load_frozen`).
    """
    from genjax.models import clip_towers, tokenizer

    validate(t)
    path, length = t.get("text_encoder", ""), int(t["text_length"])
    kind = kind_of(path)
    frozen_dtype = DTYPES[t.get("text_dtype", "float32")]
    ids0, mask0 = jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool)

    if kind == "joint":
        tok = tokenizer.ByteTokenizer()
        tower = clip_towers.TextTransformer(**model_kwargs(clip_towers.TextTransformer, t["text"],
                                                           vocab_size=tok.vocab_size, context_length=length,
                                                           dtype=dtype))

        def encode_joint(params, ids, mask):
            return tower.apply({"params": params["text"]}, ids, mask)[0].astype(jnp.float32)

        return TextEncoder(kind, tok, length, tower.width, lambda key: tower.init(key, ids0, mask0)["params"],
                           encode_joint, {}, {})

    from genjax.models import clip, t5

    if kind == "clip_workdir":
        tok, meta = tokenizer.ByteTokenizer(), {}
        module, params = load_frozen(path, mesh=mesh, family_name="clip")
    else:
        tok, meta = tokenizer.HFTokenizer.from_file(path), {"tokenizer": os.path.abspath(path)}
        module, params = (t5.load_transformers if kind == "t5" else clip.load_transformers)(path)
    if isinstance(module, clip.CLIP):  # a whole CLIP (workdir or CLIPModel): its text tower alone
        module, params = _text_tower(module), params["text"]
    check(isinstance(module, (t5.T5Encoder, clip_towers.TextTransformer)), FIELD, path,
          f"holds a {type(module).__name__}, not a text encoder; {ACCEPTED}")
    context = getattr(module, "context_length", None)
    check(context is None or length <= context, "task.text_length", length,
          f"must be <= the text encoder's context_length {context}")
    if kind != "clip_workdir" or t.get("text_dtype"):  # a CLIP workdir keeps its run's dtype by default
        module = module.clone(dtype=frozen_dtype, param_dtype=frozen_dtype)
        params = jax.tree.map(lambda x: x.astype(frozen_dtype), params)
    width = module.d_model if kind == "t5" else module.width
    params = place(module, params, mesh, ids0, mask0)

    def encode(p, ids, mask):
        out = module.apply({"params": p[FROZEN]}, ids, mask)  # T5: hidden; CLIP: (hidden, pooled)
        return (out if kind == "t5" else out[0]).astype(jnp.float32)

    return TextEncoder(kind, tok, length, width, None, encode, {FROZEN: params}, meta)


def _text_tower(module) -> nn.Module:
    """The `TextTransformer` a `clip.CLIP` builds in its setup (its params are params["text"])."""
    from genjax.models import clip_towers

    return clip_towers.TextTransformer(module.vocab_size, module.context_length, module.text_width,
                                       module.text_layers, module.text_heads, 4 * module.text_width,
                                       module.activation, eos_token_id=module.eos_token_id, scan=module.scan,
                                       remat=module.remat, attention_impl=module.attention_impl)
