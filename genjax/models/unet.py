"""DDPM / ADM U-Net: the diffusers `UNet2DModel`, channels-last, in Flax Linen (blocks: `unet_blocks.py`).

    x (B, H, W, C_in), t (B,) [, y (B,)] [, text (B, S, Dc), text_mask (B, S)]
        -> eps / v / x0 prediction (B, H, W, C_out)

    temb = MLP(sinusoid(t)) [+ class_embedding(y)] [+ Dense(masked_mean(text))]   (B, 4 * C0)
    h = conv_in(x);  skips = [h]
    for each level i: layers_per_block x (ResnetBlock [+ SpatialAttention]) [+ Downsample],
                      every output pushed to skips
    mid: ResnetBlock, SpatialAttention, ResnetBlock
    for each level i (reversed): (layers_per_block + 1) x (concat(h, skips.pop()) -> ResnetBlock
                      [+ SpatialAttention]) [+ Upsample]
    out = conv_out(silu(group_norm(h)))

With `context_dim` set, every SpatialAttention is followed by a cross-attention to the
text tokens (`conv.SpatialCrossAttention`) and the pooled text joins the time embedding; both
are zero-initialised, so a fresh text U-Net computes exactly the U-Net without text.

Sources: Ho et al. 2020 (DDPM) Appendix B (the Wide-ResNet / PixelCNN++ U-Net, attention at
16x16); Dhariwal & Nichol 2021 (ADM) Sec. 3 (scale-shift norm "AdaGN", multi-head attention,
class embedding). Structure, parameter names and numbers match diffusers 0.42 `UNet2DModel` with
`time_embedding_type="positional"`, `act_fn="silu"`, conv down/up-sampling (checked to <= 1e-4 in
tests/models/test_unet.py), so `load_diffusers` reads checkpoints such as google/ddpm-cifar10-32.
Text conditioning: cross-attention as LDM (Rombach et al. 2022, Sec. 3.3, eq. 3; its
SpatialTransformer / diffusers `UNet2DConditionModel`), pooled text added to the time embedding
as GLIDE (Nichol et al. 2022, Sec. 2.3: the text's final token embedding "in place of a class
embedding") and SDXL (Podell et al. 2023, Sec. 2.1: pooled text embedding added to the timestep
embedding); a learned null text for classifier-free guidance (Ho & Salimans 2022, Sec. 3.2).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import UserError, check
from genjax.io.weights import StateDictReader, load_state_dict
from genjax.models import conv
from genjax.models.layers import TimestepEmbedder
from genjax.models.unet_blocks import DownBlock, MidBlock, TextEmbedding, UpBlock
from genjax.parallel.axes import EMBED

Dtype = Any

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


class UNet(nn.Module):
    """DDPM / ADM U-Net with diffusers `UNet2DModel`'s hyper-parameters (same names and defaults).

    Attributes:
      sample_size: training resolution (int or (H, W)); informational, any valid size runs.
      in_channels, out_channels: C_in, C_out.
      center_input_sample: map x from [0, 1] to [-1, 1] first (x -> 2x - 1).
      flip_sin_to_cos, freq_shift: timestep sinusoid layout (`layers.timestep_embedding`);
        DDPM checkpoints use (False, 1), diffusers' default is (True, 0).
      down_block_types / up_block_types: per level, "DownBlock2D" | "AttnDownBlock2D" and
        "UpBlock2D" | "AttnUpBlock2D" (up blocks listed from the lowest resolution up).
      block_out_channels: channels per level (C0 * channel multipliers).
      layers_per_block: residual blocks per encoder level (decoder levels get one more).
      mid_block: build the middle ResnetBlock-Attention-ResnetBlock (diffusers `mid_block_type`
        "UNetMidBlock2D" vs None); add_attention: its attention layer.
      mid_block_scale_factor: the mid block's output_scale_factor.
      downsample_padding: 1 (symmetric) or 0 (bottom/right, TF "SAME" as in the DDPM checkpoints).
      dropout: residual-block dropout (train=True only).
      attention_head_dim: K per head; None means one head over all channels (DDPM).
      norm_num_groups, norm_eps: GroupNorm groups and epsilon everywhere.
      attn_norm_num_groups: groups of the mid attention's GroupNorm; None means norm_num_groups
        with "default" time scale-shift and no norm with "scale_shift" (as diffusers).
      resnet_time_scale_shift: "default" (add temb) or "scale_shift" (ADM AdaGN).
      class_embed_type / num_class_embeds: None + an int -> learned class table `(num_class_embeds,
        E)`; "timestep" -> sinusoid + MLP of the label. None + None: unconditional.
      time_embedding_dim: E; None means 4 * block_out_channels[0].
      context_dim: Dc, the width of the text tokens; None (default) means no text
        conditioning, and then the parameters and numbers are exactly diffusers' UNet2DModel's.
        When set, every attention layer (AttnDownBlock2D / AttnUpBlock2D / the mid attention) is
        followed by `conv.SpatialCrossAttention` to the text tokens (`cross_attentions_{j}`), and
        `TextEmbedding` ("text_embedding") adds the pooled text to temb; both zero-initialised.
      text_dropout_prob: probability, with `train=True`, of replacing an example's text by the
        learned null text (classifier-free guidance training; SD and PixArt use 0.1).
      remat: rematerialise each block in the backward pass (less memory, same numbers).
      attention_impl: the implementation of every attention layer (self- and cross-attention),
        see `attention.dot_product_attention`.
      dtype, param_dtype: compute and storage dtypes; GroupNorm, softmax and the timestep
        sinusoid compute in float32.

    Call: `(x (B, H, W, C_in) float, t (B,) or () int/float timesteps (e.g. in [0, 1000)),
    y (B,) int class labels in [0, num_class_embeds) or None, *, text (B, S, Dc) float or None,
    text_mask (B, S) bool (True = real token, False = padding; padding never influences the
    output) or None, force_drop_ids (B,) or () bool or None, train=False) -> (B, H, W, C_out)`
    in `dtype`. text and text_mask are required when context_dim is set. Where
    force_drop_ids is True the example's text is replaced by the null text (the unconditional
    branch of classifier-free guidance: pass `force_drop_ids=jnp.zeros((B,), bool)` with the
    text and `null_cond={"force_drop_ids": True}` to `genjax.diffusion.guidance.cfg_denoiser`);
    with `train` and text_dropout_prob > 0 each example's text is also dropped with that
    probability. Dropout (residual and text) needs the "dropout" rng when `train`.

    Raises:
      UserError (at trace time, before compiling): an unknown block type, time scale-shift or
        class_embed_type; lists of different lengths; x not 4-D, C != in_channels, H or W not
        divisible by 2 ** (levels - 1); t not of shape () or (B,); y missing, given to an
        unconditional model or not of shape (B,); channels not divisible by the group counts or
        attention_head_dim; context_dim < 1 or set without any attention layer,
        text_dropout_prob outside [0, 1]; text / text_mask / force_drop_ids given without
        context_dim, text missing with it, text not (B, S, context_dim),
        text_mask not (B, S), force_drop_ids not () or (B,).
    """
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block: bool = True
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    dropout: float = 0.0
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    time_embedding_dim: int | None = None
    context_dim: int | None = None
    text_dropout_prob: float = 0.0
    remat: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        n = len(self.block_out_channels)
        check(len(self.down_block_types) == n, "down_block_types", self.down_block_types,
              f"needs one entry per block_out_channels ({n})")
        check(len(self.up_block_types) == n, "up_block_types", self.up_block_types,
              f"needs one entry per block_out_channels ({n})")
        for name in self.down_block_types:
            check(name in DOWN_BLOCK_TYPES, "down_block_types", name, f"must be one of {DOWN_BLOCK_TYPES}")
        for name in self.up_block_types:
            check(name in UP_BLOCK_TYPES, "up_block_types", name, f"must be one of {UP_BLOCK_TYPES}")
        check(self.resnet_time_scale_shift in ("default", "scale_shift"), "resnet_time_scale_shift",
              self.resnet_time_scale_shift, 'must be "default" or "scale_shift"')
        check(self.class_embed_type in (None, "timestep"), "class_embed_type",
              self.class_embed_type, 'must be None (with num_class_embeds) or "timestep"')
        check(self.layers_per_block >= 1, "layers_per_block", self.layers_per_block, "must be >= 1")
        check(0.0 <= self.text_dropout_prob <= 1.0, "text_dropout_prob", self.text_dropout_prob, "must be in [0, 1]")
        if self.context_dim is not None:
            check(isinstance(self.context_dim, int) and self.context_dim >= 1,
                  "context_dim", self.context_dim, "must be None or an int >= 1")
            has_attention = (any(k.startswith("Attn") for k in self.down_block_types + self.up_block_types)
                             or (self.mid_block and self.add_attention))
            check(has_attention, "context_dim", self.context_dim,
                  "needs at least one attention layer (an Attn*Block2D or the mid attention)")

    def _check_text(self, text, text_mask, force_drop_ids, b: int) -> None:
        if self.context_dim is None:
            given = [k for k, v in (("text", text), ("text_mask", text_mask),
                                    ("force_drop_ids", force_drop_ids)) if v is not None]
            check(not given, given[0] if given else "text", "given",
                  "needs a UNet built with context_dim")
            return
        check(text is not None, "text", None, f"(B, S, {self.context_dim}) text tokens are "
              f"required (context_dim={self.context_dim})")
        shape = tuple(jnp.shape(text))
        check(len(shape) == 3 and shape[0] == b and shape[2] == self.context_dim, "text.shape", shape,
              f"must be (B, S, context_dim) = ({b}, S, {self.context_dim})")
        check(text_mask is not None, "text_mask", None,
              "must be given with text (True = real token, False = padding)")
        check(tuple(jnp.shape(text_mask)) == shape[:2], "text_mask.shape", tuple(jnp.shape(text_mask)),
              f"must be (B, S) = {shape[:2]}")
        check(force_drop_ids is None or jnp.shape(force_drop_ids) in ((), (b,)), "force_drop_ids.shape",
              None if force_drop_ids is None else jnp.shape(force_drop_ids), f"must be () or (B,) = ({b},)")

    @property
    def conditional(self) -> bool:
        """Whether the model takes class labels `y`."""
        return self.class_embed_type is not None or self.num_class_embeds is not None

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None, *,
                 text: jnp.ndarray | None = None, text_mask: jnp.ndarray | None = None,
                 force_drop_ids: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
        self._check_config()
        levels = len(self.block_out_channels)
        factor = 2 ** (levels - 1)
        check(x.ndim == 4 and x.shape[-1] == self.in_channels, "x.shape", x.shape,
              f"must be (B, H, W, {self.in_channels}) (in_channels={self.in_channels})")
        check(x.shape[1] % factor == 0 and x.shape[2] % factor == 0, "x.shape", x.shape,
              f"H and W must be divisible by 2**(levels-1) = {factor}")
        b = x.shape[0]
        t = jnp.asarray(t)
        check(t.shape in ((), (b,)), "t.shape", t.shape, f"must be () or (B,) = ({b},)")
        if self.conditional:
            check(y is not None and jnp.shape(y) == (b,), "y", None if y is None else jnp.shape(y),
                  f"class labels of shape (B,) = ({b},) are required (num_class_embeds="
                  f"{self.num_class_embeds}, class_embed_type={self.class_embed_type!r})")
        else:
            check(y is None, "y", jnp.shape(y), "must be None for an unconditional model "
                  "(set num_class_embeds or class_embed_type)")
        self._check_text(text, text_mask, force_drop_ids, b)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c0 = self.block_out_channels[0]
        temb_dim = self.time_embedding_dim or 4 * c0
        sinusoid = dict(frequency_embedding_size=c0, flip_sin_to_cos=self.flip_sin_to_cos,
                        downscale_freq_shift=self.freq_shift, **kw)
        temb = TimestepEmbedder(temb_dim, name="time_embedding", **sinusoid)(jnp.broadcast_to(t, (b,)))
        if self.class_embed_type == "timestep":
            temb = temb + TimestepEmbedder(temb_dim, name="class_embedding", **sinusoid)(y)
        elif self.num_class_embeds is not None:
            table = nn.Embed(self.num_class_embeds, temb_dim, name="class_embedding",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(1.0), (None, EMBED)), **kw)
            temb = temb + table(y)
        if self.context_dim is not None:
            drop = None
            if force_drop_ids is not None:
                drop = jnp.broadcast_to(jnp.asarray(force_drop_ids, bool), (b,))
            if train and self.text_dropout_prob > 0:
                sampled = jax.random.bernoulli(self.make_rng("dropout"), self.text_dropout_prob, (b,))
                drop = sampled if drop is None else drop | sampled
            text, text_mask, pooled = TextEmbedding(temb_dim, name="text_embedding", **kw)(text, text_mask, drop)
            temb = temb + pooled

        block = dict(attention_head_dim=self.attention_head_dim, num_groups=self.norm_num_groups,
                     eps=self.norm_eps, time_embedding_norm=self.resnet_time_scale_shift,
                     dropout=self.dropout, temb_channels=temb_dim, attention_impl=self.attention_impl,
                     cross_attention=self.context_dim is not None, **kw)
        # `train` is positional and static (argnum 3 / 4 counting self) so remat can branch on it.
        down_cls, mid_cls, up_cls = DownBlock, MidBlock, UpBlock
        if self.remat:
            down_cls = nn.remat(DownBlock, static_argnums=(3,))
            mid_cls = nn.remat(MidBlock, static_argnums=(3,))
            up_cls = nn.remat(UpBlock, static_argnums=(4,))

        if self.center_input_sample:
            x = 2 * x - 1.0
        h = conv.conv2d(c0, 3, padding=1, name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
            h, out = down_cls(ch, self.layers_per_block, kind == "AttnDownBlock2D",
                              add_downsample=i < levels - 1,
                              downsample_padding=self.downsample_padding,
                              name=f"down_blocks_{i}", **block)(h, temb, train, text, text_mask)
            skips.extend(out)

        if self.mid_block:
            attn_groups = self.attn_norm_num_groups
            if attn_groups is None and self.resnet_time_scale_shift == "default":
                attn_groups = self.norm_num_groups
            h = mid_cls(self.add_attention, attn_num_groups=attn_groups,
                        output_scale_factor=self.mid_block_scale_factor, name="mid_block",
                        **block)(h, temb, train, text, text_mask)

        n_up = self.layers_per_block + 1
        for i, (kind, ch) in enumerate(zip(self.up_block_types, self.block_out_channels[::-1])):
            level_skips, skips = tuple(skips[-n_up:]), skips[:-n_up]
            h = up_cls(ch, n_up, kind == "AttnUpBlock2D", add_upsample=i < levels - 1,
                       name=f"up_blocks_{i}", **block)(h, level_skips, temb, train, text, text_mask)

        h = nn.silu(conv.group_norm(h, num_groups=self.norm_num_groups, eps=self.norm_eps,
                                    name="conv_norm_out", **kw))
        return conv.conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)


# google/ddpm-cifar10-32 (unet/config.json): Ho et al. 2020's CIFAR-10 model, 35.7M params.
VARIANTS: dict[str, dict[str, Any]] = {
    "ddpm-cifar10-32": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
}


def Model(*, variant: str | None = None, **kw) -> UNet:
    """A `UNet` from `VARIANTS[variant]`, with `kw` overriding its fields (or alone).

    Raises:
      UserError: unknown variant or an unknown keyword.
    """
    check(variant is None or variant in VARIANTS, "variant", variant,
          f"must be one of {sorted(VARIANTS)}")
    fields = set(UNet.__dataclass_fields__) - {"parent", "name"}
    for k in kw:
        check(k in fields, "model." + k, kw[k], "is not a UNet argument")
    return UNet(**{**(VARIANTS[variant] if variant else {}), **kw})


# --- diffusers UNet2DModel checkpoints ----------------------------------------------------------

# diffusers config keys that need a value we support (or only matter for other settings).
_FIXED_CONFIG = {"time_embedding_type": ("positional",), "act_fn": ("silu", "swish"),
                 "downsample_type": ("conv",), "upsample_type": ("conv",),
                 "mid_block_type": ("UNetMidBlock2D", None)}
_IGNORED_CONFIG = {"num_train_timesteps"}  # only used by time_embedding_type="learned"
_RENAMED_CONFIG = {"cross_attention_dim": "context_dim"}  # diffusers key -> UNet field


def _kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    check(config.get("_class_name", "UNet2DModel") == "UNet2DModel", "config._class_name",
          config.get("_class_name"), "must be UNet2DModel")
    fields = set(UNet.__dataclass_fields__) - {"parent", "name", "remat", "dtype", "param_dtype"}
    kw = {}
    for key, value in config.items():
        if key.startswith("_") or key in _IGNORED_CONFIG:
            continue
        key = _RENAMED_CONFIG.get(key, key)
        if key in _FIXED_CONFIG:
            check(value in _FIXED_CONFIG[key], f"config.{key}", value,
                  f"genjax's UNet supports only {_FIXED_CONFIG[key]}")
            if key == "mid_block_type":
                kw["mid_block"] = value is not None
        elif key in fields:
            kw[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise UserError(f"config.{key}={value!r}: not a UNet2DModel setting genjax supports")
    return kw


def _kwargs_from_state(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Architecture read off a bare state dict's keys and shapes (GroupNorm groups, eps, head
    dim, sinusoid layout and padding cannot be: they come from overrides or the defaults)."""
    def has(k):
        return k in state

    levels = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("down_blocks.")), default=-1)
    check(levels > 0 and has("conv_in.weight"), "state dict", f"{len(state)} keys",
          "has no conv_in / down_blocks.* (is this a UNet2DModel checkpoint?)")
    layers = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")})
    kw = dict(
        in_channels=state["conv_in.weight"].shape[1],
        out_channels=state["conv_out.weight"].shape[0],
        block_out_channels=tuple(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                 for i in range(levels)),
        layers_per_block=layers,
        down_block_types=tuple("AttnDownBlock2D" if has(f"down_blocks.{i}.attentions.0.to_q.weight")
                               or has(f"down_blocks.{i}.attentions.0.query.weight") else "DownBlock2D"
                               for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if has(f"up_blocks.{i}.attentions.0.to_q.weight")
                             or has(f"up_blocks.{i}.attentions.0.query.weight") else "UpBlock2D"
                             for i in range(levels)),
        time_embedding_dim=state["time_embedding.linear_1.weight"].shape[0],
        mid_block=has("mid_block.resnets.0.conv1.weight"),
        add_attention=any(k.startswith("mid_block.attentions.") for k in state),
    )
    proj = state["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0]
    kw["resnet_time_scale_shift"] = "scale_shift" if proj == 2 * kw["block_out_channels"][0] else "default"
    if has("class_embedding.weight"):
        kw["num_class_embeds"] = state["class_embedding.weight"].shape[0]
    elif has("class_embedding.linear_1.weight"):
        kw["class_embed_type"] = "timestep"
    return kw


def _dummy_inputs(module: UNet):
    side = 2 ** (len(module.block_out_channels) - 1)
    x = jax.ShapeDtypeStruct((1, side, side, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if module.conditional else None
    return x, t, y


def load_diffusers(src: Any, **overrides) -> tuple[UNet, dict[str, Any]]:
    """Read a diffusers `UNet2DModel` checkpoint into `(UNet, params)` with numpy only.

    Args:
      src: a diffusers model folder (`diffusion_pytorch_model.safetensors` + `config.json`,
        e.g. the `unet/` folder of google/ddpm-cifar10-32), a `.safetensors` file, or a dict of
        key -> array (torch tensors allowed, for tests).
      **overrides: `UNet` fields that replace the config's (e.g. `dtype=jnp.bfloat16`). Without
        a config.json, the architecture is read from the state dict's keys and shapes, and
        norm_num_groups, norm_eps, attention_head_dim, attn_norm_num_groups, flip_sin_to_cos,
        freq_shift, downsample_padding and mid_block_scale_factor must be passed here unless
        diffusers' defaults apply.

    Returns:
      `(module, params)`: params are plain float32 numpy arrays in the tree of
      `nn.unbox(module.init(...))["params"]`; use `module.apply({"params": params}, x, t, y)`.
      Deprecated attention names (query/key/value/proj_attn) are accepted.

    Raises:
      UserError: unreadable `src`; a config setting genjax does not support; a missing or
        unexpected key or a wrong shape (a checkpoint of another family or config).
    """
    state, config = load_state_dict(src)
    module = Model(**{**(_kwargs_from_config(config) if config else _kwargs_from_state(state)),
                      **overrides})
    module._check_config()
    check(module.context_dim is None, "context_dim", module.context_dim,
          "UNet2DModel checkpoints have no text cross-attention; load without it")
    r = StateDictReader(state, family="UNet2DModel")
    levels, n = len(module.block_out_channels), module.layers_per_block

    def level(prefix, attention, layers, sampler, sampler_name):
        p = {}
        for j in range(layers):
            p[f"resnets_{j}"] = conv.load_resnet(r, f"{prefix}.resnets.{j}")
            if attention:
                p[f"attentions_{j}"] = conv.load_attention(r, f"{prefix}.attentions.{j}", module.attention_head_dim)
        if sampler:
            p[sampler_name.replace(".", "_")] = (conv.load_downsample if "down" in sampler_name
                                                 else conv.load_upsample)(r, f"{prefix}.{sampler_name}")
        return p

    def mlp(prefix):
        return {"linear_1": r.linear(f"{prefix}.linear_1"), "linear_2": r.linear(f"{prefix}.linear_2")}

    params: dict[str, Any] = {"conv_in": r.conv("conv_in"), "time_embedding": mlp("time_embedding")}
    if module.class_embed_type == "timestep":
        params["class_embedding"] = mlp("class_embedding")
    elif module.num_class_embeds is not None:
        params["class_embedding"] = {"embedding": r.get("class_embedding.weight")}
    for i, kind in enumerate(module.down_block_types):
        params[f"down_blocks_{i}"] = level(f"down_blocks.{i}", kind == "AttnDownBlock2D", n,
                                           i < levels - 1, "downsamplers.0")
    if module.mid_block:
        mid = {"resnets_0": conv.load_resnet(r, "mid_block.resnets.0"),
               "resnets_1": conv.load_resnet(r, "mid_block.resnets.1")}
        if module.add_attention:
            mid["attentions_0"] = conv.load_attention(r, "mid_block.attentions.0", module.attention_head_dim)
        params["mid_block"] = mid
    for i, kind in enumerate(module.up_block_types):
        params[f"up_blocks_{i}"] = level(f"up_blocks.{i}", kind == "AttnUpBlock2D", n + 1,
                                         i < levels - 1, "upsamplers.0")
    params["conv_norm_out"] = r.norm("conv_norm_out")
    params["conv_out"] = r.conv("conv_out")
    r.finish()

    want = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *_dummy_inputs(module)))["params"]
    want_shapes = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(want)}
    got_shapes = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}
    for path in sorted(set(want_shapes) | set(got_shapes)):
        check(want_shapes.get(path) == got_shapes.get(path), f"params{path}", got_shapes.get(path),
              f"UNet2DModel with this config needs shape {want_shapes.get(path)} "
              "(wrong checkpoint or config overrides?)")
    return module, params
