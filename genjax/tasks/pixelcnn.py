"""Task "pixelcnn": the class-conditional gated PixelCNN (`genjax.models.pixelcnn.GatedPixelCNN`;
the model section holds its attributes) on binarised digits (B, S, S, 1).

Binarisation: a pixel is ink (1) iff its [-1, 1] value is > 0, i.e. its uint8 value is > 127
(a fixed threshold at 0.5, not the stochastic binarisation of Salakhutdinov & Murray 2008 that
PixelRNN's Table 4 uses, so NLLs are not comparable with the paper's 81.3 nats).

Loss: the negative log-likelihood of the binarised image in nats, summed over its S * S pixels
and averaged over the batch (van den Oord et al. 2016, "Conditional Image Generation with
PixelCNN Decoders", eq. 1 with Bernoulli conditionals):

    nll(x | y) = -sum_i [x_i log sigmoid(l_i) + (1 - x_i) log sigmoid(-l_i)]

Metrics: nll (nats per image, = loss) and bits_per_dim = nll / (S * S * ln 2).

sample_fn(params, rng, cond=None, *, temperature=None, height=None, width=None, ...) -> uint8
(N, H, W, 1) in {0, 255}: pixels drawn in raster order in one jitted loop (`sample`), each from
`token_sampling.sample_logits` on the two logits [0, l_i] (softmax of which is the Bernoulli
p(x_i = 1) = sigmoid(l_i)) at `temperature` (default eval.temperature). cond: class labels (N,)
(default: eval.num_samples labels 0, 1, ..., 9, 0, ...). sampler / num_steps / cfg_scale are refused.

evaluate(params) -> nll, bits_per_dim of the first task.eval_examples test digits (held out) and
train_nll, train_bits_per_dim of as many training digits (overfitting); with task.eval_samples
> 0, digit_accuracy: the share of that many class-conditional samples (labels 0..9 in turn)
that `genjax.eval.digit_classifier` reads as their label.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from genjax.errors import check
from genjax.tasks import Task, make_model

TASK_KEYS = ("eval_examples", "eval_samples")
EVAL_KEYS = ("temperature",)
DATA_KEYS = ()


def _task(config) -> dict:
    t = config.get("task", {})
    return dict(eval_examples=int(t.get("eval_examples", 1000)), eval_samples=int(t.get("eval_samples", 100)))


def validate(config) -> None:
    """Raises UserError (before anything is built): data.channels != 1; task.eval_examples < 1;
    task.eval_samples < 0; model.channels < 1; eval.temperature <= 0; model.num_classes > 0 with task.eval_samples
    > 0 and fewer than 10 classes (the digit classifier reads 10 digits); a non-odd or < 3
    kernel size."""
    t, m = _task(config), config.model
    check(int(m.get("channels", 64)) >= 1, "model.channels", m.get("channels"), "must be >= 1")
    check(config.data.channels == 1, "data.channels", config.data.channels,
          "must be 1 (the PixelCNN models binarised grayscale digits)")
    check(t["eval_examples"] >= 1, "task.eval_examples", t["eval_examples"], "must be >= 1")
    check(t["eval_samples"] >= 0, "task.eval_samples", t["eval_samples"], "must be >= 0 (0: no digit accuracy)")
    temperature = float(config.eval.get("temperature", 1.0))
    check(temperature > 0, "eval.temperature", temperature, "must be > 0")
    classes = int(m.get("num_classes", 10))
    check(t["eval_samples"] == 0 or classes >= 10, "task.eval_samples", t["eval_samples"],
          f"must be 0 when model.num_classes={classes} < 10 (digit accuracy needs the 10 digit classes)")
    for key in ("kernel_size", "first_kernel_size"):
        k = m.get(key, 3)
        check(isinstance(k, int) and k >= 3 and k % 2 == 1, f"model.{key}", k, "must be an odd integer >= 3")


def make_module(config):
    """The `GatedPixelCNN` of `config` (in_channels from data.channels)."""
    from genjax.models import pixelcnn

    return make_model(pixelcnn, pixelcnn.GatedPixelCNN, config.model, in_channels=config.data.channels)


def binarise(x) -> jax.Array:
    """[-1, 1] pixels -> float32 {0, 1}: 1 iff x > 0 (uint8 value > 127)."""
    return (jnp.asarray(x) > 0).astype(jnp.float32)


def nll(logits: jax.Array, bits: jax.Array) -> jax.Array:
    """Bernoulli NLL in nats per image: logits (B, H, W), bits (B, H, W[, 1]) in {0, 1} -> (B,)
    float32, `sum_i softplus(-l_i)` where x_i = 1 and `softplus(l_i)` where x_i = 0."""
    bits = bits.reshape(logits.shape)
    return jnp.sum(jax.nn.softplus(jnp.where(bits > 0, -logits, logits)), axis=(1, 2))


def bits_per_dim(nats: float | jax.Array, num_pixels: int):
    """nats per image -> bits per pixel: nats / (num_pixels ln 2)."""
    return nats / (num_pixels * math.log(2.0))


def sample(module, params, rng, labels, *, height: int, width: int, temperature: float = 1.0) -> jax.Array:
    """Images (N, height, width, 1) float32 in {0, 1} drawn pixel by pixel in raster order.

    One jitted loop: for each row r the vertical stack runs once on the image so far (its row r
    depends on rows < r only, all drawn), then for each column c the horizontal stack runs on row r
    alone and pixel (r, c) is drawn with key `fold_in(rng, r * width + c)` from
    `token_sampling.sample_logits` on [0, l_rc] at `temperature`. The result is what the full
    forward gives: tests/train/test_pixelcnn_task.py redraws every pixel from `module.apply` on
    the finished image with the same keys and gets the same image back. Traceable: call it under
    `jax.jit` with module, height, width and temperature static (the task does)."""
    from genjax.models.token_sampling import sample_logits

    labels, variables = jnp.asarray(labels, jnp.int32), {"params": params}
    x = jnp.zeros((labels.shape[0], height, width, 1), jnp.float32)

    def row(r, x):
        links = module.apply(variables, x, labels, method=module.vertical)
        links = [jax.lax.dynamic_slice_in_dim(a, r, 1, axis=1) for a in links]  # (N, 1, W, 2p)

        def column(c, x):
            line = jax.lax.dynamic_slice_in_dim(x, r, 1, axis=1)
            logit = module.apply(variables, line, links, labels, method=module.horizontal)[:, 0, c]
            key = jax.random.fold_in(rng, r * width + c)
            bit = sample_logits(key, jnp.stack([jnp.zeros_like(logit), logit], -1), temperature=temperature)
            return x.at[:, r, c, 0].set(bit.astype(x.dtype))

        return jax.lax.fori_loop(0, width, column, x)

    return jax.lax.fori_loop(0, height, row, x)


def build(config, *, mesh=None) -> Task:
    del mesh
    from genjax.data import recipes

    size = config.data.image_size
    module = make_module(config)
    t = _task(config)
    classes = module.num_classes

    def init(rng):
        return module.init(rng, jnp.zeros((1, size, size, 1), jnp.float32),
                           jnp.zeros((1,), jnp.int32) if classes else None)["params"]

    def labels_of(batch):
        return batch["label"].astype(jnp.int32) if classes else None

    def loss_fn(params, batch, rng):
        del rng
        bits = binarise(batch["image"])
        per_image = nll(module.apply({"params": params}, bits, labels_of(batch)), bits)
        loss = jnp.mean(per_image)
        return loss, {"nll": loss, "bits_per_dim": bits_per_dim(loss, size * size)}

    @jax.jit
    def nlls(params, x, y):
        bits = binarise(x)
        return nll(module.apply({"params": params}, bits, y if classes else None), bits)

    n = t["eval_examples"]
    held_out = recipes.fixed_examples(config, n)
    train = recipes.fixed_examples(config, n, split="train")

    def mean_nll(params, examples):
        b = 250
        return float(np.mean(np.concatenate([
            np.asarray(nlls(params, jnp.asarray(examples["image"][i:i + b]), jnp.asarray(examples["label"][i:i + b])))
            for i in range(0, len(examples["image"]), b)])))

    @functools.partial(jax.jit, static_argnums=(3, 4, 5))
    def draw(params, rng, labels, height, width, temperature):
        return sample(module, params, rng, labels, height=height, width=width, temperature=temperature)

    def sample_fn(params, rng, cond=None, *, temperature=None, sampler=None, num_steps=None, cfg_scale=None,
                  init_frames=None, height=None, width=None):
        for flag, value in (("sampler", sampler), ("num_steps", num_steps), ("cfg_scale", cfg_scale),
                            ("init_frames", init_frames)):
            check(value is None, flag, value, "does not apply to a PixelCNN (it draws pixels one by one "
                  "from its own conditionals; set eval.temperature instead)")
        count = config.eval.num_samples
        labels = np.arange(count) % max(classes, 1) if cond is None else np.asarray(cond)
        if classes:
            check(labels.ndim == 1 and np.all((labels >= 0) & (labels < classes)), "labels", labels.tolist(),
                  f"must be ints in [0, {classes})")
        temperature = float(config.eval.get("temperature", 1.0) if temperature is None else temperature)
        check(temperature > 0, "temperature", temperature, "must be > 0")
        x = draw(params, rng, jnp.asarray(labels, jnp.int32), height or size, width or size, temperature)
        return (x * 255).astype(jnp.uint8)

    def evaluate(params):
        out = {"nll": mean_nll(params, held_out), "train_nll": mean_nll(params, train)}
        out.update(bits_per_dim=bits_per_dim(out["nll"], size * size),
                   train_bits_per_dim=bits_per_dim(out["train_nll"], size * size))
        if t["eval_samples"]:
            from genjax.eval import digit_classifier

            labels = np.arange(t["eval_samples"]) % 10
            images = np.asarray(sample_fn(params, jax.random.PRNGKey(0), labels))
            read = digit_classifier.read_digits(digit_classifier.load_or_train(), images)
            out["digit_accuracy"] = float(np.mean(read == labels))
        return out

    return Task(module, init, loss_fn, sample_fn, recipes.pixel_data(config), evaluate=evaluate)
