"""Task "dalle": DALL·E's transformer (`genjax.models.dalle.DalleTransformer`; the model section holds
hidden_size, depth, num_heads, mlp_ratio, attention_impl, dtype) on the image tokens of a frozen
discrete VAE (task.dvae, a `genjax train` workdir of task "dvae"), conditioned on captions.

Data: `{"image", "ids", "mask"}`: images (B, S, S, C) in [-1, 1] and their captions ("digit N" for
mnist_embedded) byte-tokenized to task.text_length (`clip.tokenize_fn`). Inside the train step the
frozen dVAE tokenises each image (argmax codes, `DiscreteVAE.encode`, DALL·E Sec. 2.2), and with
probability task.caption_dropout a caption is replaced by the empty one (for classifier-free
guidance at sampling time; 0 = never).

Loss (DALL·E Sec. 2.2): cross-entropy of the next token, averaged separately over the text targets
(text positions 1 .. Lt - 1, padding included: each is a token of the stream) and the N image
tokens, weighted task.text_loss_weight and 1 - text_loss_weight (DALL·E: 1/8 and 7/8). Metrics:
text_loss, image_loss (nats per token), image_accuracy (teacher-forced argmax).

sample_fn(params, rng, cond=None, *, cfg_scale=None, temperature=None, top_k=None, top_p=None,
height=None, width=None, rerank=None) -> uint8 (N, S, S, C): for each prompt of `cond` (a list of
non-empty str fitting task.text_length - 2 bytes; None: "digit 0" .. "digit 9" repeated to
eval.num_samples) the image tokens drawn one at a time (`dalle.generate`, one jitted fori_loop,
`token_sampling.sample_logits`; settings default to config.eval's temperature, top_k, top_p and
cfg_scale, 1 = no guidance) and decoded by the frozen dVAE (hard path). With task.clip (a
`genjax train` CLIP workdir) and rerank = R > 1 (default eval.rerank) R candidates are drawn per
prompt and the one the CLIP scores highest against its prompt is kept (DALL·E Sec. 2.5).
evaluate(params) -> {"digit_accuracy"}: the share of task.eval_per_digit samples for each prompt
"digit 0" .. "digit 9" (config.eval's settings, key from config.seed) that
`genjax.eval.digit_classifier` reads as the prompted digit (images resized to 28 x 28 if needed).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genjax import tasks
from genjax.errors import check
from genjax.tasks import Task, make_model

TASK_KEYS = ("dvae", "clip", "text_length", "text_loss_weight", "caption_dropout", "eval_per_digit")
EVAL_KEYS = ("temperature", "top_k", "top_p", "rerank")
DIGIT_PROMPTS = tuple(f"digit {d}" for d in range(10))


def _task(config) -> dict:
    t = config.get("task", {})
    return dict(dvae=t.get("dvae", ""), clip=t.get("clip", ""), text_length=int(t.get("text_length", 16)),
                text_loss_weight=float(t.get("text_loss_weight", 1 / 8)),
                caption_dropout=float(t.get("caption_dropout", 0.0)),
                eval_per_digit=int(t.get("eval_per_digit", 10)))


def _eval(config, **given) -> dict:
    e = config.get("eval", {})
    out = dict(temperature=float(e.get("temperature", 1.0)), top_k=int(e.get("top_k", 0)),
               top_p=float(e.get("top_p", 1.0)), cfg_scale=float(e.get("cfg_scale", 1.0)),
               rerank=int(e.get("rerank", 1)))
    return {k: out[k] if given.get(k) is None else given[k] for k in out}


def validate(config) -> None:
    """Raises UserError (before anything is built): task.dvae not a workdir of a "dvae" run, or
    task.clip (when set) not one of a "clip" run; task.text_length < 3; task.text_loss_weight or
    task.caption_dropout outside [0, 1]; task.eval_per_digit < 1; eval.temperature <= 0,
    eval.top_k < 0, eval.top_p outside (0, 1] (`token_sampling.check_settings`), eval.cfg_scale
    not finite, eval.rerank < 1 or > 1 without task.clip."""
    from genjax.io import checkpoint
    from genjax.models import token_sampling

    t, e = _task(config), _eval(config)
    for key, family in (("dvae", "dvae"), ("clip", "clip")):
        if key == "clip" and not t["clip"]:
            continue
        check(tasks.is_model_dir(t[key]), f"task.{key}", t[key], f"must be a `genjax train` workdir of a {family!r} run")
        name = checkpoint.read_config(t[key]).model.name
        check(name == family, f"task.{key}", t[key], f"was trained with model.name={name!r}, not {family!r}")
    check(t["text_length"] >= 3, "task.text_length", t["text_length"], "must be >= 3 (bos, a byte, eos)")
    for key in ("text_loss_weight", "caption_dropout"):
        check(0 <= t[key] <= 1, f"task.{key}", t[key], "must be in [0, 1]")
    check(t["eval_per_digit"] >= 1, "task.eval_per_digit", t["eval_per_digit"], "must be >= 1")
    token_sampling.check_settings(e["temperature"], e["top_k"], e["top_p"])
    check(math.isfinite(e["cfg_scale"]), "eval.cfg_scale", e["cfg_scale"], "must be finite (1 = no guidance)")
    check(e["rerank"] >= 1, "eval.rerank", e["rerank"], "must be >= 1 (1 = no re-ranking)")
    check(e["rerank"] == 1 or t["clip"], "eval.rerank", e["rerank"], "needs task.clip (a CLIP workdir)")


def _dvae_config(config):
    from genjax.io import checkpoint

    return checkpoint.read_config(_task(config)["dvae"])


def make_module(config):
    """The `DalleTransformer` of `config`: vocabularies and image grid from the byte tokenizer,
    task.text_length and the frozen dVAE's run config (read from its workdir, no params)."""
    from genjax.models import dalle, tokenizer
    from genjax.tasks import dvae as dvae_task

    dvae_config = _dvae_config(config)
    dvae_module = dvae_task.make_module(dvae_config)
    g = config.data.image_size // dvae_module.downsample_factor
    return make_model(dalle, dalle.DalleTransformer, config.model, text_vocab_size=tokenizer.ByteTokenizer.vocab_size,
                      text_length=_task(config)["text_length"], num_codes=dvae_module.num_codes, image_grid=(g, g))


def build(config, *, mesh=None) -> Task:
    from genjax.data import recipes
    from genjax.models import dalle, tokenizer
    from genjax.tasks import dvae as dvae_task
    from genjax.tasks.clip import tokenize_fn

    t, d = _task(config), config.data
    dvae_config = _dvae_config(config)
    check(dvae_config.data.image_size == d.image_size and dvae_config.data.channels == d.channels,
          "task.dvae", t["dvae"], f"was trained on {dvae_config.data.image_size}^2 x {dvae_config.data.channels} "
          f"images; data is {d.image_size}^2 x {d.channels}")
    module = make_module(config)
    dvae_module, dvae_params = tasks.load_frozen(t["dvae"], family_name="dvae", mesh=mesh)
    frozen = {"dvae": dvae_task.module_params(dvae_params)}
    tok, lt, n, (g, _) = tokenizer.ByteTokenizer(), t["text_length"], module.num_image_tokens, module.image_grid
    null_ids = jnp.asarray(tok.encode([""], lt)[0])  # (1, Lt): the empty caption
    w_text, drop = t["text_loss_weight"], t["caption_dropout"]

    def init_params(rng):
        return module.init(rng, jnp.zeros((1, lt), jnp.int32), jnp.zeros((1, n), jnp.int32))["params"]

    def loss_fn(params, batch, rng):
        params = dict(params)
        codes = dvae_module.apply({"params": params.pop("dvae")}, batch["image"], method=dvae_module.encode)
        codes = jax.lax.stop_gradient(codes.reshape(codes.shape[0], n))
        ids = batch["ids"]
        if drop > 0:
            dropped = jax.random.bernoulli(rng, drop, (ids.shape[0], 1))
            ids = jnp.where(dropped, null_ids, ids)
        text_logits, image_logits = module.apply({"params": params}, ids, codes)
        text_ce = _cross_entropy(text_logits, ids[:, 1:])
        image_ce = _cross_entropy(image_logits, codes)
        accuracy = jnp.mean((jnp.argmax(image_logits, -1) == codes).astype(jnp.float32))
        loss = w_text * text_ce + (1 - w_text) * image_ce
        return loss, {"text_loss": text_ce, "image_loss": image_ce, "image_accuracy": accuracy}

    @functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p", "cfg_scale"))
    def tokens(params, ids, rng, *, temperature, top_k, top_p, cfg_scale):
        fn = lambda text_ids, image_ids: module.apply({"params": params}, text_ids, image_ids)[1]
        return dalle.generate(fn, ids, rng, num_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p,
                              null_text_ids=jnp.broadcast_to(null_ids, ids.shape), cfg_scale=cfg_scale)

    @jax.jit
    def decode(codes):
        x = dvae_module.apply({"params": frozen["dvae"]}, codes.reshape(-1, g, g), method=dvae_module.decode_codes)
        return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    clip_score = _clip_scorer(t["clip"], mesh) if t["clip"] else None

    def sample_fn(params, rng, cond=None, *, sampler=None, num_steps=None, cfg_scale=None, init_frames=None,
                  height=None, width=None, temperature=None, top_k=None, top_p=None, rerank=None):
        from genjax.models import token_sampling

        check(sampler is None and num_steps is None and init_frames is None, "sampler/num_steps/init_frames",
              (sampler, num_steps, init_frames), "are for diffusion models; DALL·E draws tokens")
        for field, v in (("height", height), ("width", width)):
            check(v is None or v == d.image_size, field, v, f"must be {d.image_size} (the dVAE's image size) or unset")
        e = _eval(config, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, rerank=rerank)
        token_sampling.check_settings(e["temperature"], e["top_k"], e["top_p"], dvae_module.num_codes)
        check(e["rerank"] >= 1 and (e["rerank"] == 1 or clip_score is not None), "rerank", e["rerank"],
              "must be >= 1, and > 1 only with task.clip (a CLIP workdir)")
        prompts = list(cond) if cond is not None else [DIGIT_PROMPTS[i % 10] for i in range(config.eval.num_samples)]
        tok.check_fits(prompts, lt, "prompts")  # a prompt cut at text_length changes the image
        for i, p in enumerate(prompts):
            check(p.strip() != "", f"prompts[{i}]", p, "must be a non-empty string")
        r = e["rerank"]
        ids = jnp.asarray(np.repeat(tok.encode(prompts, lt)[0], r, axis=0))
        codes = tokens(params, ids, rng, temperature=e["temperature"], top_k=e["top_k"], top_p=e["top_p"],
                       cfg_scale=e["cfg_scale"])
        images = np.asarray(decode(codes))
        if r == 1:
            return images
        scores = clip_score(images, [p for p in prompts for _ in range(r)]).reshape(len(prompts), r)
        return images.reshape(len(prompts), r, *images.shape[1:])[np.arange(len(prompts)), scores.argmax(1)]

    def evaluate(params):
        from genjax.eval import digit_classifier

        prompts = [p for p in DIGIT_PROMPTS for _ in range(t["eval_per_digit"])]
        images = sample_fn(params, jax.random.PRNGKey(config.seed), prompts)
        read = digit_classifier.read_digits(digit_classifier.load_or_train(), images)
        labels = np.repeat(np.arange(10), t["eval_per_digit"])
        return {"digit_accuracy": float(np.mean(read == labels))}

    make_data = recipes.pixel_data(config, tokenize_fn(tok, lt, "image"))
    return Task(module, init_params, loss_fn, sample_fn, make_data, evaluate=evaluate, frozen=frozen)


def _clip_scorer(path: str, mesh):
    """`(images uint8 (N, S, S, C), prompts list of N str) -> float32 (N,)`: the cosine similarity
    of each image with its prompt under the frozen CLIP of workdir `path` (`tasks.load_frozen`;
    `CLIP.encode_image` / `encode_text`, L2-normalised embeddings; images resized bilinearly to the
    CLIP's image size), DALL·E Sec. 2.5's re-ranking score (Radford et al. 2021)."""
    from genjax.models import tokenizer
    from genjax.models.clip import CLIP

    module, params = tasks.load_frozen(path, family_name="clip", mesh=mesh)
    tok, (h, w) = tokenizer.ByteTokenizer(), module.image_size

    @jax.jit
    def similarity(images, ids, mask):
        x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), "bilinear")
        image = module.apply({"params": params}, x, method=CLIP.encode_image)
        text = module.apply({"params": params}, ids, mask, method=CLIP.encode_text)
        return jnp.sum(image * text, axis=-1)

    def score(images, prompts):
        ids, mask = tok.encode(list(prompts), module.context_length)
        return np.asarray(similarity(images, ids, mask))

    return score


def _cross_entropy(logits, targets):
    """Mean over all positions of `-log softmax(logits)[target]` (nats), float32 scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
