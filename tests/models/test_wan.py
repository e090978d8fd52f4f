"""Wan 2.1 transformer vs diffusers `WanTransformer3DModel` (tiny random config, save_pretrained
folder, sharded too), 3D RoPE vs `WanRotaryPosEmbed`, scan == unrolled, bf16, published variants'
parameter counts (meta device vs eval_shape), bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import wan
from genjax.models.spacetime import apply_rope, grid_positions, rope_angles

torch.set_num_threads(1)
TOL = 1e-4
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def _reference(**cfg):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**TINY, **cfg})
    with torch.no_grad():  # perturb everything: zero / one inits (biases, norms) must not hide a mistake
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs(b=1, shape=(3, 8, 8), s=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, *shape, TINY["in_channels"])).astype(np.float32)
    t = rng.uniform(0, 1000, size=(b,)).astype(np.float32)
    text = rng.normal(size=(b, s, TINY["text_dim"])).astype(np.float32)
    return x, t, text


def _ref_out(ref, x, t, text):
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(text)).sample
    return out.permute(0, 2, 3, 4, 1).numpy()  # (B, C, T, H, W) -> channels-last


def test_forward_matches_diffusers(tmp_path):
    ref = _reference()
    ref.save_pretrained(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    x, t, text = _inputs(b=2)
    want = _ref_out(ref, x, t, text)
    module, params = wan.load_diffusers(tmp_path / "one")
    assert (module.num_attention_heads, module.attention_head_dim, module.num_layers, module.ffn_dim) == (2, 16, 2, 64)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, t, text))
    err = np.abs(got - want).max()
    print(f"wan forward max |diff| {err:.2e} (|out| max {np.abs(want).max():.2f})")
    assert got.shape == x.shape and err < TOL
    module_sharded, params_sharded = wan.load_diffusers(tmp_path / "sharded")
    assert module_sharded == module
    jax.tree.map(np.testing.assert_array_equal, params_sharded, params)


def test_rope_matches_wan_rotary_pos_embed():
    """`rope_angles` + `apply_rope` equal diffusers' `WanRotaryPosEmbed` + `WanAttnProcessor`'s rotation
    (interleaved real / imag pairs, head dim split over (t, h, w)) for Wan's head dim 128 and the tiny 16."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    grid = (3, 5, 4)
    for k in (16, 128):
        cos, sin = WanRotaryPosEmbed(k, (1, 2, 2), 64)(torch.zeros(1, 1, grid[0], 2 * grid[1], 2 * grid[2]))
        q = np.random.default_rng(k).normal(size=(1, int(np.prod(grid)), 2, k)).astype(np.float32)
        x1, x2 = q[..., 0::2], q[..., 1::2]
        c, s = cos.numpy()[..., 0::2], sin.numpy()[..., 1::2]
        want = np.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(q.shape)  # diffusers apply_rotary_emb
        angles = rope_angles(jnp.asarray(grid_positions(grid))[None], k)
        np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(q), angles)), want, atol=1e-5)


def _state_dict_case():
    ref = _reference(cross_attn_norm=False)
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    x, t, text = _inputs(shape=(2, 4, 6))
    return state, (x, t, text), _ref_out(ref, x, t, text), ref


def test_state_dict_scanned_and_text_mask():
    """A bare state dict (heads as an override, no norm2), loaded scanned: the same numbers; masked
    text tokens count as absent (diffusers run on the prompt without them)."""
    state, args, want, ref = _state_dict_case()
    with pytest.raises(UserError, match="num_attention_heads"):
        wan.load_diffusers(state)
    module, params = wan.load_diffusers(state, num_attention_heads=2, scan=True)
    assert module.scan and not module.cross_attn_norm and params["blocks"]["attn1"]["norm_q"]["scale"].shape == (2, 2, 16)
    apply = jax.jit(module.apply)
    np.testing.assert_allclose(np.asarray(apply({"params": params}, *args)), want, atol=TOL)
    x, t, text = args
    mask = np.arange(text.shape[1])[None] < 3
    np.testing.assert_allclose(np.asarray(apply({"params": params}, x, t, text, mask)),
                               _ref_out(ref, x, t, text[:, :3]), atol=TOL)


@pytest.mark.slow
def test_bf16_and_remat():
    state, args, want, _ = _state_dict_case()
    module, params = wan.load_diffusers(state, num_attention_heads=2, scan=True, remat="full")
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": params}, *args)), want, atol=TOL)
    module, params = wan.load_diffusers(state, num_attention_heads=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = jax.jit(module.apply)({"params": params}, *args)
    rel = np.abs(np.asarray(out) - want).max() / np.abs(want).max()
    assert out.dtype == jnp.float32 and params["proj_out"]["kernel"].dtype == jnp.bfloat16 and rel < 0.05, rel


@pytest.mark.parametrize("variant,expected", [("T2V-1.3B", 1_418_996_800), ("T2V-14B", 14_288_491_584)])
def test_variant_parameter_counts_equal_diffusers(variant, expected):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = sum(p.numel() for p in WanTransformer3DModel(**wan.VARIANTS[variant]).parameters())
    m = wan.Model(variant=variant, scan=True)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 1, 2, 2, 16)), jnp.zeros((1,)),
                            jnp.zeros((1, 1, 4096)))
    ours = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
    print(f"{variant}: genjax {ours:,} diffusers {ref:,}")
    assert ours == ref == expected
    blk = shapes["params"]["blocks"]  # sharded like the other DiTs
    assert blk["attn1"]["to_q"]["kernel"].names == ("layers", "embed", "heads", "kv")
    assert blk["ffn"]["fc1"]["kernel"].names == ("layers", "embed", "mlp")


def test_bad_input_raises_user_error():
    m = wan.WanTransformer(**TINY)
    x, t, text = _inputs()
    params = jax.eval_shape(m.init, jax.random.key(0), x, t, text)
    for args, field in (((x[:, :, :7], t, text), "video"), ((x[..., :3], t, text), "video.shape"),
                        ((x, t[None], text), "timestep.shape"), ((x, t, text[..., :8]), "encoder_hidden_states")):
        with pytest.raises(UserError, match=field):
            jax.eval_shape(m.apply, params, *args)
    with pytest.raises(UserError, match="qk_norm"):
        wan.WanTransformer(**{**TINY, "qk_norm": "rms_norm"}).init(jax.random.key(0), x, t, text)
    with pytest.raises(UserError, match="variant"):
        wan.Model(variant="T2V-2B")
    with pytest.raises(UserError, match="image-to-video"):
        wan.load_diffusers({"patch_embedding.weight": np.zeros((32, 4, 1, 2, 2))} | {
            "blocks.0.attn2.add_k_proj.weight": np.zeros((32, 32))})
