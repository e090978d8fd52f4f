"""Task "mdt": the class-conditional Masked Diffusion Transformer (`genjax.models.mdt.MDT`; Gao et
al. 2023), on pixels or on a frozen VAE's latents exactly as task "dit" (`tasks.dit`: the same
task, config sections, data, sampler and evaluation; `dit.image_task`).

Mask latent modelling (MDT Sec. 3.2; the official `train_util.py` sums two losses per step): the
loss is the diffusion loss of the full branch plus that of the masked branch, where the encoder
sees a random (1 - model.mask_ratio) share of the noisy tokens and the side-interpolator fills in
the rest. The two branches draw their own timesteps and noise, as the official code's two calls
of `training_losses`. Metrics: the full branch's under their names (`loss` is the sum), the masked
branch's prefixed `masked_`. Sampling runs the full branch only. No packing (the learnable
position embeddings are for one input size, model.input_size, set from the data).
"""

from __future__ import annotations

import jax

from genjax.errors import check
from genjax.tasks import Task, dit, make_model

TASK_KEYS = dit.TASK_KEYS
DATA_KEYS = dit.DATA_KEYS
DIFFUSION_KEYS = dit.DIFFUSION_KEYS
EVAL_KEYS = dit.EVAL_KEYS


def validate(config) -> None:
    """Raises UserError: see `tasks.dit.validate`; data.packing set."""
    dit.validate(config)
    check(config.data.get("packing") is None, "data.packing", config.data.get("packing"),
          "is not supported by mdt (its position embeddings are for one input size); use model.name=dit")


def build(config, *, mesh=None) -> Task:
    from genjax.models import mdt

    x_shape, vae = dit.inputs(config, mesh)
    module = make_model(mdt, mdt.MDT, config.model, in_channels=x_shape[-1], input_size=x_shape[0])
    full = dit.image_task(config, module, x_shape, vae)
    masked = dit.image_task(config, module, x_shape, vae, denoise_kwargs=lambda rng: (
        {"enable_mask": True}, {"mask": jax.random.fold_in(rng, 1)}))

    def loss_fn(params, batch, rng):
        full_rng, masked_rng = jax.random.split(rng)
        full_loss, metrics = full.loss_fn(params, batch, full_rng)
        masked_loss, masked_metrics = masked.loss_fn(params, batch, masked_rng)
        loss = full_loss + masked_loss
        return loss, {**metrics, **{f"masked_{k}": v for k, v in masked_metrics.items()},
                      "full_loss": full_loss, "loss": loss}

    return full._replace(loss_fn=loss_fn)
