"""Frame conditioning: mask shapes and statistics, the loss ignores known frames, samples keep them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.diffusion import frame_conditioning as fc
from genjax.diffusion import losses, samplers, schedules
from genjax.errors import UserError

LINEAR = schedules.make("linear", 100)
B, T, H, W, C = 3, 5, 2, 3, 2


def _video(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, H, W, C))


def test_named_masks_shape_and_content():
    np.testing.assert_array_equal(fc.image_to_video_mask(2, 4), [[1, 0, 0, 0]] * 2)
    np.testing.assert_array_equal(fc.extension_mask(1, 5, 3), [[1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(fc.interpolation_mask(2, 4), [[1, 0, 0, 1]] * 2)
    assert fc.interpolation_mask(2, 4).dtype == jnp.float32
    with pytest.raises(UserError, match="num_frames"):
        fc.interpolation_mask(2, 1)
    with pytest.raises(UserError, match="k=6"):
        fc.extension_mask(2, 5, 6)


def test_random_mask_probabilities_are_respected():
    n, t = 4000, 8
    probs = {"none": 0.4, "first": 0.2, "first_k": 0.1, "first_last": 0.2, "random": 0.1}
    m = np.asarray(jax.jit(lambda k: fc.random_frame_mask(k, n, t, probs=probs, max_known_ratio=0.5))(
        jax.random.key(0)))
    assert m.shape == (n, t) and set(np.unique(m)) <= {0.0, 1.0}
    count = m.sum(1)
    first_last = (m[:, 0] == 1) & (m[:, -1] == 1) & (count == 2)
    # masks that only "first_last" / "none" can make (first_k and random hold k <= 4 frames; a random
    # {0, 7} pair has probability 1/28 * P(k = 2)): check frequencies within 4 standard errors
    for got, want in [((count == 0).mean(), probs["none"]),
                      (first_last.mean(), probs["first_last"] + probs["random"] * 0.25 / 28)]:
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n)
    # prefix masks with one frame: "first", plus first_k / random with k = 1 (prob 1/4 and 1/4 * 1/8)
    first = (m[:, 0] == 1) & (count == 1)
    want = probs["first"] + probs["first_k"] / 4 + probs["random"] / 4 / 8
    assert abs(first.mean() - want) < 4 * np.sqrt(want * (1 - want) / n)
    assert count.max() <= 4  # k <= max_known_ratio * T
    # "random" alone: every frame equally likely known (k ~ U{1..4}, mean 2.5 of 8)
    r = np.asarray(fc.random_frame_mask(jax.random.key(1), n, t, probs={"random": 1.0}, max_known_ratio=0.5))
    np.testing.assert_allclose(r.mean(0), 2.5 / 8, atol=4 * np.sqrt(0.3 * 0.7 / n))
    assert (r.sum(1) >= 1).all()


def test_random_mask_bad_probs():
    with pytest.raises(UserError, match="probs"):
        fc.random_frame_mask(jax.random.key(0), 2, 4, probs={"first": 0.5})
    with pytest.raises(UserError, match="probs"):
        fc.random_frame_mask(jax.random.key(0), 2, 4, probs={"last": 1.0})


def test_loss_keeps_known_frames_clean_at_t0_and_ignores_them():
    x0 = _video()
    mask = jnp.asarray([[1, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]], jnp.float32)
    seen = {}

    def denoiser(pred, x, t):
        seen.update(x=x, t=t)
        return pred + 0.0 * x

    pred = jax.random.normal(jax.random.key(3), x0.shape)
    loss_fn = lambda p: fc.frame_conditioned_diffusion_loss(  # noqa: E731
        lambda x, t: denoiser(p, x, t), x0, jax.random.key(1), schedule=LINEAR, frame_mask=mask)[0]
    loss, grad = jax.value_and_grad(loss_fn)(pred)
    known = np.asarray(mask, bool)
    # the model saw clean known frames with t = 0 and noised unknown frames at the example's t
    np.testing.assert_array_equal(np.asarray(seen["x"])[known], np.asarray(x0)[known])
    assert np.abs(np.asarray(seen["x"])[~known] - np.asarray(x0)[~known]).min() > 0
    t = np.asarray(seen["t"])
    assert t.shape == (B, T) and (t[known] == 0).all() and (t[~known] > 0).all()
    assert (t == t.max(1, keepdims=True))[~known].all()
    # exactly zero gradient on known frames; the value is diffusion_loss's masked MSE over unknown frames
    np.testing.assert_array_equal(np.asarray(grad)[known], 0.0)
    assert np.abs(np.asarray(grad)[~known]).min() > 0
    plain, _ = losses.diffusion_loss(lambda x, t_: pred, x0, jax.random.key(1), schedule=LINEAR,
                                     mask=(1 - mask)[:, :, None, None, None])
    np.testing.assert_allclose(float(loss), float(plain), rtol=1e-6)
    with pytest.raises(UserError, match="frame_mask.shape"):
        fc.frame_conditioned_diffusion_loss(lambda x, t: x, x0, jax.random.key(0), schedule=LINEAR,
                                            frame_mask=mask[:, :4])


def _eps_model(x, t, *, scale):
    """A jittable stand-in denoiser that depends on x, per-frame t and a cond input."""
    return scale * jnp.tanh(x) * (1.0 + t[:, :, None, None, None] / 100.0)


@pytest.mark.parametrize("mask_fn", [lambda: fc.image_to_video_mask(B, T), lambda: fc.extension_mask(B, T, 2),
                                     lambda: fc.interpolation_mask(B, T)])
def test_sample_keeps_known_frames_exactly(mask_fn):
    x_known, mask = _video(5), mask_fn()
    args = fc.frame_conditioned_sampling(_eps_model, x_known, mask, cond={"scale": jnp.float32(0.5)})
    out = samplers.sample(noise=jax.random.normal(jax.random.key(6), x_known.shape), schedule=LINEAR,
                          sampler="ddim", num_steps=4, rng=jax.random.key(7), **args)
    known = np.asarray(mask, bool)
    np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(x_known)[known])
    assert np.abs(np.asarray(out)[~known] - np.asarray(x_known)[~known]).max() > 0.1


def test_sampling_denoiser_sees_clean_known_frames_at_t0():
    x_known, mask = _video(1), fc.interpolation_mask(B, T)
    args = fc.frame_conditioned_sampling(lambda x, t: (x, t), x_known, mask)
    x_t = _video(2)
    x_in, t = args["denoise_fn"](x_t, jnp.full((B,), 40), **args["cond"])
    known = np.asarray(mask, bool)
    np.testing.assert_array_equal(np.asarray(x_in)[known], np.asarray(x_known)[known])
    np.testing.assert_array_equal(np.asarray(x_in)[~known], np.asarray(x_t)[~known])
    np.testing.assert_array_equal(np.asarray(t), np.where(known, 0, 40))
    assert hash(args["denoise_fn"]) == hash(fc.FrameConditionedDenoiser(args["denoise_fn"].denoise_fn))
