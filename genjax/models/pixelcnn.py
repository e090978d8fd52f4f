"""Gated PixelCNN: an autoregressive model of binary images, one Bernoulli logit per pixel.

Source: van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves, Kavukcuoglu 2016, "Conditional
Image Generation with PixelCNN Decoders" (arXiv:1606.05328), Sec. 2.1-2.3 and Fig. 2; the masked
convolutions of type A / B are those of van den Oord, Kalchbrenner, Kavukcuoglu 2016, "Pixel
Recurrent Neural Networks" (arXiv:1601.06759), Sec. 3.4.

    p(x | y) = prod_i p(x_i | x_<i, y),  i in raster order (row by row, left to right)

Each gated layer l has a vertical stack (a k x k convolution seeing the rows at and above the
current one) and a horizontal stack (a 1 x k convolution seeing the current row up to the current
pixel: type "A", the centre excluded, in the first layer; type "B", centre included, after):

    v_pre = V_l * v                          (2p channels; mask "V": rows <= centre)
    h_pre = H_l * h + L_l(down_shift(v_pre)) (mask "A" / "B"; L_l a 1 x 1 conv, eq. of Fig. 2)
    v'    = tanh(v_pre_f + V_f y) * sigmoid(v_pre_g + V_g y)        (eq. 4 with the h term:
    g     = tanh(h_pre_f + V_f y) * sigmoid(h_pre_g + V_g y)         y a learned class embedding)
    h'    = h + O_l(g)   (no residual in layer 0, whose input is the image)
    skip += S_l(g)
    logits = C_2(relu(C_1(relu(skip))))      (the ReLU - 1x1 conv output layers of PixelRNN, Table 2)

The vertical stack sees its own row, so it reaches the horizontal stack only through the shift by
one row down: pixel (r, c) then depends on rows < r through the vertical stack and on (r, c' < c)
through the horizontal one, and on nothing else. Because the vertical kernel is k wide on each
side, the receptive field after L layers is the full rectangle of width 2W + 1 above the pixel,
W = first_kernel_size // 2 + (L - 1) (kernel_size // 2), plus W pixels to its left: no "blind
spot" up and to the right, which a stack of k x k type-B masks misses (Sec. 2.2).

Masked convolutions are computed on the mask's support only (`MaskedConv`): a k x k convolution
with SAME padding whose kernel is zero outside the mask equals the convolution with the support's
kernel and the padding the support implies (tests/models/test_pixelcnn.py checks this identity).

Shapes: images x (B, H, W, 1) float in {0, 1} (1 = ink); labels y (B,) int in [0, num_classes);
logits (B, H, W) float32, log p(x = 1) - log p(x = 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.models.conv import dense
from genjax.parallel.axes import CONV_IN, CONV_OUT

Dtype = Any
MASK_TYPES = ("A", "B", "V")


def mask_support(kernel_size: int, mask_type: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The rows and columns `((r0, r1), (c0, c1))` (inclusive, kernel coordinates, centre at
    kernel_size // 2) where a `kernel_size` x `kernel_size` causal mask is 1:

      "A": the centre row, columns left of the centre (PixelRNN's mask A on one row: the pixel itself
           excluded; the horizontal stack's first layer)
      "B": the centre row up to and including the centre (mask B; the later horizontal layers)
      "V": every column of the rows at and above the centre (the gated vertical stack, Fig. 2)

    Raises:
      UserError: kernel_size not an odd int >= 3, or mask_type not one of MASK_TYPES.
    """
    check(isinstance(kernel_size, int) and kernel_size >= 3 and kernel_size % 2 == 1, "kernel_size",
          kernel_size, "must be an odd integer >= 3")
    check(mask_type in MASK_TYPES, "mask_type", mask_type, f"must be one of {MASK_TYPES}")
    k = kernel_size // 2
    return {"A": ((k, k), (0, k - 1)), "B": ((k, k), (0, k)), "V": ((0, k), (0, 2 * k))}[mask_type]


class MaskedConv(nn.Module):
    """The `kernel_size` x `kernel_size` SAME convolution whose kernel is masked by `mask_type`
    (`mask_support`), stored and computed on the support only: kernel `(r1 - r0 + 1, c1 - c0 + 1,
    C_in, features)` (HWIO), bias `(features,)`; output (r, c) = bias + sum over the support of
    x[r + i - k, c + j - k] K[i - r0, j - c0] (k = kernel_size // 2, zeros outside the image), as
    an im2col matmul. `(B, H, W, C_in) -> (B, H, W, features)` in `dtype`."""

    features: int
    kernel_size: int
    mask_type: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        (r0, r1), (c0, c1) = mask_support(self.kernel_size, self.mask_type)
        k, rows, cols = self.kernel_size // 2, r1 - r0 + 1, c1 - c0 + 1
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.linear.default_kernel_init, (None, None, CONV_IN, CONV_OUT)),
            (rows, cols, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
                          (self.features,), self.param_dtype)
        # im2col: the taps' shifted copies side by side, one matmul (XLA:CPU's convolution
        # gradients are several times slower at these shapes)
        h, w = x.shape[1:3]
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (k - r0, max(r1 - k, 0)), (k - c0, max(c1 - k, 0)), (0, 0)))
        taps = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(rows) for j in range(cols)], axis=-1)
        out = taps @ kernel.reshape(-1, self.features).astype(self.dtype)
        return out + bias.astype(self.dtype)


def gate(x: jax.Array) -> jax.Array:
    """The gated activation `tanh(x_f) * sigmoid(x_g)` of `x (..., 2p)` split in halves -> (..., p)
    (eq. 2 of the paper)."""
    f, g = jnp.split(x, 2, axis=-1)
    return jnp.tanh(f) * jax.nn.sigmoid(g)


def down_shift(x: jax.Array) -> jax.Array:
    """`x (B, H, W, C)` moved one row down, a zero row on top: out[:, r] = x[:, r - 1]."""
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def receptive_width(first_kernel_size: int, kernel_size: int, num_layers: int) -> int:
    """W: after `num_layers` layers, pixel (r, c) sees the rows r - 1 - W .. r - 1 at columns
    c - W .. c + W and the pixels (r, c - W .. c - 1), and nothing else."""
    return first_kernel_size // 2 + (num_layers - 1) * (kernel_size // 2)


class GatedPixelCNN(nn.Module):
    """Class-conditional gated PixelCNN over binary images (module docstring for the equations).

    Attributes:
      channels: p, the width of both stacks (gates take 2p pre-activations).
      num_layers: gated layers L (>= 1).
      kernel_size, first_kernel_size: odd kernel sizes (>= 3) of layers 1.. and of layer 0.
      num_classes: classes of the h term (0: unconditional, labels ignored).
      in_channels: 1 (one Bernoulli per pixel).

    `__call__(x, y=None) -> logits (B, H, W)` float32; `vertical(x, y)` -> the down-shifted links
    of every layer, `horizontal(x, links, y)` -> logits: `__call__` is `horizontal(x, vertical(x,
    y), y)`, and since `horizontal` mixes only along rows it may be applied to one row
    `(B, 1, W, 1)` with that row of the links (the sampler does, `tasks.pixelcnn`).

    Raises:
      UserError: in_channels != 1, a bad kernel size, labels missing with num_classes > 0.
    """

    channels: int = 64
    num_layers: int = 8
    kernel_size: int = 3
    first_kernel_size: int = 7
    num_classes: int = 10
    in_channels: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        check(self.in_channels == 1, "model.in_channels", self.in_channels,
              "must be 1 (one Bernoulli logit per pixel of a binary image)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, sizes = self.channels, [self.first_kernel_size] + [self.kernel_size] * (self.num_layers - 1)
        self.v_convs = [MaskedConv(2 * p, k, "V", **kw) for k in sizes]
        self.h_convs = [MaskedConv(2 * p, k, "A" if i == 0 else "B", **kw) for i, k in enumerate(sizes)]
        self.links = [dense(2 * p, (CONV_IN, CONV_OUT), **kw) for _ in sizes]
        self.h_outs = [dense(p, (CONV_IN, CONV_OUT), **kw) for _ in sizes]
        self.skips = [dense(p, (CONV_IN, CONV_OUT), **kw) for _ in sizes]
        self.head = [dense(p, (CONV_IN, CONV_OUT), **kw), dense(1, (CONV_IN, CONV_OUT), **kw)]
        if self.num_classes:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, CONV_OUT))
            embed = lambda: nn.Embed(self.num_classes, 2 * p, embedding_init=init, **kw)  # noqa: E731
            self.v_embeds = [embed() for _ in sizes]
            self.h_embeds = [embed() for _ in sizes]

    def _condition(self, embeds, y, layer):
        if not self.num_classes:
            return 0.0
        check(y is not None, "labels", None, f"are required: the model is conditioned on {self.num_classes} classes")
        return embeds[layer](y)[:, None, None, :]

    def vertical(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """The links L_l(down_shift(V_l * v)) of every layer: a tuple of L arrays (B, H, W, 2p);
        row r of each depends only on x's rows < r."""
        v, links = x.astype(self.dtype), []
        for i in range(self.num_layers):
            pre = self.v_convs[i](v)
            links.append(self.links[i](down_shift(pre)))
            if i + 1 < self.num_layers:  # the last layer's vertical output feeds nothing
                v = gate(pre + self._condition(getattr(self, "v_embeds", None), y, i))
        return tuple(links)

    def horizontal(self, x: jax.Array, links, y: jax.Array | None = None) -> jax.Array:
        """Logits (B, H', W) float32 of `x (B, H', W, 1)` given `links` (the `vertical` output for
        these rows). Mixes along rows only."""
        h, skip = x.astype(self.dtype), 0.0
        for i in range(self.num_layers):
            g = gate(self.h_convs[i](h) + links[i] + self._condition(getattr(self, "h_embeds", None), y, i))
            skip = skip + self.skips[i](g)
            out = self.h_outs[i](g)
            h = out if i == 0 else h + out  # layer 0's input is the image, whose centre it must not see
        logits = self.head[1](nn.relu(self.head[0](nn.relu(skip))))
        return logits[..., 0].astype(jnp.float32)

    def __call__(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
        return self.horizontal(x, self.vertical(x, y), y)


VARIANTS: dict[str, dict[str, Any]] = {
    "mnist": dict(channels=64, num_layers=8, kernel_size=3, first_kernel_size=7, num_classes=10),
    "tiny": dict(channels=8, num_layers=2, kernel_size=3, first_kernel_size=3, num_classes=10),
}


def Model(*, variant: str | None = None, **kw) -> GatedPixelCNN:
    """A `GatedPixelCNN` of a named size ("mnist", "tiny"); kwargs override it.

    Raises:
      UserError: unknown variant.
    """
    check(variant is None or variant in VARIANTS, "variant", variant, f"must be one of {list(VARIANTS)}")
    return GatedPixelCNN(**{**(VARIANTS[variant] if variant else {}), **kw})
