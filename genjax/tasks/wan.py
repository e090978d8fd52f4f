"""Task "wan": Wan 2.1 text-to-video sampling from a `genjax convert --model wan` folder.

Source: Wan Team 2025 (arXiv:2503.20314); the numbers are diffusers 0.42 `WanPipeline`'s
(tests/test_wan_pipeline.py: every pixel within one uint8 level of WanPipeline from the same
initial latents, tiny random pipeline).

Pieces (config sections, `converted_config` writes them for a converted folder):
  model     the `genjax.models.wan.WanTransformer` attributes (the converted kwargs) + name "wan";
            its params are what `sample_fn` takes (the converted DIR/params).
  task.vae  a `genjax convert --model wan_vae` folder (DIR/vae): the frozen `WanVAE`; latents are
            un-normalised z * latents_std + latents_mean and decoded chunk by chunk
            (`wan_vae.decode_chunked`, as diffusers' `AutoencoderKLWan._decode`).
  task.text_encoder, text_length, text_dtype
            the frozen umT5 (`tasks.text_encoders`, kind "t5"; DIR/text_encoder), 512 tokens as
            WanPipeline's max_sequence_length. As WanPipeline, each prompt is cleaned
            (`clean_prompt`), encoded with its attention mask, and the hidden states past its
            last token are zeroed; the transformer attends to all 512 positions.
  diffusion schedule "flow", prediction_type "flow", num_timesteps and flow_shift from the
            pipeline's scheduler; the Euler grid s_i = shift(linspace(1, shift(1 / T), S)) then 0
            with model time t = 1000 s is FlowMatchEulerDiscreteScheduler(shift=flow_shift)'s
            (`samplers._grid`).
  eval      sampler: the pipeline scheduler's, "unipc" for UniPCMultistepScheduler (the Wan2.1
            Diffusers folders': UniPC-2 on its own grid shift(linspace(1, 1/T, S + 1)[:S]) with integer
            model times, `samplers.sample`) or "euler" for FlowMatchEulerDiscreteScheduler (flow
            Euler: x <- x + (s_next - s) v on the grid above); num_sampling_steps 50, cfg_scale 5.0, negative_prompt "", num_frames 81, height 480,
            width 832 (WanPipeline's defaults).

sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None,
num_frames=None, height=None, width=None, negative_prompt=None, init_frames=None, noise=None)
-> uint8 videos (N, T, H, W, 3):
  cond: N prompts (non-empty str, at most text_length tokens; longer ones are refused, not cut);
    default eval.prompts.
  cfg_scale > 1: classifier-free guidance (`guidance.cfg_denoiser`, one 2N-batch call per step),
    uncond + s (cond - uncond) with the unconditional branch conditioned on negative_prompt
    (a str for all, or N str; default eval.negative_prompt, ""); cfg_scale <= 1: the conditional
    prediction alone (WanPipeline does no guidance then).
  num_frames T = 1 + 4k (the VAE's temporal factor ft; with k + 1 a multiple of the temporal patch);
    height, width positive multiples of 16 (VAE 8 x patch 2).
  noise: optional x_T float (N, 1 + (T - 1) / ft, H / 8, W / 8, C) channels-last, instead of
    drawing it from rng (diffusers' `latents=` is the same array in (N, C, t, h, w)).
  Everything (text encoding, the sampling loop, decoding) runs in one jit, compiled once per
  (N, size, sampler, num_steps, guided or not).

Raises (sample_fn, before compiling): UserError for bad prompts, negative prompts, sizes, noise,
init_frames (image-to-video is not supported) and `tasks.diffusion.sampling_options`' errors.
Fine-tuning is not implemented: `loss_fn` and `make_data` raise UserError.
"""

from __future__ import annotations

import functools
import html
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check, fail
from genjax.tasks import Task, diffusion, make_model, replicated

TASK_KEYS = ("vae", "text_encoder", "text_length", "text_dtype")
DIFFUSION_KEYS = diffusion.DIFFUSION_KEYS
EVAL_KEYS = ("prompts", "negative_prompt", "num_frames", "height", "width")
DEFAULT_PROMPTS = ("A cat walks on the grass, realistic",)
# WanPipeline's defaults (diffusers 0.42 pipeline_wan.py __call__).
DEFAULT_EVAL = dict(sample_every_steps=0, num_samples=1, sampler="euler", num_sampling_steps=50, cfg_scale=5.0,
                    negative_prompt="", num_frames=81, height=480, width=832, prompts=list(DEFAULT_PROMPTS))
TEXT_LENGTH = 512  # WanPipeline's max_sequence_length


def converted_config(path: str, *, dtype: str | None = None, **eval_overrides):
    """The sampling config of a `genjax convert --model wan` folder `path` (see the module docstring);
    `dtype` ("float32" default, "bfloat16"): the transformer's dtype / param_dtype and task.text_dtype
    (the umT5's), as WanPipeline loaded with torch_dtype; the VAE stays float32.

    Raises:
      UserError: `path` is not a converted Wan folder, or lacks its vae/ or text_encoder/.
    """
    import ml_collections

    from genjax import convert

    converted = convert.read_converted_config(path)
    check(converted is not None and converted.get("family") == "wan", "--workdir", path,
          "is not a `genjax convert --model wan` folder")
    check(dtype in (None, "float32", "bfloat16"), "dtype", dtype, "must be 'float32' or 'bfloat16'")
    sched = converted.get("scheduler") or {}
    path = os.path.abspath(path)
    task = dict(vae=os.path.join(path, converted.get("vae", "vae")),
                text_encoder=os.path.join(path, converted.get("text_encoder", "text_encoder")),
                text_length=TEXT_LENGTH, text_dtype=dtype or "float32")
    check(os.path.isdir(task["vae"]), "--workdir", path, "holds no vae/ (convert the pipeline again)")
    check(os.path.isdir(task["text_encoder"]), "--workdir", path, "holds no text_encoder/ (convert the pipeline again)")
    diff = dict(schedule="flow", num_timesteps=int(sched.get("num_train_timesteps", 1000)), prediction_type="flow",
                weighting="none", flow_shift=float(sched.get("flow_shift", 1.0)))
    # the pipeline's own solver: UniPC for the Wan2.1-*-Diffusers folders, else flow Euler
    eval_overrides = {"sampler": "unipc" if sched.get("class") == "UniPCMultistepScheduler" else "euler",
                      **eval_overrides}
    model = dict(converted["kwargs"], name="wan")
    if dtype:
        model.update(dtype=dtype, param_dtype=dtype)
    return ml_collections.ConfigDict(dict(model=model, task=task,
                                          data=dict(dataset="converted"), diffusion=diff,
                                          eval={**DEFAULT_EVAL, **eval_overrides}, seed=0))


def clean_prompt(text: str) -> str:
    """WanPipeline's `prompt_clean` without ftfy (not a genjax dependency; diffusers, too, skips it
    when ftfy is not installed): HTML entities unescaped twice, whitespace runs -> one space, stripped."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_size(frames, height, width, *, fs: int, ft: int, patch) -> None:
    """Refuse a video size the VAE (spatial factor fs, temporal ft) and the transformer's patch
    (pt, ph, pw) cannot take: frames = 1 + ft k with 1 + k a multiple of pt; height, width
    positive multiples of fs * ph, fs * pw. Raises UserError naming the field and the rule."""
    pt, ph, pw = patch
    check(isinstance(frames, int) and frames >= 1 and (frames - 1) % ft == 0
          and (1 + (frames - 1) // ft) % pt == 0, "num_frames", frames,
          f"must be 1 + {ft} k (the VAE's temporal factor {ft})" + (f" with 1 + k a multiple of {pt}" if pt > 1 else ""))
    for field, v, p in (("height", height, ph), ("width", width, pw)):
        check(isinstance(v, int) and v >= fs * p and v % (fs * p) == 0, field, v,
              f"must be a positive multiple of {fs * p} (VAE downsampling {fs} x patch {p})")


def check_request(path: str, prompts, negative_prompt=None, frames=None, height=None, width=None) -> None:
    """`genjax sample`'s checks of a converted Wan folder `path`, from its files alone (before
    the weights are read): prompts (and the negative prompt) that the tokenizer would cut (more
    than text_length tokens after `clean_prompt`), and the size (`check_size`; None: the defaults).

    Raises:
      UserError: naming the prompt's index, its token count and the limit, or the size field;
        `converted_config`'s."""
    from genjax import convert
    from genjax.models import tokenizer

    config = converted_config(path)
    t, e = config.task, config.eval
    tok = tokenizer.HFTokenizer.from_file(t.text_encoder)
    tok.check_fits([clean_prompt(p) for p in prompts], t.text_length, "--prompt")
    if negative_prompt is not None:
        tok.check_fits([clean_prompt(negative_prompt)], t.text_length, "--negative-prompt")
    vae = convert.read_converted_config(t.vae)["kwargs"]
    check_size(e.num_frames if frames is None else frames, e.height if height is None else height,
               e.width if width is None else width, fs=2 ** (len(vae["dim_mult"]) - 1),
               ft=2 ** sum(bool(x) for x in vae["temporal_downsample"]), patch=tuple(config.model.patch_size))


def validate(config) -> None:
    """Raises UserError: task.vae not a converted Wan VAE folder; task.text_encoder not a T5 / umT5
    folder, text_length < 2 or an unknown text_dtype (`text_encoders.validate`)."""
    from genjax import convert
    from genjax.tasks import text_encoders

    t = config.get("task", {})
    vae = convert.read_converted_config(t.get("vae", "")) if t.get("vae") else None
    check(vae is not None and vae["family"] == "wan_vae", "task.vae", t.get("vae", ""),
          "must be a `genjax convert --model wan_vae` folder (DIR/vae of `--model wan`)")
    text_encoders.validate(t)
    kind = text_encoders.kind_of(t.get("text_encoder", ""))
    check(kind == "t5", "task.text_encoder", t.get("text_encoder", ""),
          f"must be a transformers umT5 / T5 folder (Wan's text encoder), not {kind!r}")


def make_module(config):
    """The `WanTransformer` of config.model."""
    from genjax.models import wan

    return make_model(wan, wan.WanTransformer, config.model)


def _not_trainable(*_args, **_kwargs):
    fail("model.name", "wan", "fine-tuning Wan is not implemented yet (this task samples only)")


def build(config, *, mesh=None) -> Task:
    from genjax import convert
    from genjax.models import wan_vae
    from genjax.tasks import text_encoders

    t, e = config.task, config.eval
    module = make_module(config)
    vae_module, vae_params = convert.load_converted(t.vae)
    text = text_encoders.build(t, mesh=mesh)
    check(vae_module.z_dim == module.in_channels == module.out_channels, "task.vae", t.vae,
          f"has z_dim {vae_module.z_dim}; the transformer takes {module.in_channels} channels")
    check(text.width == module.text_dim, "task.text_encoder", t.text_encoder,
          f"gives width {text.width}; the transformer takes text_dim {module.text_dim}")
    fs, ft = vae_module.downsample_factor, vae_module.temporal_downsample_factor
    pt, ph, pw = module.patch_size
    channels, schedule = module.in_channels, diffusion.make_schedule(config)
    frozen = {**text.frozen, "vae": replicated(vae_params, mesh)}  # placed as the text encoder's

    def init_params(key):
        x = jnp.zeros((1, pt, ph, pw, channels), jnp.float32)
        return module.init(key, x, jnp.zeros((1,), jnp.float32), jnp.zeros((1, 1, module.text_dim)))["params"]

    @functools.partial(jax.jit, static_argnames=("shape", "sampler", "num_steps", "guided"))
    def run(params, frozen, rng, ids, mask, neg_ids, neg_mask, cfg_scale, noise, *, shape, sampler, num_steps, guided):
        def embed(ids, mask):  # WanPipeline: hidden states past each text's last token are zeros
            return jnp.where(mask[..., None], text.encode(frozen, ids, mask), 0.0)  # (N, L, Dt)

        def denoise_fn(x_t, t, text):
            return module.apply({"params": params}, x_t, t, text).astype(jnp.float32)

        def decode(z):  # diffusers: latents / (1 / std) + mean, then AutoencoderKLWan.decode
            z = z / vae_module.scaling_factor + vae_module.shift_factor
            return wan_vae.decode_chunked(vae_module, frozen["vae"], z)

        tokens = math.prod(s // p for s, p in zip(shape[:3], module.patch_size))
        return diffusion.generate(denoise_fn, (ids.shape[0], *shape), rng, schedule=schedule,
                                  cond={"text": embed(ids, mask)},
                                  null_cond={"text": embed(neg_ids, neg_mask)} if guided else None,
                                  cfg_scale=cfg_scale, sampler=sampler, num_steps=num_steps, keep=channels,
                                  decode=decode, flow_shift=diffusion.sample_shift(config, tokens), noise=noise)

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, num_frames=None,
                  height=None, width=None, negative_prompt=None, init_frames=None, noise=None):
        sampler, num_steps, cfg_scale = diffusion.sampling_options(config, sampler, num_steps, cfg_scale)
        check(init_frames is None, "init_frames", "given", "image-to-video is not supported by the Wan 2.1 "
              "text-to-video task")
        defaults = tuple(e.get("prompts") or DEFAULT_PROMPTS)
        prompts = [defaults[i % len(defaults)] for i in range(e.num_samples)] if cond is None else list(cond)
        for i, p in enumerate(prompts):
            check(isinstance(p, str) and p.strip() != "", f"prompts[{i}]", p, "must be a non-empty string")
        prompts = [clean_prompt(p) for p in prompts]
        negative = e.get("negative_prompt", "") if negative_prompt is None else negative_prompt
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        check(len(negative) == len(prompts) and all(isinstance(p, str) for p in negative), "negative_prompt",
              negative, f"must be a str or {len(prompts)} str (one per prompt)")
        negative = [clean_prompt(p) for p in negative]
        text.tokenizer.check_fits(prompts, text.length, "prompts")  # a prompt cut short changes the video
        text.tokenizer.check_fits(negative, text.length, "negative_prompt")
        frames = int(e.get("num_frames", 81)) if num_frames is None else num_frames
        h, w = (int(e.get(k, d)) if v is None else v for k, v, d in (("height", height, 480), ("width", width, 832)))
        check_size(frames, h, w, fs=fs, ft=ft, patch=module.patch_size)
        shape = (1 + (frames - 1) // ft, h // fs, w // fs, channels)
        if noise is not None:
            noise = np.asarray(noise)
            check(noise.shape == (len(prompts), *shape) and np.issubdtype(noise.dtype, np.floating), "noise",
                  f"{noise.dtype}{noise.shape}", f"must be float (N, t, h, w, C) = {(len(prompts), *shape)}")
            noise = jnp.asarray(noise, jnp.float32)
        ids, mask = text.tokenize(prompts)
        neg_ids, neg_mask = text.tokenize(negative)
        return run(params, frozen, rng, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(neg_ids),
                   jnp.asarray(neg_mask), jnp.float32(cfg_scale), noise, shape=shape, sampler=sampler,
                   num_steps=num_steps, guided=bool(cfg_scale > 1))

    return Task(module, init_params, _not_trainable, sample_fn, _not_trainable, frozen=frozen)
