"""Text-to-video generation from a trained demo stack, and the `genjax sample` command.

    genjax sample --workdir runs/demo --prompt "digit 3" --num 4 --seed 0 --out digit3.npz
        [--steps 50] [--cfg-scale 4] [--sampler ddpm|ddim|dpmpp] [--frames 8] [--height 32]
        [--width 32] [--init-frame first.png]

The stack (written by `genjax demo`, see `configs/demo_moving_mnist.py`): a frozen causal video
VAE (`genjax.models.video_vae`), a frozen CLIP text tower (`genjax.models.clip`, byte tokenizer)
and a video DiT (`genjax.models.video_dit`) trained on the VAE's normalised latents with text
cross-attention. Generation: text token states -> Gaussian noise of the latent shape ->
`samplers.sample` (one compiled loop) with classifier-free guidance (`guidance.cfg_denoiser`, the
null condition is the DiT's learned null text through `force_drop_ids`) -> VAE decoder -> uint8.
With `--init-frame` the first latent frame is fixed to the image's latent (image-to-video,
`frame_conditioning.frame_conditioned_sampling`; the DiT was trained with first-frame masks).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check

SAMPLERS = {"ddpm": "ddpm", "ddim": "ddim", "dpmpp": "dpmpp_2m"}


class Pipeline(NamedTuple):
    """A restored text-to-video stack (params are EMA weights, replicated on the default device).

    Fields: config (the DiT stage's ConfigDict, with `latent_scale`), vae / vae_params,
    clip / clip_params (the text tower is used), dit / dit_params, schedule (`schedules.Schedule`).
    """

    config: Any
    vae: Any
    vae_params: Any
    clip: Any
    clip_params: Any
    dit: Any
    dit_params: Any
    schedule: Any


def read_config(workdir: str):
    """`(folder, config)` of the video DiT stage of `workdir`: `workdir/dit` (a demo workdir) or
    `workdir` itself, and its config.json as a ConfigDict. Reads no weights.

    Raises:
      UserError: neither holds a finished video DiT stage (config.json with model.name "video_dit").
    """
    import ml_collections

    for path in (os.path.join(workdir, "dit"), workdir):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            with open(cfg) as f:
                config = json.load(f)
            if config.get("model", {}).get("name") == "video_dit":
                return path, ml_collections.ConfigDict(config)
    from genjax.errors import fail

    fail("--workdir", workdir, "holds no trained text-to-video model (run `genjax demo` first)")


def text_states(clip_module, clip_params, prompts) -> tuple[jax.Array, jax.Array]:
    """CLIP text-tower token states for `prompts` (list of str): `(tokens float32 (B, S, D),
    mask bool (B, S))`, S = the CLIP context length, D = its text width (byte tokenizer).

    Raises:
      UserError: a prompt that is empty, not a string, or longer than the context.
    """
    from genjax.models import tokenizer

    for p in prompts:
        check(isinstance(p, str) and p.strip() != "", "--prompt", p, "must be a non-empty string")
    ids, mask = tokenizer.ByteTokenizer().encode(list(prompts), clip_module.context_length)
    hidden, _ = clip_module.apply({"params": clip_params}, jnp.asarray(ids), jnp.asarray(mask),
                                  method=lambda m, i, k: m.text(i, k))
    return hidden.astype(jnp.float32), jnp.asarray(mask, bool)


def dit_denoiser(dit_module):
    """`denoise(params, x_t, t, text, text_mask, force_drop_ids=None, rng=None) -> eps` for the
    video DiT: x_t `(B, T, h, w, c)`, t `(B,)` or `(B, T)`; rng enables training-time text dropout."""
    def denoise(params, x_t, t, text, text_mask, force_drop_ids=None, rng=None):
        kw = dict(text=text, text_mask=text_mask, force_drop_ids=force_drop_ids)
        if rng is None:
            return dit_module.apply({"params": params}, x_t, t, **kw).astype(jnp.float32)
        return dit_module.apply({"params": params}, x_t, t, train=True, rngs={"dropout": rng},
                                **kw).astype(jnp.float32)
    return denoise


def restore_params(workdir: str, init_params, optim_config, num_steps: int, seed: int):
    """EMA params of the newest checkpoint in `workdir` (`train.checkpoint`), or None if none."""
    from genjax.parallel import mesh as mesh_lib
    from genjax.train import checkpoint, state as state_lib

    manager = checkpoint.make_manager(workdir, {"save_interval_steps": 1, "max_to_keep": 0,
                                                "async_save": False})
    try:
        if manager.latest_step() is None:
            return None
        mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        tx, _ = state_lib.make_optimizer(optim_config, num_steps)
        abstract, _ = state_lib.abstract_train_state(init_params, tx, seed=seed, mesh=mesh)
        return checkpoint.restore(manager, abstract).ema_params
    finally:
        manager.close()


def load(workdir: str) -> Pipeline:
    """Restore the stack of a demo workdir (or of its `dit/` stage folder).

    Raises:
      UserError: no trained video DiT, VAE or text encoder there.
    """
    from genjax.diffusion import schedules
    from genjax.models import video_dit
    from genjax.train import tasks

    path, config = read_config(workdir)
    devices = jax.devices()[:1]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    vae_module, vae_params = tasks.load_frozen(os.path.join(path, config.vae_workdir), mesh=mesh,
                                               family="video_vae")
    _, text_task, clip_params = tasks.restore(os.path.join(path, config.text_workdir), devices=devices)
    dit_module = video_dit.VideoDiT(**tasks.module_kwargs(video_dit.VideoDiT, config.model,
                                                          in_channels=config.latent_shape[-1]))
    params = restore_params(path, init_fn(dit_module, config), config.optim, config.num_steps, config.seed)
    check(params is not None, "--workdir", workdir, "holds no video DiT checkpoint (no trained model)")
    d = config.diffusion
    schedule = schedules.make(d.schedule, d.num_timesteps, prediction_type=d.prediction_type)
    return Pipeline(config, vae_module, vae_params, text_task.module, clip_params, dit_module,
                    params, schedule)


def init_fn(dit_module, config):
    """`key -> boxed params` of the video DiT at the training latent shape `config.latent_shape`
    (T, h, w, c), with `config.text_context` text tokens."""
    shape = (1, *config.latent_shape)
    s, w = config.text_context, dit_module.context_dim

    def init(key):
        return dit_module.init(key, jnp.zeros(shape), jnp.zeros((1,), jnp.int32),
                               text=jnp.zeros((1, s, w)), text_mask=jnp.ones((1, s), bool))["params"]
    return init


def check_request(config, *, num: int, num_frames: int, height: int, width: int, num_steps: int,
                  sampler: str) -> None:
    """Raise UserError (before loading or compiling anything) for a request the model of the DiT
    stage `config` (`read_config`) cannot take: num < 1, frames or sizes that the VAE's
    downsampling and the DiT's tubelets do not divide, steps outside the schedule, unknown sampler."""
    check(isinstance(num, int) and num >= 1, "--num", num, "must be an integer >= 1")
    check(sampler in SAMPLERS, "--sampler", sampler, f"must be one of {tuple(SAMPLERS)}")
    n = int(config.diffusion.num_timesteps)
    check(1 <= num_steps <= n, "--steps", num_steps, f"must be in [1, {n}]")
    pt, ph, pw = config.model.patch_size
    f = config.data.image_size // config.latent_shape[1]  # the VAE's spatial downsampling
    check(num_frames >= 1 and num_frames % pt == 0, "--frames", num_frames,
          f"must be a positive multiple of the DiT's temporal patch {pt}")
    for field, v, p in (("--height", height, ph), ("--width", width, pw)):
        check(v >= f * p and v % (f * p) == 0, field, v,
              f"must be a positive multiple of {f * p} (VAE downsampling {f} x DiT patch {p})")


def generate(pipe: Pipeline, prompts, *, seed: int = 0, num_steps: int = 50, cfg_scale: float = 4.0,
             sampler: str = "ddim", num_frames: int | None = None, height: int | None = None,
             width: int | None = None, init_frame: np.ndarray | None = None) -> np.ndarray:
    """Videos for `prompts` (one video per entry): uint8 `(N, T, H, W, 1)` in [0, 255].

    Args:
      pipe: `load(workdir)`. prompts: N non-empty strings.
      seed: the noise and sampler key `PRNGKey(seed)`; the same seed gives the same videos.
      num_steps, sampler ("ddpm" | "ddim" | "dpmpp"), cfg_scale (1 = no guidance).
      num_frames, height, width: default the training clip's (8, 32, 32).
      init_frame: optional uint8 `(H, W)` / `(H, W, C)` image: the first frame (image-to-video).

    Raises:
      UserError (before compiling): see `check_request` and `text_states`.
    """
    from genjax.data import transforms
    from genjax.diffusion import frame_conditioning, guidance, samplers

    d = pipe.config.data
    num_frames = d.num_frames if num_frames is None else num_frames
    height = d.image_size if height is None else height
    width = d.image_size if width is None else width
    check_request(pipe.config, num=len(prompts), num_frames=num_frames, height=height, width=width,
                  num_steps=num_steps, sampler=sampler)
    text, text_mask = text_states(pipe.clip, pipe.clip_params, prompts)
    n, f = len(prompts), pipe.vae.downsample_factor
    shape = (n, num_frames, height // f, width // f, pipe.vae.latent_channels)
    scale = float(pipe.config.latent_scale)
    known = None
    if init_frame is not None:
        img = np.asarray(init_frame)
        img = img[..., None] if img.ndim == 2 else img
        img = img.mean(-1, keepdims=True).astype(np.uint8) if img.shape[-1] != 1 else img
        if img.shape[:2] != (height, width):
            img = transforms.resize(img, (height, width))
        frame = jnp.asarray(img, jnp.float32) / 127.5 - 1.0
        video = jnp.zeros((n, num_frames, height, width, 1)).at[:, 0].set(frame)
        known = pipe.vae.apply({"params": pipe.vae_params}, video, method=pipe.vae.encode).mean * scale
    denoise = dit_denoiser(pipe.dit)

    @jax.jit
    def run(dit_params, vae_params, text, text_mask, rng, known):
        def model(x_t, t, text, text_mask, force_drop_ids):
            return denoise(dit_params, x_t, t, text, text_mask, force_drop_ids)

        guided = guidance.cfg_denoiser(model, cfg_scale, null_cond={"force_drop_ids": 1})
        cond = {"text": text, "text_mask": text_mask, "force_drop_ids": jnp.zeros((n,), jnp.int32)}
        noise_rng, loop_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, shape)
        kw = dict(denoise_fn=guided, cond=cond)
        if known is not None:
            mask = jnp.zeros(shape[:2]).at[:, 0].set(1.0)
            kw = frame_conditioning.frame_conditioned_sampling(guided, known, mask, cond)
        z = samplers.sample(noise=noise, schedule=pipe.schedule, sampler=SAMPLERS[sampler],
                            num_steps=num_steps, rng=loop_rng, **kw)
        x = pipe.vae.apply({"params": vae_params}, z / scale, method=pipe.vae.decode)
        return jnp.round((jnp.clip(x.astype(jnp.float32), -1, 1) + 1) * 127.5).astype(jnp.uint8)

    return np.asarray(run(pipe.dit_params, pipe.vae_params, text, text_mask,
                          jax.random.PRNGKey(seed), known))


def write_outputs(out: str, videos: np.ndarray, prompts, *, fps: float = 8) -> list[str]:
    """`out` (.npz with `videos` uint8 (N, T, H, W, C) and `prompts`) plus a GIF and an MP4 of the
    videos beside it (same stem), captioned with the prompts. Returns the three paths."""
    from genjax.io import media

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, videos=videos, prompts=np.asarray(list(prompts)))
    stem = os.path.splitext(out)[0]
    captions = list(prompts)
    return [out, media.write_gif(stem + ".gif", videos, fps=fps, captions=captions),
            media.write_mp4(stem + ".mp4", videos, fps=fps, captions=captions)]


def _trained_video_dit(workdir: str) -> bool:
    """True for a `genjax train` video DiT run (model.name "video_dit", not a demo stage)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        config = json.load(f)
    return config.get("model", {}).get("name") == "video_dit" and "vae_workdir" not in config


def _sample_trained_video_dit(args, prompts, init) -> np.ndarray:
    """Videos from a `genjax train` video DiT run through its task's `sample_fn`."""
    from genjax.train import tasks

    config, task, params = tasks.restore(args.workdir, devices=jax.devices()[:1])
    check(args.frames is None and args.height is None and args.width is None, "--frames/--height/--width",
          (args.frames, args.height, args.width), "are fixed by a `genjax train` video DiT run (its training clips)")
    init_frames = None
    if init is not None:
        img = init[..., None] if init.ndim == 2 else init
        img = img.mean(-1, keepdims=True).astype(np.uint8) if img.shape[-1] != config.data.get("channels", 1) else img
        init_frames = np.broadcast_to(img[None, None], (len(prompts), 1, *img.shape)).copy()
    return np.asarray(task.sample_fn(params, jax.random.PRNGKey(args.seed), prompts=prompts, num=len(prompts),
                                     cfg_scale=args.cfg_scale, num_steps=args.steps,
                                     sampler=SAMPLERS[args.sampler], init_frames=init_frames))


def main(args) -> int:
    """`genjax sample`: validate every argument (UserError, before anything compiles), restore the
    model, generate, write `--out` (+ .gif / .mp4 for videos, .png for images).

    The workdir decides what is generated:
      a `genjax demo` workdir (or its dit/ stage) or a `genjax train` video DiT run: `--num`
        videos for each `--prompt`;
      a `genjax train` image diffusion run (dit / unet) or a `genjax convert` DiT / U-Net folder
        (`--vae` for a latent DiT): `--num` images for each `--class-label`
        (`genjax.sample_images`).
    """
    from genjax import sample_images

    check(args.num >= 1, "--num", args.num, "must be an integer >= 1")
    check(args.out.endswith(".npz"), "--out", args.out, "must be a .npz file")
    check(args.cfg_scale is None or np.isfinite(args.cfg_scale), "--cfg-scale", args.cfg_scale, "must be finite")
    check(args.sampler in SAMPLERS, "--sampler", args.sampler, f"must be one of {tuple(SAMPLERS)}")
    check(args.steps is None or args.steps >= 1, "--steps", args.steps, "must be an integer >= 1")
    check(os.path.isdir(args.workdir), "--workdir", args.workdir, "does not exist")
    check(args.vae is None or os.path.isdir(args.vae), "--vae", args.vae, "does not exist")
    if sample_images.is_image_model(args.workdir):
        return sample_images.main(args, SAMPLERS[args.sampler])
    check(bool(args.prompt), "--prompt", None, "is required for a text-to-video model")
    check(not args.class_label, "--class-label", args.class_label, "is for class-conditional image models; "
          "this is a text-to-video model: use --prompt")
    for p in args.prompt:
        check(isinstance(p, str) and p.strip() != "", "--prompt", p, "must be a non-empty string")
    init = None
    if args.init_frame:
        from genjax.io import media

        check(os.path.isfile(args.init_frame), "--init-frame", args.init_frame, "must be an existing image file")
        init = media.read_image(args.init_frame)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    if _trained_video_dit(args.workdir):
        videos = _sample_trained_video_dit(args, prompts, init)
    else:
        _, config = read_config(args.workdir)
        s, d = config.sample, config.data
        kw = dict(num_frames=d.num_frames if args.frames is None else args.frames,
                  height=d.image_size if args.height is None else args.height,
                  width=d.image_size if args.width is None else args.width,
                  num_steps=args.steps or s.num_steps, sampler=args.sampler)
        check_request(config, num=args.num, **kw)
        videos = generate(load(args.workdir), prompts, seed=args.seed, init_frame=init,
                          cfg_scale=s.cfg_scale if args.cfg_scale is None else args.cfg_scale, **kw)
    for path in write_outputs(args.out, videos, prompts):
        print(path)
    return 0
