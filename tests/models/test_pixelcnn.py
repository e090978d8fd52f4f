"""Gated PixelCNN (van den Oord et al. 2016): the masked convolutions equal k x k SAME convolutions
with masked kernels, and the stacked model's receptive field is exactly the causal one of the
paper (every earlier pixel within reach, no blind spot, nothing at or after the pixel)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.models import pixelcnn


def _mask(k, mask_type):
    """The masks as PixelRNN / the gated PixelCNN paper draw them, on a k x k kernel (centre c)."""
    c, m = k // 2, np.zeros((k, k), bool)
    if mask_type == "V":
        m[:c + 1] = True  # rows above and the centre row, every column
    else:
        m[c, :c + (mask_type == "B")] = True  # the centre row left of (A) / up to (B) the centre
    return m


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("mask_type", ["A", "B", "V"])
def test_masked_conv_equals_same_conv_with_masked_kernel(mask_type, k):
    conv = pixelcnn.MaskedConv(3, k, mask_type)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 7, 2))
    params = nn.unbox(conv.init(jax.random.PRNGKey(1), x))["params"]
    params["bias"] = jnp.arange(3.0)
    (r0, r1), (c0, c1) = pixelcnn.mask_support(k, mask_type)
    full = np.zeros((k, k, 2, 3), np.float32)
    full[r0:r1 + 1, c0:c1 + 1] = params["kernel"]
    assert np.array_equal(np.any(full != 0, axis=(2, 3)), _mask(k, mask_type))
    expect = jax.lax.conv_general_dilated(x, jnp.asarray(full), (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
    np.testing.assert_allclose(conv.apply({"params": params}, x), expect, rtol=1e-5, atol=1e-5)


def test_receptive_field_is_exactly_causal_without_blind_spot_and_class_conditional():
    """d logit(r, c) / d x(r', c') over an 8 x 9 image: zero for every (r', c') at or after (r, c)
    in raster order; nonzero exactly on the rows r - 1 - W .. r - 1 at columns c - W .. c + W and on
    (r, c - W .. c - 1) (clipped to the image), W = receptive_width. That includes (r - 1, c + 2),
    which a stack of two 3 x 3 type-B masked convolutions never sees (the blind spot, Sec. 2.2)."""
    model = pixelcnn.Model(variant="tiny", num_layers=2)  # kernels 3, 3: W = 2
    h, w = 8, 9
    x = (jax.random.uniform(jax.random.PRNGKey(0), (1, h, w, 1)) > 0.5).astype(jnp.float32)
    y = jnp.array([4])
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, y)
    jac = jax.jit(jax.jacrev(lambda x: model.apply(params, x, y)[0]))(x)  # (h, w, 1, h, w, 1)
    nonzero = np.abs(np.asarray(jac).reshape(h * w, h * w)) > 0
    W = pixelcnn.receptive_width(3, 3, 2)
    assert W == 2
    expect = np.zeros((h * w, h * w), bool)
    for r in range(h):
        for c in range(w):
            for rr in range(max(r - 1 - W, 0), r):
                expect[r * w + c, rr * w + max(c - W, 0):rr * w + min(c + W, w - 1) + 1] = True
            expect[r * w + c, r * w + max(c - W, 0):r * w + c] = True
    assert not np.any(np.triu(nonzero))  # j >= i: no gradient (the diagonal included: mask A)
    np.testing.assert_array_equal(nonzero, expect)
    assert nonzero[4 * w + 4, 3 * w + 6]  # up-right of (4, 4): the blind spot of plain masked convs
    # the class (the h term) reaches every logit, the first pixel's too; it is required
    apply = jax.jit(model.apply)
    assert np.all(np.asarray(apply(params, x, y) != apply(params, x, jnp.array([5]))))
    with pytest.raises(UserError, match="labels"):
        model.apply(params, x)


def test_kernel_sizes_are_checked():
    for k in (4, 1, 2.0):
        with pytest.raises(UserError, match="odd integer"):
            pixelcnn.mask_support(k, "B")
    with pytest.raises(UserError, match="mask_type"):
        pixelcnn.mask_support(3, "C")
