"""Task "vivit": video classification with `genjax.models.vivit.ViViTClassifier` (Arnab et al.
2021; the model section holds its attributes) on Moving MNIST clips (B, T, S, S, C) in [-1, 1],
the label being the (first) digit.

loss_fn: softmax cross-entropy of the logits against `batch["label"]` (B,) int32; metric
`accuracy` (of the training batch). No samples; evaluate(params) -> {"accuracy"} on the first
eval.num_samples clips of data.eval_split (default "test"; chance 1 / num_classes).

task.pretrained = an MAE workdir (`genjax train` with model.name "mae", `genjax.tasks.mae`):
the classifier's `tubelet_embed` and `encoder` params start from that run's EMA params (the MAE
encoder, He et al. 2022 sec. 4 "end-to-end fine-tuning"; VideoMAE for videos); the rest (norm,
head) from the usual init. Needs model.attention "joint" and model.pos_embed "sincos" (the MAE
encoder's), and the MAE's tubelet, channels, width, depth, heads, mlp_dim and scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import Task, make_model

DATA_KEYS = ("eval_split",)  # config.data's fields read here beyond recipes.DATA_KEYS
TASK_KEYS = ("pretrained",)
PRETRAINED = ("tubelet_embed", "encoder")  # the MAE submodules a ViViTClassifier takes over


def validate(config) -> None:
    """Raises UserError (before anything is built): task.pretrained not a workdir of an "mae"
    run; with it, model.attention not "joint" or model.pos_embed not "sincos"."""
    from genjax.io import checkpoint
    from genjax.tasks import is_model_dir

    path = config.get("task", {}).get("pretrained", "")
    if not path:
        return
    check(is_model_dir(path), "task.pretrained", path, "must be an MAE workdir (genjax train with model.name=mae)")
    name = checkpoint.read_config(path).get("model", {}).get("name")
    check(name == "mae", "task.pretrained", path, f"was trained with model.name={name!r}, not 'mae'")
    from genjax.models.vivit import ViViTClassifier

    for key, want, why in (("attention", "joint", "the MAE encoder attends jointly over its visible tubelets"),
                           ("pos_embed", "sincos", "the MAE encoder was trained with fixed sin-cos positions")):
        value = config.model.get(key, getattr(ViViTClassifier, key))  # the class default when unset
        check(value == want, f"model.{key}", value, f"must be {want!r} with task.pretrained ({why})")


def pretrained_encoder(path: str, module, video_shape) -> dict:
    """The `PRETRAINED` subtrees of the MAE run in `path` (its EMA params, `tasks.load_frozen`),
    cast to the classifier's param dtypes.

    Raises:
      UserError: a param of the MAE encoder missing or of another shape than the classifier's
        (naming task.pretrained, the param and both shapes).
    """
    from flax import linen as nn
    from flax import traverse_util

    from genjax.tasks import load_frozen

    _, mae_params = load_frozen(path, family_name="mae")
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, *video_shape)))))
    out = {}
    for name in PRETRAINED:
        want = traverse_util.flatten_dict(shapes["params"][name], sep="/")
        have = traverse_util.flatten_dict(nn.meta.unbox(mae_params.get(name, {})), sep="/")
        for key, spec in want.items():
            got = have.get(key)
            check(got is not None and got.shape == spec.shape, "task.pretrained", path,
                  f"has {name}/{key} of shape {None if got is None else tuple(got.shape)}, the classifier "
                  f"needs {tuple(spec.shape)}: give the ViViT the MAE's patch_size, in_channels, hidden_size, "
                  f"num_layers, num_heads, mlp_dim and scan")
        out[name] = traverse_util.unflatten_dict({k: jnp.asarray(have[k], want[k].dtype) for k in want}, sep="/")
    return out


def build(config, *, mesh=None) -> Task:
    del mesh
    import optax
    from flax import linen as nn

    from genjax.data import recipes
    from genjax.models import vivit

    d = config.data
    check(d.dataset == "moving_mnist", "data.dataset", d.dataset, "vivit trains on moving_mnist")
    module = make_model(vivit, vivit.ViViTClassifier, config.model, in_channels=d.channels)
    video_shape = (d.num_frames, d.image_size, d.image_size, d.channels)

    path = config.get("task", {}).get("pretrained", "")
    pretrained = pretrained_encoder(path, module, video_shape) if path else {}

    def init_params(key):
        params = dict(module.init(key, jnp.zeros((1, *video_shape), jnp.float32))["params"])
        for name, tree in pretrained.items():  # keep the init's boxes (logical axis names)
            params[name] = nn.meta.replace_boxed(params[name], tree)
        return params

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
