"""T5-family text encoders (T5 v1.1, umT5) and their tokenizer, for text-conditioned video models.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5; v1.1 adds the gated-GELU FFN and drops the FFN biases); Chung et al. 2023,
"UniMax: Fairer and More Effective Language Sampling for Large-Scale Multilingual Pretraining"
(umT5: one relative position bias table per layer). Dimension letters as in `genjax.models.layers`.

  ids (B, L) int32 -> token embedding (B, L, D)
    x += attn(rms_norm(x), relative position bias (1, N, L, L) + key padding mask)   x num_layers
    x += wo(gelu_tanh(wi_0(rms_norm(x))) * wi_1(rms_norm(x)))
  -> rms_norm -> hidden (B, L, D)

Attention is an einsum here rather than `attention.dot_product_attention`: T5 adds a learned
per-head `(N, L, S)` bias to the logits and does not scale q.k by 1/sqrt(K), and
`dot_product_attention` takes neither an additive bias nor a scale. Outputs equal transformers'
`T5EncoderModel` / `UMT5EncoderModel` (tested to 1e-4, padded positions included); `load_transformers`
reads their safetensors with numpy, `load_tokenizer` their `tokenizer.json` with `tokenizers`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check
from genjax.io.weights import StateDictReader, check_overrides, check_params_match, load_state_dict
from genjax.models.layers import HeadsDense, logical, stack_blocks
from genjax.parallel.axes import BATCH, EMBED, HEADS, KV, LENGTH, MLP, NORM, VOCAB

Dtype = Any
Array = jax.Array

# transformers `dense_act_fn` -> activation; "gated-gelu" configs mean "gelu_new" (tanh approximation).
ACTIVATIONS = {"gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
               "gelu": lambda x: nn.gelu(x, approximate=False), "relu": nn.relu}


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """Bidirectional T5 buckets of `key - query` positions: `(q_len, k_len)` int32 in [0, num_buckets).

    Half the buckets per direction; within one, distances below a quarter of `num_buckets` get their
    own bucket and larger ones log-spaced buckets up to `max_distance` (beyond it: the last bucket).
    Computed in float32 numpy exactly as transformers' `T5Attention._relative_position_bucket`
    (Mesh TensorFlow `_relative_position_bucket`), at trace time (lengths are static).
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    scaled = (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5 layer norm: `scale * x / sqrt(mean(x^2) + eps)`, no mean subtraction, no bias.

    The mean square is taken in float32 (as transformers' `T5LayerNorm`); output in `dtype`.
    Param `scale (D,)`, init ones, logical axis `norm`. Shapes `(..., D)` -> `(..., D)`.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", logical(nn.initializers.ones, (NORM,)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * y.astype(self.dtype)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head): `(L, S)` positions -> `(1, N, L, S)` float32.

    Param `embedding (num_buckets, N)`, logical axes `(None, heads)` (transformers
    `relative_attention_bias.weight`).
    """

    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_len: int, k_len: int) -> Array:
        table = self.param("embedding", logical(nn.initializers.normal(1.0), (None, HEADS)),
                           (self.num_buckets, self.num_heads), self.param_dtype)
        idx = relative_position_buckets(q_len, k_len, self.num_buckets, self.max_distance)
        return jnp.transpose(jnp.take(table, jnp.asarray(idx), axis=0), (2, 0, 1))[None].astype(jnp.float32)


class T5Block(nn.Module):
    """One encoder layer: pre-norm self-attention with an additive position bias, then the (gated) FFN.

    Submodules (transformers name): `attn_norm` (layer.0.layer_norm), `q`, `k`, `v`, `o`
    (layer.0.SelfAttention.*; `attention.HeadsDense`, no biases, kernel axes `(embed, heads, kv)` /
    `(heads, kv, embed)`), `relative_attention_bias` (umT5 only: `per_layer_bias`), `ffn_norm`
    (layer.1.layer_norm), `wi_0`, `wi_1` (gated only) / `wi`, `wo` (layer.1.DenseReluDense;
    kernel axes `(embed, mlp)`, `(mlp, embed)`). Init as transformers `T5PreTrainedModel` (factor 1).

    Call: `x (B, L, D)`, `bias (1, N, L, L)` float32 or None (then `per_layer_bias` must be set),
    `key_mask (B, 1, 1, L)` bool (False: padding key) -> `(B, L, D)`.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    gated: bool = True
    activation: str = "gelu_new"
    per_layer_bias: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array | None, key_mask: Array) -> Array:
        d, n, k, length = x.shape[-1], self.num_heads, self.head_dim, x.shape[1]
        kw, normal = dict(dtype=self.dtype, param_dtype=self.param_dtype), nn.initializers.normal
        if self.per_layer_bias:
            bias = RelativePositionBias(n, self.num_buckets, self.max_distance, self.param_dtype,
                                        name="relative_attention_bias")(length, length)
        h = RMSNorm(self.epsilon, **kw, name="attn_norm")(x)

        def proj(name, std):
            return HeadsDense((n, k), (EMBED, HEADS, KV), (HEADS, KV), use_bias=False,
                              kernel_init=normal(std), **kw, name=name)(h)

        q, key, v = proj("q", (d * k) ** -0.5), proj("k", d ** -0.5), proj("v", d ** -0.5)
        logits = jnp.einsum("blnk,bsnk->bnls", q, key, preferred_element_type=jnp.float32) + bias
        logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)  # as transformers: min, not -inf
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bnls,bsnk->blnk", weights, v)
        x = x + HeadsDense((d,), (HEADS, KV, EMBED), (EMBED,), in_axes=2, use_bias=False,
                           kernel_init=normal((n * k) ** -0.5), **kw, name="o")(o)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, None))

        h = RMSNorm(self.epsilon, **kw, name="ffn_norm")(x)

        def dense(name, inp, features, names):  # init std fan_in ** -0.5, as transformers
            init = logical(normal(inp.shape[-1] ** -0.5), names)
            return nn.Dense(features, use_bias=False, kernel_init=init, **kw, name=name)(inp)

        g = ACTIVATIONS[self.activation](dense("wi_0" if self.gated else "wi", h, self.mlp_dim, (EMBED, MLP)))
        if self.gated:  # T5 v1.1 / umT5: act(wi_0 h) * wi_1 h
            g = g * dense("wi_1", h, self.mlp_dim, (EMBED, MLP))
        x = x + dense("wo", g, d, (MLP, EMBED))
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class T5Encoder(nn.Module):
    """T5 v1.1 / umT5 encoder: `input_ids (B, L)`, `attention_mask (B, L)` -> `hidden (B, L, D)`.

    Attributes (transformers config name): vocab_size, d_model (D), d_kv (K), num_heads (N), d_ff
      (mlp width), num_layers, num_buckets (relative_attention_num_buckets), max_distance
      (relative_attention_max_distance), layer_norm_epsilon; gated / activation (from
      `feed_forward_proj`: "gated-gelu" -> gated, "gelu_new"; "relu" -> not gated, "relu");
      per_layer_bias: False for T5 (one bias table, in `relative_attention_bias` here, block 0 in
      transformers, shared by every layer), True for umT5 (a table in every block).
      scan / remat: as `dit.DiT` (`layers.stack_blocks`; scanned params have a leading `layers` axis).
      dtype / param_dtype: compute / storage (bf16 works; norms' mean square and softmax in float32).

    Params: `token_embedding.embedding (V, D)` axes `(vocab, embed)`, blocks `layers_i` (`T5Block`),
      `final_layer_norm.scale`; all kernels carry logical names (`genjax.parallel.axes`), so an
      xxl encoder shards over fsdp (D) and tensor (heads, mlp, vocab) instead of replicating.

    Call:
      input_ids: `(B, L)` int in [0, vocab_size). attention_mask: `(B, L)` 0/1 (or bool) or None
        (all ones). Keys with mask 0 get logit float32-min, as transformers; padded queries still
        attend to the real keys, so padded positions give the same numbers as transformers.

    Returns:
      `(B, L, D)` in `dtype` (transformers `last_hidden_state`; dropout omitted, inference).

    Raises:
      UserError: input_ids not 2-D, attention_mask of another shape, unknown activation / remat.

    Source: transformers 5.x `modeling_t5.py` (`T5Stack`) / `modeling_umt5.py` (`UMT5Stack`);
      Raffel et al. 2020 sec. 2.1 (relative position buckets, simplified layer norm).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    num_heads: int = 8
    d_ff: int = 1024
    num_layers: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    per_layer_bias: bool = False
    gated: bool = True
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-6
    scan: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        check(input_ids.ndim == 2, "input_ids.shape", tuple(input_ids.shape), "must be (B, L)")
        check(attention_mask is None or attention_mask.shape == input_ids.shape, "attention_mask.shape",
              None if attention_mask is None else tuple(attention_mask.shape),
              f"must equal input_ids.shape {tuple(input_ids.shape)}")
        check(self.activation in ACTIVATIONS, "activation", self.activation, f"must be one of {list(ACTIVATIONS)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        x = nn.Embed(self.vocab_size, self.d_model, embedding_init=logical(nn.initializers.normal(1.0),
                     (VOCAB, EMBED)), **kw, name="token_embedding")(input_ids)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, None))
        bias = None if self.per_layer_bias else RelativePositionBias(
            self.num_heads, self.num_buckets, self.max_distance, self.param_dtype,
            name="relative_attention_bias")(length, length)
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask != 0
        block_kw = dict(num_heads=self.num_heads, head_dim=self.d_kv, mlp_dim=self.d_ff, gated=self.gated,
                        activation=self.activation, per_layer_bias=self.per_layer_bias,
                        num_buckets=self.num_buckets, max_distance=self.max_distance,
                        epsilon=self.layer_norm_epsilon, **kw)
        x = stack_blocks(T5Block, block_kw, self.num_layers, "layers", x, bias, mask[:, None, None, :],
                         scan=self.scan, remat=self.remat)
        return RMSNorm(self.layer_norm_epsilon, **kw, name="final_layer_norm")(x)


def _xxl(vocab_size: int, per_layer_bias: bool) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                num_buckets=32, max_distance=128, per_layer_bias=per_layer_bias)


VARIANTS: dict[str, dict[str, Any]] = {
    # google/t5-v1_1-xxl encoder (PixArt-alpha, Open-Sora): 4,762,310,656 parameters.
    "t5-v1_1-xxl": _xxl(32128, False),
    # google/umt5-xxl encoder (Wan 2.1 / 2.2 text encoder): 5,680,910,336 parameters.
    "umt5-xxl": _xxl(256384, True),
}


def Model(*, variant: str | None = None, **kw) -> T5Encoder:
    """A `T5Encoder` of a named variant ("t5-v1_1-xxl", "umt5-xxl"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return T5Encoder(**{**(VARIANTS[variant] if variant else {}), **kw})


# --------------------------------------------------------------------------- transformers weights

MODEL_TYPES = {"t5": False, "mt5": False, "umt5": True}  # model_type -> per_layer_bias


def _encoder_kwargs(r: StateDictReader, cfg: dict) -> dict[str, Any]:
    """T5Encoder kwargs from a transformers config, falling back to the tensor shapes."""
    e = "encoder.block.{}.layer.{}."
    model_type = cfg.get("model_type")
    if model_type is None:  # a bare state dict: umT5 has a bias table in every block
        model_type = "umt5" if r.has(e.format(1, 0) + "SelfAttention.relative_attention_bias.weight") else "t5"
    check(model_type in MODEL_TYPES, "model_type", model_type, f"must be one of {list(MODEL_TYPES)} "
          "(a transformers T5 / mT5 / umT5 encoder)")
    layers = 0
    while r.has(e.format(layers, 0) + "SelfAttention.q.weight"):
        layers += 1
    check(layers > 0 or "num_layers" in cfg, "src", "state dict",
          "holds no transformers T5 encoder blocks (encoder.block.0.*; wrong model family?)")
    bias = r.state.get(e.format(0, 0) + "SelfAttention.relative_attention_bias.weight", np.zeros((32, 0)))
    inner, d = r.state.get(e.format(0, 0) + "SelfAttention.q.weight", np.zeros((0, 0))).shape
    gated = r.has(e.format(0, 1) + "DenseReluDense.wi_0.weight")
    ff = r.state.get(e.format(0, 1) + f"DenseReluDense.wi{'_0' if gated else ''}.weight", np.zeros((0, 0))).shape[0]
    vocab = r.state.get("shared.weight", r.state.get("encoder.embed_tokens.weight", np.zeros((0, 0)))).shape[0]
    heads = cfg.get("num_heads", bias.shape[1])
    proj = cfg.get("feed_forward_proj", "gated-gelu" if gated else "relu")
    act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    check(act in ACTIVATIONS, "feed_forward_proj", proj, f"activation must be one of {list(ACTIVATIONS)}")
    check(heads > 0, "num_heads", heads, "must be given (no config.json and no relative_attention_bias tensor)")
    return dict(vocab_size=cfg.get("vocab_size", vocab), d_model=cfg.get("d_model", d),
                d_kv=cfg.get("d_kv", inner // heads), num_heads=heads, d_ff=cfg.get("d_ff", ff),
                num_layers=cfg.get("num_layers", layers), num_buckets=cfg.get("relative_attention_num_buckets",
                                                                              bias.shape[0]),
                max_distance=cfg.get("relative_attention_max_distance", 128),
                per_layer_bias=MODEL_TYPES[model_type], gated=proj.startswith("gated-"), activation=act,
                layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6))


def load_transformers(src: Any, **overrides) -> tuple[T5Encoder, dict]:
    """Load a transformers T5 / mT5 / umT5 encoder (`T5EncoderModel`, `UMT5EncoderModel`, or the
    encoder of a whole `T5ForConditionalGeneration`, whose decoder and lm_head are skipped).

    Args:
      src: a folder with `config.json` and `model.safetensors` or the shards of
        `model.safetensors.index.json`; a `.safetensors` file; or a state dict `{key: array}`
        (then T5 vs umT5 is read from the keys, heads from the bias table's shape, and
        `max_distance`, which no tensor records, is 128 unless overridden). Read with
        numpy (`genjax.io.weights.load_state_dict`), no torch; bf16 / fp16 tensors are upcast.
      overrides: `T5Encoder` kwargs replacing the config's (e.g. `dtype`, `param_dtype`, `scan`).

    Returns:
      `(module, params)`: a `T5Encoder` and the plain (unboxed) numpy params tree of
      `module.init(...)["params"]`, in `param_dtype` (float32 by default). T5 vs umT5 comes from
      config `model_type` ("t5" / "mt5": one shared bias table; "umt5": one per layer).

    Raises:
      UserError: missing folder / weights / shard; an unsupported model_type or activation; a
        tensor missing, extra, or of another shape than the config needs (naming key and shapes);
        an unknown override.

    Source: transformers 5.x `modeling_t5.py` / `modeling_umt5.py` key names; outputs equal
      `T5EncoderModel` / `UMT5EncoderModel` (tested to 1e-4 with random weights).
    """
    check_overrides(T5Encoder, overrides)
    state, cfg = load_state_dict(src)
    state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    r = StateDictReader(state, "transformers T5 / umT5 encoder")
    kw = {**_encoder_kwargs(r, cfg), **overrides}
    module = T5Encoder(**kw)
    d, n, k, f = kw["d_model"], kw["num_heads"], kw["d_kv"], kw["d_ff"]
    table = (kw["num_buckets"], n)

    def qkv(key):
        return {"kernel": r.get(key, (n * k, d)).T.reshape(d, n, k)}

    def linear(key, d_in, d_out):
        return {"kernel": r.get(key, (d_out, d_in)).T}

    blocks = []
    for i in range(kw["num_layers"]):
        a, m = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        s = a + "SelfAttention."
        blk = {"attn_norm": {"scale": r.get(a + "layer_norm.weight", (d,))},
               "q": qkv(s + "q.weight"), "k": qkv(s + "k.weight"), "v": qkv(s + "v.weight"),
               "o": {"kernel": r.get(s + "o.weight", (d, n * k)).T.reshape(n, k, d)},
               "ffn_norm": {"scale": r.get(m + "layer_norm.weight", (d,))},
               "wo": linear(m + "DenseReluDense.wo.weight", f, d)}
        for name in ("wi_0", "wi_1") if kw["gated"] else ("wi",):
            blk[name] = linear(m + f"DenseReluDense.{name}.weight", d, f)
        if kw["per_layer_bias"]:
            blk["relative_attention_bias"] = {"embedding": r.get(s + "relative_attention_bias.weight", table)}
        blocks.append(blk)
    if kw.get("scan"):
        params = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    else:
        params = {f"layers_{i}": b for i, b in enumerate(blocks)}
    emb = [r.get(key, (kw["vocab_size"], d)) for key in ("shared.weight", "encoder.embed_tokens.weight")
           if r.has(key)] or [r.get("shared.weight")]  # tied copies: transformers uses `shared`
    params["token_embedding"] = {"embedding": emb[0]}
    if not kw["per_layer_bias"]:
        params["relative_attention_bias"] = {"embedding": r.get(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", table)}
    params["final_layer_norm"] = {"scale": r.get("encoder.final_layer_norm.weight", (d,))}
    r.finish()
    check_params_match(module, params, np.zeros((1, 1), np.int32), family="T5Encoder")
    return module, jax.tree.map(lambda x: np.asarray(x, module.param_dtype), params)


# --------------------------------------------------------------------------- tokenizer


class T5Tokenizer:
    """Strings -> `(input_ids (B, max_length) int32, attention_mask (B, max_length) int32)`.

    A `tokenizers.Tokenizer` from a `tokenizer.json` (its normaliser, SentencePiece-Unigram model
    and post-processor, which appends `</s>` for T5), truncated to `max_length` tokens counting
    the appended ones and right-padded with `pad_token` to exactly `max_length`: the same ids as
    transformers' `tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)`
    (tested). Mask 1 = real token, 0 = padding. Attributes: `tokenizer`, `max_length`, `pad_id`,
    `vocab_size`.

    Raises (on call): UserError unless `texts` is a list / tuple of str.
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int, pad_token: str):
        self.tokenizer, self.max_length, self.pad_id = tokenizer, max_length, pad_id
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        check(isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts), "texts",
              type(texts).__name__, "must be a list of str")
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(len(texts), self.max_length)
        return ids, mask


def load_tokenizer(folder: str | os.PathLike, max_length: int = 512, pad_token: str = "<pad>") -> T5Tokenizer:
    """The T5 / umT5 tokenizer of a transformers folder's `tokenizer.json` (`tokenizers` package).

    Args:
      folder: holds `tokenizer.json` (a `spiece.model` alone is not read: sentencepiece is not
        a genjax dependency). max_length: tokens per text after truncation / padding (512 as Wan
        uses for umT5; PixArt-alpha uses 120). pad_token: the padding token ("<pad>", id 0 in T5).

    Returns:
      A `T5Tokenizer`.

    Raises:
      UserError: no folder; no tokenizer.json (the message says how to write one); an unreadable
        tokenizer.json; pad_token not in the vocabulary; max_length < 1.

    Source: transformers `T5TokenizerFast` / `tokenizers` truncation and padding.
    """
    from tokenizers import Tokenizer

    path = os.fspath(folder)
    check(os.path.isdir(path), "folder", path, "no such folder")
    check(int(max_length) >= 1, "max_length", max_length, "must be >= 1")
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        hint = (" (it has only spiece.model: write tokenizer.json where sentencepiece is installed, with "
                "transformers AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
                if os.path.isfile(os.path.join(path, "spiece.model")) else "")
        check(False, "folder", path, "holds no tokenizer.json" + hint)
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as e:
        raise UserError(f"tokenizer.json={file!r}: not a readable tokenizers file ({e})") from None
    pad_id = tokenizer.token_to_id(pad_token)
    check(pad_id is not None, "pad_token", pad_token, f"is not in the vocabulary of {file}")
    return T5Tokenizer(tokenizer, int(max_length), pad_id, pad_token)
