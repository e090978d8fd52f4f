"""CLIP: text, image and video towers with projections to a shared embedding (CLIP, SigLIP).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision";
Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training". Dimension letters are defined
in `genjax.models.layers`; E is the shared embedding width.

  ids (B, L) int32 + mask (B, L) bool -> TextTransformer  -> (hidden (B, L, D), pooled at EOT (B, D))
  images (B, H, W, C) in [-1, 1]      -> VisionTransformer -> (hidden (B, 1+L, D), pooled CLS (B, D))
  videos (B, T, H, W, C) in [-1, 1]   -> VideoTransformer  -> (hidden (B, L, D), mean-pooled (B, D))
  CLIP: towers -> bias-free projections to E -> L2 normalise; `contrastive.clip_loss` / `siglip_loss`.

The towers are in `genjax.models.clip_towers`; the text and image towers match transformers'
`CLIPTextModel` / `CLIPVisionModel` exactly (`load_transformers` reads their safetensors with
numpy; tested to 1e-4). The losses and zero-shot evaluation are in `genjax.models.contrastive`.
Tokenizers are in `genjax.models.tokenizer`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.io.weights import StateDictReader, load_state_dict
from genjax.models.clip_towers import TextTransformer, VideoTransformer, VisionTransformer, pair
from genjax.models.layers import logical
from genjax.parallel.axes import EMBED, MLP

Dtype = Any
Array = jax.Array


# --------------------------------------------------------------------------- CLIP


def _normalize(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nn.Module):
    """CLIP / SigLIP: text, image and (optionally) video towers with bias-free projections to E.

    Attributes:
      embed_dim: E. loss: "clip" (softmax InfoNCE; `logit_scale` init log(1/0.07)) or "siglip"
        (sigmoid; `logit_scale` init log(10), `logit_bias` init -10).
      Text: vocab_size, context_length, text_width, text_layers, text_heads, eos_token_id
        (see `TextTransformer`). Image: image_size, patch_size, in_channels, vision_width,
        vision_layers, vision_heads. Video (None = no video tower): video_patch_size (pt, ph, pw),
        video_max_grid, video_attention, video_layers, video_temporal_layers; width and heads
        are vision_width / vision_heads. MLPs are 4x wide. activation: `clip_towers.ACTIVATIONS` key.
      scan, remat, attention_impl: of every tower (as `dit.DiT`).

    Methods (each returns L2-normalised float32 `(B, E)`):
      encode_text(ids (B, L) int, mask (B, L) bool | None), encode_image(images (B, H, W, C) in
      [-1, 1]), encode_video(videos (B, T, H, W, C) in [-1, 1]).
      __call__(ids=None, mask=None, images=None, videos=None) -> dict with "text" / "image" /
      "video" for the inputs given, plus the raw (log) "logit_scale" and, for SigLIP,
      "logit_bias" — the arguments of `contrastive.clip_loss` / `siglip_loss`. Init with every input to
      create every parameter.

    Raises:
      UserError: unknown loss; a video input without a video tower; the towers' input errors.

    Source: Radford et al. 2021 (fig. 3 pseudo-code); Zhai et al. 2023 (SigLIP, sec. 3);
      parameter count of "ViT-B/32" equals transformers `CLIPModel` (tested).
    """

    embed_dim: int = 512
    loss: str = "clip"
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    eos_token_id: int | None = None
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (32, 32)
    in_channels: int = 3
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    video_patch_size: tuple[int, int, int] | None = None
    video_max_grid: tuple[int, int, int] = (8, 14, 14)
    video_attention: str = "joint"
    video_layers: int = 12
    video_temporal_layers: int = 4
    activation: str = "quick_gelu"
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        check(self.loss in ("clip", "siglip"), "loss", self.loss, "must be 'clip' or 'siglip'")
        kw = dict(scan=self.scan, remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.text = TextTransformer(self.vocab_size, self.context_length, self.text_width, self.text_layers,
                                    self.text_heads, 4 * self.text_width, self.activation,
                                    eos_token_id=self.eos_token_id, **kw)
        self.vision = VisionTransformer(self.image_size, self.patch_size, self.in_channels, self.vision_width,
                                        self.vision_layers, self.vision_heads, 4 * self.vision_width,
                                        self.activation, **kw)
        self.video = None if self.video_patch_size is None else VideoTransformer(
            tuple(self.video_patch_size), self.in_channels, tuple(self.video_max_grid), self.vision_width,
            self.video_layers, self.vision_heads, 4 * self.vision_width, self.video_attention,
            self.video_temporal_layers, **kw)

        def proj(name):
            init = logical(nn.initializers.lecun_normal(), (EMBED, MLP))
            return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=init, name=name)

        self.text_projection, self.visual_projection = proj("text_projection"), proj("visual_projection")
        self.video_projection = None if self.video is None else proj("video_projection")
        siglip = self.loss == "siglip"
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0 if siglip else 1 / 0.07)),
                                      (), jnp.float32)
        self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (), jnp.float32) if siglip else None

    def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
        return _normalize(self.text_projection(self.text(ids, mask)[1]))

    def encode_image(self, images: Array) -> Array:
        return _normalize(self.visual_projection(self.vision(images)[1]))

    def encode_video(self, videos: Array) -> Array:
        check(self.video is not None, "video_patch_size", None, "this CLIP has no video tower (set video_patch_size)")
        return _normalize(self.video_projection(self.video(videos)[1]))

    def __call__(self, ids: Array | None = None, mask: Array | None = None, images: Array | None = None,
                 videos: Array | None = None) -> dict[str, Array]:
        out = {"logit_scale": self.logit_scale}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if ids is not None:
            out["text"] = self.encode_text(ids, mask)
        if images is not None:
            out["image"] = self.encode_image(images)
        if videos is not None:
            out["video"] = self.encode_video(videos)
        return out


# --------------------------------------------------------------------------- transformers weights

_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}


def _tower_kwargs(r: StateDictReader, prefix: str, cfg: Mapping[str, Any], text: bool) -> dict[str, Any]:
    """A tower's hyper-parameters from its transformers config, or from the tensor shapes."""
    layers = 0
    while r.has(f"{prefix}encoder.layers.{layers}.layer_norm1.weight"):
        layers += 1
    fc1 = r.get(f"{prefix}encoder.layers.0.mlp.fc1.weight") if layers else np.zeros((0, 0))
    if text:
        vocab, width = r.get(prefix + "embeddings.token_embedding.weight").shape
        kw = dict(vocab_size=cfg.get("vocab_size", vocab), width=cfg.get("hidden_size", width),
                  context_length=cfg.get("max_position_embeddings",
                                         r.get(prefix + "embeddings.position_embedding.weight").shape[0]))
        eos = cfg.get("eos_token_id")
        kw["eos_token_id"] = None if eos in (None, 2) else int(eos)  # 2: transformers' legacy argmax pooling
    else:
        width, channels, ph, pw = r.get(prefix + "embeddings.patch_embedding.weight").shape
        side = math.isqrt(r.get(prefix + "embeddings.position_embedding.weight").shape[0] - 1)
        image, patch = cfg.get("image_size", side * ph), cfg.get("patch_size", ph)
        kw = dict(image_size=pair(image), patch_size=pair(patch), in_channels=cfg.get("num_channels", channels),
                  width=cfg.get("hidden_size", width))
    act = cfg.get("hidden_act", "quick_gelu")
    check(act in _HF_ACTIVATIONS, "hidden_act", act, f"must be one of {list(_HF_ACTIVATIONS)}")
    kw.update(num_layers=cfg.get("num_hidden_layers", layers), mlp_dim=cfg.get("intermediate_size", fc1.shape[0]),
              activation=_HF_ACTIVATIONS[act], layer_norm_eps=cfg.get("layer_norm_eps", 1e-5))
    if "num_attention_heads" in cfg:
        kw["num_heads"] = cfg["num_attention_heads"]
    return kw


def _tower_params(r: StateDictReader, prefix: str, kw: Mapping[str, Any], text: bool, scan: bool) -> dict:
    """transformers `CLIPTextModel` / `CLIPVisionModel` tensors -> our tower's params."""
    d, n, m = kw["width"], kw["num_heads"], kw["mlp_dim"]
    k = d // n

    def dense(key, shape_in, shape_out):  # torch Linear (out, in) -> DenseGeneral kernel (*in, *out)
        w = r.get(key + ".weight", (math.prod(shape_out), math.prod(shape_in)))
        b = r.get(key + ".bias", (math.prod(shape_out),))
        return {"kernel": w.T.reshape(*shape_in, *shape_out), "bias": b.reshape(shape_out)}

    def norm(key):
        return {"norm": {"scale": r.get(key + ".weight", (d,)), "bias": r.get(key + ".bias", (d,))}}

    blocks = []
    for i in range(kw["num_layers"]):
        p = f"{prefix}encoder.layers.{i}."
        attn = {name: dense(p + f"self_attn.{src}_proj", (d,), (n, k)) for name, src in
                (("to_q", "q"), ("to_k", "k"), ("to_v", "v"))}
        attn["to_out"] = dense(p + "self_attn.out_proj", (n, k), (d,))
        blocks.append({"layer_norm1": norm(p + "layer_norm1"), "self_attn": attn, "layer_norm2": norm(p + "layer_norm2"),
                       "mlp": {"fc1": dense(p + "mlp.fc1", (d,), (m,)), "fc2": dense(p + "mlp.fc2", (m,), (d,))}})
    if scan:
        stack = {"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)} if blocks else {}
    else:
        stack = {f"layers_{i}": b for i, b in enumerate(blocks)}
    e = prefix + "embeddings."
    if r.has(e + "position_ids"):  # a buffer older checkpoints saved
        r.get(e + "position_ids")
    if text:
        return {"token_embedding": {"embedding": r.get(e + "token_embedding.weight", (kw["vocab_size"], d))},
                "position_embedding": r.get(e + "position_embedding.weight", (kw["context_length"], d)),
                "transformer": stack, "final_layer_norm": norm(prefix + "final_layer_norm")}
    (hh, ww), (ph, pw) = kw["image_size"], kw["patch_size"]
    conv = r.get(e + "patch_embedding.weight", (d, kw["in_channels"], ph, pw))
    return {"patch_embed": {"proj": {"kernel": conv.transpose(2, 3, 1, 0)}},
            "class_embedding": r.get(e + "class_embedding", (d,)),
            "position_embedding": r.get(e + "position_embedding.weight", ((hh // ph) * (ww // pw) + 1, d)),
            "pre_layernorm": norm(prefix + "pre_layrnorm"), "transformer": stack,
            "post_layernorm": norm(prefix + "post_layernorm")}


def _check_heads(kw, field):
    check(kw.get(field) is not None, field, None,
          "must be given (a bare state dict does not record the number of attention heads)")
    width = kw["width"] if "width" in kw else kw[field.replace("heads", "width")]
    check(width % kw[field] == 0, field, kw[field], f"must divide the width {width}")


def load_transformers(src: Any, **overrides) -> tuple[nn.Module, dict]:
    """Load transformers CLIP weights: `CLIPTextModel`, `CLIPVisionModel` or a whole `CLIPModel`.

    Args:
      src: a folder with `model.safetensors` (+ `config.json`), a `.safetensors` file, or an
        in-memory state dict (`{key: array}`; then the number of heads must be in overrides:
        `num_heads` for a tower, `text_heads` and `vision_heads` for a CLIPModel). Keys may
        carry the `text_model.` / `vision_model.` prefix of saved towers.
      overrides: module kwargs that replace the config's (e.g. `dtype`, `scan=True`).

    Returns:
      `(module, params)`: a `TextTransformer`, `VisionTransformer` or `CLIP` and its params
      (plain float32 numpy arrays, the tree of `nn.unbox(module.init(...))["params"]`). The
      transformers config's `eos_token_id == 2` (old OpenAI configs) maps to argmax pooling, as
      transformers does.

    Raises:
      UserError: unreadable src; missing / extra keys or wrong shapes (another model family or
        config); an activation we do not have; heads missing or not dividing the width; a
        CLIPModel whose MLPs are not 4x wide or whose towers use different activations.

    Source: transformers 5.x `modeling_clip.py` key names; outputs equal `CLIPTextModel` /
      `CLIPVisionModel` / `CLIPModel.get_*_features` (tested to 1e-4 with random weights).
    """
    state, cfg = load_state_dict(src)
    r = StateDictReader(state, "transformers CLIP")
    scan = bool(overrides.get("scan", False))
    if r.has("text_model.embeddings.token_embedding.weight") and r.has("vision_model.embeddings.patch_embedding.weight"):
        text_kw = _tower_kwargs(r, "text_model.", cfg.get("text_config", {}), True)
        vis_kw = _tower_kwargs(r, "vision_model.", cfg.get("vision_config", {}), False)
        embed = r.get("text_projection.weight").shape[0]
        kw = {**dict(embed_dim=cfg.get("projection_dim", embed), vocab_size=text_kw["vocab_size"],
                  context_length=text_kw["context_length"], text_width=text_kw["width"],
                  text_layers=text_kw["num_layers"], text_heads=text_kw.get("num_heads"),
                  eos_token_id=text_kw["eos_token_id"], image_size=vis_kw["image_size"],
                  patch_size=vis_kw["patch_size"], in_channels=vis_kw["in_channels"],
                  vision_width=vis_kw["width"], vision_layers=vis_kw["num_layers"],
                  vision_heads=vis_kw.get("num_heads"), activation=text_kw["activation"]), **overrides}
        for tower, prefix in ((text_kw, "text"), (vis_kw, "vision")):
            check(tower["mlp_dim"] == 4 * tower["width"], f"{prefix}_config.intermediate_size", tower["mlp_dim"],
                  f"must be 4 x hidden_size={tower['width']} for genjax CLIP")
            check(tower["layer_norm_eps"] == 1e-5, f"{prefix}_config.layer_norm_eps", tower["layer_norm_eps"],
                  "must be 1e-5 for genjax CLIP")
            tower["num_heads"] = kw[f"{prefix}_heads"]
            _check_heads(kw, f"{prefix}_heads")
        check(vis_kw["activation"] == text_kw["activation"], "vision_config.hidden_act", vis_kw["activation"],
              f"must equal the text tower's {text_kw['activation']!r} for genjax CLIP")
        e = kw["embed_dim"]
        params = {"text": _tower_params(r, "text_model.", text_kw, True, scan),
                  "vision": _tower_params(r, "vision_model.", vis_kw, False, scan),
                  "text_projection": {"kernel": r.get("text_projection.weight", (e, kw["text_width"])).T},
                  "visual_projection": {"kernel": r.get("visual_projection.weight", (e, kw["vision_width"])).T},
                  "logit_scale": np.asarray(r.get("logit_scale", ()), np.float32)}
        module: nn.Module = CLIP(**kw)
    else:
        state = {k.removeprefix("text_model.").removeprefix("vision_model."): v for k, v in state.items()}
        r = StateDictReader(state, "transformers CLIPTextModel / CLIPVisionModel")
        text = r.has("embeddings.token_embedding.weight")
        check(text or r.has("embeddings.patch_embedding.weight"), "src", "state dict", "holds no transformers "
              "CLIPTextModel / CLIPVisionModel / CLIPModel embeddings (wrong model family?)")
        kw = {**_tower_kwargs(r, "", cfg, text), **overrides}
        _check_heads(kw, "num_heads")
        params = _tower_params(r, "", kw, text, scan)
        module = (TextTransformer if text else VisionTransformer)(**kw)
    r.finish()
    return module, params


# --------------------------------------------------------------------------- variants


def _openai(width, layers, heads, patch, image=224, embed=512, text_width=512, text_heads=8):
    return dict(embed_dim=embed, vocab_size=49408, context_length=77, text_width=text_width, text_layers=12,
                text_heads=text_heads, image_size=(image, image), patch_size=(patch, patch), in_channels=3,
                vision_width=width, vision_layers=layers, vision_heads=heads, activation="quick_gelu")


VARIANTS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP (Radford et al. 2021, table 20); "ViT-B/32" is 151,277,313 parameters.
    "ViT-B/32": _openai(768, 12, 12, 32),
    "ViT-B/16": _openai(768, 12, 12, 16),
    "ViT-L/14": _openai(1024, 24, 16, 14, embed=768, text_width=768, text_heads=12),
    # Moving MNIST / MNIST: byte tokenizer (vocab 259, EOT = largest id), 28x28 digits in 7x7
    # patches, 8-frame 32x32 videos in 2x8x8 tubelets (a 4x4x4 grid).
    "tiny": dict(embed_dim=64, vocab_size=259, context_length=32, text_width=64, text_layers=2, text_heads=2,
                 image_size=(28, 28), patch_size=(7, 7), in_channels=1, vision_width=64, vision_layers=2,
                 vision_heads=2, video_patch_size=(2, 8, 8), video_max_grid=(4, 4, 4), video_layers=2,
                 video_temporal_layers=1, activation="gelu_tanh"),
}


def Model(*, variant: str | None = None, **kw) -> CLIP:
    """A `CLIP` of a named variant ("ViT-B/32", "ViT-B/16", "ViT-L/14", "tiny"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return CLIP(**{**(VARIANTS[variant] if variant else {}), **kw})
