"""Task "video_dit": text-to-video latent diffusion, the Sora-style `genjax.models.video_dit.VideoDiT`
(the model section holds its attributes) on the latents of a frozen video VAE, conditioned on the
clips' captions.

Latents: x0 = `(z - shift_factor) * latent_scale` of the video VAE in task.vae (a `video_vae`
workdir, frozen EMA params; latent_scale = task.latent_scale, or the VAE's scaling_factor when 0;
`latent_scale_of` measures 1 / std, LDM appendix D.1), z ~ q(z | video) drawn with the step's rng
(LDM, Rombach et al. 2022, sec. 3): videos (B, T, S, S, C) in [-1, 1] -> (B, 1 + (T - 1) / ft,
S / fs, S / fs, latent_channels).
  data.latents = "on_the_fly" (default): the clips are encoded inside the jitted train step;
  data.latents = "cache": the posterior mean and std (and the caption tokens) are computed once
    into WORKDIR/latents/ (`recipes.latent_cache_data`), so a step costs only the DiT.
  data.packing = {seq_len, max_per_seq} (with data.sizes, native sizes, or a data.mix of videos
    and 1-frame images): NaViT packing, each clip encoded alone in the input pipeline and its
    latent tubelets packed into data.batch_size sequences (`_packed`; the loss runs through
    `VideoDiT.packed`, one time per example).
Text (`tasks.text_encoders`): captions tokenized to task.text_length tokens and encoded by the
text encoder task.text_encoder names:
  "" (default, the offline demo): byte tokenizer (`tokenizer.ByteTokenizer`) and a
    `clip_towers.TextTransformer` (task.text: width, num_layers, num_heads, mlp_dim) trained jointly;
  a genjax CLIP workdir (`genjax train`, model.name=clip): byte tokenizer, its frozen text tower;
  a transformers T5 / mT5 / umT5 encoder folder (config.json model_type t5 / mt5 / umt5,
    safetensors, tokenizer.json; e.g. google/t5-v1_1-xxl, Wan's umt5-xxl): its tokenizer.json and
    the frozen `t5.T5Encoder`, params sharded over fsdp / tensor by their logical axes;
  a transformers CLIP folder (model_type clip or clip_text_model, tokenizer.json): its tokenizer
    and frozen text tower.
A frozen encoder runs in task.text_dtype ("float32" default, "bfloat16") inside the train step,
without gradients; its params are `Task.frozen`, not trained nor saved. The DiT cross-attends to
its last hidden states `(B, L, Dt)` under text_mask (PixArt-alpha / Wan condition on a frozen
encoder's last hidden states). Params: `{"dit": ..., "text": ...}` (no "text" with a frozen encoder).

loss_fn: `losses.diffusion_loss` (diffusion.schedule / prediction_type / weighting; model.learn_sigma
adds the VLB; a "flow" schedule trains flow matching, `tasks.diffusion.validate`, with each sample
size's own timestep shift at sampling) with the DiT's classifier-free text dropout (model.text_dropout_prob -> its learned
null text, Ho & Salimans 2022). diffusion.frame_mask_probs (default {"none": 1}) draws known latent
frames per example (`frame_conditioning.random_frame_mask`: first, first k, first + last, random)
and the loss is `frame_conditioning.frame_conditioned_diffusion_loss` (Open-Sora v1.1), so the
same model does image-to-video and extension.

sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None,
init_frames=None, num_frames=None, height=None, width=None) -> uint8 videos (N, T, H, W, C):
  cond: prompts, a list of N non-empty str of valid UTF-8, each fitting task.text_length (at most
    text_length - 2 bytes for the byte tokenizer, text_length tokens for a tokenizer.json; longer
    ones are refused, not cut) (default eval.prompts, or "digit 0" ... "digit 9", cycled
    to eval.num_samples); classifier-free guidance against the null text (force_drop_ids = 1).
  sampler, num_steps, cfg_scale: default config.eval's (`tasks.diffusion.sampling_options`).
  init_frames: optional uint8 (N, K, H, W, C) first frames, K = 1 + j * ft < T: encoded by the VAE
    (posterior mode) and kept as the first 1 + j latent frames (image-to-video with K = 1).
  num_frames, height, width: default the training clips'; other sizes need T = 1 + k * ft with
    1 + k divisible by the DiT's temporal patch, and H, W multiples of fs x the spatial patch.
The loop is compiled once per (N, shape, sampler, num_steps, init_frames or not).

Raises:
  UserError: data.dataset not a video dataset (`recipes.is_video`); data.num_frames / image_size
    not fitting the VAE; task.text_encoder of no accepted kind (`text_encoders.kind_of`, in
    validate); task.text_length < 2 or above a frozen CLIP's context_length; the latent grid not divisible by
    model.patch_size; in sample_fn (before compiling) bad prompts (not UTF-8, longer than
    task.text_length - 2 bytes), sizes or init_frames.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import DTYPES, Task, diffusion, is_model_dir, load_frozen, make_model

# The config fields this family reads beyond the common ones (tasks.check_keys).
TASK_KEYS = ("vae", "text_encoder", "text", "text_length", "text_dtype", "latent_scale")
DATA_KEYS = ("latents",)
DIFFUSION_KEYS = (*diffusion.DIFFUSION_KEYS, "frame_mask_probs")
EVAL_KEYS = ("prompts",)  # default prompts of samples (default DEFAULT_PROMPTS)
DEFAULT_PROMPTS = tuple(f"digit {i}" for i in range(10))


def validate(config) -> None:
    """Raises UserError: task.vae not a trained video VAE workdir, task.text_encoder of no accepted
    kind, task.text_length < 2 or task.text_dtype unknown (`text_encoders.validate`), a bad
    diffusion.frame_mask_probs, an unknown data.latents."""
    from genjax.diffusion import frame_conditioning
    from genjax.tasks import text_encoders

    t = config.get("task", {})
    check(is_model_dir(t.get("vae", "")), "task.vae", t.get("vae", ""),
          "must be a trained video VAE workdir (genjax train, model.name=video_vae)")
    text_encoders.validate(t)
    probs = dict(config.diffusion.get("frame_mask_probs", {"none": 1.0}))
    check(set(probs) <= set(frame_conditioning.MASK_KINDS) and all(p >= 0 for p in probs.values())
          and abs(sum(probs.values()) - 1) < 1e-6, "diffusion.frame_mask_probs", probs,
          f"must map kinds of {frame_conditioning.MASK_KINDS} to probabilities >= 0 summing to 1")
    latents = config.data.get("latents", "on_the_fly")
    check(latents in ("on_the_fly", "cache"), "data.latents", latents, "must be one of ('on_the_fly', 'cache')")


def latent_scale_of(config, num: int = 512) -> float:
    """1 / std of the frozen video VAE's posterior means (task.vae) on the first `num` training
    clips of config.data: the latent_scale that gives unit-variance latents (LDM App. D.1)."""
    from genjax.data import recipes

    vae_module, vae_params = load_frozen(config.task.vae, family_name="video_vae")
    videos = recipes.fixed_examples(config, num, split=config.data.split)["video"]
    mean = jax.jit(lambda x: vae_module.apply({"params": vae_params}, x, method=vae_module.encode).mean)
    z = np.concatenate([np.asarray(mean(videos[i:i + 64])) for i in range(0, len(videos), 64)])
    return float(1.0 / z.std())


def build(config, *, mesh=None) -> Task:
    from genjax.data import recipes
    from genjax.diffusion import frame_conditioning, losses
    from genjax.models import video_dit
    from genjax.tasks import clip as clip_task, diffusion, text_encoders

    d, t, e = config.data, config.task, config.eval
    check(recipes.is_video(config), "data.dataset", d.dataset,
          "video_dit trains on videos: moving_mnist, video_folder:PATH, a TFDS video dataset or a data.mix")
    vae_module, vae_params = load_frozen(t.vae, mesh=mesh, family_name="video_vae")
    if t.get("latent_scale", 0.0):
        vae_module = vae_module.clone(scaling_factor=float(t.latent_scale))
    fs, ft = vae_module.downsample_factor, vae_module.temporal_downsample_factor
    check(d.image_size % fs == 0, "data.image_size", d.image_size, f"must be divisible by the VAE's {fs}")
    check((d.num_frames - 1) % ft == 0, "data.num_frames", d.num_frames, f"must be 1 + k * {ft} (the VAE's)")
    x_shape = (1 + (d.num_frames - 1) // ft, d.image_size // fs, d.image_size // fs, vae_module.latent_channels)

    text = text_encoders.build(t, mesh=mesh, dtype=DTYPES[config.model.get("dtype", "float32")])
    tok, length, encode_text = text.tokenizer, text.length, text.encode
    module = make_model(video_dit, video_dit.VideoDiT, config.model, in_channels=x_shape[-1], context_dim=text.width,
                        num_classes=0)
    check(all(s % p == 0 for s, p in zip(x_shape[:3], module.patch_size)), "model.patch_size",
          tuple(module.patch_size), f"must divide the latent grid {x_shape[:3]}")
    schedule = diffusion.make_schedule(config)
    channels, learn_sigma = x_shape[-1], module.learn_sigma
    probs = dict(config.diffusion.get("frame_mask_probs", {"none": 1.0}))
    loss_kw = diffusion.loss_options(config, math.prod(s // p for s, p in zip(x_shape[:3], module.patch_size)))

    def init_params(key):
        dit_key, text_key = jax.random.split(key)
        hidden = jnp.zeros((1, length, text.width), jnp.float32)
        params = {"dit": module.init(dit_key, jnp.zeros((1, *x_shape), jnp.float32), jnp.zeros((1,), jnp.int32),
                                     text=hidden, text_mask=jnp.ones((1, length), bool))["params"]}
        if text.init is not None:  # the joint text tower; a frozen encoder's params are text.frozen
            params["text"] = text.init(text_key)
        return params

    tokenize = clip_task.tokenize_fn(tok, length, "video")
    encode, decode, make_data = diffusion.latent_fns(config, vae_module, vae_params, t.vae, "video", inputs=tokenize,
                                                     meta={"text_length": length, **text.meta})

    def loss_fn(params, batch, rng):
        vae_rng, model_rng, loss_rng, mask_rng = jax.random.split(rng, 4)
        x0 = encode(batch, vae_rng)
        cond = {"text": encode_text(params, batch["ids"], batch["mask"]), "text_mask": batch["mask"]}

        def denoise_fn(x_t, t, **c):
            return module.apply({"params": params["dit"]}, x_t, t, **c, train=True,
                                rngs={"dropout": model_rng}).astype(jnp.float32)

        kw = dict(schedule=schedule, cond=cond, learn_sigma=learn_sigma, **loss_kw)
        if probs.get("none", 0.0) == 1.0:
            return losses.diffusion_loss(denoise_fn, x0, loss_rng, **kw)
        frame_mask = frame_conditioning.random_frame_mask(mask_rng, x0.shape[0], x0.shape[1], probs=probs)
        return frame_conditioning.frame_conditioned_diffusion_loss(denoise_fn, x0, loss_rng,
                                                                   frame_mask=frame_mask, **kw)

    @functools.partial(jax.jit, static_argnames=("shape", "sampler", "num_steps"))
    def run(params, rng, ids, mask, cfg_scale, init_frames, *, shape, sampler, num_steps):
        def denoise_fn(x_t, t, **c):
            return module.apply({"params": params["dit"]}, x_t, t, **c).astype(jnp.float32)

        n = ids.shape[0]
        cond = {"text": encode_text(params, ids, mask), "text_mask": mask,
                "force_drop_ids": jnp.zeros((n,), jnp.int32)}
        known = None
        if init_frames is not None:
            z = vae_module.apply({"params": vae_params}, init_frames.astype(jnp.float32) / 127.5 - 1,
                                 method=vae_module.encode_latents).astype(jnp.float32)
            k = z.shape[1]
            x_known = jnp.concatenate([z, jnp.zeros((n, shape[0] - k, *shape[1:]))], axis=1)
            known = (x_known, jnp.broadcast_to(jnp.arange(shape[0]) < k, (n, shape[0])))
        tokens = math.prod(s // p for s, p in zip(shape[:3], module.patch_size))
        return diffusion.generate(denoise_fn, (n, *shape), rng, schedule=schedule, cond=cond,
                                  null_cond={"force_drop_ids": 1}, cfg_scale=cfg_scale, sampler=sampler,
                                  num_steps=num_steps, keep=channels, known=known, decode=decode,
                                  flow_shift=diffusion.sample_shift(config, tokens))

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None,
                  num_frames=None, height=None, width=None):
        sampler, num_steps, cfg_scale = diffusion.sampling_options(config, sampler, num_steps, cfg_scale)
        defaults = tuple(e.get("prompts") or DEFAULT_PROMPTS)
        prompts = [defaults[i % len(defaults)] for i in range(e.num_samples)] if cond is None else cond
        tok.check_fits(prompts, length, "prompts")  # a prompt cut at text_length changes the sample
        for i, p in enumerate(prompts):
            check(p.strip() != "", f"prompts[{i}]", p, "must be a non-empty string")
        frames = d.num_frames if num_frames is None else num_frames
        h, w = (d.image_size if v is None else v for v in (height, width))
        pt, ph, pw = module.patch_size
        check(isinstance(frames, int) and frames >= 1 and (frames - 1) % ft == 0
              and (1 + (frames - 1) // ft) % pt == 0, "num_frames", frames,
              f"must be 1 + k * {ft} (the VAE's temporal factor) with 1 + k a positive multiple of the DiT's temporal patch {pt}")
        for field, v, p in (("height", h, ph), ("width", w, pw)):
            check(isinstance(v, int) and v >= fs * p and v % (fs * p) == 0, field, v,
                  f"must be a positive multiple of {fs * p} (VAE downsampling {fs} x DiT patch {p})")
        shape = (1 + (frames - 1) // ft, h // fs, w // fs, channels)
        if init_frames is not None:
            init_frames = np.asarray(init_frames)
            k = init_frames.shape[1] if init_frames.ndim == 5 else 0
            check(init_frames.dtype == np.uint8 and init_frames.ndim == 5 and init_frames.shape[0] == len(prompts)
                  and init_frames.shape[2:] == (h, w, d.channels) and (k - 1) % ft == 0 and k < frames,
                  "init_frames", f"{init_frames.dtype}{tuple(init_frames.shape)}",
                  f"must be uint8 (N={len(prompts)}, 1 + j * {ft} < {frames}, {h}, {w}, {d.channels})")
        ids, mask = text.tokenize(prompts)
        return run({**params, **text.frozen}, rng, jnp.asarray(ids), jnp.asarray(mask), jnp.float32(cfg_scale), init_frames,
                   shape=shape, sampler=sampler, num_steps=num_steps)

    if d.get("packing") is not None:  # NaViT: mixed sizes in fixed (S, L) batches, one compiled step
        loss_fn, make_data = _packed(config, module, vae_module, vae_params, tokenize, encode_text, schedule,
                                     {"text_length": length, **text.meta})
    return Task(module, init_params, loss_fn, sample_fn, make_data, encode=encode, frozen=text.frozen)


def _packed(config, module, vae_module, vae_params, tokenize, encode_text, schedule, text_meta):
    """`(loss_fn, make_data)` of packed training (data.packing): every example (of data.sizes, or a
    folder's clip at its native aspect resized to fit seq_len tokens, `transforms.FitArea`) is
    encoded alone by the frozen VAE in the input pipeline (`recipes.packed_latent_data`; or read
    from its latent cache), its latent tubelets packed into data.batch_size sequences of data.packing.seq_len tokens; the
    loss is `losses.diffusion_loss` on the packed tokens (one time per example, padding out)
    through `VideoDiT.packed`, with each example's own flow shift (`tasks.diffusion.loss_options`
    of its token count). With data.latents "cache" the latents and caption tokens come from a
    ragged latent cache, computed once. Raises UserError (before compiling) for a size the VAE or
    the DiT patch does not divide, an example longer than seq_len, or frame conditioning."""
    from genjax.data import mixing, recipes, transforms

    d, c = config.data, vae_module.latent_channels
    fs, ft = vae_module.downsample_factor, vae_module.temporal_downsample_factor
    check(not module.learn_sigma, "model.learn_sigma", True, "must be false with data.packing")
    check(dict(config.diffusion.get("frame_mask_probs", {"none": 1.0})) == {"none": 1.0},
          "diffusion.frame_mask_probs", dict(config.diffusion.get("frame_mask_probs", {})),
          "must be {'none': 1.0} with data.packing")
    pt, ph, pw = module.patch_size
    fit = None
    sizes = [tuple(z) for z in (d.get("sizes") or [(d.num_frames, d.image_size, d.image_size)])]
    if d.dataset != "moving_mnist":  # native sizes (folders, TFDS, a mix): each fitted to the token budget
        nt = (1 + (d.num_frames - 1) // ft) // pt
        multiple = math.lcm(fs * ph, fs * pw)
        fit = transforms.FitArea(max_area=d.packing.seq_len * fs * ph * fs * pw // max(nt, 1), multiple=multiple,
                                 keys=("video",))
        sizes = [(d.num_frames, multiple, multiple)]  # the frame count and the smallest size
        if d.dataset == recipes.MIX and not all(recipes.is_video(c) for c in mixing.configs(config)):
            check(pt == 1, "model.patch_size", tuple(module.patch_size),
                  "must be 1 in time with images in data.mix (they are 1-frame videos)")
            sizes.append((1, multiple, multiple))
    for t, h, w in sizes:
        ok = (t - 1) % ft == 0 and (1 + (t - 1) // ft) % pt == 0 and h % (fs * ph) == 0 and w % (fs * pw) == 0
        check(ok, "data.sizes", (t, h, w), f"each (T, H, W) needs T = 1 + k * {ft} with 1 + k a multiple of {pt}, "
              f"H a multiple of {fs * ph} and W of {fs * pw} (VAE factors x DiT patch)")
        tokens = (1 + (t - 1) // ft) // pt * (h // fs // ph) * (w // fs // pw)
        check(tokens <= d.packing.seq_len, "data.sizes", (t, h, w),
              f"has {tokens} tokens, more than data.packing.seq_len={d.packing.seq_len}")

    meta = {"vae": os.path.abspath(config.task.vae), **text_meta}  # what a latent cache depends on
    make_data = recipes.packed_latent_data(config, diffusion.posterior_fn(vae_module, vae_params),
                                           patch_size=module.patch_size, inputs=tokenize, fit=fit, meta=meta)

    def conditions(params, batch):
        s, m = batch["example_index"].shape
        empty = (batch["example_index"] < 0)[..., None]  # (S, M, 1): give empty slots one valid text token
        first = jnp.arange(batch["mask"].shape[-1]) == 0
        text_mask = jnp.where(empty, first, batch["mask"] > 0)
        ids = jnp.maximum(batch["ids"], 0)
        text = encode_text(params, ids.reshape(s * m, -1), text_mask.reshape(s * m, -1)).reshape(s, m, *ids.shape[2:], -1)
        return {"text": text, "text_mask": text_mask}

    def denoise(params, batch, x_t, t, rng, **cond):
        return module.apply({"params": params["dit"]}, x_t, batch["segment_ids"], batch["positions"], t, **cond,
                            example_shape=batch["example_shape"], train=True, rngs={"dropout": rng},
                            method=module.packed).astype(jnp.float32)

    loss_fn = diffusion.packed_loss(config, schedule, denoise, conditions,
                                    latent=(c, vae_module.scaling_factor, vae_module.shift_factor))
    return loss_fn, make_data
