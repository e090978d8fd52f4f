"""Task "dvae": DALL·E's discrete VAE (`genjax.models.dvae.DiscreteVAE`; the model section holds its
attributes) on images (B, S, S, data.channels), trained with the Gumbel-softmax relaxation.

Loss (the negative ELBO per pixel; Ramesh et al. 2021, Sec. 2.1 and Appendix A.2):

    loss = mean_pixels rec(x, decode(gumbel_softmax(logits, tau) @ codebook))
           + beta * sum_positions KL(q(z | x) || U(K)) / (H * W * C)

rec is |x - recon| (task.rec "l1") or (x - recon)^2 ("l2"); dividing the KL (summed over the h x w
positions of an image) by the pixel count keeps the ELBO's ratio of reconstruction to KL terms per
image (DALL·E sums both over the image). The temperature tau goes from task.temperature_start (1)
to task.temperature_end (DALL·E: 1/16) over task.temperature_steps, and beta from 0 to
task.kl_weight over task.kl_warmup_steps (DALL·E: 0 -> 6.6 over 5,000 updates), both on a cosine
(DALL·E's) or an exponential (geometric, tau only) curve, task.temperature_schedule
(`anneal`). The step they read is the task's own counter in the model state ("anneal":
{"step"}, `Task.init_state`, checkpointed with the run), counted in micro-batches and divided by
optim.grad_accum_steps: the trainer passes no step to loss_fn, and this needs no change to it.
The Gumbel noise is drawn with the step's key.

Metrics: rec_loss, kl (nats per position), temperature, kl_weight, perplexity (of the batch's
argmax codes, `vqvae.perplexity`), codes_used (fraction of the K codes the batch's argmax picked).

sample_fn(params, rng, cond=None) -> uint8 (2N, S, S, C): N = eval.num_samples // 2 held-out test
digits (evenly spaced over the first task.eval_examples) and their hard reconstructions (argmax
codes -> one-hot -> decoder; `autoencoder.reconstruction_fns`, as "vae" and "vqvae").
evaluate(params) -> psnr, ssim of the hard reconstructions of the task.eval_examples test digits,
eval_perplexity / eval_codes_used of their argmax codes (`autoencoder.code_usage`, as "vqvae").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import MODEL_STATE, Task, make_model

TASK_KEYS = ("rec", "kl_weight", "kl_warmup_steps", "temperature_start", "temperature_end",
             "temperature_steps", "temperature_schedule", "eval_examples")
SCHEDULES = ("cosine", "exponential")
ANNEAL = "anneal"  # the model-state collection holding the task's step counter


def _task(config) -> dict:
    t = config.get("task", {})
    return dict(rec=t.get("rec", "l2"), kl_weight=float(t.get("kl_weight", 0.0)),
                kl_warmup_steps=int(t.get("kl_warmup_steps", 0)),
                temperature_start=float(t.get("temperature_start", 1.0)),
                temperature_end=float(t.get("temperature_end", 1 / 16)),
                temperature_steps=int(t.get("temperature_steps", config.num_steps)),
                temperature_schedule=t.get("temperature_schedule", "cosine"),
                eval_examples=int(t.get("eval_examples", 1000)))


def anneal(step, start: float, end: float, steps: int, kind: str = "cosine") -> jax.Array:
    """The value at `step` of a curve from `start` (step 0) to `end` (step >= steps), float32.

    "cosine": `end + (start - end) * (1 + cos(pi * s)) / 2`, s = min(step / steps, 1) (DALL·E
    App. A.2 anneals tau, beta and the step size on cosine curves); "exponential": the geometric
    `start * (end / start) ** s` (start, end > 0). steps 0: `end` at once. step may be traced.
    """
    s = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0) if steps > 0 else jnp.float32(1)
    if kind == "exponential":
        return jnp.float32(start) * jnp.float32(end / start) ** s
    return jnp.float32(end) + jnp.float32(start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * s))


def validate(config) -> None:
    """Raises UserError (before anything is built): task.rec not "l1" / "l2"; task.kl_weight
    negative or not finite; a warm-up or annealing length < 0; a temperature <= 0 or not finite;
    task.temperature_schedule not "cosine" / "exponential"; task.eval_examples < 1."""
    t = _task(config)
    check(t["rec"] in ("l1", "l2"), "task.rec", t["rec"], 'must be "l1" or "l2"')
    check(math.isfinite(t["kl_weight"]) and t["kl_weight"] >= 0, "task.kl_weight", t["kl_weight"],
          "must be a finite number >= 0")
    for key in ("kl_warmup_steps", "temperature_steps"):
        check(t[key] >= 0, f"task.{key}", t[key], "must be >= 0")
    for key in ("temperature_start", "temperature_end"):
        check(math.isfinite(t[key]) and t[key] > 0, f"task.{key}", t[key], "must be a finite number > 0")
    check(t["temperature_schedule"] in SCHEDULES, "task.temperature_schedule", t["temperature_schedule"],
          f"must be one of {SCHEDULES}")
    check(t["eval_examples"] >= 1, "task.eval_examples", t["eval_examples"], "must be >= 1")


def make_module(config):
    """The `DiscreteVAE` of `config` (channels from data.channels)."""
    from genjax.models import dvae

    c = config.data.channels
    return make_model(dvae, dvae.DiscreteVAE, config.model, in_channels=c, out_channels=c)


def module_params(params) -> dict:
    """The task's params tree (model state merged in, as sample_fn / evaluate / `tasks.load_frozen`
    get it) -> the `DiscreteVAE`'s params."""
    return {k: v for k, v in params.items() if k != ANNEAL}


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes
    from genjax.models import dvae, vqvae
    from genjax.tasks.autoencoder import code_usage, reconstruction_fns

    size, channels = config.data.image_size, config.data.channels
    module = make_module(config)
    f = module.downsample_factor
    check(size % f == 0, "data.image_size", size, f"must be divisible by the downsampling factor {f}")
    t = _task(config)
    K, accum = module.num_codes, int(config.optim.get("grad_accum_steps", 1))

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, size, size, channels), jnp.float32))["params"]

    def loss_fn(params, batch, rng):
        x = batch["image"]
        counter = params[ANNEAL]["step"]
        step = counter // accum
        tau = anneal(step, t["temperature_start"], t["temperature_end"], t["temperature_steps"],
                     t["temperature_schedule"])
        beta = anneal(step, 0.0, t["kl_weight"], t["kl_warmup_steps"])
        recon, logits = module.apply({"params": module_params(params)}, x, tau, rng)
        diff = x.astype(jnp.float32) - recon.astype(jnp.float32)
        rec_loss = jnp.mean(jnp.abs(diff) if t["rec"] == "l1" else jnp.square(diff))
        kl = dvae.kl_to_uniform(logits)  # (B, h, w)
        kl_per_pixel = jnp.sum(jnp.mean(kl, axis=0)) / (size * size * channels)
        indices = jnp.argmax(logits, axis=-1)
        metrics = {"rec_loss": rec_loss, "kl": jnp.mean(kl), "temperature": tau, "kl_weight": beta,
                   "perplexity": vqvae.perplexity(indices, K),
                   "codes_used": jnp.mean((jnp.bincount(indices.reshape(-1), length=K) > 0).astype(jnp.float32)),
                   MODEL_STATE: {ANNEAL: {"step": counter + 1}}}
        return rec_loss + beta * kl_per_pixel, metrics

    @jax.jit
    def reconstruct(params, x):
        p = {"params": module_params(params)}
        return module.apply(p, module.apply(p, x, method=module.encode), method=module.decode_codes)

    @jax.jit
    def codes(params, x):
        return module.apply({"params": module_params(params)}, x, method=module.encode)

    held_out = recipes.fixed_examples(config, t["eval_examples"])["image"]
    n = min(max(config.eval.num_samples // 2, 1), len(held_out))
    examples = held_out[np.linspace(0, len(held_out) - 1, n).round().astype(int)]
    sample_fn, reconstruction_metrics = reconstruction_fns(reconstruct, examples, held_out)

    def evaluate(params):
        return {**reconstruction_metrics(params), **code_usage(codes, params, held_out, K)}

    return Task(module, init_params, loss_fn, sample_fn, recipes.pixel_data(config), evaluate=evaluate,
                init_state=lambda rng: {ANNEAL: {"step": jnp.zeros((), jnp.int32)}})
