"""Training state, optimizer and EMA.

`TrainState` is pure data (a pytree of arrays), created already sharded on the mesh:
`jax.eval_shape(init)` -> `nn.get_partition_spec` -> `nn.logical_to_mesh_sharding(..., RULES)`
-> `jax.jit(init, out_shardings=...)`, the recipe of the Flax guide "Scale up Flax Modules on
multiple devices". Parameters and optimizer moments are float32; compute precision is the
module's `dtype` (bf16 on accelerators).

`apply_gradients` is the one place an update happens: optax AdamW (with global-norm clipping and a
warm-up + constant / cosine learning-rate schedule), then the EMA of the parameters, with any
non-finite gradient turning the whole update into a no-op.

Model state: a task may carry non-gradient arrays from step to step (a VQ-VAE's EMA codebook and
usage counts): `TrainState.model_state`, a dict of Flax collections (`{}` for most tasks). The
functions of the task see it merged into their params (`{**params, **model_state}`, as
`Task.frozen`), and its loss_fn returns the updated state as `metrics[MODEL_STATE]`
(`loss_and_grads`); it is checkpointed with the rest of the state and kept, like params, when a
step's gradient is not finite.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from genjax.errors import check
from genjax.parallel.axes import RULES
from genjax.tasks import MODEL_STATE

PyTree = Any

# The key of a loss_fn's metrics under which a stateful task returns its updated model state.

# The fields of config.optim: make_optimizer's, plus the trainer's grad_accum_steps, ema_decay,
# ema_warmup and max_nonfinite_steps.
OPTIM_KEYS = ("lr", "schedule", "warmup_steps", "end_lr_ratio", "b1", "b2", "eps", "weight_decay",
              "grad_clip_norm", "grad_accum_steps", "ema_decay", "ema_warmup", "max_nonfinite_steps")


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (all arrays; checkpointed as is).

    Fields:
      step: int32 scalar, number of train steps run (skipped non-finite steps included); the
        per-step key is `fold_in(rng, step)`.
      params: float32 parameter tree (unboxed; shardings live in the arrays).
      opt_state: optax state of `make_optimizer`'s transformation.
      ema_params: exponential moving average of `params`, same tree and dtypes.
      rng: uint32 (2,) raw root PRNG key (`jax.random.PRNGKey(seed)`), never split in place.
      nonfinite_count: int32 scalar, total steps skipped because the gradient was NaN / Inf.
      nonfinite_streak: int32 scalar, consecutive skipped steps up to now (0 after a good step).
      model_state: dict of non-gradient Flax collections the task updates in its loss_fn (e.g.
        `{"vq_stats": ...}`), `{}` for a task without (see the module docstring).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    rng: jax.Array
    nonfinite_count: jax.Array
    nonfinite_streak: jax.Array
    model_state: PyTree = flax.struct.field(default_factory=dict)


def learning_rate_schedule(optim_config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the number of applied updates.

    `optim.schedule`:
      "constant": linear warm-up from 0 to `lr` over `warmup_steps`, then `lr`
        (DiT, Peebles & Xie 2023, Sec. 5: constant 1e-4, no warm-up).
      "cosine": `optax.warmup_cosine_decay_schedule` from 0 to `lr` over `warmup_steps`, then
        cosine decay to `lr * end_lr_ratio` at `total_steps` (Loshchilov & Hutter 2017).

    Raises:
      UserError: lr <= 0, negative warmup_steps, unknown schedule, warmup >= total_steps (cosine).
    """
    lr = float(optim_config["lr"])
    warmup = int(optim_config["warmup_steps"])
    name = optim_config["schedule"]
    check(lr > 0, "optim.lr", lr, "must be > 0")
    check(warmup >= 0, "optim.warmup_steps", warmup, "must be >= 0")
    check(name in ("constant", "cosine"), "optim.schedule", name, "must be 'constant' or 'cosine'")
    if name == "constant":
        if warmup == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    check(total_steps > warmup, "optim.warmup_steps", warmup,
          f"must be < the number of train steps {total_steps} for the cosine schedule")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * float(optim_config["end_lr_ratio"]))


def make_optimizer(optim_config: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and the schedule of `learning_rate_schedule`.

    Config fields: lr, schedule, warmup_steps, end_lr_ratio, b1, b2, eps, weight_decay,
    grad_clip_norm (0 disables clipping). Gradient accumulation is not part of the optimizer:
    `train_step` sums micro-batch gradients in a `lax.scan` and calls the optimizer once per step,
    so step counts, the schedule and the EMA stay per optimizer update (unlike `optax.MultiSteps`,
    whose inner state advances on every micro-batch).

    Returns:
      (transformation, schedule); `schedule(n)` is the learning rate of the n-th update.

    Raises:
      UserError: see `learning_rate_schedule`; negative weight_decay or grad_clip_norm.
    """
    schedule = learning_rate_schedule(optim_config, total_steps)
    clip = float(optim_config["grad_clip_norm"])
    wd = float(optim_config["weight_decay"])
    check(clip >= 0, "optim.grad_clip_norm", clip, "must be >= 0 (0 disables clipping)")
    check(wd >= 0, "optim.weight_decay", wd, "must be >= 0")
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts.append(optax.adamw(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]),
                             eps=float(optim_config["eps"]), weight_decay=wd))
    return optax.chain(*parts), schedule


def validate_optim(optim_config: Mapping[str, Any], total_steps: int) -> None:
    """Check config.optim before anything is built: its keys (`OPTIM_KEYS`) and every number's range.

    Raises:
      UserError: an unknown key; ema_decay outside [0, 1]; b1 or b2 outside [0, 1); eps <= 0;
        end_lr_ratio < 0; grad_accum_steps or max_nonfinite_steps < 1; ema_warmup not a bool;
        and `make_optimizer`'s errors (lr <= 0, a bad schedule or warmup, negative weight_decay
        or grad_clip_norm). A NaN fails every range.
    """
    from genjax.config import check_keys

    check_keys("optim", optim_config, OPTIM_KEYS)
    o = optim_config
    check(0 <= float(o["ema_decay"]) <= 1, "optim.ema_decay", o["ema_decay"],
          "must be in [0, 1] (the EMA keeps ema_decay of the old weights each step)")
    for key in ("b1", "b2"):
        check(0 <= float(o[key]) < 1, f"optim.{key}", o[key], "must be in [0, 1)")
    check(float(o["eps"]) > 0 and math.isfinite(float(o["eps"])), "optim.eps", o["eps"],
          "must be a finite number > 0")
    check(float(o["end_lr_ratio"]) >= 0, "optim.end_lr_ratio", o["end_lr_ratio"], "must be >= 0")
    check(math.isfinite(float(o["lr"])), "optim.lr", o["lr"], "must be a finite number > 0")
    check(isinstance(o["ema_warmup"], bool), "optim.ema_warmup", o["ema_warmup"], "must be true or false")
    for key in ("grad_accum_steps", "max_nonfinite_steps"):
        check(int(o[key]) >= 1, f"optim.{key}", o[key], "must be >= 1")
    make_optimizer(o, total_steps)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay for the update made at `step` (0-based).

    With `warmup`: `min(decay, (1 + step) / (10 + step))`, the num_updates rule of
    `tf.train.ExponentialMovingAverage`; otherwise the constant `decay`.
    Returns a float32 scalar in [0, 1).
    """
    decay = jnp.float32(decay)
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _boxed_init(init_params: Callable[[jax.Array], PyTree], tx: optax.GradientTransformation,
                seed: int, init_state: Callable[[jax.Array], PyTree] | None
                ) -> tuple[Callable[[jax.Array], TrainState], jax.Array]:
    root = jax.random.PRNGKey(seed)

    def init(key):
        params = init_params(key)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, opt_state=tx.init(params), ema_params=params,
                          rng=root, nonfinite_count=zero, nonfinite_streak=zero,
                          model_state={} if init_state is None else init_state(key))

    return init, jax.random.split(root)[1]


def create_train_state(init_params: Callable[[jax.Array], PyTree],
                       tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                       rules=RULES, init_state: Callable[[jax.Array], PyTree] | None = None
                       ) -> tuple[TrainState, TrainState]:
    """Initialise a `TrainState` directly into its shardings on `mesh`.

    Args:
      init_params: `key -> params` returning the boxed (`nn.Partitioned`) parameter tree of a
        Flax module, e.g. `lambda k: module.init(k, *dummy)["params"]`.
      tx: the optimizer from `make_optimizer`.
      seed: root seed; the root key is `PRNGKey(seed)`, params are drawn with
        `split(root)[1]`, distinct from the step keys `fold_in(root, step)`.
      mesh: the training mesh; logical names map to it through `rules`.
      init_state: `key -> model state` (`Task.init_state`, called with the params' key), or None
        for `model_state={}`.

    Returns:
      (state, shardings): the state (params, moments and EMA sharded per the logical axis names,
      scalars replicated) and the same tree of `NamedSharding`s for jit in/out shardings.
    """
    init, param_key = _boxed_init(init_params, tx, seed, init_state)
    shardings = _shardings(jax.eval_shape(init, param_key), mesh, rules)
    state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(param_key)
    return state, shardings


def abstract_train_state(init_params: Callable[[jax.Array], PyTree],
                         tx: optax.GradientTransformation, *, seed: int, mesh: Mesh,
                         rules=RULES, init_state: Callable[[jax.Array], PyTree] | None = None
                         ) -> tuple[TrainState, TrainState]:
    """Like `create_train_state` without computing anything: returns (abstract state, shardings),
    the abstract state a tree of `jax.ShapeDtypeStruct` carrying the shardings on `mesh` (the
    target for `checkpoint.restore`)."""
    init, param_key = _boxed_init(init_params, tx, seed, init_state)
    boxed = jax.eval_shape(init, param_key)
    shardings = _shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def _shardings(boxed_abstract_state: TrainState, mesh: Mesh, rules) -> TrainState:
    specs = nn.get_partition_spec(boxed_abstract_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def loss_and_grads(loss_fn: Callable, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
                   rng: jax.Array, *, frozen: Mapping[str, Any] | None = None, grad_accum_steps: int = 1,
                   micro_sharding=None) -> tuple[jax.Array, dict[str, jax.Array], PyTree, PyTree]:
    """The loss, metrics, gradient and updated model state of one train step (traced inside it).

    `loss_fn(merged, batch, rng) -> (loss, metrics)` sees `merged = {**params, **frozen,
    **model_state}` and is differentiated only in `params`; a stateful task puts its updated model
    state in `metrics[MODEL_STATE]` (absent: the state is unchanged). With `grad_accum_steps` A > 1
    the batch (B, ...) is split into A micro-batches of B / A rows (micro-batch i takes rows i,
    i + A, ...; constrained to `micro_sharding`) run in a `lax.scan` with key `fold_in(rng, i)`:
    loss, metrics and gradients are averaged, and the model state is threaded through the
    micro-batches in order (micro-batch i sees the state micro-batch i - 1 left). A = 1 uses
    `rng` itself.

    Returns:
      (loss, metrics without MODEL_STATE, grads like params, new model state).
    """
    frozen = dict(frozen or {})

    def loss(p, b, r, s):
        out, metrics = loss_fn({**p, **frozen, **s}, b, r)
        metrics = dict(metrics)
        return out, (metrics, metrics.pop(MODEL_STATE, s))

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if grad_accum_steps == 1:
        (value, (metrics, model_state)), grads = grad_fn(params, batch, rng, model_state)
        return value, metrics, grads, model_state
    a = grad_accum_steps

    def split(x):
        x = x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)
        return x if micro_sharding is None else jax.lax.with_sharding_constraint(x, micro_sharding)

    def body(carry, inputs):
        acc, s = carry
        i, micro_batch = inputs
        (value, (metrics, s)), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, i), s)
        return (jax.tree.map(jnp.add, acc, (value, metrics, grads)), s), None

    micro_batches = jax.tree.map(split, batch)
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng, model_state)
    (value, (metrics, _)), grads = shapes
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (value, metrics, grads))
    (total, model_state), _ = jax.lax.scan(body, (zeros, model_state), (jnp.arange(a), micro_batches))
    value, metrics, grads = jax.tree.map(lambda x: x / a, total)
    return value, metrics, grads, model_state


def apply_gradients(state: TrainState, grads: PyTree, *, tx: optax.GradientTransformation,
                    ema_decay: float, ema_warmup: bool, model_state: PyTree | None = None
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer + EMA update, or none at all if the gradient is not finite.

    If `global_norm(grads)` is NaN / Inf, params, opt_state, ema_params and model_state are
    returned bit-identical (`jnp.where` on the finite flag, so the NaN never mixes in),
    `nonfinite_count` and `nonfinite_streak` go up by one; `step` always advances. `model_state`:
    the step's updated model state (`loss_and_grads`), None to keep `state.model_state`.

    Returns:
      (new_state, metrics) with float32 scalars grad_norm (before clipping), param_norm,
      ema_decay, `finite` (1.0 / 0.0) and int32 nonfinite_steps / nonfinite_streak (the new
      counters).
    """
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step - state.nonfinite_count, ema_decay, ema_warmup)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    bad = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        ema_params=keep_if_bad(ema, state.ema_params),
        model_state=state.model_state if model_state is None else keep_if_bad(model_state, state.model_state),
        nonfinite_count=state.nonfinite_count + bad,
        nonfinite_streak=(state.nonfinite_streak + 1) * bad,
    )
    metrics = {"grad_norm": grad_norm, "param_norm": optax.global_norm(new_state.params),
               "ema_decay": decay, "finite": finite.astype(jnp.float32),
               "nonfinite_steps": new_state.nonfinite_count,
               "nonfinite_streak": new_state.nonfinite_streak}
    return new_state, metrics
