"""Data recipes of the trainer's tasks: `config.data` -> a source, its transforms and a grain
pipeline of batches (dicts of numpy arrays with a leading batch axis).

    source(config, split)                 the dataset of data.dataset
    pixel_transforms(config, source, extra)   uint8 -> float [-1, 1] at data.image_size, then extra
    dataset(config, source, transforms)   `pipeline.make_dataset` with data.batch_size and the seed
    pixel_data(config)                    `make_data` of {"image" | "video", "label"} batches
    fixed_examples(config, num, split)    the first `num` examples, in order (samples, evaluation)
    latent_cache_data(...)                `make_data` over a frozen autoencoder's latent cache
    packed_latent_data(...)               `make_data` of NaViT-packed latents of mixed-size examples

Every task goes through these, so a data option (crop, flip, a new source) is written once.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from genjax.errors import check

CROPS = ("resize", "adm_center")  # data.crop: see `pixel_transforms`
CACHE_BATCH = 500  # examples per autoencoder forward while filling a latent cache


def image_inputs(example: Mapping[str, Any]) -> dict[str, Any]:
    """An image example -> `{"image", "label" int32}`."""
    return {"image": example["image"], "label": np.int32(example["label"])}


def video_inputs(example: Mapping[str, Any]) -> dict[str, Any]:
    """A video example -> `{"video", "label" int32}`: Moving MNIST's first digit, a TFDS video's
    class label, -1 for an unlabelled clip (a video folder)."""
    labels = example.get("labels")
    label = example.get("label", -1 if labels is None else labels[0])
    return {"video": example["video"], "label": np.int32(label)}


GENJAX_DATASETS = ("moving_mnist", "mnist_embedded")  # names genjax owns; "tfds:NAME" reaches TFDS's
FOLDERS = ("video_folder:", "image_folder:")
MIX = "mix"  # data.dataset of a data.mix
CONVERTED = "converted"  # data.dataset of a converted checkpoint's sampling config (`genjax sample`): no data


def tfds_name(dataset: str) -> str | None:
    """The TFDS dataset a data.dataset names ("tfds:NAME", or any name that is not genjax's own,
    a folder or "mix"), else None."""
    if dataset.startswith("tfds:"):
        return dataset[len("tfds:"):]
    return None if dataset in (*GENJAX_DATASETS, MIX, CONVERTED) or dataset.startswith(FOLDERS) else dataset


def is_video(config) -> bool:
    """Whether config.data.dataset gives videos: moving_mnist, video_folder:PATH, a data.mix
    (images enter it as 1-frame videos), or a TFDS dataset whose pixel feature has rank 4
    (`tfds_source.pixel_feature`: its builder's feature spec, no data read). Raises `UserError`
    for an unknown TFDS name (or one whose features need TensorFlow)."""
    d = config.data
    if d.dataset in ("moving_mnist", MIX) or d.dataset.startswith("video_folder:"):
        return True
    name = tfds_name(d.dataset)
    if name is None:
        return False
    from genjax.data import tfds_source

    return len(tfds_source.pixel_feature(name, d.get("data_dir", "") or None)[1]) == 4


def media_key(config) -> str:
    """"video" for video datasets (`is_video`), else "image"."""
    return "video" if is_video(config) else "image"


def labelled_inputs(config) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """`video_inputs` or `image_inputs` for `config.data.dataset`."""
    return video_inputs if media_key(config) == "video" else image_inputs


# The fields of config.data that the recipes read (a task family may read more: its DATA_KEYS).
DATA_KEYS = ("dataset", "split", "batch_size", "image_size", "channels", "num_frames", "num_digits",
             "num_examples", "data_dir", "crop", "random_flip", "sizes", "packing", "frame_stride", "captions",
             "clip_start", "fps", "mix")
# The fields of config.data.packing (NaViT patch n' pack; `packed_latent_data`).
PACKING_KEYS = ("seq_len", "max_per_seq", "drop_rate", "lookahead")


def validate(config) -> None:
    """The data section's checks.

    Raises:
      UserError: an unknown data.crop, or a data.random_flip that is not a bool; data.sizes on a
        dataset other than moving_mnist; an unknown data.packing key, a seq_len or max_per_seq
        that is not an int >= 1; a data.clip_start other than "fixed" / "random", or "random" on
        a dataset without clips to start (not video_folder:PATH or a TFDS video); a data.fps that
        is not > 0, on anything but video_folder:PATH, or with a data.frame_stride other than 1;
        a bad data.mix (`mixing.validate`).
    """
    from genjax.config import check_keys
    from genjax.data import mixing, transforms

    crop = config.data.get("crop", "resize")
    check(crop in CROPS, "data.crop", crop, f"must be one of {CROPS}")
    flip = config.data.get("random_flip", False)
    check(isinstance(flip, bool), "data.random_flip", flip, "must be true or false")
    check(config.data.get("sizes") is None or config.data.dataset == "moving_mnist", "data.sizes",
          config.data.get("sizes"), "is a moving_mnist option (mixed canvas sizes and durations)")
    d = config.data
    start = d.get("clip_start", "fixed")
    check(start in transforms.CLIP_STARTS, "data.clip_start", start, f"must be one of {transforms.CLIP_STARTS}")
    clips = d.dataset.startswith("video_folder:") or (tfds_name(d.dataset) is not None and is_video(config))
    check(start == "fixed" or clips, "data.clip_start", start,
          f"applies to video_folder:PATH and TFDS video datasets, not {d.dataset!r}")
    fps = d.get("fps")
    if fps is not None:
        check(isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0, "data.fps", fps,
              "must be a number of frames per second > 0")
        check(d.dataset.startswith("video_folder:"), "data.fps", fps, f"needs video files with a frame rate "
              f"(video_folder:PATH); {d.dataset!r} records none, use data.frame_stride")
        check(d.get("frame_stride", 1) in (None, 1), "data.fps", fps,
              f"and data.frame_stride={d.get('frame_stride')} are exclusive: the stride follows from the frame rate")
    mixing.validate(config)
    packing = config.data.get("packing")
    if packing is not None:
        check_keys("data.packing", packing, PACKING_KEYS)
        for key in ("seq_len", "max_per_seq"):
            value = packing.get(key)
            check(isinstance(value, int) and value >= 1, f"data.packing.{key}", value, "must be an int >= 1")


def source(config, split: str):
    """`config.data.dataset` for `split`.

    - "moving_mnist": genjax's procedural Moving MNIST, from data.num_frames / image_size /
      num_examples / num_digits (/ sizes).
    - "video_folder:PATH": clips of data.num_frames frames every data.frame_stride (default 1),
      or with data.fps every round(native fps / data.fps) frames of each video; their starts
      "fixed" (every non-overlapping clip) or "random" (data.clip_start, drawn at each read);
      resized and center-cropped to data.image_size (with data.packing: at their native size and
      aspect, fitted to the token budget by the task); captioned from data.captions (default: the
      folder's captions.jsonl / .csv, else file stems; `folders.VideoFolderSource`).
    - a TFDS dataset, "tfds:NAME" or a plain NAME that is not one of genjax's
      (`GENJAX_DATASETS`; so "tfds:moving_mnist" is TFDS's Moving MNIST), read from data.data_dir
      (empty / absent: TFDS's default folder, $TFDS_DATA_DIR or ~/tensorflow_datasets). A video
      dataset (`is_video`) is sampled and resized as a folder's videos are (one clip per example,
      from frame 0 or, with data.clip_start "random", a uniform start; `tfds_source.TfdsSource`).
    - "mix": see `mixing.sources`; not a single source.

    Raises `UserError` for a TFDS video whose channels differ from data.channels (convert the data
    or set data.channels: no silent grey-to-RGB), and what the source raises.
    """
    from genjax.data import sources

    d = config.data
    check(d.dataset != MIX, "data.dataset", d.dataset, "is a data.mix: read it with mixing.sources")
    packed = d.get("packing") is not None  # packed: native sizes, fitted to the token budget later
    clips = dict(clip_length=d.get("num_frames"), frame_stride=d.get("frame_stride") or 1, seed=config.seed,
                 clip_start=d.get("clip_start", "fixed"), size=None if packed else d.image_size,
                 crop=None if packed else "center")
    if d.dataset == "moving_mnist":
        sizes = d.get("sizes")
        return sources.make_source("moving_mnist", split=split, num_frames=d.num_frames,
                                   image_size=d.image_size, num_examples=d.num_examples,
                                   num_digits=d.get("num_digits", 1), seed=config.seed,
                                   sizes=None if sizes is None else [tuple(z) for z in sizes])
    if d.dataset.startswith("video_folder:"):
        return sources.make_source(d.dataset, split=split, fps=d.get("fps"), captions=d.get("captions") or None,
                                   **clips)
    data_dir = {"data_dir": d.data_dir} if d.get("data_dir", "") else {}
    if tfds_name(d.dataset) is not None and is_video(config):
        src = sources.make_source(d.dataset, split=split, **data_dir, **clips)
        check(d.get("channels") in (None, src.channels), "data.channels", d.get("channels"),
              f"{d.dataset!r} has {src.channels}-channel videos; set data.channels={src.channels}")
        return src
    return sources.make_source(d.dataset, split=split, **data_dir)


def pixel_transforms(config, src, extra=()) -> tuple:
    """uint8 pixels -> [-1, 1] at data.image_size, then `extra`.

    data.crop "resize" (default): resized (bilinear, aspect not kept) to image_size x image_size
    when the source's size differs; "adm_center": `transforms.adm_center_crop` (ADM / DiT: BOX
    halvings, BICUBIC to the short side, central square), for sources of any image size.
    data.random_flip (default False): a horizontal flip with probability 0.5 (DiT `train.py`),
    the same for every frame of a video.
    """
    from genjax.data import transforms

    first = src[0]
    key = "video" if "video" in first else "image"
    size = config.data.image_size
    if config.data.get("crop", "resize") == "adm_center":
        out = [transforms.AdmCenterCrop(size, keys=(key,))]
    else:
        out = [] if first[key].shape[-3:-1] == (size, size) else [transforms.Resize(size, keys=(key,))]
    if config.data.get("random_flip", False):
        out.append(transforms.RandomFlip(0.5, keys=(key,)))
    return (*out, transforms.ToFloat(keys=(key,)), *extra)


def dataset(config, src, transforms, *, shard_index=None, shard_count=None, **kw):
    """`pipeline.make_dataset(src)` with data.batch_size and the config's seed."""
    from genjax.data import pipeline

    return pipeline.make_dataset(src, batch_size=config.data.batch_size, seed=config.seed,
                                 transforms=transforms, shard_index=shard_index, shard_count=shard_count,
                                 skip_unreadable=skips_unreadable(config), read_options=read_options(config), **kw)


def read_options(config, examples: int | None = None):
    """grain's read options: its defaults (16 threads, 500 examples read ahead), except for
    videos that are decoded per example (a folder of videos, a TFDS video dataset, a data.mix):
    then as many threads as cores and `examples` (default 2 batches) read ahead, as 500 decoded
    clips (or whole TFDS videos) would take minutes of CPU and gigabytes before the first step."""
    import grain

    if config.data.dataset == "moving_mnist" or not is_video(config):
        return None
    ahead = examples or 2 * config.data.batch_size
    return grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1), prefetch_buffer_size=max(ahead, 2))


def is_folder(config) -> bool:
    """Whether config.data.dataset reads files of a folder (video_folder: / image_folder:)."""
    return config.data.dataset.startswith(FOLDERS)


def skips_unreadable(config) -> bool:
    """Whether unreadable examples are skipped and named, never stopping a run
    (`pipeline.SkipUnreadable`): a folder's files, and a TFDS video's examples (one shorter than
    a clip is skipped, as a folder's too-short videos give no clips)."""
    return is_folder(config) or (tfds_name(config.data.dataset) is not None and is_video(config))


def pixel_data(config, inputs: Callable | None = None):
    """`make_data(workdir, shard_index=None, shard_count=None)` of pixel batches: by default
    images `{"image", "label"}` or videos `{"video", "label"}`, float32 in [-1, 1]; `inputs`
    (an example -> dict function, applied last) replaces the default (e.g. a tokenizer)."""
    def make_data(workdir, shard_index=None, shard_count=None):
        del workdir
        src = source(config, config.data.split)
        last = inputs or labelled_inputs(config)
        return dataset(config, src, pixel_transforms(config, src, (last,)),
                       shard_index=shard_index, shard_count=shard_count)
    return make_data


def fixed_examples(config, num: int, split: str = "test") -> dict[str, np.ndarray]:
    """The first `num` examples of `split` as float32 [-1, 1] pixels (+ int32 labels), in order.
    A folder dataset is one split: its examples come from data.split."""
    if config.data.dataset.startswith(("video_folder:", "image_folder:")):
        split = config.data.split
    src = source(config, split)
    ds = dataset(config, src, pixel_transforms(config, src, (labelled_inputs(config),)), shuffle=False,
                 shard_index=0, shard_count=1, num_epochs=1, drop_remainder=False)
    batches, have = [], 0
    for batch in ds:
        batches.append(batch)
        have += len(batch["label"])
        if have >= num:
            break
    return {k: np.concatenate([b[k] for b in batches])[:num] for k in batches[0]}


def latent_cache_data(config, posterior: Callable, *, meta: Mapping[str, Any], inputs: Callable | None = None):
    """`make_data(workdir, ...)` over the latent cache of `config.data.split` in WORKDIR/latents
    (`genjax.data.latent_cache`, computed on first use and whenever `meta` changes).

    `posterior(x) -> (mean, std)` is a frozen autoencoder's jitted posterior of a float [-1, 1]
    batch; `inputs` (default `labelled_inputs`) turns an example into the fields stored beside the
    latents (the pixels themselves are dropped). Batches: `{"mean", "std": float32 (B, *latent),
    **the other fields of inputs}`."""
    from genjax.data import latent_cache, pipeline

    def make_data(workdir, shard_index=None, shard_count=None):
        src = source(config, config.data.split)
        key = media_key(config)

        def compute():
            ds = pipeline.make_dataset(src, batch_size=CACHE_BATCH, shuffle=False, num_epochs=1,
                                       drop_remainder=False, shard_index=0, shard_count=1,
                                       transforms=pixel_transforms(config, src, (inputs or labelled_inputs(config),)))
            for batch in ds:
                mean, std = posterior(batch.pop(key))
                yield {"mean": np.asarray(mean), "std": np.asarray(std), **batch}

        cache = latent_cache.ensure(os.path.join(workdir, "latents"), config.data.split,
                                    meta=_cache_meta(config, meta, src), compute=compute)
        return dataset(config, cache, (), shard_index=shard_index, shard_count=shard_count)
    return make_data


def _cache_meta(config, meta: Mapping[str, Any], src) -> dict[str, Any]:
    """What a latent cache of config.data was computed from: the caller's `meta` (the VAE, ...), the
    dataset, split and sizes, and non-default preprocessing (a flip or a clip start is drawn once per
    example when the cache is filled, as the feature-caching DiT ports fast-DiT / LightningDiT do)."""
    d = config.data
    full = {**meta, "dataset": d.dataset, "split": d.split, "image_size": d.image_size}
    if media_key(config) == "video":
        full.update(num_frames=d.num_frames, num_examples=d.get("num_examples"), num_digits=d.get("num_digits", 1),
                    seed=config.seed, frame_stride=d.get("frame_stride", 1), clips=len(src))
    full.update({k: d[k] for k, default in (("crop", "resize"), ("random_flip", False), ("clip_start", "fixed"),
                                            ("fps", None), ("sizes", None))
                 if d.get(k, default) != default})
    return full


def _rate(drop_rate):
    """A config's drop_rate: a number, or ("beta", a, b) given as a list or tuple."""
    return tuple(drop_rate) if isinstance(drop_rate, (list, tuple)) else drop_rate


def packed_latent_data(config, posterior: Callable | None, *, patch_size: tuple[int, int, int], inputs: Callable,
                       fit: Callable | None = None, meta: Mapping[str, Any] | None = None):
    """`make_data(workdir, shard_index=None, shard_count=None)` of NaViT-packed batches of
    mixed-size examples (Dehghani et al. 2023), for a latent diffusion task on a frozen autoencoder.

    Each example (e.g. Moving MNIST with data.sizes, a folder's or a TFDS dataset's clips at their
    native size, unreadable ones skipped, `skips_unreadable`; or, with data.dataset "mix", the
    examples of data.mix's datasets at their weights, images as 1-frame videos, `mixing`) is resized by `fit` (a transform, e.g.
    `transforms.FitArea` to the token budget; None: as it is), scaled to [-1, 1], turned into fields by
    `inputs` (e.g. the caption's "ids" and "mask"), and encoded alone by `posterior(x (1, ...))
    -> (mean, std)` (jit it: one compilation per example size) into `latents = concat([mean, std],
    channel axis)` (posterior None: pixel space, the latents are the pixels); `genjax.data.packing.packed_batches` then packs the latents' tubelets of
    `patch_size` into data.batch_size sequences (over all processes) of data.packing.seq_len
    tokens with at most data.packing.max_per_seq examples each (planned over a look-ahead of
    data.packing.lookahead examples, default 128), after NaViT token dropping at
    data.packing.drop_rate (default 0; a rate in [0, 1) or ("beta", a, b), sec. 3.4; seeded by
    the config's seed, so resuming is exact). Batches: the packed dict
    (`tokens (S, L, pt*ph*pw*2C)` in (pt, ph, pw, [mean C | std C]) order, segment_ids,
    positions, example_shape, video_shape, example_index) plus `inputs`' other fields per slot,
    `(S, M, ...)`, -1 at empty slots. Deterministic and checkpointable like `make_dataset`.

    data.latents = "cache" (with a posterior): every example's `latents` and fields are computed once
    into the ragged latent cache WORKDIR/latents/{split} (with data.mix one per entry k, {split}.{k};
    `latent_cache.ensure(ragged=True)`, each
    example at its own size; recomputed when `meta`, what it depends on besides the data section,
    e.g. the VAE, changes); the packer then reads the cache, so a step costs no VAE forward.
    """
    import grain

    from genjax.data import mixing, packing, pipeline, transforms

    cached = posterior is not None and config.data.get("latents", "on_the_fly") == "cache"

    def make_data(workdir, shard_index=None, shard_count=None):
        shard_index, shard_count = pipeline.resolve_shard(shard_index, shard_count)
        check(config.data.batch_size % shard_count == 0, "data.batch_size", config.data.batch_size,
              f"must be divisible by the number of processes ({shard_count}): sequences per batch")
        parts = mixing.sources(config, config.data.split)  # one source, or data.mix's entries
        key = media_key(config)
        first = parts[0][0][0]
        for transform in parts[0][3]:
            first = transform.map(first)
        fields = tuple(sorted(k for k in inputs(first) if k != key))  # per-example fields, e.g. ids, mask

        def encode(example):
            out = inputs(example)
            x = np.asarray(out.pop(key), np.float32)
            if posterior is None:  # pixel space: the tokens are the pixels
                latents = x
            else:
                mean, std = posterior(x[None])
                latents = np.concatenate([np.asarray(mean)[0], np.asarray(std)[0]], axis=-1)
            return {"latents": latents, **{k: np.asarray(v).astype(np.int32) for k, v in out.items()}}

        last = (*([fit] if fit else []), transforms.ToFloat(keys=(key,)), encode)
        p = config.data.packing
        lookahead = p.get("lookahead", 128)
        mixed = config.data.dataset == MIX
        streams = []
        for k, ((src, _, skip, to_video), part) in enumerate(zip(parts, mixing.configs(config) if mixed else [config])):
            steps = (*to_video, *last)
            if cached:  # computed once per entry, each example at its own size
                src = _ragged_cache(part, src, steps, skip, workdir, name=f"{config.data.split}.{k}" if mixed
                                    else config.data.split, meta={**(meta or {}), "fit": repr(fit)}, lookahead=lookahead)
                steps, skip = (), False
            streams.append(pipeline.example_dataset(src, seed=config.seed + k, shard_index=shard_index,
                                                    shard_count=shard_count, transforms=steps, skip_unreadable=skip))
        ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for _, w, _, _ in parts])
        ds = ds.to_iter_dataset(read_options(config, lookahead))
        return iter(packing.packed_batches(ds, seq_len=p.seq_len, patch_size=patch_size, lookahead=lookahead,
                                           max_per_seq=p.max_per_seq, key="latents", example_fields=fields,
                                           sequences_per_batch=config.data.batch_size // shard_count,
                                           drop_rate=_rate(p.get("drop_rate", 0.0)), seed=config.seed))
    return make_data


def _ragged_cache(config, src, steps, skip: bool, workdir: str, *, name: str, meta, lookahead: int):
    """`src`'s examples after `steps` (fit, scale, encode) in the ragged latent cache WORKDIR/latents/NAME,
    computed once (`latent_cache.ensure(ragged=True)`); returns its source."""
    from genjax.data import latent_cache, pipeline

    def compute():
        ds = pipeline.example_dataset(src, shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                                      transforms=steps, skip_unreadable=skip)
        for example in ds.to_iter_dataset(read_options(config, lookahead)):
            yield {k: np.asarray(v)[None] for k, v in example.items()}

    full = {**_cache_meta(config, meta, src), "packed": True}
    return latent_cache.ensure(os.path.join(workdir, "latents"), name, meta=full, compute=compute, ragged=True)
