"""VAR (`genjax.models.var`): the multi-scale residual quantiser against a torch transcription of
the reference `VectorQuantizer2` (FoundationVision/VAR `models/quant.py`: torch's own area /
bicubic interpolation and Conv2d), its exact identities, and the transformer's block-causal
attention (mask structure and zero gradients from later scales)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genjax.errors import UserError
from genjax.models import var

SCALES = (1, 2, 3, 5)


def _quantizer(quant_resi=0.5, num_phi=4, num_codes=16, dim=3, scales=SCALES):
    q = var.MultiScaleQuantizer(num_codes, dim, scales, beta=0.25, quant_resi=quant_resi, num_phi=num_phi)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, scales[-1], scales[-1], dim))
    params = q.init(jax.random.PRNGKey(0), z)["params"]
    return q, jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(params)), z


def _torch_reference(params, z, scales, ratio, num_phi):
    """VAR `VectorQuantizer2.forward` (f_hat, loss) and `f_to_idxBl_or_fhat` (indices), NCHW torch."""
    f = torch.tensor(np.asarray(z)).permute(0, 3, 1, 2).double()
    book = torch.tensor(np.asarray(params["codebook"])).double()
    B, C, H, W = f.shape
    K = len(scales)
    rest, f_hat, loss, tokens = f.clone(), torch.zeros_like(f), 0.0, []
    for si, pn in enumerate(scales):
        r = F.interpolate(rest, size=(pn, pn), mode="area") if si != K - 1 else rest
        r = r.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.argmin(torch.cdist(r, book), dim=1)
        h = book[idx].view(B, pn, pn, C).permute(0, 3, 1, 2)
        h = F.interpolate(h, size=(H, W), mode="bicubic") if si != K - 1 else h
        p = params[f"phi_{var.phi_index(si, K, num_phi)}"]["conv"]
        weight = torch.tensor(np.asarray(p["kernel"])).double().permute(3, 2, 0, 1)
        h = h * (1 - ratio) + F.conv2d(h, weight, torch.tensor(np.asarray(p["bias"])).double(), padding=1) * ratio
        f_hat, rest = f_hat + h, rest - h
        tokens.append(idx.view(B, -1))
        loss = loss + F.mse_loss(f_hat, f) * 1.25  # beta * commitment + codebook, equal in value
    return f_hat.permute(0, 2, 3, 1).numpy(), float(loss / K), torch.cat(tokens, 1).numpy()


def test_interpolation_matrices_match_torch():
    x = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    for n in (1, 2, 3, 4, 5, 7):
        area = var.area_matrix(7, n).astype(np.float64)
        np.testing.assert_allclose(area @ x[0, 0].numpy() @ area.T, F.interpolate(x, size=(n, n), mode="area")[0, 0],
                                   atol=1e-6)
        y = torch.randn(1, 1, n, n, dtype=torch.float64)
        cubic = var.bicubic_matrix(n, 7).astype(np.float64)
        np.testing.assert_allclose(cubic @ y[0, 0].numpy() @ cubic.T,
                                   F.interpolate(y, size=(7, 7), mode="bicubic")[0, 0], atol=1e-6)
    np.testing.assert_array_equal(var.bicubic_matrix(5, 5), np.eye(5))


def test_multiscale_quantizer_matches_var_reference():
    """Indices, f_hat and the VQ loss equal VAR's algorithm run in torch float64 on the same
    weights (4 shared phi convs over 4 scales, quant_resi 0.5); z_q = f_hat in value."""
    q, params, z = _quantizer()
    z_q, idx, aux = q.apply({"params": params}, z)
    f_hat, loss, tokens = _torch_reference(params, z, SCALES, 0.5, 4)
    np.testing.assert_array_equal(np.asarray(idx), tokens)
    np.testing.assert_allclose(np.asarray(z_q), f_hat, atol=2e-5)
    np.testing.assert_allclose(float(aux["loss"]), loss, rtol=1e-4)
    assert idx.shape == (2, sum(s * s for s in SCALES)) and idx.dtype == jnp.int32


def test_f_hat_is_the_sum_of_its_code_maps_and_the_straight_through_gradient():
    """f_hat from the tokens alone (`f_hat`, VAR embed_to_fhat) equals the quantiser's output
    z + sg(f_hat - z) up to that sum's float32 rounding; the teacher-forcing input of scale k is area(f_hat_{k-1}, s_k); d z_q / d z = I."""
    q, params, z = _quantizer()
    z_q, idx, _ = q.apply({"params": params}, z)
    v = {"params": params}
    np.testing.assert_allclose(np.asarray(q.apply(v, idx, method=q.f_hat)), np.asarray(z_q), atol=1e-6, rtol=0)
    x_in = np.asarray(q.apply(v, idx, method=q.var_input))
    assert x_in.shape == (2, sum(s * s for s in SCALES[1:]), 3)
    part = q.apply(v, q.apply(v, idx[:, :1], method=lambda m, i: m.code_map(0, i)), 2, "area",
                   method=lambda m, f, s, k: var.resize(f, s, k))
    np.testing.assert_allclose(x_in[:, :4], np.asarray(part).reshape(2, 4, 3), atol=1e-6)
    g = jax.grad(lambda z: jnp.sum(q.apply(v, z)[0] * jnp.arange(3.0)))(z)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.arange(3.0), z.shape))


def test_exact_reconstruction_of_a_constant_latent():
    """With phi the identity (quant_resi 0) and a codebook holding the constant latent's vector
    c and 0: scale 1 picks c, bicubic upsampling keeps the constant, the residual is exactly 0, every
    later scale picks 0, and f_hat == f exactly."""
    q, params, _ = _quantizer(quant_resi=0.0)
    c = jnp.array([0.3, -1.2, 0.7])
    params = dict(params, codebook=params["codebook"].at[5].set(c).at[9].set(0.0))
    z = jnp.broadcast_to(c, (1, 5, 5, 3))
    z_q, idx, aux = q.apply({"params": params}, z)
    np.testing.assert_array_equal(np.asarray(z_q), np.asarray(z))
    assert int(idx[0, 0]) == 5 and np.all(np.asarray(idx[0, 1:]) == 9) and float(aux["loss"]) == 0.0


def test_block_causal_mask_structure():
    mask = var.block_causal_mask((1, 2, 3))
    lvl = np.array([0, 1, 1, 1, 1] + [2] * 9)
    np.testing.assert_array_equal(var.level_ids((1, 2, 3)), lvl)
    for l in range(14):
        np.testing.assert_array_equal(mask[l], lvl <= lvl[l])  # own scale and all coarser ones
    assert mask[1, 4] and not mask[1, 5] and not mask[0, 1]


def test_var_logits_of_a_scale_ignore_later_scales():
    """d logits[scale k] / d inputs of scales > k == 0, and != 0 for scales <= k (the input of
    scale k is what predicts it); a sequence cut inside a scale is refused. (A prefix run giving
    the full run's logits: tests/train/test_var_task.py, sampling vs teacher forcing.)"""
    scales = (1, 2, 3)
    m = var.VAR(scales=scales, vocab_size=8, code_dim=3, hidden_size=16, depth=2, num_heads=2)
    x_in = jax.random.normal(jax.random.PRNGKey(0), (1, 13, 3))
    y = jnp.array([4])
    params = jax.jit(lambda: jax.tree.map(  # random weights everywhere (no zero gates): jitted, one compile
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
        m.init(jax.random.PRNGKey(1), y, x_in)["params"]))()
    bounds = [0, 1, 5, 14]  # token l of the sequence; x_in[j] is token j + 1
    per_scale = lambda x: jnp.stack([jnp.sum(m.apply({"params": params}, y, x)[0, bounds[k]:bounds[k + 1]])  # noqa: E731
                                     for k in range(3)])
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(per_scale))(x_in))[:, 0]).sum(-1)  # (3 scales, 13 inputs)
    for k in range(3):
        np.testing.assert_array_equal(jac[k] > 0, np.arange(1, 14) < bounds[k + 1])
    with pytest.raises(UserError, match="x_in.shape"):
        m.apply({"params": params}, y, x_in[:, :3])
