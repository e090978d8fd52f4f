"""Wan 2.1 text-to-video diffusion transformer (`WanTransformer`), with diffusers weight loading.

Source: Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models"
(arXiv:2503.20314, sec. 3.2 and Fig. 5-6; github.com/Wan-Video/Wan2.1 `wan/modules/model.py`);
numbers checked against diffusers 0.42 `WanTransformer3DModel` (tests/models/test_wan.py).
Dimension letters are defined in `genjax.models.layers`; Dt is the text-encoder width (umT5-XXL:
4096), F the sinusoid width `freq_dim`.

  x (B, T, H, W, C) latents -> TubeletEmbed, Conv3d patch (1, 2, 2) -> tokens (B, L, D), D = N * K
  positions (t, h, w) -> rope_angles: 3D RoPE, K/2 frequencies split over (t, h, w)  (B, L, K/2)
  t (B,) -> sinusoid (F, cos first) -> time_embedder (Dense, SiLU, Dense) -> temb    (B, D)
         -> time_proj(SiLU(temb)) -> 6 modulation rows, shared by all blocks          (B, 6, D)
  text (B, S, Dt) -> text_embedder (Dense, GELU-tanh, Dense) -> context               (B, S, D)
  num_layers x WanBlock, with its own `scale_shift_table (6, D)` added to the 6 rows:
     x += gate * attn1(LN(x) * (1 + scale) + shift)    self-attention, RMS-norm q / k, RoPE
     x += attn2(LN_affine(x), context)                 cross-attention, RMS-norm q / k
     x += c_gate * ffn(LN(x) * (1 + c_scale) + c_shift) GELU-tanh MLP
  LN(x) * (1 + scale) + shift, (shift, scale) = scale_shift_table (2, D) + temb -> proj_out
     -> (B, L, pt*ph*pw*C_out) -> unpatchify -> (B, T, H, W, C_out)

Text-to-video only: the image-to-video parts of the checkpoint family (`image_embedder`, the
`add_k_proj` / `add_v_proj` image keys of cross-attention, `image_dim` / `added_kv_proj_dim`) and
Wan 2.2's per-token timesteps are not implemented; `load_diffusers` refuses such checkpoints.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check
from genjax.io.weights import StateDictReader, check_overrides, check_params_match, load_state_dict
from genjax.models.adaln import adaln_norm
from genjax.models.attention import Attention
from genjax.models.layers import REMAT_POLICIES, LayerNorm, Mlp, TimestepEmbedder, logical, stack_blocks
from genjax.models.spacetime import TubeletEmbed, check_video, grid_positions, rope_angles, unpatchify_3d
from genjax.parallel.axes import BATCH, EMBED, LENGTH, MLP

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

QK_NORM = "rms_norm_across_heads"
# scale_shift_tables init normal(0, 1 / sqrt(D)), as diffusers' `torch.randn(1, n, D) / D**0.5`.


class WanBlock(nn.Module):
    """One Wan transformer block: `(B, L, D)` -> `(B, L, D)`.

    Submodules (diffusers `WanTransformerBlock` names): `norm1` / `norm3` (non-affine LayerNorm),
    `attn1` (self-attention), `norm2` (affine LayerNorm when `cross_attn_norm`), `attn2`
    (cross-attention), `ffn` (Mlp, GELU-tanh); param `scale_shift_table (6, D)` float32 rows
    (shift, scale, gate of attention; shift, scale, gate of the FFN) added to the shared
    time rows. Norms, modulation and residual sums in float32, as diffusers.

    Call positional (for `nn.scan`): `x (B, L, D), context (B, S, D), context_mask (B, S) | None,
    t_mod (B, 6, D) float32, rope (B, L, K/2)`.
    """

    num_heads: int
    head_dim: int
    ffn_dim: int
    cross_attn_norm: bool = True
    eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, context_mask, t_mod, rope):
        d = self.num_heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(head_dim=self.head_dim, qk_norm=QK_NORM, qk_norm_eps=self.eps,
                       attention_impl=self.attention_impl, **kw)
        table = self.param("scale_shift_table", logical(nn.initializers.normal(d ** -0.5), (None, EMBED)), (6, d),
                           self.param_dtype)
        mods = jnp.asarray(table, jnp.float32)[None] + t_mod  # (B, 6, D) float32
        shift, scale, gate, c_shift, c_scale, c_gate = (mods[:, i:i + 1] for i in range(6))  # (B, 1, D)
        h = adaln_norm(x, shift, scale, eps=self.eps, dtype=self.dtype, name="norm1")
        h = Attention(self.num_heads, **attn_kw, name="attn1")(h, rope=rope)  # (B, L, D)
        x = (x.astype(jnp.float32) + h * gate).astype(self.dtype)
        h = LayerNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm2")(x) \
            if self.cross_attn_norm else x
        x = x + Attention(self.num_heads, **attn_kw, name="attn2")(h, context, context_mask=context_mask)
        h = adaln_norm(x, c_shift, c_scale, eps=self.eps, dtype=self.dtype, name="norm3")
        h = Mlp(self.ffn_dim, **kw, name="ffn")(h)
        x = (x.astype(jnp.float32) + h.astype(jnp.float32) * c_gate).astype(self.dtype)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, None))


class WanTransformer(nn.Module):
    """Wan 2.1 text-to-video transformer on channels-last video latents (diffusers `WanTransformer3DModel`).

    Attributes (diffusers config names): patch_size (pt, ph, pw); num_attention_heads N;
      attention_head_dim K (D = N * K; even, >= 6, for the 3D RoPE); in_channels / out_channels C /
      C_out; text_dim Dt; freq_dim F; ffn_dim; num_layers; cross_attn_norm (affine LayerNorm
      before cross-attention); qk_norm (only "rms_norm_across_heads"); eps (all norms);
      rope_max_seq_len (largest tubelet grid side, the size of diffusers' RoPE table);
      rope_theta; scan / remat / attention_impl as `video_dit.VideoDiT` (scanned params `blocks`
      with a leading `layers` axis); dtype / param_dtype (norms, modulations, sinusoids, RoPE
      and the timestep MLP in float32).

    Params: `patch_embedding` (TubeletEmbed), `time_embedder` (`linear_1`, `linear_2`),
      `time_proj`, `text_embedder` (`fc1`, `fc2`), `blocks_{i}` / `blocks` (`WanBlock`),
      `proj_out`, `scale_shift_table (2, D)`; logical axis names as the other DiTs.
    """

    patch_size: Grid = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = QK_NORM
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, timestep: Array, encoder_hidden_states: Array,
                 encoder_attention_mask: Array | None = None) -> Array:
        """Flow-matching velocity for noisy video latents.

        Args:
          x: `(B, T, H, W, C)` float latents; T, H, W divisible by patch_size.
          timestep: `(B,)` or `()` float / int, in [0, 1000] (Wan's flow time t * 1000).
          encoder_hidden_states: `(B, S, text_dim)` umT5 hidden states (Wan pads each prompt with
            zeros to S = 512 and attends to the padding too).
          encoder_attention_mask: optional `(B, S)` bool, False = text token ignored; None attends
            to all S tokens, as diffusers and Wan.

        Returns:
          `(B, T, H, W, out_channels)` float32 (diffusers' output moved to channels-last).

        Raises:
          UserError (before compiling): x not 5-D, wrong channels, T/H/W not divisible by the
            patch, a grid side beyond rope_max_seq_len; timestep / text / mask of wrong shape;
            unsupported qk_norm, head dim, remat.
        """
        n, k = self.num_attention_heads, self.attention_head_dim
        d = n * k
        check(self.qk_norm == QK_NORM, "qk_norm", self.qk_norm, f"must be {QK_NORM!r} (Wan 2.1)")
        check(k % 2 == 0 and k >= 6, "attention_head_dim", k, "must be even and >= 6 for 3D RoPE")
        check(self.remat in REMAT_POLICIES, "remat", self.remat, f"must be one of {sorted(REMAT_POLICIES)}")
        grid = check_video(x, tuple(self.patch_size), self.in_channels)
        check(max(grid) <= self.rope_max_seq_len, "tubelet grid", grid,
              f"sides must be <= rope_max_seq_len={self.rope_max_seq_len}")
        b = x.shape[0]
        timestep = jnp.asarray(timestep)
        check(timestep.shape in ((), (b,)), "timestep.shape", timestep.shape, f"must be () or (B,)=({b},)")
        text = encoder_hidden_states
        check(text.ndim == 3 and text.shape[0] == b and text.shape[-1] == self.text_dim,
              "encoder_hidden_states.shape", tuple(text.shape), f"must be (B={b}, S, text_dim={self.text_dim})")
        if encoder_attention_mask is not None:
            check(tuple(encoder_attention_mask.shape) == text.shape[:2], "encoder_attention_mask.shape",
                  tuple(encoder_attention_mask.shape), f"must be (B, S)={tuple(text.shape[:2])}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        h, _ = TubeletEmbed(d, tuple(self.patch_size), self.in_channels, **kw, name="patch_embedding")(x)  # (B, L, D)
        positions = jnp.broadcast_to(jnp.asarray(grid_positions(grid))[None], (b, h.shape[1], 3))
        rope = rope_angles(positions, k, self.rope_theta)  # (B, L, K/2) float32
        temb = TimestepEmbedder(d, self.freq_dim, param_dtype=self.param_dtype, name="time_embedder")(
            jnp.broadcast_to(timestep, (b,)))  # (B, D) float32
        t_mod = nn.Dense(6 * d, **kw, kernel_init=logical(nn.initializers.lecun_normal(), (EMBED, MLP)),
                         bias_init=logical(nn.initializers.zeros, (MLP,)), name="time_proj")(nn.silu(temb))
        t_mod = t_mod.astype(jnp.float32).reshape(b, 6, d)  # (B, 6, D)
        context = Mlp(d, d, **kw, name="text_embedder")(text.astype(self.dtype))  # (B, S, D)
        block_kw = dict(num_heads=n, head_dim=k, ffn_dim=self.ffn_dim, cross_attn_norm=self.cross_attn_norm,
                        eps=self.eps, attention_impl=self.attention_impl, **kw)
        h = stack_blocks(WanBlock, block_kw, self.num_layers, "blocks", h, context, encoder_attention_mask, t_mod,
                         rope, scan=self.scan, remat=self.remat)  # (B, L, D)
        table = self.param("scale_shift_table", logical(nn.initializers.normal(d ** -0.5), (None, EMBED)), (2, d),
                           self.param_dtype)
        mods = jnp.asarray(table, jnp.float32)[None] + temb[:, None]  # (B, 2, D)
        h = adaln_norm(h, mods[:, :1], mods[:, 1:], eps=self.eps, dtype=self.dtype, name="norm_out")
        out = nn.Dense(int(np.prod(self.patch_size)) * self.out_channels, **kw,
                       kernel_init=logical(nn.initializers.lecun_normal(), (EMBED, None)),
                       bias_init=logical(nn.initializers.zeros, (None,)), name="proj_out")(h)  # (B, L, P_out)
        return unpatchify_3d(out.astype(jnp.float32), grid, tuple(self.patch_size))


# Wan 2.1 T2V checkpoints (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer/config.json; the same
# numbers as Wan's own wan/configs/wan_t2v_{1_3B,14B}.py: dim 1536 / 5120).
_T2V = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, cross_attn_norm=True, qk_norm=QK_NORM, eps=1e-6, rope_max_seq_len=1024)
VARIANTS: dict[str, dict[str, Any]] = {
    "T2V-1.3B": dict(_T2V, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "T2V-14B": dict(_T2V, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


def Model(*, variant: str | None = None, **kw) -> WanTransformer:
    """A `WanTransformer` of a named variant ("T2V-1.3B", "T2V-14B"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return WanTransformer(**{**(VARIANTS[variant] if variant else {}), **kw})


# --------------------------------------------------------------------------- diffusers weights

FAMILY = "WanTransformer3DModel"


def _config_kwargs(r: StateDictReader, config: dict, overrides: dict) -> dict:
    """WanTransformer kwargs from a diffusers config, or from the tensor shapes without one."""
    for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        check(config.get(field) is None, f"config.{field}", config.get(field),
              "must be null: image-to-video Wan checkpoints are not supported (text-to-video only)")
    if r.has("condition_embedder.image_embedder.norm1.weight") or r.has("blocks.0.attn2.add_k_proj.weight"):
        raise UserError(f"state dict: has image-to-video keys (image_embedder / add_k_proj); only text-to-video "
                        f"{FAMILY} checkpoints are supported")
    check(config.get("qk_norm", QK_NORM) == QK_NORM, "config.qk_norm", config.get("qk_norm"), f"must be {QK_NORM!r}")
    conv = r.get("patch_embedding.weight")
    check(conv.ndim == 5, "patch_embedding.weight.shape", conv.shape, f"must be 5-D (Conv3d) in a {FAMILY}")
    d, c_in, patch = conv.shape[0], conv.shape[1], tuple(int(p) for p in conv.shape[2:])
    layers = 0
    while r.has(f"blocks.{layers}.scale_shift_table"):
        layers += 1
    heads = overrides.pop("num_attention_heads", config.get("num_attention_heads"))
    check(heads is not None, "num_attention_heads", None, "must be given when src has no config.json")
    check(d % heads == 0, "num_attention_heads", heads, f"must divide the checkpoint's width {d}")
    return dict(patch_size=patch, num_attention_heads=heads, attention_head_dim=d // heads, in_channels=c_in,
                out_channels=r.get("proj_out.weight").shape[0] // int(np.prod(patch)),
                text_dim=r.get("condition_embedder.text_embedder.linear_1.weight").shape[1],
                freq_dim=r.get("condition_embedder.time_embedder.linear_1.weight").shape[1],
                ffn_dim=r.get("blocks.0.ffn.net.0.proj.weight").shape[0], num_layers=layers,
                cross_attn_norm=r.has("blocks.0.norm2.weight"), eps=float(config.get("eps", 1e-6)),
                rope_max_seq_len=int(config.get("rope_max_seq_len", 1024)))


def load_diffusers(src: str | Mapping[str, Any], **overrides) -> tuple[WanTransformer, dict]:
    """Read a diffusers `WanTransformer3DModel` (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers `transformer/`).

    Args:
      src: model folder (config.json + `diffusion_pytorch_model.safetensors` or its sharded
        `.index.json` set), a `.safetensors` file, or a state dict `{key: array}`. Read with numpy
        (`genjax.io.weights.load_state_dict`), no torch; bf16 / fp16 tensors are upcast.
      **overrides: `WanTransformer` attributes (dtype, param_dtype, scan, remat, attention_impl;
        `num_attention_heads` is required when src has no config.json: the weights do not show it).

    Returns:
      (module, params): params of plain numpy arrays in `param_dtype`, the tree of
      `nn.unbox(module.init(...))["params"]` (stacked over blocks when scan=True); use
      `module.apply({"params": params}, x, t, text)`. Outputs equal `WanTransformer3DModel`'s
      (moved to channels-last) to float32 rounding (tested, tiny random config).

    Raises:
      UserError: missing folder / file / key, a tensor of another shape than the config needs,
        unexpected keys (another family), image-to-video checkpoints (image_dim / added_kv_proj_dim /
        pos_embed_seq_len set, or their keys), qk_norm other than "rms_norm_across_heads", an
        unknown override or one that changes the checkpoint's shapes, num_attention_heads unknown.
    """
    check_overrides(WanTransformer, overrides)
    state, config = load_state_dict(src)
    r = StateDictReader(state, FAMILY)
    module = WanTransformer(**{**_config_kwargs(r, config, overrides), **overrides})
    n, k = module.num_attention_heads, module.attention_head_dim
    d = n * k

    def attention(prefix, d_kv):
        def heads_in(name, d_in):
            w = r.get(f"{prefix}.{name}.weight", (d, d_in))
            return {"kernel": w.T.reshape(d_in, n, k), "bias": r.get(f"{prefix}.{name}.bias", (d,)).reshape(n, k)}

        return {"to_q": heads_in("to_q", d), "to_k": heads_in("to_k", d_kv), "to_v": heads_in("to_v", d_kv),
                "to_out": {"kernel": r.get(f"{prefix}.to_out.0.weight", (d, d)).T.reshape(n, k, d),
                           "bias": r.get(f"{prefix}.to_out.0.bias", (d,))},
                "norm_q": {"scale": r.get(f"{prefix}.norm_q.weight", (d,)).reshape(n, k)},
                "norm_k": {"scale": r.get(f"{prefix}.norm_k.weight", (d,)).reshape(n, k)}}

    blocks = []
    for i in range(module.num_layers):
        b = f"blocks.{i}."
        blk = {"scale_shift_table": r.get(b + "scale_shift_table", (1, 6, d))[0],
               "attn1": attention(b + "attn1", d), "attn2": attention(b + "attn2", d),
               "ffn": {"fc1": r.linear(b + "ffn.net.0.proj"), "fc2": r.linear(b + "ffn.net.2")}}
        if module.cross_attn_norm:
            blk["norm2"] = {"norm": r.norm(b + "norm2")}
        blocks.append(blk)
    ce = "condition_embedder."
    params = {
        "patch_embedding": r.conv("patch_embedding"),
        "time_embedder": {"linear_1": r.linear(ce + "time_embedder.linear_1"),
                          "linear_2": r.linear(ce + "time_embedder.linear_2")},
        "time_proj": r.linear(ce + "time_proj"),
        "text_embedder": {"fc1": r.linear(ce + "text_embedder.linear_1"), "fc2": r.linear(ce + "text_embedder.linear_2")},
        "proj_out": r.linear("proj_out"),
        "scale_shift_table": r.get("scale_shift_table", (1, 2, d))[0],
    }
    if module.scan:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    else:
        params.update({f"blocks_{i}": blk for i, blk in enumerate(blocks)})
    r.finish()
    x = np.zeros((1, *module.patch_size, module.in_channels), np.float32)
    check_params_match(module, params, x, np.zeros((1,), np.float32), np.zeros((1, 1, module.text_dim), np.float32),
                       family=FAMILY)
    return module, jax.tree.map(lambda a: np.asarray(a, module.param_dtype), params)
