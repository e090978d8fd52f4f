"""VQ-VAE quantiser and model: checked against brute-force numpy and the Sonnet 2 EMA formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from genjax.errors import UserError
from genjax.models import vqvae
from genjax.models.vqvae import (VectorQuantizer, load_diffusers, nearest_code, perplexity,
                                 restart_dead_codes)

torch.set_num_threads(1)

K, D = 16, 4


def _init(vq, z):
    return vq.init(jax.random.PRNGKey(0), z)


def _z(shape=(2, 3, 5, D), seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_quantiser_picks_argmin_code():
    vq = VectorQuantizer(num_codes=K, code_dim=D)
    z = _z()
    variables = _init(vq, z)
    z_q, idx, _ = vq.apply(variables, z)
    codebook = np.asarray(nn.unbox(variables)["params"]["codebook"])
    dist = ((np.asarray(z)[..., None, :] - codebook) ** 2).sum(-1)  # (..., K) brute force
    np.testing.assert_array_equal(np.asarray(idx), dist.argmin(-1))
    np.testing.assert_allclose(np.asarray(z_q), codebook[dist.argmin(-1)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(vq.apply(variables, idx, method=vq.lookup)), np.asarray(z_q), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(nearest_code(z, codebook)), dist.argmin(-1))


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(num_codes=K, code_dim=D)
    z = _z((3, D))
    variables = _init(vq, z)
    jac = jax.jacobian(lambda z: vq.apply(variables, z)[0])(z)  # (3, D, 3, D)
    np.testing.assert_allclose(np.asarray(jac).reshape(3 * D, 3 * D), np.eye(3 * D), atol=1e-6)


def test_losses_match_numpy_and_route_gradients():
    vq = VectorQuantizer(num_codes=K, code_dim=D, beta=0.25)
    z = _z()
    variables = nn.unbox(_init(vq, z))
    _, idx, aux = vq.apply(variables, z)
    e = np.asarray(variables["params"]["codebook"])[np.asarray(idx)]
    mse = np.mean((np.asarray(z) - e) ** 2)
    np.testing.assert_allclose(float(aux["codebook_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(aux["commitment_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), 1.25 * mse, rtol=1e-5)

    def loss(params, z, name):
        return vq.apply({"params": params}, z)[2][name]

    g_cb_z = jax.grad(loss, argnums=1)(variables["params"], z, "codebook_loss")
    g_cb_e = jax.grad(loss, argnums=0)(variables["params"], z, "codebook_loss")["codebook"]
    g_cm_z = jax.grad(loss, argnums=1)(variables["params"], z, "commitment_loss")
    g_cm_e = jax.grad(loss, argnums=0)(variables["params"], z, "commitment_loss")["codebook"]
    assert float(jnp.abs(g_cb_z).max()) == 0.0 and float(jnp.abs(g_cm_e).max()) == 0.0
    n = np.asarray(z).size
    np.testing.assert_allclose(np.asarray(g_cm_z), 2 * (np.asarray(z) - e) / n, rtol=1e-4, atol=1e-7)
    # codebook grad: sum over the positions assigned to each code of 2 (e - z) / n
    expect = np.zeros((K, D), np.float32)
    np.add.at(expect, np.asarray(idx).reshape(-1), (2 * (e - np.asarray(z)) / n).reshape(-1, D))
    np.testing.assert_allclose(np.asarray(g_cb_e), expect, rtol=1e-4, atol=1e-7)


def _sonnet_ema_numpy(codebook, steps, decay=0.99, eps=1e-5):
    """Sonnet 2 VectorQuantizerEMA, transposed to (K, D): debiased EMAs, Laplace smoothing."""
    cs_h = np.zeros(K)
    dw_h = np.zeros((K, D))
    for t, z in enumerate(steps, start=1):
        flat = z.reshape(-1, D).astype(np.float64)
        idx = ((flat[:, None] - codebook) ** 2).sum(-1).argmin(-1)
        enc = np.eye(K)[idx]
        cs_h -= (cs_h - enc.sum(0)) * (1 - decay)
        dw_h -= (dw_h - enc.T @ flat) * (1 - decay)
        cs, dw = cs_h / (1 - decay ** t), dw_h / (1 - decay ** t)
        n = cs.sum()
        cs = (cs + eps) / (n + K * eps) * n
        codebook = dw / cs[:, None]
    return codebook


def test_ema_update_matches_sonnet_formula():
    vq = VectorQuantizer(num_codes=K, code_dim=D, use_ema=True)
    zs = [_z(seed=s) for s in (1, 2)]
    variables = _init(vq, zs[0])
    assert "params" not in variables
    expect = _sonnet_ema_numpy(np.asarray(variables["vq_stats"]["codebook"], np.float64),
                               [np.asarray(z) for z in zs])
    for z in zs:
        (_, _, aux), updates = vq.apply(variables, z, train=True, mutable=["vq_stats"])
        variables = {**variables, **updates}
    np.testing.assert_allclose(np.asarray(variables["vq_stats"]["codebook"]), expect, rtol=1e-5, atol=1e-6)
    assert int(variables["vq_stats"]["counter"]) == 2
    np.testing.assert_allclose(float(aux["loss"]), 0.25 * float(aux["commitment_loss"]), rtol=1e-6)
    # eval mode leaves the statistics alone
    _, updates = vq.apply(variables, zs[0], train=False, mutable=["vq_stats"])
    np.testing.assert_array_equal(np.asarray(updates["vq_stats"]["codebook"]),
                                  np.asarray(variables["vq_stats"]["codebook"]))


def test_perplexity_uniform_and_single_code():
    np.testing.assert_allclose(float(perplexity(jnp.arange(2 * K) % K, K)), K, rtol=1e-5)
    np.testing.assert_allclose(float(perplexity(jnp.full((7,), 3), K)), 1.0, rtol=1e-6)


def test_restart_replaces_only_dead_codes():
    codebook = _z((K, D), seed=3)
    counts = jnp.asarray(np.random.default_rng(0).integers(0, 3, K))
    z = _z((5, 7, D), seed=4) + 100.0  # far from every code
    new = np.asarray(restart_dead_codes(codebook, counts, z, jax.random.PRNGKey(0), threshold=1))
    dead = np.asarray(counts) < 1
    assert dead.any() and (~dead).any()
    np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
    rows = np.asarray(z).reshape(-1, D)
    for code in new[dead]:
        assert np.any(np.all(rows == code, axis=1))


def test_wrong_code_dim_raises():
    vq = VectorQuantizer(num_codes=K, code_dim=D)
    with pytest.raises(UserError, match="code_dim"):
        _init(vq, jnp.zeros((2, D + 1)))


def _diffusers_vqmodel(**cfg):
    from diffusers import VQModel
    levels = len(cfg["block_out_channels"])
    torch.manual_seed(0)
    m = VQModel(down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, **cfg).eval()
    with torch.no_grad():
        for p in m.parameters():  # randomise everything, zero-initialised tensors included
            p.normal_(0, 0.1)
    return m


def test_vqvae_matches_diffusers_vqmodel():
    cfg = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=3,
               num_vq_embeddings=16, norm_num_groups=8)
    tm = _diffusers_vqmodel(**cfg)
    module, params = load_diffusers({k: v.numpy() for k, v in tm.state_dict().items()}, norm_num_groups=8)
    assert module.num_codes == 16 and module.latent_channels == 3
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 6, 3)).astype(np.float32)
    with torch.no_grad():
        h = tm.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latents
        z_q_ref, _, (_, _, idx_ref) = tm.quantize(h)
        recon_ref = tm.decode(h).sample.numpy().transpose(0, 2, 3, 1)

    @jax.jit
    def run(params, x):
        z_q, idx, _ = module.apply({"params": params}, x, method=module.encode)
        return z_q, idx, module.apply({"params": params}, idx, method=module.decode_indices)

    z_q, idx, recon = run(params, x)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), idx_ref.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(z_q), z_q_ref.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(recon), recon_ref, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="divisible"):
        module.apply({"params": params}, x[:, :7], method=module.encode)


def test_ldm_f4_param_count_matches_diffusers():
    from diffusers import VQModel
    kw = vqvae.VARIANTS["ldm-f4"]
    shapes = jax.eval_shape(vqvae.Model(variant="ldm-f4").init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))
    with torch.device("meta"):
        ref = VQModel(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                      block_out_channels=kw["block_out_channels"], layers_per_block=2, latent_channels=3,
                      num_vq_embeddings=8192)
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow
def test_small_vqvae_overfits_eight_mnist_digits():
    from genjax.data.sources import MnistEmbeddedSource
    x = jnp.asarray(MnistEmbeddedSource("train").images[:8].astype(np.float32) / 127.5 - 1)
    m = vqvae.VQVAE(in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                    latent_channels=8, num_codes=32, mid_block_attention=False)
    params = jax.jit(m.init)(jax.random.PRNGKey(0), x)["params"]
    opt = optax.adam(2e-3)

    def loss_fn(p):
        recon, _, aux = m.apply({"params": p}, x)
        rec = jnp.mean((recon - x) ** 2)
        return rec + aux["loss"], rec

    @jax.jit
    def step(p, state):
        (_, rec), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, rec

    state, recs = opt.init(params), []
    for _ in range(120):
        params, state, rec = step(params, state)
        recs.append(float(rec))
    assert recs[-1] < recs[0] / 5, (recs[0], recs[-1])


def test_ema_update_on_a_hand_made_batch_is_the_mean_of_the_assigned_vectors():
    """One EMA step from empty statistics on 4 vectors and codes (0, 0), (1, 1), (5, 5): the
    debiased averages are the batch's counts (2, 2, 0) and sums, so each code becomes the mean of
    its vectors up to Laplace smoothing, (n_k + eps) / (n + K eps) * n (paper App. A.1 eqs. 6-8,
    with Sonnet's zero-debiasing and smoothing); the unused code's sum is 0, so it goes to 0."""
    book = np.array([[0, 0], [1, 1], [5, 5]], np.float32)
    z = np.array([[0.1, 0.0], [0.9, 1.1], [1.1, 0.9], [0.0, -0.1]], np.float32)
    vq = VectorQuantizer(num_codes=3, code_dim=2, use_ema=True, ema_decay=0.99, epsilon=1e-5)
    variables = jax.tree.map(np.asarray, vq.init(jax.random.PRNGKey(0), z))
    variables["vq_stats"]["codebook"] = book
    (_, idx, aux), updates = vq.apply(variables, z, train=True, mutable=["vq_stats"])
    np.testing.assert_array_equal(np.asarray(idx), [0, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(aux["counts"]), [2, 2, 0])
    n, eps = 4.0, 1e-5
    smoothed = (np.array([2.0, 2.0, 0.0]) + eps) / (n + 3 * eps) * n
    expect = np.array([[0.1, -0.1], [2.0, 2.0], [0.0, 0.0]]) / smoothed[:, None]
    np.testing.assert_allclose(np.asarray(updates["vq_stats"]["codebook"]), expect, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vqvae.ema_usage(updates["vq_stats"], 0.99)), [2, 2, 0], rtol=1e-5)


def test_restart_ema_codes_replaces_exactly_the_rarely_used_codes_and_resets_their_statistics():
    decay, t = 0.99, 3
    rng = np.random.default_rng(0)
    debias = 1 - decay ** t
    usage = np.array([0.0, 0.5, 1.0, 3.0, 0.99, 2.0], np.float32)  # threshold 1: codes 0, 1, 4 dead
    stats = {"codebook": rng.normal(size=(6, D)).astype(np.float32),
             "ema_cluster_size_hidden": (usage * debias).astype(np.float32),
             "ema_dw_hidden": rng.normal(size=(6, D)).astype(np.float32),
             "counter": np.int32(t)}
    z = _z((2, 5, D), seed=7) + 100.0
    new, dead = vqvae.restart_ema_codes(stats, z, jax.random.PRNGKey(1), threshold=1.0, decay=decay)
    np.testing.assert_array_equal(np.asarray(dead), [True, True, False, False, True, False])
    new = jax.tree.map(np.asarray, new)
    keep = ~np.asarray(dead)
    for name in ("codebook", "ema_cluster_size_hidden", "ema_dw_hidden"):
        np.testing.assert_array_equal(new[name][keep], stats[name][keep])
    rows = np.asarray(z).reshape(-1, D)
    assert all(np.any(np.all(rows == code, axis=1)) for code in new["codebook"][~keep])
    # a restarted code has debiased usage = threshold and debiased sum = threshold * code
    np.testing.assert_allclose(np.asarray(vqvae.ema_usage(new, decay))[~keep], 1.0, rtol=1e-5)
    np.testing.assert_allclose(new["ema_dw_hidden"][~keep] / debias, new["codebook"][~keep], rtol=1e-5)
    assert int(new["counter"]) == t
