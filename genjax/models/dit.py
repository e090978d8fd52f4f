"""DiT: class-conditional latent diffusion transformer with adaLN-Zero blocks.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748), sec. 3.2
and Fig. 3; numbers checked against diffusers `DiTTransformer2DModel` (random weights) and the
paper's Table 4 (parameters, Gflops). Dimension letters are defined in `genjax.models.layers`.

  x (B, H, W, C) latents -> PatchEmbed + fixed 2D sin-cos positions -> (B, L, D)
  c = TimestepEmbedder(t) + LabelEmbed(y) [+ pooled text]             -> (B, D)
  depth x DiTBlock(x, c [, text])  (adaLN-Zero: shift/scale/gate from c, gates zero-initialised;
                                    optional cross-attention to text tokens, PixArt-alpha)
  FinalLayer: adaLN LayerNorm -> Dense(D -> p*p*C_out), zero-initialised -> unpatchify
  -> (B, H, W, C_out), C_out = 2C with learn_sigma (eps and variance interpolation v).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check
from genjax.io.weights import StateDictReader, load_state_dict
from genjax.models.adaln import (FinalLayer, adaln_norm, cfg_drop, check_text, embed_labels, embed_text,
                                 modulations)
from genjax.models.attention import Attention
from genjax.models.layers import (SIZES, Mlp, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d, sincos_pos_embed_at,
                                  stack_blocks, unpatchify)
from genjax.parallel.axes import BATCH, LENGTH

Dtype = Any
Array = jax.Array


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT Fig. 3, right): `(B, L, D), (B, D)` -> `(B, L, D)`.

    `adaLN_modulation` = Dense(SiLU(c)) -> shift/scale/gate for attention and MLP (this order, as
    DiT and diffusers `AdaLayerNormZero`), zero-initialised so each block starts as the identity.
    LayerNorms are non-affine, in float32, eps 1e-6 (DiT) except `mlp_norm_eps` before the MLP
    (diffusers' `norm3` uses the config's `norm_eps`, 1e-5 by default). With `cross_attention`,
    `x + cross_attn(x, context)` (an `attention.Attention` with zero-initialised `to_out`, no norm
    before it, as PixArt-alpha / Open-Sora STDiT) runs between self-attention and the MLP
    (PixArt-alpha Fig. 4). Call `(x, c, c_index, segment_ids, context (B, S, D), context_mask (B, S),
    context_segment_ids)`: c `(B, D)`, or `(B, M, D)` rows gathered per token by c_index `(B, L)`
    (`adaln.per_token`); segment_ids make self- and cross-attention block-diagonal (packed); mask (an
    explicit `(B|1, 1, L, L)` boolean self-attention mask, e.g. VAR's block-causal one) is and-ed in.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    cross_attention: bool = False
    mlp_norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, c_index: Array | None = None, segment_ids: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None,
                 context_segment_ids: Array | None = None, mask: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulations(c, 6, self.hidden_size, c_index,
                                                                                     **kw)
        h = adaln_norm(x, shift_msa, scale_msa, dtype=self.dtype, name="norm1")
        h = Attention(self.num_heads, attention_impl=self.attention_impl, **kw, name="attn")(h, segment_ids=segment_ids, mask=mask)
        x = x + (gate_msa * h).astype(self.dtype)
        if self.cross_attention:
            x = x + Attention(self.num_heads, zero_init_out=True, attention_impl=self.attention_impl, **kw,
                              name="cross_attn")(
                x, context, segment_ids=segment_ids, context_segment_ids=context_segment_ids,
                context_mask=context_mask)
        h = adaln_norm(x, shift_mlp, scale_mlp, eps=self.mlp_norm_eps, dtype=self.dtype, name="norm2")
        h = Mlp(int(self.hidden_size * self.mlp_ratio), **kw, name="mlp")(h)
        x = x + (gate_mlp * h).astype(self.dtype)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023).

    Attributes:
      patch_size: p (square patches). in_channels: C of the latents (4 for SD's VAE).
      hidden_size: D. depth: number of blocks. num_heads: N (K = D / N). mlp_ratio: MLP width / D.
      num_classes: labels 0..num_classes-1; id `num_classes` is the null class used for
        classifier-free guidance (its embedding row exists when class_dropout_prob > 0).
        0 = no labels (y must be None; e.g. text-only conditioning).
      class_dropout_prob: label-dropout probability in training (DiT: 0.1).
      context_dim: Dc, the width of the text-encoder tokens; None = no text conditioning (the model, its
        parameters and its numbers are exactly the class-conditional DiT). When set, every block
        cross-attends to the projected text tokens and the pooled text joins the adaLN condition
        (`TextEmbedder`, PixArt-alpha style).
      text_dropout_prob: probability of replacing an example's text by the null text in training.
      learn_sigma: output 2C channels (eps, variance interpolation v; Nichol & Dhariwal 2021).
      out_channels: override C_out (default C * (2 if learn_sigma else 1)).
      frequency_embedding_size: timestep sinusoid width (256).
      mlp_norm_eps: eps of the LayerNorm before each block's MLP; 1e-6 in the DiT code, the
        config's `norm_eps` (default 1e-5) in diffusers.
      time_freq_shift: sinusoid `downscale_freq_shift`; 0 in the DiT code, 1 in diffusers'
        `DiTTransformer2DModel` (set by `load_diffusers`).
      pos_embed_base_size: None -> positions are patch indices (DiT); an int -> diffusers-style
        interpolation to that training grid side (set by `load_diffusers` to sample_size / p).
      scan: scan the blocks with `nn.scan` (params `blocks` with a leading `layers` axis) instead of
        unrolled `blocks_0..blocks_{depth-1}`; same numbers.
      remat: "none" | "full" | "dots_saveable" | "dots_with_no_batch_dims_saveable" (per block).
      attention_impl: "auto" | "xla" | "blockwise" | "cudnn" | "pallas", the implementation of
        every attention layer (`attention.dot_product_attention`; same numbers to 1e-5).
      dtype / param_dtype: compute / storage dtype.
    """

    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    context_dim: int | None = None
    text_dropout_prob: float = 0.1
    learn_sigma: bool = True
    out_channels: int | None = None
    frequency_embedding_size: int = 256
    time_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    pos_embed_base_size: int | None = None
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_dim(self) -> int:
        """C_out: `out_channels` or C * (2 if learn_sigma else 1)."""
        return self.out_channels or self.in_channels * (2 if self.learn_sigma else 1)

    def __call__(self, x: Array, t: Array, y: Array | None = None, *, text: Array | None = None,
                 text_mask: Array | None = None, text_pooled: Array | None = None, train: bool = False,
                 force_drop_ids: Array | None = None) -> Array:
        """Predict noise (and variance) for noisy latents.

        Args:
          x: `(B, H, W, C)` noisy latents, float; H and W divisible by patch_size.
          t: `(B,)` (or scalar) diffusion timesteps, int or float, in [0, 1000).
          y: `(B,)` int class labels in [0, num_classes); `num_classes` = the null (unconditional)
            class, valid when class_dropout_prob > 0. None when num_classes = 0.
          text: `(B, S, context_dim)` float text-encoder tokens (only with context_dim set, then required).
          text_mask: `(B, S)` bool/int, 1 = real token, 0 = padding (never influences the output).
          text_pooled: optional `(B, context_dim)` pooled text embedding (default: masked mean of text).
          train: apply label / text dropout (probs class_dropout_prob / text_dropout_prob, drawn
            independently) when an rng named "dropout" is given.
          force_drop_ids: `(B,)` int/bool; 1 -> replace that label by the null class and its text
            by the null text (the unconditional branch of classifier-free guidance).

        Returns:
          `(B, H, W, C_out)` float32; with learn_sigma the first C channels are eps and the last C
          the variance interpolation v.

        Raises:
          UserError: depth, hidden_size, num_heads or patch_size < 1; wrong rank / channels /
            indivisible size, t or y of the wrong shape, y not integer or (when concrete) outside
            [0, num_classes) (num_classes itself allowed with a null class), y given without labels, text given without context_dim (or missing with it), text_mask missing
            or misshaped, remat policy unknown, force_drop_ids without a null class or text.
        """
        check(x.ndim == 4, "x.shape", x.shape, "must be (B, H, W, C)")
        b, hgt, wid, c = x.shape
        p = self.patch_size
        check(c == self.in_channels, "x.shape[-1]", c, f"must equal in_channels={self.in_channels}")
        check(hgt % p == 0 and wid % p == 0, "x (H, W)", (hgt, wid), f"must be divisible by patch_size={p}")
        t = jnp.asarray(t)
        check(t.shape in ((), (b,)), "t.shape", t.shape, f"must be (B,)=({b},) or ()")
        self._check_common((b,), y, text, text_mask, text_pooled, force_drop_ids)
        grid = (hgt // p, wid // p)
        pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, *grid, base_size=self.pos_embed_base_size))[None]
        expand = (lambda a: None if a is None else jnp.asarray(a)[:, None])
        out = self._forward(x, pos, jnp.broadcast_to(t, (b,))[:, None], expand(y), expand(text), expand(text_mask),
                            expand(text_pooled), expand(force_drop_ids), None, train)
        return unpatchify(out, grid, (p, p))

    def packed(self, tokens: Array, segment_ids: Array, positions: Array, t: Array, y: Array | None = None, *,
               text: Array | None = None, text_mask: Array | None = None, text_pooled: Array | None = None,
               example_shape: Array | None = None, train: bool = False,
               force_drop_ids: Array | None = None) -> Array:
        """Denoiser output for NaViT-packed images of mixed sizes (`genjax.data.packing` layout).

        S sequences of L patches hold up to M images each (segment j + 1 = slot j). Each image is
        seen as if alone (tested against `__call__` per image to 1e-5): patches attend only within
        their segment, take their image's time / label / text, and the 2D sin-cos position of their
        (h, w) patch coordinates (with pos_embed_base_size, scaled to the image's own grid, as
        diffusers interpolates).

        Args:
          tokens: `(S, L, p*p*C)` noisy patches in (p, p, C) order (`packing.patchify_video` with
            patch_size (1, p, p)).
          segment_ids: `(S, L)` int, 0 = padding, j + 1 = slot j. positions: `(S, L, 3)` (t, h, w)
            patch coordinates (t unused: images).
          t: `(S, M)` timesteps per slot, in [0, 1000) (or flow time x 1000); empty slots ignored.
          y: `(S, M)` labels; text `(S, M, S_text, context_dim)`, text_mask `(S, M, S_text)`,
            text_pooled `(S, M, context_dim)`, force_drop_ids `(S, M)`: as `__call__`, per slot.
          example_shape: `(S, M, 3)` patch grids (1, nh, nw), required with pos_embed_base_size.
          train: label / text dropout per slot with an rng named "dropout".

        Returns:
          `(S, L, p*p*C_out)` float32 in the tokens' layout, 0 at padding.

        Raises:
          UserError (before compiling): shapes inconsistent with the above, or those of `__call__`.
        """
        p, c = self.patch_size, self.in_channels
        check(tokens.ndim == 3 and tokens.shape[-1] == p * p * c, "tokens.shape", tuple(tokens.shape),
              f"must be (S, L, p*p*C={p * p * c}) for patch_size={p}, in_channels={c}")
        s, l = tokens.shape[:2]
        check(jnp.shape(segment_ids) == (s, l), "segment_ids.shape", jnp.shape(segment_ids), f"must be {(s, l)}")
        check(jnp.shape(positions) == (s, l, 3), "positions.shape", jnp.shape(positions), f"must be {(s, l, 3)}")
        t = jnp.asarray(t)
        check(t.ndim == 2 and t.shape[0] == s, "t.shape", t.shape, f"must be (S, M) with S={s}")
        m = t.shape[1]
        self._check_common((s, m), y, text, text_mask, text_pooled, force_drop_ids)
        check(self.pos_embed_base_size is None or jnp.shape(example_shape) == (s, m, 3), "example_shape.shape",
              None if example_shape is None else jnp.shape(example_shape),
              f"must be {(s, m, 3)} with pos_embed_base_size (positions are scaled to each image's grid)")
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        slot = jnp.clip(segment_ids - 1, 0, m - 1)
        coords = jnp.asarray(positions, jnp.float32)[..., 1:]  # (S, L, 2) patch (h, w)
        if self.pos_embed_base_size is not None:
            grid = jnp.take_along_axis(jnp.asarray(example_shape, jnp.float32), slot[..., None], axis=1)[..., 1:]
            coords = coords / (jnp.maximum(grid, 1) / self.pos_embed_base_size)
        pos = sincos_pos_embed_at(self.hidden_size, coords)
        x = tokens.reshape(s * l, p, p, c)  # one patch per "image": the same conv as __call__
        out = self._forward(x, pos, t, y, text, text_mask, text_pooled, force_drop_ids, segment_ids, train)
        return jnp.where((segment_ids > 0)[..., None], out, 0.0)

    def _check_common(self, lead, y, text, text_mask, text_pooled, force_drop_ids):
        for field in ("depth", "hidden_size", "num_heads", "patch_size"):
            check(getattr(self, field) >= 1, field, getattr(self, field), "must be >= 1")
        if self.num_classes:
            check(y is not None and jnp.shape(y) == lead, "y.shape", None if y is None else jnp.shape(y),
                  f"must be {lead}")
        else:
            check(y is None, "y", "given", "needs num_classes > 0")
        check_text(text, text_mask, text_pooled, lead, self.context_dim)
        has_null_class = self.num_classes and self.class_dropout_prob > 0
        check(force_drop_ids is None or has_null_class or (self.context_dim and not self.num_classes),
              "force_drop_ids", "given", "needs a null class (class_dropout_prob > 0) or text-only conditioning")
        check(force_drop_ids is None or jnp.shape(force_drop_ids) == lead, "force_drop_ids.shape",
              None if force_drop_ids is None else jnp.shape(force_drop_ids), f"must be {lead}")

    @nn.compact
    def _forward(self, x, pos, t, y, text, text_mask, text_pooled, force_drop_ids, segment_ids, train):
        """Shared body of both forms. Per-example fields have a leading `(B, M)` (M = 1 in the regular
        form); x is the images `(B, H, W, C)` or one patch per row `(B * L, p, p, C)` (packed); pos
        `(1 | B, L, D)`. Returns `(B, L, p*p*C_out)`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        (b, m), d, p = t.shape, self.hidden_size, self.patch_size
        packed = segment_ids is not None
        h = PatchEmbed(d, (p, p), **kw, name="x_embedder")(x).reshape(b, -1, d)  # (B, L, D)
        h = h + pos.astype(self.dtype)

        cond = TimestepEmbedder(d, self.frequency_embedding_size, downscale_freq_shift=self.time_freq_shift,
                                **kw, name="t_embedder")(t.reshape(-1)).reshape(b, m, d)  # (B, M, D)
        if self.num_classes:
            drop = cfg_drop(self, (b, m), self.class_dropout_prob, train, force_drop_ids)
            cond = cond + embed_labels(y, drop, self.num_classes, self.class_dropout_prob > 0, d, **kw)
        context = context_mask = context_segment_ids = None
        if self.context_dim:
            context, context_mask, context_segment_ids, pooled = embed_text(
                self, text, text_mask, text_pooled, force_drop_ids, train=train, packed=packed, **kw)
            cond = cond + pooled
        cond = cond.astype(self.dtype)
        c_index = jnp.clip(segment_ids - 1, 0, m - 1) if packed else None

        block_kw = dict(hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        cross_attention=bool(self.context_dim), mlp_norm_eps=self.mlp_norm_eps,
                        attention_impl=self.attention_impl, **kw)
        h = stack_blocks(DiTBlock, block_kw, self.depth, "blocks", h, cond, c_index, segment_ids, context,
                         context_mask, context_segment_ids, scan=self.scan, remat=self.remat)
        return FinalLayer(p * p * self.out_dim, **kw, name="final_layer")(h, cond, c_index)


# --------------------------------------------------------------------------- variants

VARIANTS: dict[str, dict[str, Any]] = {
    f"{name}/{p}": dict(depth=SIZES[name][0], hidden_size=SIZES[name][1], num_heads=SIZES[name][2], patch_size=p)
    for name in ("S", "B", "L", "XL") for p in (2, 4, 8)
}


def Model(*, variant: str | None = None, **kw) -> DiT:
    """A `DiT` of a named variant (Table 1 of the paper: "S/2" ... "XL/8"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return DiT(**{**(VARIANTS[variant] if variant else {}), **kw})


def forward_gflops(module: DiT, input_size: tuple[int, int] = (32, 32)) -> float:
    """Forward Gflops per example as the DiT paper counts them (multiply-accumulates).

    XLA's cost analysis of one jitted forward on abstract inputs (no weights are materialised),
    divided by 2 (XLA counts a multiply-add as 2 flops). Matches Table 4 within 1 % (tested).
    """
    h, w = input_size
    x = jax.ShapeDtypeStruct((1, h, w, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), x, t, y)
    cost = jax.jit(module.apply).lower(params, x, t, y).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"] / 2 / 1e9


# --------------------------------------------------------------------------- diffusers weights

FAMILY = "DiTTransformer2DModel"


def load_diffusers(src: str | Mapping[str, Any], **overrides) -> tuple[DiT, dict]:
    """Read a diffusers `DiTTransformer2DModel` (e.g. facebook/DiT-XL-2-256 `transformer/`).

    Args:
      src: model folder (safetensors + config.json), a `.safetensors` file, or a state dict.
      **overrides: `DiT` attributes (dtype, scan, remat, ...; `num_heads` is required when src has
        no config.json, since head count is not visible in the weights).

    Returns:
      (module, params): params of plain float32 numpy arrays, the tree of
      `nn.unbox(module.init(...))["params"]` (stacked over blocks when scan=True), as
      `vae.load_diffusers` / `unet.load_diffusers`; use `module.apply({"params": params}, ...)`.
      The module uses diffusers' timestep sinusoid (`time_freq_shift=1`) and position
      interpolation, so its forward matches `DiTTransformer2DModel` (NCHW in, NCHW out) to float32
      rounding.

    Raises:
      UserError: missing / misshaped / extra keys (another model family), an unsupported config
        (norm_type, activation_fn, attention_bias, norm_elementwise_affine), num_heads unknown, or
        per-block timestep/label embedder copies that differ (named by key).
    """
    state, config = load_state_dict(src)
    for field, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                        ("attention_bias", True), ("norm_elementwise_affine", False)):
        check(config.get(field, want) == want, f"config.{field}", config.get(field), f"must be {want!r}")
    r = StateDictReader(state, FAMILY)
    proj = r.get("pos_embed.proj.weight")
    d, c_in, p = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 0
    while r.has(f"transformer_blocks.{depth}.norm1.linear.weight"):
        depth += 1
    check(depth > 0, "state dict", "no transformer_blocks.0.norm1.linear.weight", f"not a {FAMILY}")
    emb0 = "transformer_blocks.0.norm1.emb."
    table = r.get(emb0 + "class_embedder.embedding_table.weight")
    num_classes = config.get("num_embeds_ada_norm", table.shape[0] - 1)
    num_heads = overrides.pop("num_heads", config.get("num_attention_heads"))
    check(num_heads is not None, "num_heads", None, "must be given when src has no config.json")
    check(d % num_heads == 0, "num_heads", num_heads, f"must divide the checkpoint's width {d}")
    sample_size = config.get("sample_size")
    kw = dict(patch_size=p, in_channels=c_in, hidden_size=d, depth=depth, num_heads=num_heads,
              mlp_ratio=r.get("transformer_blocks.0.ff.net.0.proj.weight").shape[0] / d,
              num_classes=num_classes, class_dropout_prob=0.1 if table.shape[0] > num_classes else 0.0,
              out_channels=r.get("proj_out_2.weight").shape[0] // (p * p), time_freq_shift=1.0,
              mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
              pos_embed_base_size=sample_size // p if sample_size else None)
    module = DiT(**{**kw, **overrides})
    k = d // num_heads

    def heads_in(prefix):  # (D, D) -> DenseGeneral (D, N, K)
        lin = r.linear(prefix)
        return {"kernel": lin["kernel"].reshape(d, num_heads, k), "bias": lin["bias"].reshape(num_heads, k)}

    shared = [f"timestep_embedder.linear_{j}.{w}" for j in (1, 2) for w in ("weight", "bias")]
    shared.append("class_embedder.embedding_table.weight")
    blocks = []
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for name in shared if i > 0 else ():  # diffusers copies the embedders into every block
            v0 = r.get(emb0 + name)
            if not np.array_equal(r.get(b + "norm1.emb." + name, v0.shape), v0):
                raise UserError(f"state dict key {b + 'norm1.emb.' + name!r}: differs from block 0's copy; "
                                "DiT shares one timestep/label embedder across blocks")
        blocks.append({
            "adaLN_modulation": r.linear(b + "norm1.linear"),
            "attn": {"to_q": heads_in(b + "attn1.to_q"), "to_k": heads_in(b + "attn1.to_k"),
                     "to_v": heads_in(b + "attn1.to_v"),
                     "to_out": {"kernel": r.get(b + "attn1.to_out.0.weight", (d, d)).T.reshape(num_heads, k, d),
                                "bias": r.get(b + "attn1.to_out.0.bias")}},
            "mlp": {"fc1": r.linear(b + "ff.net.0.proj"), "fc2": r.linear(b + "ff.net.2")},
        })
    params = {
        "x_embedder": {"proj": r.conv("pos_embed.proj")},
        "t_embedder": {"linear_1": r.linear(emb0 + "timestep_embedder.linear_1"),
                       "linear_2": r.linear(emb0 + "timestep_embedder.linear_2")},
        "y_embedder": {"embedding": table},
        "final_layer": {"adaLN_modulation": r.linear("proj_out_1"), "linear": r.linear("proj_out_2")},
    }
    if module.scan:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    else:
        params.update({f"blocks_{i}": blk for i, blk in enumerate(blocks)})
    r.finish()
    check(module.out_dim == kw["out_channels"] and module.patch_size == p and module.hidden_size == d,
          "overrides", overrides, "must not change the checkpoint's shapes")
    return module, params
