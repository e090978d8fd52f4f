"""Task "vqvae": the vector-quantised autoencoder (`genjax.models.vqvae.VQVAE`; the model section
holds its attributes, among them num_codes, beta, ema_decay) on images (B, S, S, data.channels).

Loss (van den Oord, Vinyals & Kavukcuoglu 2017, eq. 3):

    loss = rec(x, recon) + ||sg[z] - e||^2 + beta ||z - sg[e]||^2        task.codebook = "loss"
    loss = rec(x, recon) + beta ||z - sg[e]||^2, codebook by EMA         task.codebook = "ema"

rec is the mean over pixels of |x - recon| (task.rec = "l1") or (x - recon)^2 ("l2", the paper's
Gaussian likelihood up to scale, as Sonnet's VQ-VAE example without its 1 / data variance);
the VQ terms are means over all latent elements (Sonnet); beta = model.beta (paper: 0.25).
With "ema" the codebook is no parameter: it is the zero-debiased, Laplace-smoothed EMA of the
encoder outputs assigned to each code (paper Appendix A.1; Sonnet 2 `VectorQuantizerEMA`, decay
model.ema_decay = 0.99, epsilon 1e-5), kept in `TrainState.model_state` ("vq_stats") and updated
inside the train step. With task.restart_threshold > 0 (needs "ema") the codes whose EMA usage
(`vqvae.ema_usage`, vectors per batch) falls below the threshold are restarted at random encoder
outputs of the batch after each EMA update, drawn with the step's key (`vqvae.restart_ema_codes`,
Jukebox, Dhariwal et al. 2020).

With model.scales (VAR's multi-scale residual tokenizer, `var.MultiScaleQuantizer`; Tian et al.
2024) the VQ terms are VAR's: the means over the K scales of ||f_hat_k - sg[z]||^2 and
beta ||sg[f_hat_k] - z||^2 (f_hat_k the sum of the first k upsampled, phi-mixed code maps); the
codebook must be "loss" and the metrics count the tokens of all scales.

Metrics: rec_loss, vq_loss (the VQ terms in the loss), commitment_loss (mean ||z - e||^2, equal
in value to the codebook term), perplexity (exp of the entropy of the batch's code histogram),
codes_used (fraction of the K codes the batch picked), restarted (codes restarted this step).

sample_fn(params, rng, cond=None) -> uint8 (2N, S, S, C): N = eval.num_samples // 2 of the first
task.eval_examples test digits, evenly spaced (the embedded MNIST test split is sorted by class,
so 1000 of them show every class), and their reconstructions (`autoencoder.reconstruction_fns`,
as "vae"). evaluate(params) -> psnr, ssim (the same function as "vae") of those task.eval_examples
test digits, and eval_perplexity / eval_codes_used of all their codes taken together.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import MODEL_STATE, Task, make_model

TASK_KEYS = ("codebook", "rec", "restart_threshold", "eval_examples")
CODEBOOKS = ("loss", "ema")
STATS = "vq_stats"  # the Flax collection of an EMA quantiser (`vqvae.VectorQuantizer`)


def _task(config) -> dict:
    t = config.get("task", {})
    return dict(codebook=t.get("codebook", "loss"), rec=t.get("rec", "l2"),
                restart_threshold=t.get("restart_threshold", 0.0), eval_examples=t.get("eval_examples", 1000))


def validate(config) -> None:
    """Raises UserError (before anything is built): task.codebook not "loss" / "ema"; task.rec not
    "l1" / "l2"; task.restart_threshold negative, not finite, or > 0 with the "loss" codebook;
    task.eval_examples < 1; model.beta < 0 or not finite; model.ema_decay outside [0, 1);
    model.use_ema set (task.codebook chooses it); model.scales not strictly increasing positive
    ints, or given with task.codebook "ema"; model.num_phi < 1."""
    t, m = _task(config), config.model
    check(t["codebook"] in CODEBOOKS, "task.codebook", t["codebook"], f"must be one of {CODEBOOKS}")
    check(t["rec"] in ("l1", "l2"), "task.rec", t["rec"], 'must be "l1" or "l2"')
    threshold = float(t["restart_threshold"])
    check(math.isfinite(threshold) and threshold >= 0, "task.restart_threshold", t["restart_threshold"],
          "must be a finite number >= 0 (0 disables dead-code restarts)")
    check(threshold == 0 or t["codebook"] == "ema", "task.restart_threshold", t["restart_threshold"],
          'needs task.codebook="ema" (restarts reset the EMA usage statistics)')
    check(int(t["eval_examples"]) >= 1, "task.eval_examples", t["eval_examples"], "must be >= 1")
    beta = float(m.get("beta", 0.25))
    check(math.isfinite(beta) and beta >= 0, "model.beta", m.get("beta"), "must be a finite number >= 0")
    decay = float(m.get("ema_decay", 0.99))
    check(0 <= decay < 1, "model.ema_decay", m.get("ema_decay"), "must be in [0, 1)")
    check("use_ema" not in m, "model.use_ema", m.get("use_ema"),
          'is set by task.codebook ("ema" or "loss"); leave it out')
    scales = m.get("scales")
    if scales is not None:
        ok = all(isinstance(s, int) and s >= 1 for s in scales) and list(scales) == sorted(set(scales))
        check(ok and len(scales) >= 1, "model.scales", scales, "must be strictly increasing ints >= 1")
        check(t["codebook"] == "loss", "task.codebook", t["codebook"],
              'must be "loss" with model.scales (the multi-scale quantizer has no EMA codebook)')
        check(int(m.get("num_phi", 4)) >= 1, "model.num_phi", m.get("num_phi"), "must be >= 1")


def make_module(config):
    """The `VQVAE` of `config` (use_ema from task.codebook)."""
    from genjax.models import vqvae

    c = config.data.channels
    return make_model(vqvae, vqvae.VQVAE, config.model, in_channels=c, out_channels=c,
                      use_ema=_task(config)["codebook"] == "ema")


def _forward(m, x, train):
    """`VQVAE.__call__` that also returns the encoder output z (the restarts' candidates)."""
    from genjax.models.ldm_autoencoder import check_image

    check_image(x, m.in_channels, m.downsample_factor)
    z = m.quant_conv(m.encoder(x))  # (B, h, w, latent_channels)
    z_q, indices, aux = m.quantizer(z, train=train)
    return m.decode(z_q), z, indices, aux


def _variables(params) -> dict:
    """The params tree the task's functions get (model state merged in) -> Flax variables."""
    params = dict(params)
    stats = params.pop(STATS, None)
    return {"params": params} if stats is None else {"params": params, STATS: stats}


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes
    from genjax.models import vqvae
    from genjax.tasks.autoencoder import code_usage, reconstruction_fns

    size, channels = config.data.image_size, config.data.channels
    module = make_module(config)
    f = module.downsample_factor
    check(size % f == 0, "data.image_size", size, f"must be divisible by the downsampling factor {f}")
    check(module.scales is None or module.scales[-1] == size // f, "model.scales", module.scales,
          f"must end with the latent side data.image_size / {f} = {size // f}")
    t = _task(config)
    ema, rec, threshold = t["codebook"] == "ema", t["rec"], float(t["restart_threshold"])
    K = module.num_codes

    def init(rng):
        return module.init(rng, jnp.zeros((1, size, size, channels), jnp.float32))

    def loss_fn(params, batch, rng):
        x = batch["image"]
        if ema:
            (recon, z, indices, aux), updated = module.apply(_variables(params), x, True, method=_forward,
                                                             mutable=[STATS])
            stats = updated[STATS]["quantizer"]
            restarted = jnp.zeros((), jnp.float32)
            if threshold > 0:
                stats, dead = vqvae.restart_ema_codes(stats, z, rng, threshold=threshold,
                                                      decay=module.ema_decay)
                restarted = jnp.sum(dead).astype(jnp.float32)
        else:
            recon, z, indices, aux = module.apply(_variables(params), x, True, method=_forward)
        diff = x.astype(jnp.float32) - recon.astype(jnp.float32)
        rec_loss = jnp.mean(jnp.abs(diff) if rec == "l1" else jnp.square(diff))
        loss = rec_loss + aux["loss"]
        metrics = {"rec_loss": rec_loss, "vq_loss": aux["loss"], "commitment_loss": aux["commitment_loss"],
                   "perplexity": aux["perplexity"],
                   "codes_used": jnp.mean((aux["counts"] > 0).astype(jnp.float32))}
        if ema:
            metrics.update(restarted=restarted, **{MODEL_STATE: {STATS: {"quantizer": stats}}})
        return loss, metrics

    @jax.jit
    def reconstruct(params, x):
        return module.apply(_variables(params), x)[0]

    @jax.jit
    def codes(params, x):
        return module.apply(_variables(params), x, method=module.encode)[1]

    held_out = recipes.fixed_examples(config, int(t["eval_examples"]))["image"]
    n = min(max(config.eval.num_samples // 2, 1), len(held_out))
    # evenly spaced: a split sorted by class shows its classes
    examples = held_out[np.linspace(0, len(held_out) - 1, n).round().astype(int)]
    sample_fn, reconstruction_metrics = reconstruction_fns(reconstruct, examples, held_out)

    def evaluate(params):
        return {**reconstruction_metrics(params), **code_usage(codes, params, held_out, K)}

    return Task(module, lambda rng: init(rng)["params"], loss_fn, sample_fn, recipes.pixel_data(config),
                evaluate=evaluate, init_state=(lambda rng: {STATS: init(rng)[STATS]}) if ema else None)
