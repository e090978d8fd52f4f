"""Task "mae": masked autoencoder pre-training (`genjax.models.mae.MAE`; the model section holds its
attributes, among them mask_ratio, masking and norm_pix_loss) on images (B, S, S, C), e.g.
mnist_embedded (MAE, He et al. 2022), or videos (B, T, S, S, C), e.g. moving_mnist (VideoMAE,
Tong et al. 2022), in [-1, 1].

loss_fn: `mae.mae_loss`, the per-patch (normalised) pixel MSE on the masked tubelets, masks drawn
with the step's rng. Metric `visible` (tubelets the encoder saw per example).

sample_fn(params, rng, cond=None) -> uint8 `(N, [T,] S, 3 S + 4, C)`: for N held-out examples
side by side [original | masked input (masked tubelets grey) | reconstruction (`MAE.reconstruct`:
predictions on masked tubelets, the input pasted on visible ones)], separated by 2 white
columns. The held-out examples are task.eval_examples of the test split (`spread_examples`); N =
eval.num_samples of them, evenly spaced; `cond` a list of digit classes (`genjax sample --class-label`): for each, the next
held-out example of that class. The masks are drawn with rng.

evaluate(params) -> `masked_mse` (the loss on the task.eval_examples held-out examples, masks from
a fixed key), and with task.probe_train > 0 the linear probe (`linear_probe`, fitted on
task.probe_train training examples, `spread_examples`, tested on the held-out ones):
`probe_accuracy` of the frozen encoder's mean-pooled features, and `probe_accuracy_random_init`
of the same encoder at a random initialisation (`init_params(PRNGKey(config.seed))`), computed once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import Task, make_model

TASK_KEYS = ("eval_examples", "probe_train", "num_classes")


def _task(config) -> dict:
    t = config.get("task", {})
    return dict(eval_examples=int(t.get("eval_examples", 1000)), probe_train=int(t.get("probe_train", 4000)),
                num_classes=int(t.get("num_classes", 10)))


def validate(config) -> None:
    """Raises UserError (before anything is built): task.eval_examples < 1, task.probe_train < 0,
    task.num_classes < 2; model.mask_ratio outside [0, 1); model.masking unknown, or "tube" on
    images."""
    from genjax.data import recipes
    from genjax.models import mae

    t, m = _task(config), config.model
    check(t["eval_examples"] >= 1, "task.eval_examples", t["eval_examples"], "must be >= 1")
    check(t["probe_train"] >= 0, "task.probe_train", t["probe_train"], "must be >= 0 (0: no linear probe)")
    check(t["num_classes"] >= 2, "task.num_classes", t["num_classes"], "must be >= 2")
    ratio = m.get("mask_ratio", 0.75)
    check(isinstance(ratio, (int, float)) and 0 <= ratio < 1, "model.mask_ratio", ratio, "must be in [0, 1)")
    masking = m.get("masking", "random")
    check(masking in mae.MASKINGS, "model.masking", masking, f"must be one of {mae.MASKINGS}")
    check(masking == "random" or recipes.is_video(config), "model.masking", masking,
          "'tube' masks the same locations in every frame: it needs a video dataset")


def make_module(config):
    """The `MAE` of `config` (in_channels from data.channels)."""
    from genjax.models import mae

    return make_model(mae, mae.MAE, config.model, in_channels=config.data.channels)


def triptych(original, masked, recon):
    """[original | masked | reconstruction] along the width with 2 white columns between:
    `(N, ..., W, C)` float in [-1, 1] each -> uint8 `(N, ..., 3 W + 4, C)`."""
    from genjax.io import media

    gap = jnp.ones((*original.shape[:-2], 2, original.shape[-1]), jnp.float32)
    return media.to_uint8(jnp.concatenate([original, gap, masked, gap, recon], axis=-2))


def linear_probe(features, train_x, train_y, test_x, test_y, *, batch_size: int = 250) -> float:
    """Held-out accuracy of a linear classifier on frozen features.

    `features`: `x (B, ...) -> (B, D)` (e.g. a jitted `MAE.features`), applied in batches of
    `batch_size`. The features are standardised with the training set's mean and std (MAE's
    linear probe puts an affine-free BatchNorm before its linear head, sec. A.3 / `main_linprobe`)
    and fitted by multinomial logistic regression (scikit-learn, L-BFGS, C = 1, 2000 iterations).
    Returns the accuracy on (test_x, test_y) in [0, 1].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def embed(x):
        return np.concatenate([np.asarray(features(jnp.asarray(x[i:i + batch_size])))
                               for i in range(0, len(x), batch_size)])

    scaler = StandardScaler().fit(embed(train_x))
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(embed(train_x)), train_y)
    return float(clf.score(scaler.transform(embed(test_x)), test_y))


def spread_examples(config, num: int, split: str) -> dict[str, np.ndarray]:
    """`num` examples of `split` (`recipes.fixed_examples` fields), evenly spaced over the whole
    split for mnist_embedded (its splits are sorted by class, so every class appears); the first
    `num` for other datasets (procedural Moving MNIST draws digits in random order)."""
    from genjax.data import recipes

    if config.data.dataset != "mnist_embedded":
        return recipes.fixed_examples(config, num, split=split)
    every = recipes.fixed_examples(config, len(recipes.source(config, split)), split=split)
    index = np.linspace(0, len(every["label"]) - 1, min(num, len(every["label"]))).round().astype(int)
    return {k: v[index] for k, v in every.items()}


def build(config, *, mesh=None) -> Task:
    del mesh
    from flax import linen as nn

    from genjax.data import recipes
    from genjax.models import mae
    from genjax.tasks.autoencoder import eval_batch_size

    d, t = config.data, _task(config)
    module = make_module(config)
    key = recipes.media_key(config)
    shape = ((d.num_frames,) if key == "video" else ()) + (d.image_size, d.image_size, d.channels)
    check(all(s % p == 0 for s, p in zip(((shape[0],) if key == "video" else (1,)) + shape[-3:-1],
                                         module.patch_size)),
          "model.patch_size", module.patch_size, f"must divide the {key} size {shape[:-1]} (images: pt = 1)")

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, *shape), jnp.float32), rng)["params"]

    def loss_fn(params, batch, rng):
        pred, mask, patches = module.apply({"params": params}, batch[key], rng)
        loss = mae.mae_loss(pred, patches, mask, norm_pix_loss=module.norm_pix_loss)
        return loss, {"visible": jnp.mean(jnp.sum(1 - mask, axis=1))}

    held_out = spread_examples(config, t["eval_examples"], "test")
    x_eval, y_eval = held_out[key], held_out["label"]
    n = min(max(config.eval.num_samples, 1), len(x_eval))
    default = np.linspace(0, len(x_eval) - 1, n).round().astype(int)  # the test split is sorted by class

    @jax.jit
    def show(params, x, rng):
        recon, masked = module.apply({"params": params}, x, rng, method=module.reconstruct)
        return triptych(x, masked, recon)

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None,
                  height=None, width=None):
        check(sampler is None and num_steps is None and cfg_scale is None and init_frames is None
              and height is None and width is None, "sampler/num_steps/cfg_scale/init_frames/height/width",
              (sampler, num_steps, cfg_scale, init_frames, height, width),
              "do not apply: an MAE's samples are reconstructions of held-out examples")
        if cond is None:
            index = default
        else:
            labels = [int(c) for c in cond]
            for y in set(labels):
                check(int(np.sum(y_eval == y)) >= labels.count(y), "class label", y,
                      f"has {int(np.sum(y_eval == y))} of the {len(y_eval)} held-out examples "
                      f"(task.eval_examples); asked for {labels.count(y)}")
            seen: dict[int, int] = {}
            index = []
            for y in labels:
                index.append(np.flatnonzero(y_eval == y)[seen.get(y, 0)])
                seen[y] = seen.get(y, 0) + 1
        return show(params, jnp.asarray(x_eval[np.asarray(index)]), rng)

    @jax.jit
    def masked_mse(params, x, rng):
        pred, mask, patches = module.apply({"params": params}, x, rng)
        return mae.mae_loss(pred, patches, mask, norm_pix_loss=module.norm_pix_loss) * jnp.sum(mask), jnp.sum(mask)

    features = jax.jit(lambda params, x: module.apply({"params": params}, x, method=module.features))
    probe_data = {}

    def probe(params):
        if not probe_data:
            train = spread_examples(config, t["probe_train"], "train")
            probe_data.update(x=train[key], y=train["label"])
        return linear_probe(lambda x: features(params, x), probe_data["x"], probe_data["y"], x_eval, y_eval)

    random_init = {}

    def evaluate(params):
        b = eval_batch_size(len(x_eval))
        parts = [masked_mse(params, jnp.asarray(x_eval[i:i + b]), jax.random.fold_in(jax.random.PRNGKey(0), i))
                 for i in range(0, len(x_eval), b)]
        out = {"masked_mse": float(sum(p[0] for p in parts) / sum(p[1] for p in parts))}
        if t["probe_train"]:
            if not random_init:
                random_init["accuracy"] = probe(nn.meta.unbox(jax.jit(init_params)(jax.random.PRNGKey(config.seed))))
            out.update(probe_accuracy=probe(params), probe_accuracy_random_init=random_init["accuracy"])
        return out

    return Task(module, init_params, loss_fn, sample_fn, recipes.pixel_data(config), evaluate=evaluate)
