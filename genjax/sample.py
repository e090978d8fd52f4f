"""`genjax sample`: parse, restore, call the task's `sample_fn`, write. Nothing here generates.

    genjax sample --workdir runs/demo --prompt "digit 3" --num 4 --seed 0 --out digit3.npz
        [--steps 50] [--cfg-scale 4] [--sampler ddim] [--frames 8] [--height 32] [--width 32]
        [--init-frame first.png]
    genjax sample --workdir runs/dit_mnist --class-label 3 --num 8 --out threes.npz
    genjax sample --workdir runs/mae_mnist --class-label 3 --num 4 --out mae3.npz  # reconstructions
    genjax sample --workdir runs/dalle_mnist --prompt "digit 7" --num 8 [--temperature 1 --top-k 0 --top-p 1]
        [--cfg-scale 1] --out sevens.npz        # text-to-image: images + prompts in the .npz, a PNG grid
    genjax convert --from diffusers --model dit DiT-XL-2-256/transformer --out runs/dit_xl2
    genjax convert --from diffusers --model vae DiT-XL-2-256/vae --out runs/sd_vae
    genjax sample --workdir runs/dit_xl2 --vae runs/sd_vae --class-label 207 --num 2 --out dit_xl2.npz
    genjax convert --from diffusers --model wan Wan2.1-T2V-1.3B-Diffusers --out runs/wan
    genjax sample --workdir runs/wan --prompt "a cat on a skateboard" --num 1 --frames 33 --height 480 \
        --width 832 --steps 50 --cfg-scale 5 [--negative-prompt "blurry"] --out cat.mp4

The workdir is a `genjax train` run (any task with samples: video_dit or dalle with --prompt; dit,
mdt, unet, pixelcnn, var with --class-label; mae: [original | masked | reconstruction] of held-out
examples of each --class-label, images or videos), a `genjax demo` workdir (its `dit/` stage is a
video_dit run), or a
`genjax convert` folder of a diffusers `DiTTransformer2DModel` (with `--vae`: a converted
`AutoencoderKL` or a trained VAE workdir), an unconditional `UNet2DModel`, or a diffusers Wan 2.1
text-to-video pipeline (`tasks/wan.py`: flow Euler with the pipeline's shift and CFG against
--negative-prompt, as `WanPipeline`; tests/test_wan_pipeline.py). `--out` is a .npz, or for a
video model a .mp4: the same .npz / .gif / .mp4 files are written either way. DiT and U-Net models are
sampled with the noise schedule of their papers (DiT, Peebles & Xie 2023, and DDPM, Ho et al.
2020, both train on linear betas 1e-4 .. 0.02 over T = 1000 with epsilon prediction) and DiT's
null class for guidance, as diffusers' `DiTPipeline` does (tests/test_sample.py checks both
against diffusers with the same noise). Sampler settings default to the run's config.eval.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from genjax.errors import check

VIDEO_MODELS = ("video_dit", "wan")
IMAGE_MODELS = ("dit", "unet", "mdt", "mae", "pixelcnn", "var")
TEXT_IMAGE_MODELS = ("dalle",)  # images from --prompt, drawn token by token (--temperature/--top-k/--top-p)
# Converted checkpoints carry no training config: the schedule both papers trained with.
PAPER_DIFFUSION = dict(schedule="linear", num_timesteps=1000, prediction_type="epsilon", weighting="none")
PAPER_EVAL = dict(sample_every_steps=0, num_samples=1, sampler="ddim", num_sampling_steps=50, cfg_scale=4.0)


def model_dir(workdir: str) -> str:
    """`workdir/dit` for a `genjax demo` workdir (its video DiT stage), else `workdir`.

    Raises:
      UserError: `workdir` does not exist or is not a folder, or neither holds a config.json.
    """
    check(os.path.isdir(workdir), "--workdir", workdir,
          "is a file, not a folder (want a genjax train / demo / convert workdir)" if os.path.exists(workdir)
          else "does not exist")
    for path in (os.path.join(workdir, "dit"), workdir):
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    from genjax.errors import fail

    fail("--workdir", workdir, "holds no trained model (run `genjax train` or `genjax demo` first, "
         "or `genjax convert` a diffusers model)")


def check_prompts(prompts, config) -> None:
    """Refuse, before the model is restored, prompts that the run's byte tokenizer would cut
    (longer than task.text_length - 2 bytes of UTF-8: a cut prompt silently changes the video) or
    that are not UTF-8 text (a non-UTF-8 byte in argv becomes a lone surrogate).

    Raises:
      UserError: naming the prompt's index, its length in bytes and the limit.
    """
    from genjax.models import tokenizer

    tokenizer.ByteTokenizer().check_fits(list(prompts), int(config.task.text_length), "--prompt")


def converted_config(converted: dict, workdir: str, vae: str | None, image_size: int | None):
    """A trainer config (tasks `dit` / `unet`) for a `genjax convert` DiT / U-Net folder.

    Raises:
      UserError: a converted VAE as workdir, a class-conditional U-Net, a DiT without --vae or
        with a VAE of other latent channels, an image size the model cannot take.
    """
    from genjax import tasks

    family, kwargs = converted["family"], dict(converted["kwargs"])
    check(family in IMAGE_MODELS, "--workdir", workdir,
          f"is a converted {family!r} model, which cannot sample alone (pass it as --vae of a latent DiT)")
    size, task = converted.get("sample_size"), {}
    if family == "unet":
        check(not kwargs.get("num_class_embeds"), "--workdir", workdir,
              "is a class-conditional converted U-Net: its null class is not known, only "
              "unconditional converted U-Nets can be sampled")
        multiple = 2 ** (len(kwargs["block_out_channels"]) - 1)  # the U-Net's downsampling
    else:  # diffusers' DiT checkpoints are latent models: they need their VAE
        check(vae is not None, "--vae", vae, "is required: a converted DiT works on VAE latents (give the "
              "VAE folder, e.g. `genjax convert --model vae .../vae --out DIR`)")
        from genjax import convert

        vae_converted = convert.read_converted_config(vae)
        check(vae_converted["family"] == "vae" if vae_converted else tasks.is_model_dir(vae), "--vae", vae,
              "must be a `genjax convert --model vae` folder or a trained VAE workdir")
        vae_module, _ = tasks.load_frozen(vae, family_name="vae")
        check(vae_module.latent_channels == kwargs["in_channels"], "--vae", vae,
              f"has {vae_module.latent_channels} latent channels; the DiT takes {kwargs['in_channels']}")
        f = vae_module.downsample_factor
        size = None if size is None else size * f
        task = {"vae": vae}
        multiple = f * kwargs["patch_size"]
    size = image_size or size
    check(size is not None, "--height", image_size, "is required: the converted model's config.json gives no sample_size")
    check(size % multiple == 0, "--height", size, f"must be a multiple of {multiple} (the model's downsampling)")
    if family == "unet":
        kwargs.update(sample_size=int(size))
    data = dict(dataset="converted", image_size=int(size), channels=int(kwargs["in_channels"]))
    return ml_collections.ConfigDict(dict(model=dict(kwargs, name=family), task=task, data=data,
                                          diffusion=PAPER_DIFFUSION, eval=PAPER_EVAL, seed=0))


def restore(path: str, *, vae: str | None, image_size: int | None, dtype: str | None = None):
    """`(config, task, params)` of a trained run or a converted folder, on the first device.
    `dtype` ("float32", "bfloat16"): a converted Wan's transformer and text encoder params and
    compute (None: float32)."""
    from genjax import convert, tasks

    converted = convert.read_converted_config(path)
    if converted is None:
        return tasks.restore(path)
    params = convert.load_converted(path)[1]
    if converted["family"] == "wan":
        from genjax.tasks import wan

        config = wan.converted_config(path, dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(tasks.DTYPES[config.model.param_dtype]), params)
    else:
        config = converted_config(converted, path, vae, image_size)
    return config, tasks.build(config), tasks.replicated(params, None)


def crop_to_aspect(img: np.ndarray, height: int, width: int) -> tuple[np.ndarray, str | None]:
    """`img` (H, W, C) center-cropped to the aspect ratio height : width (`transforms.center_crop`,
    the middle of the frame, as the data pipeline's center crops keep) and resized to (height,
    width) (`transforms.resize`); and a one-line note of the crop, None when only the size changed."""
    from genjax.data import transforms

    h, w = img.shape[:2]
    if w * height > h * width:  # wider than the model's frames: keep the middle columns
        ch, cw = h, max(1, round(h * width / height))
    else:  # taller (or the same aspect ratio): keep the middle rows
        ch, cw = max(1, round(w * height / width)), w
    note = None
    if (ch, cw) != (h, w):
        img = transforms.center_crop(img, (ch, cw))
        note = (f"is {w}x{h} (W x H), another aspect ratio than the model's {width}x{height}: kept its "
                f"central {cw}x{ch} and resized that to {width}x{height}")
    if img.shape[:2] != (height, width):
        img = transforms.resize(img, (height, width))
    return img, note


def init_frames(path: str, n: int, height: int, width: int, channels: int) -> np.ndarray:
    """The image at `path` as uint8 first frames (n, 1, height, width, channels): converted to
    grayscale when the model has one channel, resized (`transforms.resize`) when its size differs;
    an image of another aspect ratio is center-cropped to the model's first (`crop_to_aspect`,
    never stretched) and a one-line note on stderr says so.

    Raises:
      UserError: `path` is not a file, has no image extension, or cannot be decoded as an image.
    """
    import sys

    from genjax.io import media, readers

    check(os.path.isfile(path), "--init-frame", path,
          "is a folder, not an image file" if os.path.isdir(path) else "must be an existing image file")
    check(os.path.splitext(path)[1].lower() in media.IMAGE_EXTENSIONS, "--init-frame", path,
          f"extension must be one of {', '.join(media.IMAGE_EXTENSIONS)}")
    img = readers.read_image(path, field="--init-frame")
    if channels == 1 and img.shape[-1] != 1:
        img = img.mean(-1, keepdims=True).astype(np.uint8)
    img, note = crop_to_aspect(img, height, width)
    if note:
        print(f"genjax sample: note: --init-frame={path!r} {note}", file=sys.stderr)
    return np.broadcast_to(img[None, None], (n, 1, *img.shape)).copy()


def main(args) -> int:
    """`genjax sample`: check the arguments, restore the model, call its task's `sample_fn`, write
    `--out` (.npz) and a GIF + MP4 (videos) or a PNG grid (images) beside it.

    Raises:
      UserError: a bad argument (before the model is built), among them an `--out` (or the GIF /
        MP4 / PNG beside it) that exists without `--overwrite` or lies in a folder that cannot be
        written; a request the model cannot take (from `sample_fn`, before compiling), a workdir
        without a model; a file that cannot be written (full disk), naming it (no file is then
        changed).
    """
    from genjax import convert
    from genjax.diffusion import samplers
    from genjax.io import checkpoint, fs, media

    check(args.num >= 1, "--num", args.num, "must be an integer >= 1")
    check(args.out.endswith((".npz", ".mp4")), "--out", args.out, "must be a .npz file (or .mp4 for a video model)")
    out_npz = os.path.splitext(args.out)[0] + ".npz"  # .mp4: the same trio of files, named by the mp4
    overwrite = getattr(args, "overwrite", False)
    fs.check_new_file(args.out, "--out", overwrite)  # before anything is restored or generated
    check(args.cfg_scale is None or np.isfinite(args.cfg_scale), "--cfg-scale", args.cfg_scale, "must be finite")
    check(args.steps is None or args.steps >= 1, "--steps", args.steps, "must be an integer >= 1")
    check(args.sampler is None or args.sampler in samplers.SAMPLERS, "--sampler", args.sampler,
          f"must be one of {samplers.SAMPLERS}")
    for flag, v in (("--frames", args.frames), ("--height", args.height), ("--width", args.width)):
        check(v is None or v >= 1, flag, v, "must be an integer >= 1")
    check(args.vae is None or os.path.isdir(args.vae), "--vae", args.vae, "does not exist")
    for p in args.prompt:
        check(isinstance(p, str) and p.strip() != "", "--prompt", p, "must be a non-empty string")
    path = model_dir(args.workdir)
    converted = convert.read_converted_config(path)
    name = converted["family"] if converted else checkpoint.read_config(path).model.name
    sampled = VIDEO_MODELS + IMAGE_MODELS + TEXT_IMAGE_MODELS
    check(name in sampled, "--workdir", args.workdir,
          f"is a converted {name!r} model, which cannot sample alone (pass it as --vae of a latent DiT)"
          if converted else f"holds a {name!r} model, which draws no samples (sampling takes {sampled})")
    text_image = name in TEXT_IMAGE_MODELS
    tokens = {k: getattr(args, k, None) for k in ("temperature", "top_k", "top_p")}
    flags = {k: v for k, v in tokens.items() if v is not None}
    check(text_image or not flags, "--" + "/--".join(k.replace("_", "-") for k in flags), list(flags.values()),
          f"are for models that draw tokens ({TEXT_IMAGE_MODELS})")
    if text_image:  # before the model is restored (top_k against the vocabulary: in sample_fn)
        from genjax.models import token_sampling

        t, k, p = tokens["temperature"], tokens["top_k"], tokens["top_p"]
        token_sampling.check_settings(1.0 if t is None else t, 0 if k is None else k, 1.0 if p is None else p)
    video = name in VIDEO_MODELS
    check(video or args.out.endswith(".npz"), "--out", args.out, "must be a .npz file for an image model")
    negative, dtype = getattr(args, "negative_prompt", None), getattr(args, "dtype", None)
    check(negative is None or name == "wan", "--negative-prompt", negative, "is for converted Wan models")
    check(dtype is None or name == "wan", "--dtype", dtype, "is for converted Wan models")
    for out in media.output_paths(out_npz, video):
        if out != args.out:
            fs.check_new_file(out, "--out", overwrite)
    if name == "wan":
        from genjax.tasks import wan

        check(bool(args.prompt), "--prompt", None, "is required for a text-to-video model")
        check(args.vae is None and args.init_frame is None and not args.class_label,
              "--vae/--init-frame/--class-label", args.vae or args.init_frame or args.class_label,
              "do not apply to a converted Wan text-to-video model")
        wan.check_request(path, args.prompt, negative, args.frames, args.height, args.width)  # before restoring
        first = None
    elif text_image:
        check(bool(args.prompt), "--prompt", None, "is required for a text-to-image model")
        check_prompts(args.prompt, checkpoint.read_config(path))
        check(not args.class_label and args.frames in (None, 1) and args.init_frame is None and args.vae is None,
              "--class-label/--frames/--init-frame/--vae", args.class_label or args.frames or args.init_frame or args.vae,
              "do not apply to a text-to-image model (its dVAE is the run's task.dvae)")
        first = None
    elif video:
        check(bool(args.prompt), "--prompt", None, "is required for a text-to-video model")
        run_config = checkpoint.read_config(path)
        check_prompts(args.prompt, run_config)
        d = run_config.data  # the init frame is read (or refused) before the model is restored
        height, width = args.height or d.image_size, args.width or d.image_size
        first = None if args.init_frame is None else init_frames(args.init_frame, len(args.prompt) * args.num,
                                                                 height, width, d.channels)
        check(not args.class_label, "--class-label", args.class_label, "is for class-conditional image "
              "models; this is a text-to-video model: use --prompt")
    else:
        check(not args.prompt, "--prompt", args.prompt, "is for text-to-video models; this is a "
              "class-conditional image model: use --class-label N")
        check(args.frames in (None, 1) and args.init_frame is None, "--frames/--init-frame",
              args.frames if args.init_frame is None else args.init_frame, "are for video models")
    config, task, params = restore(path, vae=args.vae, image_size=None if video or text_image else args.height,
                                   dtype=dtype)
    kw = dict(sampler=args.sampler, num_steps=args.steps, cfg_scale=args.cfg_scale)
    if text_image:
        captions = [p for p in args.prompt for _ in range(args.num)]
        samples = task.sample_fn(params, jax.random.PRNGKey(args.seed), captions, height=args.height,
                                 width=args.width, **kw, **tokens)
    elif video:
        captions = [p for p in args.prompt for _ in range(args.num)]
        if name == "wan":
            kw["negative_prompt"] = negative
        samples = task.sample_fn(params, jax.random.PRNGKey(args.seed), captions, init_frames=first,
                                 num_frames=args.frames, height=args.height, width=args.width, **kw)
    else:
        num_classes = int(config.task.get("num_classes", 0) if name in ("unet", "mae")
                          else config.model.get("num_classes", 0))
        if num_classes:
            given = args.class_label or list(range(min(num_classes, 10)))
            check(all(0 <= y < num_classes for y in given), "--class-label", given,
                  f"must be ints in [0, {num_classes})")
        else:
            check(not args.class_label, "--class-label", args.class_label, "this model is unconditional")
            given = [0]
        captions = [y for y in given for _ in range(args.num)]
        samples = task.sample_fn(params, jax.random.PRNGKey(args.seed), captions, height=args.height,
                                 width=args.width, **kw)
    for out in media.write_outputs(out_npz, np.asarray(samples), captions):
        print(out)
    return 0
