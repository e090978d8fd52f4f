"""Task "vivit": video classification with `genjax.models.vivit.ViViTClassifier` (Arnab et al.
2021; the model section holds its attributes) on Moving MNIST clips (B, T, S, S, C) in [-1, 1],
the label being the (first) digit.

loss_fn: softmax cross-entropy of the logits against `batch["label"]` (B,) int32; metric
`accuracy` (of the training batch). No samples; evaluate(params) -> {"accuracy"} on the first
eval.num_samples clips of data.eval_split (default "test"; chance 1 / num_classes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import Task, make_model

DATA_KEYS = ("eval_split",)  # config.data's fields read here beyond recipes.DATA_KEYS


def build(config, *, mesh=None) -> Task:
    del mesh
    import optax

    from genjax.data import recipes
    from genjax.models import vivit

    d = config.data
    check(d.dataset == "moving_mnist", "data.dataset", d.dataset, "vivit trains on moving_mnist")
    module = make_model(vivit, vivit.ViViTClassifier, config.model, in_channels=d.channels)
    video_shape = (d.num_frames, d.image_size, d.image_size, d.channels)

    def init_params(key):
        return module.init(key, jnp.zeros((1, *video_shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng):
        del rng
        logits = module.apply({"params": params}, batch["video"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(logits.argmax(-1) == batch["label"])}

    held_out = recipes.fixed_examples(config, config.eval.num_samples, split=d.get("eval_split", "test"))
    logits_of = jax.jit(lambda params, x: module.apply({"params": params}, x))

    def evaluate(params):
        pred = np.concatenate([np.asarray(logits_of(params, held_out["video"][i:i + 64])).argmax(-1)
                               for i in range(0, len(held_out["video"]), 64)])
        return {"accuracy": float(np.mean(pred == held_out["label"]))}

    return Task(module, init_params, loss_fn, None, recipes.pixel_data(config), evaluate=evaluate)
