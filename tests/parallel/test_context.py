"""Sequence (context) parallelism on 8 forced CPU devices: ring and Ulysses attention, and tensor x
context x data parallel DiT / video DiT, equal one device (forward and gradient, float32, 1e-5).

Every comparison runs the same jitted function twice: on one device (no mesh) and under
`jax.set_mesh(mesh)` + `nn.logical_axis_rules(RULES)` + `context.strategy(...)`, as the trainer
traces its step. Shapes are tiny: the cost is compiling, a few seconds per program.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from genjax.data import packing
from genjax.errors import UserError
from genjax.models import attention, dit, spacetime, video_dit, vivit
from genjax.models.blockwise_attention import EMPTY_LSE, blockwise_attention
from genjax.parallel import context
from genjax.parallel import mesh as mesh_lib
from genjax.parallel.axes import RULES

B, L, N, K = 2, 32, 8, 4
TOL = 1e-5  # absolute and relative: gradients summed over many tokens reach ~50, where float32 rounding is ~1e-6
# ring: batch over data, tokens over context; Ulysses: heads also over tensor (8 heads -> 4 per
# tensor shard -> 1 per (tensor, context) shard after the all-to-all)
MESHES = {"ring": dict(data=2, fsdp=1, context=4, tensor=1), "ulysses": dict(data=1, fsdp=1, context=4, tensor=2)}


def _mesh(**sizes):
    return mesh_lib.make_mesh(sizes)


def _run(fn, args, mesh=None, strategy="ring"):
    """`jax.jit(fn)(*args)` on one device (mesh None) or traced under the mesh, strategy and rules."""
    if mesh is None:
        return jax.device_get(jax.jit(fn)(*args))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES), context.strategy(strategy):
        return jax.device_get(jax.jit(fn)(*args))


def _assert_trees_close(got, want, tol=TOL):
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    assert len(paths) == len(jax.tree.leaves(got))
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def _packed_ids(rng, n, k, pad):
    """Contiguous segment ids 1..k then `pad` padding zeros, as the packer writes them."""
    return np.concatenate([np.sort(rng.integers(1, k + 1, n - pad)), np.zeros(pad, int)]).astype(np.int32)


def _qkv(seed=0, n=N):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, L, n, K)).astype(np.float32) for _ in range(3))
    # row 0: a quarter of padding = one whole context shard of queries with no key (lse EMPTY_LSE)
    ids = np.stack([_packed_ids(rng, L, 3, L // 4), _packed_ids(rng, L, 4, 3)])
    mask = rng.random((B, L)) > 0.4
    return rng, q, k, v, ids, mask


ATTENTION_CASES = {  # name -> dot_product_attention mask kwargs (ids, mask as built by _qkv)
    "packed_padding": lambda ids, mask: dict(q_segment_ids=ids, kv_segment_ids=ids),
    "causal": lambda ids, mask: dict(causal=True),
    "key_mask": lambda ids, mask: dict(kv_mask=mask),
    "packed_causal_key_mask": lambda ids, mask: dict(q_segment_ids=ids, kv_segment_ids=ids, causal=True, kv_mask=mask),
}


def _attention_cases(q, k, v, ids, mask):
    """{case: (o, (dq, dk, dv))} of every case of ATTENTION_CASES, in one program."""
    out = {}
    for name, masks in ATTENTION_CASES.items():
        def loss(q, k, v):
            o = attention.dot_product_attention(q, k, v, implementation="xla", **masks(ids, mask))
            return jnp.sum(o * jnp.cos(o)), o  # non-linear, so every gradient path matters
        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        out[name] = (o, grads)
    return out


@functools.cache
def _one_device(name):
    """The one-device reference of a test shared by its ring and Ulysses runs (computed once)."""
    if name == "attention":
        return _run(_attention_cases, _qkv()[1:])
    module, inputs = _Layers(), _layer_inputs()
    return _run(_layers_fn(module), (_random_params(module, *inputs), *inputs))


@pytest.mark.parametrize("strategy", list(MESHES))
def test_attention_equals_one_device(strategy):
    """dot_product_attention, forward and jax.grad wrt q, k, v: packed with padding (a whole shard
    of padding queries), causal, key mask, all three together."""
    _, q, k, v, ids, mask = _qkv()
    want = _one_device("attention")
    got = _run(_attention_cases, (q, k, v, ids, mask), _mesh(**MESHES[strategy]), strategy)
    _assert_trees_close(got, want)
    for name in ATTENTION_CASES:
        assert np.all(np.isfinite(jax.tree.leaves(got[name])[1]))


def test_ring_log_sum_exp_equals_blockwise_and_carries_its_gradient():
    """ring_attention's (o, lse) equal blockwise_attention over the whole sequence, and a loss of
    the lse too (its cotangent enters the ring's custom VJP) gives the same q, k, v gradients."""
    _, q, k, v, ids, mask = _qkv(seed=3)
    kv_ids = np.where(mask, ids, 0).astype(np.int32)

    def blockwise(q, k, v, q_ids, kv_ids, q_positions=None, kv_positions=None):
        return blockwise_attention(q, k, v, q_ids, kv_ids, causal=True, q_positions=q_positions,
                                   kv_positions=kv_positions, block_q=8, block_k=8)

    def fn(attend):
        def loss(q, k, v):
            o, lse = attend(q, k, v)
            real = lse > EMPTY_LSE / 2
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.where(real, jnp.sin(lse), 0.0)), (o, lse)
        return lambda q, k, v: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    want = _run(fn(lambda q, k, v: blockwise(q, k, v, ids, kv_ids)), (q, k, v))
    got = _run(fn(lambda q, k, v: context.ring_attention(blockwise, q, k, v, ids, kv_ids)), (q, k, v),
               _mesh(data=1, fsdp=1, context=8, tensor=1))
    _assert_trees_close(got, want)
    assert np.all(got[0][1][1][0, :, -L // 8:] == EMPTY_LSE)  # the padding shard: finite, no key


D = 32


class _Layers(nn.Module):
    """The model-level cases in one module: joint packed self-attention (Attention, padding and a
    key mask), causal self-attention, and a packed ViViT model-3 block (factorised_attention with
    group ids). Cross-attention to text: the video DiT test below."""

    @nn.compact
    def __call__(self, x, segment_ids, key_mask, frame_ids, location_ids):
        joint = attention.Attention(N, attention_impl="xla", name="joint")(
            x, segment_ids=segment_ids, context_mask=key_mask)
        causal = attention.Attention(N, attention_impl="xla", name="causal")(x, causal=True)
        factorised = vivit.FactorisedSelfAttentionBlock(N, 2 * D, attention_impl="xla", name="factorised")(
            x, frame_ids, location_ids)
        return {"joint": joint, "causal": causal, "factorised": factorised}


def _layer_inputs(seed=1):
    rng = np.random.default_rng(seed)
    vids = [rng.normal(size=s).astype(np.float32) for s in [(2, 4, 4, 1), (3, 2, 4, 1), (1, 4, 2, 1), (2, 2, 6, 1)]]
    batch = packing.pack(vids, seq_len=L, patch_size=(1, 2, 2), max_per_seq=3)
    assert batch["tokens"].shape[:2] == (B, L)
    seg, pos = batch["segment_ids"], batch["positions"]
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    key_mask = rng.random((B, L)) > 0.3
    frame_ids = np.asarray(spacetime.group_ids(seg, pos[..., :1]))
    location_ids = np.asarray(spacetime.group_ids(seg, pos[..., 1:]))
    return x, seg, key_mask, frame_ids, location_ids


def _layers_fn(module):
    """(params, x, ...) -> (outputs, (param grads, token grads)) of a non-linear loss of all outputs."""
    def fn(params, x, *rest):
        def loss(params, x):
            out = module.apply(params, x, *rest)
            return sum(jnp.sum(o * jnp.cos(o)) for o in out.values()), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return out, grads
    return fn


def _random_params(module, *args, seed=0, std=0.2, **kwargs):
    """Every parameter random (zero-initialised ones too), so outputs depend on all of them."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, std, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize("strategy", list(MESHES))
def test_models_equal_one_device(strategy):
    """Through the models: Attention (joint packed + key mask, causal, cross to text) and a packed
    factorised ViViT block, outputs and gradients wrt the tokens and every parameter."""
    module, inputs = _Layers(), _layer_inputs()
    params = _random_params(module, *inputs)
    got = _run(_layers_fn(module), (params, *inputs), _mesh(**MESHES[strategy]), strategy)
    _assert_trees_close(got, _one_device("layers"))


def _jaxpr(fn, args, mesh, strategy="ring"):
    with jax.set_mesh(mesh), context.strategy(strategy):
        return str(jax.make_jaxpr(fn)(*args))


def test_the_sequence_parallel_forms_are_the_ones_traced():
    """ring: ppermute and no all-to-all; Ulysses: all-to-all; cross-attention to text: a shard_map
    without communication; context 1 (or no mesh): no shard_map at all."""
    _, q, k, v, ids, _ = _qkv()
    text = q[:, :8]  # 8 keys: S != L, and not split over context

    def self_attn(q, k, v):
        return attention.dot_product_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids)

    def cross(q, k, v):
        return attention.dot_product_attention(q, k, v, self_attention=False)

    mesh = _mesh(data=2, fsdp=1, context=4, tensor=1)
    ring, ulysses = _jaxpr(self_attn, (q, k, v), mesh), _jaxpr(self_attn, (q, k, v), mesh, "ulysses")
    assert "shard_map" in ring and "ppermute" in ring and "all_to_all" not in ring
    assert "shard_map" in ulysses and "all_to_all" in ulysses and "ppermute" not in ulysses
    cross_jaxpr = _jaxpr(cross, (q, text, text), mesh)
    assert "shard_map" in cross_jaxpr and "ppermute" not in cross_jaxpr and "all_to_all" not in cross_jaxpr
    assert "shard_map" not in _jaxpr(self_attn, (q, k, v), _mesh(data=8, fsdp=1, context=1, tensor=1))
    assert "shard_map" not in str(jax.make_jaxpr(self_attn)(q, k, v))


def test_tokens_not_divisible_by_context_fall_back_and_stay_equal():
    """L = 30 over context 4: no shard_map (XLA partitions the plain program), same numbers."""
    _, q, k, v, ids, mask = _qkv()
    args = (q[:, :30], k[:, :30], v[:, :30], ids[:, :30], mask[:, :30])
    fn = lambda q, k, v, ids, mask: attention.dot_product_attention(  # noqa: E731
        q, k, v, q_segment_ids=ids, kv_segment_ids=ids, kv_mask=mask, causal=True)
    mesh = _mesh(data=2, fsdp=1, context=4, tensor=1)
    assert "shard_map" not in _jaxpr(fn, args, mesh)
    _assert_trees_close(_run(fn, args, mesh), _run(fn, args))


def test_ulysses_needs_heads_divisible_by_context():
    _, q, k, v, _, _ = _qkv(n=6)  # 6 heads, tensor 2 -> 3 per shard, context 4
    mesh = _mesh(data=1, fsdp=1, context=4, tensor=2)
    with pytest.raises(UserError) as error:
        _jaxpr(lambda q, k, v: attention.dot_product_attention(q, k, v), (q, k, v), mesh, "ulysses")
    assert str(error.value) == ("num_heads=6: Ulysses needs the heads per tensor shard (3) divisible by "
                                "mesh.context=4; use mesh.context_parallel='ring'")  # one line (jax adds a note)
    _jaxpr(lambda q, k, v: attention.dot_product_attention(q, k, v), (q, k, v), mesh, "ring")  # ring: any heads


def test_strategy_is_checked_and_scoped():
    assert context.current_strategy() == "ring"
    with context.strategy("ulysses"):
        assert context.current_strategy() == "ulysses"
    assert context.current_strategy() == "ring"
    with pytest.raises(UserError, match=r"^mesh.context_parallel='stripe': must be one of \('ring', 'ulysses'\)$"):
        with context.strategy("stripe"):
            pass


class _Tokens(nn.Module):
    @nn.compact
    def __call__(self, x, segment_ids):
        x = nn.with_logical_constraint(x, ("batch", "length", None))
        return attention.Attention(N, attention_impl="xla")(x, segment_ids=segment_ids)


@pytest.mark.parametrize("strategy, collective", [("ring", "collective_permute"), ("ulysses", "all_to_all")])
def test_trainer_step_traces_the_configured_strategy(strategy, collective):
    """make_train_step(context_parallel=...) puts that strategy's collective in the lowered step."""
    import optax

    from genjax.train import state as state_lib
    from genjax.train import trainer

    mesh = _mesh(data=2, fsdp=1, context=2, tensor=2)
    x, seg = _layer_inputs()[:2]
    tx = optax.sgd(0.1)
    state, shardings = state_lib.create_train_state(lambda key: _Tokens().init(key, x[:1], seg[:1])["params"], tx,
                                                    seed=0, mesh=mesh)

    def loss_fn(params, batch, rng):
        out = _Tokens().apply({"params": params}, batch["x"], batch["segment_ids"])
        return jnp.mean(out ** 2), {}

    step = trainer.make_train_step(loss_fn, tx, mesh=mesh, state_shardings=shardings, ema_decay=0.9,
                                   ema_warmup=False, context_parallel=strategy)
    hlo = step.lower(state, mesh_lib.shard_batch({"x": x, "segment_ids": seg}, mesh), jax.random.key(0)).as_text()
    assert collective in hlo and ({"collective_permute", "all_to_all"} - {collective}).pop() not in hlo


def test_trainer_rejects_an_unknown_strategy_before_compiling(tmp_path):
    import os

    from genjax.config import load_config
    from genjax.train import trainer

    config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "dit_mnist.py")
    config = load_config(f"{config}:smoke=True", ["--config.mesh.context=2", "--config.mesh.context_parallel=zigzag"])
    with pytest.raises(UserError, match="^mesh.context_parallel='zigzag'"):
        trainer.main(config, str(tmp_path))


# --------------------------------------------------------------------------- tensor x context x data


def _shard_params(params_boxed_shapes, params, mesh):
    """Params placed by their logical annotations, as the trainer does (`state.create_train_state`)."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params_boxed_shapes), mesh, RULES)
    return jax.jit(lambda p: p, out_shardings=nn.unbox(shardings))(params)


def _compare_on_3d_mesh(module, boxed, params, inputs, strategy, apply):
    """Forward and parameter gradients of `apply(module, params, *inputs)` on one device vs a
    data 2 x context 2 x tensor 2 mesh with params sharded by their logical axes."""
    def fn(params, *inputs):
        def loss(params):
            out = apply(module, params, *inputs)
            return jnp.sum(out * jnp.cos(out)), out
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return out, grads

    want = _run(fn, (params, *inputs))
    mesh = _mesh(data=2, fsdp=1, context=2, tensor=2)
    sharded = _shard_params(boxed, params, mesh)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    inputs = [jax.device_put(x, batch) for x in inputs]
    got = _run(fn, (sharded, *inputs), mesh, strategy)
    _assert_trees_close(got, want)
    return sharded


def test_dit_tensor_context_data_parallel_equals_one_device():
    """A tiny DiT (64 tokens, 4 heads) with ring attention: MLP and heads split over tensor."""
    # 9 classes + the null class = 10 table rows (vocab over tensor 2: must divide, see the report)
    module = dit.DiT(patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=9)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    t, y = np.array([3.0, 700.0], np.float32), np.array([1, 8], np.int32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x, t, y)
    params = _random_params(module, x, t, y, std=0.1)
    sharded = _compare_on_3d_mesh(module, boxed, params, (x, t, y), "ring",
                                  lambda m, p, x, t, y: m.apply(p, x, t, y))
    kernel = sharded["params"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.addressable_shards[0].data.shape == (32, 64)
    assert sharded["params"]["blocks_0"]["attn"]["to_q"]["kernel"].sharding.spec == P("fsdp", "tensor", None)


def test_packed_video_dit_tensor_context_data_parallel_equals_one_device():
    """A tiny packed factorised VideoDiT with text (cross-attention to un-split text tokens) and
    Ulysses self-attention (4 heads / tensor 2 / context 2)."""
    module = video_dit.VideoDiT(patch_size=(1, 2, 2), in_channels=2, hidden_size=32, depth=2, num_heads=4,
                                attention="factorised", context_dim=5, num_classes=0)
    rng = np.random.default_rng(2)
    vids = [rng.normal(size=s).astype(np.float32) for s in [(2, 4, 4, 2), (3, 2, 4, 2), (1, 4, 2, 2), (2, 2, 6, 2)]]
    batch = packing.pack(vids, seq_len=16, patch_size=(1, 2, 2), max_per_seq=3)
    s, m = batch["example_index"].shape
    assert s == 2
    t = rng.uniform(0, 999, (s, m)).astype(np.float32)
    text = rng.normal(size=(s, m, 3, 5)).astype(np.float32)
    text_mask = rng.random((s, m, 3)) > 0.3
    text_mask[..., 0] = True
    x0, t0, tx0, tm0 = np.zeros((1, 1, 4, 4, 2), np.float32), np.zeros((1,), np.float32), text[:1, 0], text_mask[:1, 0]
    boxed = jax.eval_shape(module.init, jax.random.key(0), x0, t0, text=tx0, text_mask=tm0)
    params = _random_params(module, x0, t0, text=tx0, text_mask=tm0, std=0.1)

    def apply(m, p, tokens, seg, pos, t, text, text_mask):
        return m.apply(p, tokens, seg, pos, t, text=text, text_mask=text_mask, method="packed")

    inputs = (batch["tokens"], batch["segment_ids"], batch["positions"], t, text, text_mask)
    _compare_on_3d_mesh(module, boxed, params, inputs, "ulysses", apply)
