"""The autoencoder `Task` shared by "vae" and "video_vae": `vae.vae_loss` (LDM, Rombach et al.
2022: L1 or L2 reconstruction + task.kl_weight * KL) on `batch[key]` in [-1, 1], the posterior
sampled with the step's rng. `reconstruction_fns` is the sampling and evaluation of every
autoencoder task (also "vqvae").

Metric `latent_std`: the std of the sampled latents (set the autoencoder's scaling_factor to about
1 / latent_std for a latent diffusion model, LDM Appendix D.1).

sample_fn(params, rng, cond=None) -> uint8 (2N, *x_shape): N test examples (eval.num_samples // 2,
or `cond`, float in [-1, 1]) followed by their reconstructions (posterior mode; deterministic).
evaluate(params) -> {"psnr", "ssim"} of the reconstructions of those N test examples.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from genjax.errors import check
from genjax.tasks import Task


TASK_KEYS = ("kl_weight", "rec")  # the fields of config.task that `task` reads


def eval_batch_size(n: int, most: int = 256) -> int:
    """Batch size <= `most` splitting `n` examples into equal batches (one compile, at most one
    short last batch): 1000 -> 250."""
    return -(-n // -(-n // most))


def code_usage(codes_fn: Callable[[Any, jax.Array], jax.Array], params, examples, num_codes: int) -> dict:
    """`{"eval_perplexity", "eval_codes_used"}` of a discrete autoencoder ("vqvae", "dvae"): the
    code-usage perplexity (`vqvae.perplexity`) and the fraction of the `num_codes` codes picked, over
    all the codes of `examples` (float32 `(N, ...)` in [-1, 1]) taken together; `codes_fn(params, x)
    -> int codes` is jitted, run in batches of `eval_batch_size(N)`."""
    from genjax.models import vqvae

    b = eval_batch_size(len(examples))
    indices = jnp.concatenate([codes_fn(params, jnp.asarray(examples[i:i + b])) for i in range(0, len(examples), b)])
    used = jnp.mean((jnp.bincount(indices.reshape(-1), length=num_codes) > 0).astype(jnp.float32))
    return {"eval_perplexity": float(vqvae.perplexity(indices, num_codes)), "eval_codes_used": float(used)}


def reconstruction_fns(recon_fn: Callable[[Any, jax.Array], jax.Array], examples, eval_examples=None):
    """`(sample_fn, evaluate)` of an autoencoder task.

    Args:
      recon_fn: jitted `(params, x) -> recon`, x float32 `(B, *x_shape)` in [-1, 1], recon the same
        shape, about [-1, 1] (deterministic).
      examples: float32 `(N, *x_shape)` in [-1, 1], the held-out examples sample_fn shows.
      eval_examples: those evaluate measures (default `examples`).

    Returns:
      sample_fn(params, rng, cond=None) -> uint8 `(2N, *x_shape)`: the N examples (or `cond`)
        followed by their reconstructions; rng is unused. Diffusion settings (sampler, num_steps,
        cfg_scale, init_frames) raise UserError.
      evaluate(params) -> {"psnr": dB, "ssim"}: means over `eval_examples` of
        `genjax.eval.metrics.psnr` / `ssim` on uint8 pixels (`evaluate.reconstruction_metrics`:
        the reconstruction clipped and rounded as when saved), in batches of
        `eval_batch_size(len(eval_examples))`.
    """
    from genjax.eval import evaluate as evaluation
    from genjax.io import media

    examples = jnp.asarray(examples, jnp.float32)
    originals = media.to_uint8(jax.device_get(examples if eval_examples is None else eval_examples))

    @jax.jit
    def pair(params, x):
        return media.to_uint8(jnp.concatenate([x, recon_fn(params, x).astype(jnp.float32)]))

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None):
        del rng  # deterministic
        check(sampler is None and num_steps is None and cfg_scale is None and init_frames is None,
              "sampler/num_steps/cfg_scale/init_frames", (sampler, num_steps, cfg_scale, init_frames),
              "are for diffusion models; an autoencoder's samples are reconstructions")
        return pair(params, examples if cond is None else jnp.asarray(cond, jnp.float32))

    def evaluate(params):
        return evaluation.reconstruction_metrics(lambda x: recon_fn(params, jnp.asarray(x)), originals,
                                                 batch_size=eval_batch_size(len(originals)))

    return sample_fn, evaluate


def task(config, module, x_shape, key) -> Task:
    from genjax.data import recipes
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

    examples = recipes.fixed_examples(config, max(config.eval.num_samples // 2, 1))[key]

    @jax.jit
    def reconstruct(params, x):
        return module.apply({"params": params}, x, sample_posterior=False)[0]

    sample_fn, evaluate = reconstruction_fns(reconstruct, examples)
    return Task(module, init_params, loss_fn, sample_fn, recipes.pixel_data(config), evaluate=evaluate)
