"""MAE / VideoMAE: a ViT / ViViT encoder on the visible patches only, a light decoder, and a
per-patch normalised pixel loss on the masked patches.

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377) sec. 3;
Tong et al. 2022, "VideoMAE" (arXiv:2203.12602) sec. 3 (tubelets, tube masking at 90 %). The
facts follow the official code (facebookresearch/mae `models_mae.py`: `random_masking`,
`forward_encoder`, `forward_decoder`, `forward_loss`). Dimension letters as `genjax.models.layers`.

  x (B, T, H, W, C) in [-1, 1] (an image (B, H, W, C) is a 1-frame video, patch_size (1, ph, pw))
  -> patchify_3d -> patches (B, L, P), L = nt*nh*nw tubelets, P = pt*ph*pw*C
  random_masking: keep K = num_visible(L, mask_ratio) tubelets per example (one random shuffle
    per example, MAE); masking="tube" (VideoMAE sec. 3.3) draws the mask over the nh*nw
    locations and masks the same locations in every tubelet frame, so a masked tube is gone
    from the whole clip (K = nt * num_visible(nh*nw, mask_ratio))
  encoder: TubeletEmbed + fixed sin-cos positions (`FactorisedPosEmbed`, kind "sincos") of the K
    visible tubelets -> `ViViTEncoder` (joint attention) -> (B, K, D); the masked patches are
    never read (they are gathered away before the embedding)
  decoder: LayerNorm -> Dense(D -> D_dec) -> append L - K mask tokens -> unshuffle (ids_restore)
    -> + sin-cos positions of all L tubelets -> `ViViTEncoder` -> LayerNorm -> Dense -> (B, L, P)
  loss: mean over the masked tubelets of the per-patch MSE against the (normalised) pixels

The submodules `tubelet_embed` and `encoder` have the names and shapes of `ViViTClassifier`'s
(attention "joint", pos_embed "sincos"), so an MAE encoder initialises a ViViT classifier
(`genjax.tasks.vivit`, task.pretrained). No CLS token: the features are mean-pooled, as MAE's
`global_pool` fine-tuning and ViViT's mean pooling.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models.layers import LayerNorm, logical, xavier_uniform, zeros
from genjax.models.spacetime import FactorisedPosEmbed, TubeletEmbed, grid_positions, patchify_3d, unpatchify_3d
from genjax.models.vivit import ViViTEncoder
from genjax.parallel.axes import EMBED

Dtype = Any
Array = jax.Array
Grid = tuple[int, int, int]

MASKINGS = ("random", "tube")


def num_visible(length: int, mask_ratio: float) -> int:
    """Tubelets kept of `length`: `int(length * (1 - mask_ratio))` as MAE's `random_masking`
    (a tiny epsilon so that e.g. 10 * (1 - 0.7) = 2.9999999999999996 keeps 3), at least 1.

    Raises:
      UserError: mask_ratio outside [0, 1).
    """
    check(0 <= mask_ratio < 1, "mask_ratio", mask_ratio, "must be in [0, 1)")
    return max(1, int(length * (1 - mask_ratio) + 1e-6))


def random_masking(key: Array, batch: int, length: int, mask_ratio: float, *,
                   frames: int = 1) -> tuple[Array, Array, Array]:
    """Per-example random masking by shuffling, as MAE's `random_masking`.

    Each row argsorts its own uniform noise (small = keep); the first K = `num_visible(length,
    mask_ratio)` indices of the shuffle are kept. With `frames` = nt > 1, tube masking (VideoMAE):
    the L = nt * S tokens are in (t, s) order and token t * S + s takes location s's noise, so
    the stable sort keeps whole tubes, K = nt * num_visible(S, mask_ratio).

    Returns:
      ids_keep `(B, K)` int32: the visible tubelets, in shuffle order.
      mask `(B, L)` float32: 1 = masked (removed), 0 = visible, in the original order.
      ids_restore `(B, L)` int32: the inverse permutation of the shuffle, so
        `take_along_axis(concat([visible, masked]), ids_restore)` is back in the original order.

    Raises:
      UserError: mask_ratio outside [0, 1); length not a multiple of frames.
    """
    check(frames >= 1 and length % frames == 0, "frames", frames, f"must divide the token count {length}")
    spatial = length // frames
    keep = frames * num_visible(spatial, mask_ratio)
    noise = jnp.tile(jax.random.uniform(key, (batch, spatial)), (1, frames))
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    mask = jnp.take_along_axis((jnp.arange(length) >= keep).astype(jnp.float32)[None].repeat(batch, 0),
                               ids_restore, axis=1)
    return ids_shuffle[:, :keep], mask, ids_restore


def patch_stats(patches: Array) -> tuple[Array, Array]:
    """Per-patch mean and std `sqrt(var + 1e-6)` over the last axis, `(B, L, 1)` each, float32.
    The variance is the unbiased one (ddof 1), as torch's `Tensor.var` in MAE's `forward_loss`."""
    p = patches.astype(jnp.float32)
    return p.mean(-1, keepdims=True), jnp.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)


def mae_loss(pred: Array, patches: Array, mask: Array, *, norm_pix_loss: bool = True) -> Array:
    """MAE's loss (sec. 3 "Reconstruction target"; `forward_loss`): float32 scalar.

    `mean_l [mask_l * mean_p (pred_lp - target_lp)^2] / sum mask` over the batch, with target the
    patch pixels, or with `norm_pix_loss` each patch normalised by its own mean and
    `patch_stats` std. pred, patches `(B, L, P)`; mask `(B, L)`, 1 = masked.
    """
    target = patches.astype(jnp.float32)
    if norm_pix_loss:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


def paste_visible(pred: Array, patches: Array, mask: Array, *, norm_pix_loss: bool = True) -> Array:
    """The reconstruction MAE shows: predicted pixels on masked tubelets, the input on visible
    ones, `(B, L, P)` float32. With `norm_pix_loss` the prediction is mapped back to pixels with
    each masked patch's true mean and std (so the shown reconstruction borrows two numbers per
    masked patch from the input, as MAE's visualisations of norm-pix models do)."""
    pred = pred.astype(jnp.float32)
    if norm_pix_loss:
        mean, std = patch_stats(patches)
        pred = pred * std + mean
    return jnp.where(mask[..., None] > 0, pred, patches.astype(jnp.float32))


def as_video(x: Array) -> Array:
    """An image `(B, H, W, C)` as a 1-frame video `(B, 1, H, W, C)`; a video unchanged.

    Raises:
      UserError: rank not 4 or 5.
    """
    check(x.ndim in (4, 5), "x.shape", tuple(x.shape), "must be images (B, H, W, C) or videos (B, T, H, W, C)")
    return x[:, None] if x.ndim == 4 else x


class MAE(nn.Module):
    """Masked autoencoder on images or videos.

    Attributes:
      patch_size: tubelet (pt, ph, pw); (1, ph, pw) for images. in_channels: C.
      hidden_size, num_layers, num_heads, mlp_dim: the encoder (`ViViTEncoder`, joint attention).
      decoder_hidden_size, decoder_layers, decoder_heads, decoder_mlp_dim: the decoder (MAE: narrower
        and shallower than the encoder, e.g. 512 wide, 8 deep for ViT-L).
      mask_ratio: share of tubelets masked in [0, 1): MAE 0.75, VideoMAE 0.9.
      masking: "random" (MAE, any tubelet) or "tube" (VideoMAE: the same locations in every frame).
      norm_pix_loss: targets normalised per patch (MAE's best setting, Table 1c).
      scan, remat, attention_impl, dtype, param_dtype: as `ViViTEncoder`.

    Call `(x, rng)`: x images `(B, H, W, C)` or videos `(B, T, H, W, C)` in [-1, 1], rng the
    masking key -> `(pred (B, L, P) float32, mask (B, L) float32 1 = masked, patches (B, L, P))`;
    `mae_loss(pred, patches, mask)` is the training loss.
    Methods: `features(x)` the encoder on all tubelets, mean-pooled `(B, D)` float32 (the linear
    probe's input); `reconstruct(x, rng)` the input with masked tubelets replaced by predictions
    and the masked input (masked tubelets 0, mid-grey), both shaped as x.

    Raises:
      UserError: x not 4-D / 5-D, not divisible by the tubelet, wrong channels; bad mask_ratio.

    Source: MAE sec. 3 and `models_mae.MaskedAutoencoderViT`; VideoMAE sec. 3.
    """

    patch_size: Grid = (1, 4, 4)
    in_channels: int = 1
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    mlp_dim: int = 512
    decoder_hidden_size: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 256
    mask_ratio: float = 0.75
    masking: str = "random"
    norm_pix_loss: bool = True
    scan: bool = False
    remat: str = "none"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, dd = self.hidden_size, self.decoder_hidden_size
        pt, ph, pw = self.patch_size
        self.tubelet_embed = TubeletEmbed(d, tuple(self.patch_size), self.in_channels, **kw)
        self.pos_embed = FactorisedPosEmbed(d, 1, 1, 1, kind="sincos", **kw)  # fixed, no params
        self.encoder = ViViTEncoder(self.num_layers, self.num_heads, self.mlp_dim, "joint", 0, self.scan,
                                    self.remat, attention_impl=self.attention_impl, **kw)
        self.encoder_norm = LayerNorm(epsilon=1e-6, **kw)
        dense = dict(kernel_init=logical(xavier_uniform, (EMBED, None)), bias_init=zeros((None,)), **kw)
        self.decoder_embed = nn.Dense(dd, **dense)
        self.mask_token = self.param("mask_token", logical(nn.initializers.normal(0.02), (None, None, EMBED)),
                                     (1, 1, dd), self.param_dtype)
        self.decoder_pos_embed = FactorisedPosEmbed(dd, 1, 1, 1, kind="sincos", **kw)
        self.decoder = ViViTEncoder(self.decoder_layers, self.decoder_heads, self.decoder_mlp_dim, "joint", 0,
                                    self.scan, self.remat, attention_impl=self.attention_impl, **kw)
        self.decoder_norm = LayerNorm(epsilon=1e-6, **kw)
        self.decoder_pred = nn.Dense(pt * ph * pw * self.in_channels, **dense)

    def patches(self, x: Array) -> tuple[Array, Grid]:
        """`(patches (B, L, P) float32, grid)` of images or videos (see `as_video`)."""
        v = as_video(x)
        check(v.shape[-1] == self.in_channels, "x.shape[-1]", v.shape[-1], f"must equal in_channels={self.in_channels}")
        tokens, grid = patchify_3d(v.astype(jnp.float32), tuple(self.patch_size))
        return tokens, grid

    def encode(self, x: Array, ids_keep: Array | None = None) -> Array:
        """The encoder's blocks on the tubelets `ids_keep (B, K)` of x (all when None): `(B, K, D)`
        before the final LayerNorm. Masked tubelets are dropped before anything reads them."""
        patches, grid = self.patches(x)
        positions = jnp.asarray(grid_positions(grid))[None].repeat(patches.shape[0], 0)
        if ids_keep is not None:
            patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
            positions = jnp.take_along_axis(positions, ids_keep[..., None], axis=1)
        h = self.tubelet_embed(patches)[0] + self.pos_embed(positions)
        return self.encoder(h)

    def features(self, x: Array) -> Array:
        """Mean over all tubelets of the encoder output (no masking): `(B, D)` float32."""
        return self.encode(x).astype(jnp.float32).mean(axis=1)

    def decode(self, latent: Array, ids_restore: Array, grid: Grid) -> Array:
        """Encoder output of the visible tubelets `(B, K, D)` (in shuffle order) -> predicted
        patches `(B, L, P)` float32 for all tubelets in the original order."""
        b, keep, _ = latent.shape
        length = math.prod(grid)
        y = self.decoder_embed(self.encoder_norm(latent))
        mask_tokens = jnp.broadcast_to(jnp.asarray(self.mask_token, y.dtype), (b, length - keep, y.shape[-1]))
        y = jnp.take_along_axis(jnp.concatenate([y, mask_tokens], axis=1), ids_restore[..., None], axis=1)
        positions = jnp.asarray(grid_positions(grid))[None].repeat(b, 0)
        y = self.decoder(y + self.decoder_pos_embed(positions))
        return self.decoder_pred(self.decoder_norm(y)).astype(jnp.float32)

    def __call__(self, x: Array, rng: Array) -> tuple[Array, Array, Array]:
        check(self.masking in MASKINGS, "masking", self.masking, f"must be one of {MASKINGS}")
        patches, grid = self.patches(x)
        ids_keep, mask, ids_restore = random_masking(rng, patches.shape[0], patches.shape[1], self.mask_ratio,
                                                     frames=grid[0] if self.masking == "tube" else 1)
        pred = self.decode(self.encode(x, ids_keep), ids_restore, grid)
        return pred, mask, patches

    def reconstruct(self, x: Array, rng: Array) -> tuple[Array, Array]:
        """`(reconstruction, masked input)`, each shaped as x, float32: `paste_visible` of the
        prediction, and x with its masked tubelets set to 0."""
        pred, mask, patches = self(x, rng)
        grid = tuple(s // p for s, p in zip(as_video(x).shape[1:4], self.patch_size))
        shown = paste_visible(pred, patches, mask, norm_pix_loss=self.norm_pix_loss)
        masked = patches * (1 - mask[..., None])
        out = [unpatchify_3d(t, grid, tuple(self.patch_size)) for t in (shown, masked)]
        return tuple(o[:, 0] if x.ndim == 4 else o for o in out)


VARIANTS: dict[str, dict[str, Any]] = {
    # Images: 28 x 28 digits in 4 x 4 patches (49 tokens, 12 visible at 0.75). The decoder is
    # half as wide and a third as deep as the encoder (MAE ViT-L: 1024 x 24 blocks, decoder 512 x 8).
    "mnist": dict(patch_size=(1, 4, 4), in_channels=1, hidden_size=128, num_layers=6, num_heads=4, mlp_dim=512,
                  decoder_hidden_size=64, decoder_layers=2, decoder_heads=4, decoder_mlp_dim=256, mask_ratio=0.75),
    # Videos: 8 frames of 32 x 32 Moving MNIST in 2 x 4 x 4 tubelets (4 x 8 x 8 = 256 tokens), tube
    # masking at VideoMAE's 0.9: 6 of 64 locations visible in every frame, 24 tokens.
    "moving_mnist": dict(patch_size=(2, 4, 4), in_channels=1, hidden_size=128, num_layers=4, num_heads=4,
                         mlp_dim=512, decoder_hidden_size=64, decoder_layers=2, decoder_heads=4,
                         decoder_mlp_dim=256, mask_ratio=0.9, masking="tube"),
    # A few thousand parameters, for smoke tests.
    "tiny": dict(patch_size=(1, 4, 4), in_channels=1, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                 decoder_hidden_size=16, decoder_layers=1, decoder_heads=2, decoder_mlp_dim=32, mask_ratio=0.75),
}


def Model(*, variant: str | None = None, **kw: Any) -> MAE:
    """An `MAE` of a named variant ("mnist", "moving_mnist", "tiny"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return MAE(**{**(VARIANTS[variant] if variant else {}), **kw})
