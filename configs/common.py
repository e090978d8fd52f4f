"""Shared default config sections. Each function returns a fresh `ml_collections.ConfigDict`;
experiment configs call them and change fields (`configs/dit_mnist.py` is an example)."""

from __future__ import annotations

import ml_collections


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1,
         context_parallel: str = "ring") -> ml_collections.ConfigDict:
    """Device mesh `(data, fsdp, context, tensor)`; one -1 is filled from the device count
    (`genjax.parallel.mesh.make_mesh`). context > 1 splits the tokens (sequence parallelism) and
    runs attention as `context_parallel` "ring" or "ulysses" (`genjax.parallel.context`)."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, context=context, tensor=tensor,
                                          context_parallel=context_parallel))


def optim(lr: float = 1e-4, **overrides) -> ml_collections.ConfigDict:
    """AdamW (`genjax.train.state.make_optimizer`), DiT defaults: constant lr 1e-4, no weight decay,
    betas (0.9, 0.999) (Peebles & Xie 2023, Sec. 5), clipped at global norm 1.

    Fields: lr; schedule "constant" | "cosine" (decays over the run's num_steps to
    lr * end_lr_ratio); warmup_steps; b1, b2, eps, weight_decay; grad_clip_norm (0 = off);
    grad_accum_steps (micro-batches per update); ema_decay, ema_warmup (decay = min(ema_decay,
    (1 + n) / (10 + n)) at update n); max_nonfinite_steps (consecutive NaN / Inf gradients
    after which training stops).
    """
    c = ml_collections.ConfigDict(dict(
        lr=lr, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, grad_clip_norm=1.0, grad_accum_steps=1, ema_decay=0.9999,
        ema_warmup=False, max_nonfinite_steps=10))
    c.update(overrides)
    return c


def ckpt(save_interval_steps: int = 1000, max_to_keep: int = 3) -> ml_collections.ConfigDict:
    """Orbax checkpoints in WORKDIR/checkpoints (`genjax.io.checkpoint.make_manager`);
    max_to_keep 0 keeps all; async_save writes in the background; fallback: resume (or sample)
    from the newest intact checkpoint when newer ones are unreadable, saying so (False: stop
    with an error naming the broken step)."""
    return ml_collections.ConfigDict(dict(save_interval_steps=save_interval_steps,
                                          max_to_keep=max_to_keep, async_save=True, fallback=True))


def evaluation(sample_every_steps: int = 1000, num_samples: int = 16, sampler: str = "ddim",
         num_sampling_steps: int = 50, cfg_scale: float = 4.0) -> ml_collections.ConfigDict:
    """Periodic sample grids from the EMA weights -> WORKDIR/samples/step_XXXXXX.png
    (0 disables); cfg_scale 1 is unguided (classifier-free guidance, Ho & Salimans 2022)."""
    return ml_collections.ConfigDict(dict(
        sample_every_steps=sample_every_steps, num_samples=num_samples, sampler=sampler,
        num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale))


def moving_mnist(batch_size: int, num_examples: int, *, image_size: int, num_frames: int,
                 num_digits: int) -> ml_collections.ConfigDict:
    """Procedural Moving MNIST from the real MNIST training digits
    (`genjax.data.sources.MovingMnistSource`): grayscale clips of `num_frames` x image_size^2."""
    return ml_collections.ConfigDict(dict(
        dataset="moving_mnist", split="train", batch_size=batch_size, image_size=image_size,
        num_frames=num_frames, num_digits=num_digits, num_examples=num_examples, channels=1))


def scaled_steps(num_steps: int, steps_scale: float) -> int:
    """`num_steps * steps_scale`, rounded, at least 1 (the `steps_scale=` config argument)."""
    return max(1, int(round(num_steps * steps_scale)))


OBJECTIVES = ("eps", "v", "flow")


def diffusion(objective: str, *, num_timesteps: int = 1000, schedule: str = "linear",
              flow_shift: float = 1.0, shift_base_tokens: int = 0) -> ml_collections.ConfigDict:
    """config.diffusion for `objective` (the `objective=` config argument):
      "eps" / "v": `schedule` (a variance-preserving beta schedule) with epsilon or v prediction;
      "flow": rectified flow (schedule "flow", velocity target; Liu et al. 2023, Lipman et al.
        2023) with logit-normal timesteps (0, 1) (SD3, Esser et al. 2024, eq. 19) and the SD3
        timestep shift flow_shift, times sqrt(tokens / shift_base_tokens) per example when
        shift_base_tokens > 0 (`genjax.tasks.diffusion.validate`). Needs model.learn_sigma false.
    """
    from genjax.errors import check

    check(objective in OBJECTIVES, "objective", objective, f"must be one of {OBJECTIVES}")
    if objective == "flow":
        return ml_collections.ConfigDict(dict(
            schedule="flow", num_timesteps=num_timesteps, prediction_type="flow", weighting="none",
            timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, flow_shift=flow_shift,
            shift_base_tokens=shift_base_tokens))
    return ml_collections.ConfigDict(dict(
        schedule=schedule, num_timesteps=num_timesteps, weighting="none",
        prediction_type="epsilon" if objective == "eps" else "v_prediction"))
