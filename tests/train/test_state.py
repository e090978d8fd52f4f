"""TrainState init/sharding, optimizer schedule, EMA, NaN skipping and gradient accumulation,
on a tiny Flax MLP whose params carry logical axis names (8 forced CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib
from genjax.train import state as state_lib
from genjax.train import trainer

OPTIM = dict(lr=1e-2, schedule="constant", warmup_steps=0, end_lr_ratio=0.0, b1=0.9, b2=0.999,
             eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)


class MLP(nn.Module):
    """x (B, 8) -> (B, 8); kernels annotated (embed, mlp) / (mlp, embed)."""
    width: int = 32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        h = nn.Dense(self.width, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        return nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(nn.gelu(h))


def mlp_loss(params, batch, rng):
    del rng
    err = MLP().apply({"params": params}, batch["x"]) - batch["y"]
    return jnp.mean(err ** 2), {"mse": jnp.mean(err ** 2)}


def init_params(key):
    return MLP().init(key, jnp.zeros((1, 8)))["params"]


def setup(mesh_config, devices=None, grad_accum_steps=1, optim=OPTIM, ema_warmup=False):
    mesh = mesh_lib.make_mesh(mesh_config, devices)
    tx, schedule = state_lib.make_optimizer(optim, total_steps=100)
    state, shardings = state_lib.create_train_state(init_params, tx, seed=0, mesh=mesh)
    step = trainer.make_train_step(mlp_loss, tx, mesh=mesh, state_shardings=shardings,
                                   ema_decay=0.9, ema_warmup=ema_warmup,
                                   grad_accum_steps=grad_accum_steps)
    return mesh, state, step


def batch_at(i, n=16):
    r = np.random.default_rng(i)
    return {"x": r.normal(size=(n, 8)).astype(np.float32), "y": r.normal(size=(n, 8)).astype(np.float32)}


def run(mesh, state, step, num_steps, first=0):
    losses = []
    for i in range(first, first + num_steps):
        state, m = step(state, mesh_lib.shard_batch(batch_at(i), mesh), jax.random.fold_in(state.rng, i))
        losses.append(float(m["loss"]))
    return state, losses


def test_params_created_sharded_over_fsdp_and_tensor():
    _, state, _ = setup({"data": 1, "fsdp": 4, "tensor": 2})
    k = state.params["Dense_0"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in k.addressable_shards} == {(2, 16)}
    mu = state.opt_state[1][0].mu["Dense_0"]["kernel"]  # adam moment follows the param
    assert mu.sharding.spec == k.sharding.spec and mu.dtype == jnp.float32
    assert state.ema_params["Dense_0"]["kernel"].sharding.spec == k.sharding.spec


def test_eight_devices_match_one_device():
    one = run(*setup({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]), 5)[1]
    eight = run(*setup({"data": 2, "fsdp": 2, "tensor": 2}), 5)[1]
    np.testing.assert_allclose(eight, one, rtol=1e-6)
    assert one[-1] < one[0]


def test_nonfinite_gradient_skips_update_bit_identically():
    mesh, state, step = setup({"data": 2, "fsdp": 4, "tensor": 1})
    state, _ = run(mesh, state, step, 2)
    before = jax.tree.map(np.asarray, state)
    bad = batch_at(2)
    bad["x"][3, 1] = np.nan
    for k in range(2):
        state, m = step(state, mesh_lib.shard_batch(bad, mesh), jax.random.fold_in(state.rng, 2 + k))
        assert not np.isfinite(float(m["grad_norm"])) and float(m["finite"]) == 0.0
        for name in ("params", "opt_state", "ema_params"):
            jax.tree.map(np.testing.assert_array_equal, getattr(state, name), getattr(before, name))
        assert int(state.nonfinite_streak) == k + 1
    assert int(state.step) == 4 and int(state.nonfinite_count) == 2
    state, m = step(state, mesh_lib.shard_batch(batch_at(5), mesh), jax.random.fold_in(state.rng, 4))
    assert float(m["finite"]) == 1.0 and int(state.nonfinite_streak) == 0
    assert int(state.nonfinite_count) == 2
    assert not np.array_equal(np.asarray(state.params["Dense_0"]["kernel"]),
                              before.params["Dense_0"]["kernel"])


def test_grad_accumulation_equals_full_batch():
    # The loss is a mean over rows and ignores rng: mean of 4 micro-batch means == full mean.
    full = run(*setup({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2]), 3)
    accum = run(*setup({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2], grad_accum_steps=4), 3)
    np.testing.assert_allclose(accum[1], full[1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 accum[0].params, full[0].params)


def test_grad_accumulation_micro_batch_must_split_over_devices():
    mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with pytest.raises(UserError, match="optim.grad_accum_steps=4: micro-batch 4"):
        trainer.check_grad_accum(16, 4, mesh)


def test_ema_follows_the_update_rule():
    mesh, state, step = setup({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], ema_warmup=True)
    ema0 = np.asarray(state.ema_params["Dense_1"]["kernel"])
    state, m = step(state, mesh_lib.shard_batch(batch_at(0), mesh), state.rng)
    d = 1.0 / 10.0  # warm-up at update 0: min(0.9, (1 + 0) / (10 + 0))
    assert float(m["ema_decay"]) == pytest.approx(d)
    np.testing.assert_allclose(np.asarray(state.ema_params["Dense_1"]["kernel"]),
                               d * ema0 + (1 - d) * np.asarray(state.params["Dense_1"]["kernel"]),
                               rtol=1e-6)
    assert float(state_lib.ema_decay_at(jnp.int32(10**6), 0.9999, True)) == pytest.approx(0.9999)
    assert float(state_lib.ema_decay_at(jnp.int32(5), 0.9999, False)) == pytest.approx(0.9999)


def test_schedules():
    cos = dict(OPTIM, schedule="cosine", warmup_steps=10, end_lr_ratio=0.1)
    _, s = state_lib.make_optimizer(cos, total_steps=110)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1e-2)
    assert float(s(60)) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half-way: cos(pi/2) = 0
    assert float(s(110)) == pytest.approx(1e-3)
    _, c = state_lib.make_optimizer(dict(OPTIM, warmup_steps=4), total_steps=100)
    assert float(c(2)) == pytest.approx(5e-3) and float(c(50)) == pytest.approx(1e-2)


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("schedule", "linear"), ("warmup_steps", -1),
                                          ("grad_clip_norm", -1.0)])
def test_bad_optim_config(field, value):
    with pytest.raises(UserError, match=f"optim.{field}="):
        state_lib.make_optimizer(dict(OPTIM, **{field: value}), total_steps=100)


# ---------------------------------------------------------------- non-gradient model state

X_DECAY = 0.5


def stateful_loss(params, batch, rng):
    """The MLP on x minus a running EMA of the batch mean of x (a non-gradient model state, as a
    VQ-VAE's EMA codebook), updated before use and returned under MODEL_STATE."""
    del rng
    stats = params["stats"]
    x_ema = X_DECAY * stats["x_ema"] + (1 - X_DECAY) * jnp.mean(batch["x"], axis=0)
    net = {k: v for k, v in params.items() if k != "stats"}
    err = MLP().apply({"params": net}, batch["x"] - x_ema) - batch["y"]
    new = {"stats": {"x_ema": x_ema, "seen": stats["seen"] + batch["x"].shape[0]}}
    return jnp.mean(err ** 2), {"mse": jnp.mean(err ** 2), state_lib.MODEL_STATE: new}


def init_stats(key):
    del key
    return {"stats": {"x_ema": jnp.zeros((8,), jnp.float32), "seen": jnp.zeros((), jnp.int32)}}


def stateful_setup(grad_accum_steps=1, devices=None):
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices or jax.devices()[:1])
    tx, _ = state_lib.make_optimizer(OPTIM, total_steps=100)
    state, shardings = state_lib.create_train_state(init_params, tx, seed=0, mesh=mesh, init_state=init_stats)
    step = trainer.make_train_step(stateful_loss, tx, mesh=mesh, state_shardings=shardings, ema_decay=0.9,
                                   ema_warmup=False, grad_accum_steps=grad_accum_steps)
    return mesh, state, step, tx, shardings


def test_model_state_is_threaded_through_steps_and_micro_batches():
    """The state a step returns is the next step's; with A micro-batches it passes through them in
    order (micro-batch i = rows i, i + A, ...), so the EMA equals numpy's over that sequence."""
    for a in (1, 4):
        mesh, state, step, _, _ = stateful_setup(a)
        state, losses = run(mesh, state, step, 3)
        expect = np.zeros(8)
        for i in range(3):
            x = batch_at(i)["x"].astype(np.float64)
            for j in range(a):
                expect = X_DECAY * expect + (1 - X_DECAY) * x[j::a].mean(0)
        np.testing.assert_allclose(np.asarray(state.model_state["stats"]["x_ema"]), expect, rtol=1e-5, atol=1e-7)
        assert int(state.model_state["stats"]["seen"]) == 3 * 16
        assert "stats" not in state.params and "stats" not in state.ema_params and np.all(np.isfinite(losses))


def test_model_state_resumes_from_a_checkpoint_bit_for_bit_and_survives_a_nonfinite_step(tmp_path):
    from genjax.io import checkpoint

    mesh, state, step, tx, _ = stateful_setup()
    straight, _ = run(mesh, state, step, 4)
    half, _ = run(mesh, stateful_setup()[1], step, 2)  # the state is donated: a fresh one
    manager = checkpoint.make_manager(str(tmp_path), {"save_interval_steps": 1, "max_to_keep": 0, "async_save": False})
    checkpoint.save(manager, 2, half)
    abstract, _ = state_lib.abstract_train_state(init_params, tx, seed=0, mesh=mesh, init_state=init_stats)
    resumed, _ = run(mesh, checkpoint.restore(manager, abstract, step=2), step, 2, first=2)
    manager.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
    assert float(resumed.model_state["stats"]["x_ema"][0]) != 0.0
    bad = batch_at(4)
    bad["x"][0, 0] = np.nan  # poisons the EMA and the gradient: the whole step is a no-op
    after, m = step(resumed, mesh_lib.shard_batch(bad, mesh), jax.random.fold_in(resumed.rng, 4))
    assert float(m["finite"]) == 0.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after.model_state),
                 jax.device_get(straight.model_state))
