"""conv.py blocks against diffusers' ResnetBlock2D / Downsample2D / Upsample2D / Attention (self-
and cross-attention).

Each torch block gets random weights (all of them, including zero-initialised ones), is converted
with the block's `load_*` function, and both run on the same NHWC / NCHW input.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from genjax.errors import UserError
from genjax.io.weights import StateDictReader
from genjax.models import conv

torch.set_num_threads(1)

# XLA:CPU compiles threefry random bits very slowly (~1 s per parameter tensor in `init` with
# jax 0.10); the "rbg" PRNG compiles ~10x faster and is just as valid for random init / dropout.
KEY = jax.random.key(0, impl="rbg")


def randomise(m: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in m.parameters():
        p.data.normal_(0, std)
    return m.eval()


def reader(m: torch.nn.Module) -> StateDictReader:
    return StateDictReader({k: v.numpy() for k, v in m.state_dict().items()}, family="test")


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run_torch(m, x, *args):
    with torch.no_grad():
        return m(nchw(x), *args).numpy().transpose(0, 2, 3, 1)


def inputs(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check_params_tree(module, params, *args):
    """Converted params have exactly the tree and shapes `init` creates."""
    want = nn.unbox(jax.eval_shape(module.init, KEY, *args))["params"]
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, want)


@pytest.mark.parametrize("c_in,c_out,groups,norm,temb,scale", [
    (32, 64, 8, "default", 24, 1.0),       # channel change -> 1x1 shortcut
    (32, 32, 4, "scale_shift", 16, 1.0),   # ADM AdaGN
    (16, 24, 8, "default", None, 2.0),     # VAE block: no temb, output_scale_factor
])
def test_resnet_block_matches_diffusers(c_in, c_out, groups, norm, temb, scale):
    ref = randomise(ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb,
                                  groups=groups, eps=1e-5, time_embedding_norm=norm,
                                  output_scale_factor=scale))
    r = reader(ref)
    params = conv.load_resnet(r, "")
    r.finish()
    x = inputs((2, 6, 10, c_in))
    t = inputs((2, temb), seed=2) if temb else None
    block = conv.ResnetBlock(out_channels=c_out, temb_channels=temb, num_groups=groups, eps=1e-5,
                             time_embedding_norm=norm, output_scale_factor=scale)
    check_params_tree(block, params, x, t)
    got = block.apply({"params": params}, x, t)
    want = run_torch(ref, x, None if t is None else torch.from_numpy(t))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding,hw", [(1, (8, 12)), (0, (8, 12)), (1, (7, 5)), (0, (7, 5))])
def test_downsample_matches_diffusers(padding, hw):
    ref = randomise(Downsample2D(16, use_conv=True, out_channels=8, padding=padding, name="op"))
    r = reader(ref)
    params = conv.load_downsample(r, "")
    r.finish()
    x = inputs((2, *hw, 16))
    got = conv.Downsample(out_channels=8, padding=padding).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), run_torch(ref, x), atol=1e-4, rtol=0)


def test_upsample_matches_diffusers():
    ref = randomise(Upsample2D(16, use_conv=True, out_channels=8))
    r = reader(ref)
    params = conv.load_upsample(r, "")
    r.finish()
    x = inputs((2, 3, 5, 16))
    got = conv.Upsample(out_channels=8).apply({"params": params}, x)
    assert got.shape == (2, 6, 10, 8)
    np.testing.assert_allclose(np.asarray(got), run_torch(ref, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("head_dim,groups,rescale", [(None, 8, 1.0), (8, 4, 1.0), (16, None, 2.0)])
def test_spatial_attention_matches_diffusers(head_dim, groups, rescale):
    c = 32
    ref = randomise(Attention(c, heads=c // (head_dim or c), dim_head=head_dim or c,
                              rescale_output_factor=rescale, eps=1e-6, norm_num_groups=groups,
                              residual_connection=True, bias=True, upcast_softmax=True,
                              _from_deprecated_attn_block=True), std=0.2)
    r = reader(ref)
    params = conv.load_attention(r, "", head_dim)
    r.finish()
    x = inputs((2, 4, 6, c))
    block = conv.SpatialAttention(head_dim=head_dim, num_groups=groups, eps=1e-6,
                                  rescale_output_factor=rescale)
    check_params_tree(block, params, x)
    got = block.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), run_torch(ref, x), atol=1e-4, rtol=0)


def test_attention_loads_deprecated_names():
    """query/key/value/proj_attn (google/ddpm-* checkpoints) map like to_q/to_k/to_v/to_out.0."""
    ref = randomise(Attention(16, heads=1, dim_head=16, norm_num_groups=4, residual_connection=True,
                              bias=True, upcast_softmax=True, _from_deprecated_attn_block=True))
    new = {k: v.numpy() for k, v in ref.state_dict().items()}
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
           .replace("to_out.0", "proj_attn"): v for k, v in new.items()}
    assert set(old) != set(new)
    a = conv.load_attention(StateDictReader(new, "test"), "")
    r = StateDictReader(old, "test")
    b = conv.load_attention(r, "")
    r.finish()
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("head_dim,hw", [(None, (4, 6)), (8, (3, 5))])
def test_spatial_cross_attention_matches_torch(head_dim, hw):
    """LayerNorm -> diffusers cross-Attention (bias-free q/k/v) -> Linear -> residual, with a
    padding mask (diffusers' additive -10000 bias, as UNet2DConditionModel builds it)."""
    c, dc, s = 32, 12, 5
    heads, k = c // (head_dim or c), head_dim or c
    norm, proj = randomise(torch.nn.LayerNorm(c)), randomise(torch.nn.Linear(c, c))
    attn = randomise(Attention(c, cross_attention_dim=dc, heads=heads, dim_head=k, bias=False,
                               out_bias=True), std=0.2)
    w = {n: v.numpy() for n, v in attn.state_dict().items()}
    params = {
        "norm": {"norm": {"scale": norm.weight.detach().numpy(), "bias": norm.bias.detach().numpy()}},
        "attn": {"to_q": {"kernel": w["to_q.weight"].T.reshape(c, heads, k)},
                 "to_k": {"kernel": w["to_k.weight"].T.reshape(dc, heads, k)},
                 "to_v": {"kernel": w["to_v.weight"].T.reshape(dc, heads, k)},
                 "to_out": {"kernel": w["to_out.0.weight"].T.reshape(heads, k, c),
                            "bias": w["to_out.0.bias"]}},
        "proj_out": {"kernel": proj.weight.detach().numpy().T, "bias": proj.bias.detach().numpy()},
    }
    x, context = inputs((2, *hw, c)), inputs((2, s, dc), seed=2)
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], bool)
    block = conv.SpatialCrossAttention(head_dim=head_dim)
    check_params_tree(block, params, x, context, mask)
    got = block.apply({"params": params}, x, context, mask)
    tokens = torch.from_numpy(x.reshape(2, -1, c))
    bias = torch.from_numpy((~mask[:, None, :]).astype(np.float32) * -10000.0)
    with torch.no_grad():
        want = tokens + proj(attn(norm(tokens), torch.from_numpy(context), attention_mask=bias))
    np.testing.assert_allclose(np.asarray(got), want.numpy().reshape(got.shape), atol=1e-4, rtol=0)
    # A fresh block is the identity (zero-initialised proj_out), whatever the context.
    fresh = block.init(KEY, x, context, mask)
    np.testing.assert_array_equal(block.apply(fresh, x, context, mask), x)


def test_bf16_close_to_f32_and_logical_axes():
    x = inputs((2, 8, 8, 32))
    t = inputs((2, 16), seed=2)
    block = conv.ResnetBlock(out_channels=32, temb_channels=16, num_groups=8,
                             time_embedding_norm="scale_shift")
    boxed = block.init(KEY, x, t)
    spec = nn.get_partition_spec(boxed)["params"]
    assert spec["conv1"]["kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    assert spec["time_emb_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "conv_out")
    f32 = block.apply(boxed, x, t)
    bf16 = conv.ResnetBlock(out_channels=32, temb_channels=16, num_groups=8,
                            time_embedding_norm="scale_shift", dtype=jnp.bfloat16).apply(boxed, x, t)
    assert bf16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32))
    assert err.max() < 0.05 * np.abs(np.asarray(f32)).max()


def test_dropout_active_only_in_training():
    x = inputs((1, 4, 4, 8))
    block = conv.ResnetBlock(num_groups=4, dropout=0.5)
    params = block.init(KEY, x)
    eval_out = block.apply(params, x)
    np.testing.assert_array_equal(eval_out, block.apply(params, x))
    train_out = block.apply(params, x, train=True, rngs={"dropout": jax.random.fold_in(KEY, 1)})
    assert not np.allclose(train_out, eval_out)


def test_bad_input_raises_user_error():
    with pytest.raises(UserError, match="norm_num_groups=32"):
        conv.ResnetBlock().init(KEY, jnp.zeros((1, 4, 4, 24)))
    with pytest.raises(UserError, match="attention_head_dim"):
        conv.SpatialAttention(head_dim=5, num_groups=8).init(KEY,
                                                              jnp.zeros((1, 4, 4, 16)))
    with pytest.raises(UserError, match="temb"):
        conv.ResnetBlock(temb_channels=8, num_groups=4).init(KEY,
                                                             jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(UserError, match="padding"):
        conv.Downsample(padding=2).init(KEY, jnp.zeros((1, 4, 4, 8)))
