"""Task "var": class-conditional VAR (Tian et al. 2024, `genjax.models.var.VAR`; the model section
holds its attributes) on the tokens of a frozen multi-scale VQ-VAE.

task.vqvae = a `genjax train` workdir of task "vqvae" with model.scales (VAR's multi-scale
residual tokenizer, `configs/vqvae_mnist.py:var_tokenizer=True`), loaded frozen
(`tasks.load_frozen`); the VAR's scales, vocab_size and code_dim are taken from it.

Loss (teacher forcing, one forward): images (B, S, S, data.channels) -> the tokenizer's tokens
r (B, L) of all K scales and the inputs of scales 2..K (`MultiScaleQuantizer.var_input`:
area(f_hat_{k-1}, s_k)); loss = mean over the B x L tokens of -log p(r_l | class, coarser scales)
(VAR `train.py`, no label smoothing); labels dropped to the null class with
model.class_dropout_prob. Metrics: loss, accuracy (top-1 token accuracy), loss_k per scale k.

sample_fn(params, rng, cond=None, *, cfg_scale=None, temperature=None, top_k=None, top_p=None,
cfg_ramp=None, sampler=None, num_steps=None, height=None, width=None) -> uint8 (N, S, S, C):
next-scale sampling (VAR Algorithm 2, `autoregressive_infer_cfg`), K forward passes in one
jitted function, each recomputing the whole prefix (no KV cache): the logits of scale k, guided
as `token_sampling.cfg_logits(cond, uncond, w_k)` against the null class (w_k = cfg_scale, or
with cfg_ramp 1 + (cfg_scale - 1) k / (K - 1), VAR's linear ramp `t = cfg * k / (K - 1)` with
cfg_scale = 1 + cfg), drawn with `token_sampling.sample_logits` (temperature, top-k, top-p); the
code map joins f_hat (`MultiScaleQuantizer.accumulate`) and the frozen decoder draws f_hat.
cond: int labels (N,) in [0, num_classes) (None: 0, 1, ..., for eval.num_samples). Settings
default to config.eval (cfg_scale, temperature, top_k, top_p, cfg_ramp). sampler / num_steps
must be None (the K scales are the steps); height / width None or data.image_size.

evaluate(params) -> digit_accuracy (guided with eval.cfg_scale) and digit_accuracy_nocfg
(cfg_scale 1): the fraction of eval.num_eval_samples class-conditional samples (classes in turn,
fixed seed) that `eval.digit_classifier` reads as their class (resized to 28 x 28 if needed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax.errors import check
from genjax.tasks import Task, is_model_dir, load_frozen, make_model

TASK_KEYS = ("vqvae",)
EVAL_KEYS = ("temperature", "top_k", "top_p", "cfg_ramp", "num_eval_samples")
EVAL_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, cfg_ramp=True, num_eval_samples=200)


def _eval(config) -> dict:
    e = config.get("eval", {})
    return {k: e.get(k, v) for k, v in EVAL_DEFAULTS.items()}


def validate(config) -> None:
    """Raises UserError: task.vqvae not a workdir; eval.temperature / top_k / top_p out of range
    (`token_sampling.check_settings`); eval.num_eval_samples < 0; model.num_classes < 1."""
    from genjax.models import token_sampling

    path = config.get("task", {}).get("vqvae", "")
    check(is_model_dir(path), "task.vqvae", path, "must be a `genjax train` workdir of task vqvae with model.scales")
    e = _eval(config)
    token_sampling.check_settings(float(e["temperature"]), int(e["top_k"]), float(e["top_p"]))
    check(int(e["num_eval_samples"]) >= 0, "eval.num_eval_samples", e["num_eval_samples"], "must be >= 0")
    check(int(config.model.get("num_classes", 10)) >= 1, "model.num_classes", config.model.get("num_classes"),
          "must be >= 1 (VAR here is class-conditional)")


def _tokenizer(config, mesh):
    """`(vq_module, vq_variables)` of task.vqvae, refusing a single-scale one."""
    from genjax.tasks import vqvae as vqvae_task

    vq, params = load_frozen(config.task.vqvae, family_name="vqvae", mesh=mesh)
    check(vq.scales is not None, "task.vqvae", config.task.vqvae,
          "is a single-scale VQ-VAE; VAR needs one trained with model.scales (var_tokenizer=True)")
    size = config.data.image_size
    check(size == vq.scales[-1] * vq.downsample_factor, "data.image_size", size,
          f"must be the tokenizer's image side {vq.scales[-1] * vq.downsample_factor}")
    return vq, vqvae_task._variables(params)


def _quant(vq, vq_vars, fn: str, *args):
    """The frozen tokenizer's `MultiScaleQuantizer` method `fn` on `args`."""
    return vq.apply(vq_vars, *args, method=lambda m, *a: getattr(m.quantizer, fn)(*a))


def generate(module, params, vq, vq_vars, rng, labels, cfg_scale, *, guided: bool, cfg_ramp: bool,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Next-scale sampling (VAR Algorithm 2 / `autoregressive_infer_cfg`, the prefix recomputed at
    each of the K steps instead of a KV cache).

    Args:
      module, params: the `VAR` and its params. vq, vq_vars: the frozen `VQVAE(scales=...)` and its
        variables. labels: int `(N,)` in [0, num_classes). cfg_scale: float, the guidance weight
        (`token_sampling.cfg_logits`); used only when `guided` (static: the batch is doubled with
        the null class), ramped 1 -> cfg_scale over the scales when `cfg_ramp`.
      temperature, top_k, top_p: `token_sampling.sample_logits`'s.

    Returns:
      tokens int32 `(N, L)`, f_hat `(N, h, w, C)` float32 (decode with `vq.decode`), and the K
      (guided) logits `(N, s_k^2, V)` the tokens were drawn from.
    """
    from genjax.models import token_sampling, var

    scales, n, c = module.scales, labels.shape[0], module.code_dim
    bounds = np.cumsum([0] + [s * s for s in scales])
    y = jnp.concatenate([labels, jnp.full_like(labels, module.num_classes)]) if guided else labels
    f_hat = jnp.zeros((n, scales[-1], scales[-1], c), jnp.float32)
    x_in, tokens, all_logits = jnp.zeros((n, 0, c), jnp.float32), [], []
    for k in range(len(scales)):
        inp = jnp.concatenate([x_in, x_in]) if guided else x_in
        logits = module.apply({"params": params}, y, inp)[:, bounds[k]:bounds[k + 1]]
        if guided:
            w = 1 + (cfg_scale - 1) * k / max(len(scales) - 1, 1) if cfg_ramp else cfg_scale
            logits = token_sampling.cfg_logits(logits[:n], logits[n:], w)
        rng, key = jax.random.split(rng)
        idx = token_sampling.sample_logits(key, logits, temperature=temperature, top_k=top_k, top_p=top_p)
        f_hat = _quant(vq, vq_vars, "accumulate", f_hat, k, idx)
        if k + 1 < len(scales):  # the next scale's input, as MultiScaleQuantizer.var_input
            nxt = var.resize(f_hat, scales[k + 1], "area")
            x_in = jnp.concatenate([x_in, nxt.reshape(n, -1, c)], axis=1)
        tokens.append(idx)
        all_logits.append(logits)
    return jnp.concatenate(tokens, axis=1), f_hat, all_logits


def make_module(config, vq=None):
    """The `VAR` of `config` (scales, vocab_size, code_dim from the tokenizer task.vqvae)."""
    from genjax.models import var

    vq = vq or _tokenizer(config, None)[0]
    return make_model(var, var.VAR, config.model, scales=tuple(vq.scales), vocab_size=vq.num_codes,
                      code_dim=vq.latent_channels)


def build(config, *, mesh=None) -> Task:
    from genjax.data import recipes
    from genjax.io import media
    from genjax.models import token_sampling

    vq, vq_vars = _tokenizer(config, mesh)
    module = make_module(config, vq)
    K, bounds = len(module.scales), np.cumsum([0] + [s * s for s in module.scales])
    num_classes, ev = module.num_classes, _eval(config)

    def tokens_of(vq_vars, images):
        """Images -> (tokens (B, L), teacher-forcing input (B, L - s_1^2, C)), no gradient."""
        idx = vq.apply(vq_vars, images, method=vq.encode)[1]
        return jax.lax.stop_gradient(idx), jax.lax.stop_gradient(_quant(vq, vq_vars, "var_input", idx))

    def init_params(rng):
        x = jnp.zeros((1, bounds[-1] - bounds[1], module.code_dim), jnp.float32)
        return module.init(rng, jnp.zeros((1,), jnp.int32), x)["params"]

    def loss_fn(params, batch, rng):
        params = dict(params)
        vq_vars = params.pop("vqvae")
        idx, x_in = tokens_of(vq_vars, batch["image"])
        logits = module.apply({"params": params}, batch["label"], x_in, train=True, rngs={"dropout": rng})
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), idx)  # (B, L)
        metrics = {"accuracy": jnp.mean((jnp.argmax(logits, -1) == idx).astype(jnp.float32))}
        metrics.update({f"loss_{k + 1}": jnp.mean(nll[:, bounds[k]:bounds[k + 1]]) for k in range(K)})
        return jnp.mean(nll), metrics

    @functools.partial(jax.jit, static_argnames=("guided", "cfg_ramp", "temperature", "top_k", "top_p"))
    def draw(params, vq_vars, rng, labels, cfg_scale, **settings):
        f_hat = generate(module, params, vq, vq_vars, rng, labels, cfg_scale, **settings)[1]
        return media.to_uint8(vq.apply(vq_vars, f_hat, method=vq.decode))

    def sample_fn(params, rng, cond=None, *, cfg_scale=None, temperature=None, top_k=None, top_p=None,
                  cfg_ramp=None, sampler=None, num_steps=None, height=None, width=None):
        check(sampler is None and num_steps is None, "sampler/num_steps", (sampler, num_steps),
              f"do not apply to VAR (it draws its {K} scales in turn)")
        for name, v in (("height", height), ("width", width)):
            check(v in (None, config.data.image_size), name, v, f"must be the tokenizer's {config.data.image_size}")
        labels = np.arange(config.eval.num_samples) % num_classes if cond is None else np.asarray(cond)
        check(labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer) and np.all(labels >= 0)
              and np.all(labels < num_classes), "cond", cond, f"must be int labels in [0, {num_classes})")
        w = float(config.eval.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
        pick = lambda v, key: ev[key] if v is None else v  # noqa: E731
        settings = dict(temperature=float(pick(temperature, "temperature")), top_k=int(pick(top_k, "top_k")),
                        top_p=float(pick(top_p, "top_p")))
        token_sampling.check_settings(**settings, vocab_size=module.vocab_size)
        vars_ = params.get("vqvae", vq_vars)
        params = {k: v for k, v in params.items() if k != "vqvae"}
        return draw(params, vars_, rng, jnp.asarray(labels, jnp.int32), jnp.float32(w), guided=w != 1.0,
                    cfg_ramp=bool(pick(cfg_ramp, "cfg_ramp")), **settings)

    def evaluate(params):
        n = int(ev["num_eval_samples"])
        if n == 0:
            return {}
        from genjax.eval import digit_classifier

        classifier = digit_classifier.load_or_train()
        labels = np.arange(n) % num_classes
        def accuracy(w):
            images = sample_fn(params, jax.random.PRNGKey(0), labels, cfg_scale=w)
            return float(np.mean(digit_classifier.read_digits(classifier, images) == labels))

        return {"digit_accuracy": accuracy(None), "digit_accuracy_nocfg": accuracy(1.0)}

    return Task(module, init_params, loss_fn, sample_fn, recipes.pixel_data(config), evaluate=evaluate,
                frozen={"vqvae": vq_vars})
