"""The autoencoder `Task` shared by "vae" and "video_vae": `vae.vae_loss` (LDM, Rombach et al.
2022: L1 or L2 reconstruction + task.kl_weight * KL) on `batch[key]` in [-1, 1], the posterior
sampled with the step's rng.

Metric `latent_std`: the std of the sampled latents (set the autoencoder's scaling_factor to about
1 / latent_std for a latent diffusion model, LDM Appendix D.1).

sample_fn(params, rng, cond=None) -> uint8 (2N, *x_shape): N test examples (eval.num_samples // 2,
or `cond`, float in [-1, 1]) followed by their reconstructions (posterior mode; deterministic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.tasks import Task


TASK_KEYS = ("kl_weight", "rec")  # the fields of config.task that `task` reads


def task(config, module, x_shape, key) -> Task:
    from genjax.data import recipes
    from genjax.io import media
    from genjax.models import vae

    t = config.get("task", {})
    kl_weight, rec = float(t.get("kl_weight", 1e-6)), str(t.get("rec", "l1"))

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, *x_shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng):
        recon, posterior = module.apply({"params": params}, batch[key], rng)
        loss, metrics = vae.vae_loss(recon, batch[key], posterior, kl_weight=kl_weight, rec=rec)
        z = posterior.sample(rng)  # the same draw as inside apply (same rng, same shape)
        return loss, {**metrics, "latent_std": jnp.std(z)}

    examples = jnp.asarray(recipes.fixed_examples(config, max(config.eval.num_samples // 2, 1))[key])

    @jax.jit
    def reconstruct(params, x):
        recon, _ = module.apply({"params": params}, x, sample_posterior=False)
        return media.to_uint8(jnp.concatenate([x, recon.astype(jnp.float32)]))

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None):
        del rng  # deterministic: the posterior mode
        check(sampler is None and num_steps is None and cfg_scale is None and init_frames is None,
              "sampler/num_steps/cfg_scale/init_frames", (sampler, num_steps, cfg_scale, init_frames),
              "are for diffusion models; an autoencoder's samples are reconstructions")
        return reconstruct(params, examples if cond is None else jnp.asarray(cond, jnp.float32))

    return Task(module, init_params, loss_fn, sample_fn, recipes.pixel_data(config))
