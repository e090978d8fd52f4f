"""Task "clip": CLIP / SigLIP (`genjax.models.clip.CLIP`; the model section holds its attributes)
on MNIST digits (data.dataset "mnist_embedded", batch `{"image", "ids", "mask"}`) or Moving MNIST
videos ("moving_mnist", `{"video", "ids", "mask"}`) paired with their captions ("digit N"),
byte-tokenized (`tokenizer.ByteTokenizer`, model.context_length).

loss_fn: `contrastive.clip_loss` (model.loss "clip") or `contrastive.siglip_loss` ("siglip") over
the global batch; metric `logit_scale`. No samples; evaluate(params) -> {"zero_shot_accuracy"} on
eval.num_samples test examples with the prompts "digit 0" ... "digit 9"
(`contrastive.zero_shot_accuracy`, Radford et al. 2021 Sec. 3.1.2; chance 0.1).
"""

from __future__ import annotations

import sys

import jax.numpy as jnp

from genjax.errors import check
from genjax.tasks import Task, make_model


def make_module(config):
    """The `CLIP` of `config` (a frozen text tower is rebuilt from its run's config.json)."""
    from genjax.models import clip

    return make_model(clip, clip.CLIP, config.model, in_channels=config.data.channels)


def tokenize_fn(tok, length: int, key: str | None):
    """An example -> `{key: pixels, "ids", "mask"}` (the caption tokenized by `tok`, a
    `tokenizer.ByteTokenizer` or `HFTokenizer`, to `length`).

    A caption longer than `length` allows (`tok.limit`) is cut (training goes on), never silently: the first
    cut is reported once per process, one line on stderr naming the caption and the limit."""
    reported = []

    def tokenize(example):
        caption = str(example["caption"])
        if not reported and not tok.fits(caption, length):
            reported.append(caption)
            print(f"genjax: note: captions longer than {tok.limit(length)} are cut, e.g. {caption!r} "
                  f"({tok.size(caption)}); later cuts are not reported", file=sys.stderr)
        ids, mask = tok.encode([caption], length)
        return {**({key: example[key]} if key else {}), "ids": ids[0], "mask": mask[0]}
    return tokenize


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes
    from genjax.models import contrastive, tokenizer

    video = config.data.dataset == "moving_mnist"
    key = "video" if video else "image"
    module = make_module(config)
    if video:
        check(module.video_patch_size is not None, "model.video_patch_size", None,
              "a video CLIP needs a video tower")
    tok = tokenizer.ByteTokenizer()
    length = module.context_length

    def init_params(rng):
        kw = dict(ids=jnp.zeros((1, length), jnp.int32), mask=jnp.ones((1, length), bool),
                  images=jnp.zeros((1, *module.image_size, module.in_channels)))
        if module.video_patch_size is not None:
            kw["videos"] = jnp.zeros((1, *module.video_patch_size, module.in_channels))
        return module.init(rng, **kw)["params"]

    def loss_fn(params, batch, rng):
        del rng
        inputs = {"videos" if video else "images": batch[key]}
        out = module.apply({"params": params}, ids=batch["ids"], mask=batch["mask"], **inputs)
        if module.loss == "clip":
            loss = contrastive.clip_loss(out[key], out["text"], out["logit_scale"])
        else:
            loss = contrastive.siglip_loss(out[key], out["text"], out["logit_scale"], out["logit_bias"])
        return loss, {"logit_scale": jnp.exp(out["logit_scale"])}

    held_out = recipes.fixed_examples(config, config.eval.num_samples)

    def evaluate(params):
        acc = contrastive.zero_shot_accuracy({"params": params}, module, held_out[key], held_out["label"], tok)
        return {"zero_shot_accuracy": acc}

    make_data = recipes.pixel_data(config, tokenize_fn(tok, length, key))
    return Task(module, init_params, loss_fn, None, make_data, evaluate=evaluate)
