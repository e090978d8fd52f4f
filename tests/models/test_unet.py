"""genjax UNet against diffusers UNet2DModel (random weights, several small configs)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from genjax.errors import UserError
from genjax.models import unet

torch.set_num_threads(1)

# XLA:CPU compiles threefry random bits very slowly (~1 s per parameter tensor in `init` with
# jax 0.10); the "rbg" PRNG compiles ~10x faster and is just as valid for random init / dropout.
KEY = jax.random.key(0, impl="rbg")

# Settings a bare state dict cannot reveal; passed to load_diffusers as overrides.
NOT_IN_STATE = ("norm_num_groups", "norm_eps", "attention_head_dim", "attn_norm_num_groups",
                "flip_sin_to_cos", "freq_shift", "downsample_padding", "mid_block_scale_factor")

CONFIGS = {
    # DDPM layout: attention at one level only, one head, TF-style padding, sin-first sinusoid.
    "ddpm": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
                 flip_sin_to_cos=False, freq_shift=1),
    # ADM-style: scale-shift norm, multi-head attention, class table, channel mult (1, 2, 3).
    "adm": dict(block_out_channels=(16, 32, 48), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8, resnet_time_scale_shift="scale_shift", num_class_embeds=5),
    # Two levels, attention everywhere, "timestep" class embedding, mid block without attention,
    # scaled mid block, custom temb width.
    "misc": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=4,
                 class_embed_type="timestep", add_attention=False, mid_block_scale_factor=2.0,
                 time_embedding_dim=24, in_channels=2, out_channels=5),
    # scale-shift with an explicit mid-attention GroupNorm.
    "attn_norm": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                      resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2),
}


def torch_unet(cfg, std=0.2):
    torch.manual_seed(0)
    m = UNet2DModel(**cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, std)
    return m


def compare(m, module, params, hw=(8, 12), atol=1e-4):
    cfg = m.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, cfg.in_channels)).astype(np.float32)
    t = np.array([3, 917])
    y = np.array([1, 4]) if module.conditional else None
    with torch.no_grad():
        want = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                 None if y is None else torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(module.apply({"params": params}, x, t, y))
    assert got.shape == want.shape == (2, *hw, cfg.out_channels)
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers_from_state_dict(name):
    cfg = CONFIGS[name]
    m = torch_unet(cfg)
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    module, params = unet.load_diffusers(state, **{k: cfg[k] for k in NOT_IN_STATE if k in cfg})
    compare(m, module, params)


def test_matches_diffusers_from_saved_folder_with_deprecated_names(tmp_path):
    """config.json + safetensors as on the Hub, attention keys in the pre-0.14 naming that
    google/ddpm-* checkpoints use; square input at another size."""
    from safetensors.numpy import save_file

    m = torch_unet(CONFIGS["ddpm"])
    m.save_pretrained(tmp_path)
    old = {}
    for k, v in m.state_dict().items():
        for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{dep}.")
        old[k] = v.numpy()
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert json.load(open(tmp_path / "config.json"))["_class_name"] == "UNet2DModel"
    module, params = unet.load_diffusers(tmp_path)
    assert module.downsample_padding == 0 and module.flip_sin_to_cos is False
    compare(m, module, params, hw=(16, 16))


def test_ddpm_cifar10_param_count_matches_diffusers():
    cfg = unet.VARIANTS["ddpm-cifar10-32"]
    with torch.device("meta"):
        ref = sum(p.numel() for p in UNet2DModel(**cfg).parameters())
    module = unet.Model(variant="ddpm-cifar10-32")
    shapes = jax.eval_shape(module.init, KEY, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(shapes)))
    assert ours == ref == 35_746_307  # "35.7M" (Ho et al. 2020, Table 1 footnote / HF model card)


def test_jit_init_shapes_and_logical_axes():
    module = unet.Model(in_channels=2, out_channels=5, block_out_channels=(8,), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("AttnDownBlock2D",),
                        up_block_types=("AttnUpBlock2D",), num_class_embeds=4)
    x, t, y = jnp.zeros((2, 4, 6, 2)), jnp.array([1, 2]), jnp.array([0, 3])
    variables = jax.jit(module.init)(KEY, x, t, y)
    spec = nn.get_partition_spec(variables)["params"]
    assert spec["conv_in"]["kernel"] == jax.sharding.PartitionSpec(None, None, "conv_in", "conv_out")
    assert spec["class_embedding"]["embedding"] == jax.sharding.PartitionSpec(None, "embed")
    assert spec["mid_block"]["attentions_0"]["attn"]["to_q"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
    # A scalar t is broadcast over the batch, as in diffusers.
    apply = jax.jit(module.apply)
    out = apply(variables, x, t, y)
    assert out.shape == (2, 4, 6, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(apply(variables, x, 7, y), apply(variables, x, jnp.array([7, 7]), y),
                               atol=1e-6)


def test_bf16_close_to_f32():
    cfg = CONFIGS["misc"]
    m = torch_unet(cfg)
    module, params = unet.load_diffusers({k: v.numpy() for k, v in m.state_dict().items()},
                                         **{k: cfg[k] for k in NOT_IN_STATE if k in cfg})
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 2)).astype(np.float32)
    t, y = np.array([10, 500]), np.array([0, 2])
    f32 = np.asarray(jax.jit(module.apply)({"params": params}, x, t, y))
    bf16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, x, t, y)
    assert bf16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(bf16, np.float32) - f32)
    assert err.max() < 0.05 * np.abs(f32).max(), (err.max(), np.abs(f32).max())


@pytest.mark.slow  # heavy on 2 CPU cores; run by `make test-all`
def test_remat_same_values_and_grads():
    # One level and no mid block keeps the backward-pass compile short (~1 s per ResnetBlock).
    x, t = jnp.ones((1, 4, 4, 2)), jnp.array([5])
    kw = dict(in_channels=2, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
              down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), mid_block=False,
              dropout=0.1)
    plain, remat = unet.Model(**kw), unet.Model(**kw, remat=True)
    params = jax.jit(plain.init)(KEY, x, t)
    rngs = {"dropout": jax.random.fold_in(KEY, 1)}

    def value_and_grad(module):
        loss = lambda p: jnp.sum(module.apply(p, x, t, train=True, rngs=rngs) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (la, ga), (lb, gb) = value_and_grad(plain), value_and_grad(remat)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max(), rtol=0),
                 ga, gb)


def test_bad_input_raises_user_error():
    module = unet.Model(**CONFIGS["adm"])

    def init(x, t=jnp.zeros((1,)), y=jnp.zeros((1,), jnp.int32), **kw):
        return jax.eval_shape(unet.Model(**{**CONFIGS["adm"], **kw}).init, KEY, x, t, y)

    ok = jnp.zeros((1, 8, 8, 3))
    assert module.conditional and init(ok)  # the valid call goes through
    with pytest.raises(UserError, match="divisible by 2\\*\\*\\(levels-1\\) = 4"):
        init(jnp.zeros((1, 6, 8, 3)))
    with pytest.raises(UserError, match="in_channels=3"):
        init(jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(UserError, match="class labels"):
        init(ok, y=None)
    with pytest.raises(UserError, match="t.shape"):
        init(ok, t=jnp.zeros((3,)))
    with pytest.raises(UserError, match="unconditional"):
        init(ok, num_class_embeds=None)
    with pytest.raises(UserError, match="down_block_types"):
        init(ok, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(UserError, match="attention_head_dim"):
        init(ok, attention_head_dim=5)
    with pytest.raises(UserError, match="variant"):
        unet.Model(variant="ddpm-cifar10-64")


def test_load_rejects_wrong_family_and_unsupported_config(tmp_path):
    m = torch_unet(CONFIGS["misc"])
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    with pytest.raises(UserError, match="time_embedding_dim|params"):
        unet.load_diffusers(state, time_embedding_dim=32, attention_head_dim=4, norm_num_groups=4)
    with pytest.raises(UserError, match="conv_in"):
        unet.load_diffusers({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)})
    with pytest.raises(UserError, match="unexpected"):
        unet.load_diffusers({**state, "decoder.mid.weight": np.zeros(3, np.float32)},
                            attention_head_dim=4, norm_num_groups=4)
    m.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "time_embedding_type": "fourier"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(UserError, match="time_embedding_type"):
        unet.load_diffusers(tmp_path)


# --- text conditioning (context_dim) ----------------------------------------------------

TEXT = dict(in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, context_dim=6)
# One text U-Net and one compiled apply shared by the tests below (each compile costs seconds);
# text_dropout_prob only acts with train=True.
TEXT_UNET = unet.Model(**TEXT, text_dropout_prob=1.0)
TEXT_APPLY = jax.jit(TEXT_UNET.apply, static_argnames="train")


def text_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 2)).astype(np.float32)
    text = rng.standard_normal((2, 5, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool)
    return x, np.array([3, 700]), text, mask


def random_params(module, *args, std=0.3, **kw):
    """Every parameter (zero-initialised ones included) drawn N(0, std), so the text path is live."""
    shapes = nn.unbox(jax.eval_shape(module.init, KEY, *args, **kw))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def without_text(tree):
    """The param tree minus the text-conditioning entries (text_embedding, cross_attentions_*)."""
    if not isinstance(tree, dict):
        return tree
    return {k: without_text(v) for k, v in tree.items()
            if k != "text_embedding" and not k.startswith("cross_attentions_")}


def test_fresh_text_unet_equals_unet_without_text():
    """Zero-initialised cross-attention output and pooled projection: a fresh text U-Net is exactly
    the U-Net without text on the shared parameters, which are the same tree."""
    x, t, text, mask = text_inputs()
    module = TEXT_UNET
    variables = jax.jit(module.init)(KEY, x, t, text=text, text_mask=mask)
    spec = nn.get_partition_spec(variables)["params"]
    P = jax.sharding.PartitionSpec
    assert spec["mid_block"]["cross_attentions_0"]["attn"]["to_k"]["kernel"] == P("embed", "heads", "kv")
    assert spec["text_embedding"]["null_text"] == P("embed")
    params = nn.unbox(variables)["params"]
    assert {"cross_attentions_0"} <= set(params["down_blocks_1"]) and "cross_attentions_1" in params["up_blocks_0"]
    assert "cross_attentions_0" not in params["down_blocks_0"]  # plain DownBlock2D: no attention

    base = module.clone(context_dim=None)
    base_shapes = nn.unbox(jax.eval_shape(base.init, KEY, x, t))["params"]
    stripped = without_text(params)
    assert jax.tree.map(np.shape, stripped) == jax.tree.map(lambda s: s.shape, base_shapes)
    got = TEXT_APPLY({"params": params}, x, t, text=text, text_mask=mask)
    want = base.apply({"params": stripped}, x, t)  # op by op: cheaper than compiling once
    assert got.shape == (2, 4, 6, 2) and np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_padding_tokens_never_influence_output():
    x, t, text, mask = text_inputs()
    params = random_params(TEXT_UNET, x, t, text=text, text_mask=mask)
    apply = TEXT_APPLY
    out = np.asarray(apply({"params": params}, x, t, text=text, text_mask=mask))
    other = np.where(mask[..., None], text, 1e3 * np.random.default_rng(2).standard_normal(text.shape))
    np.testing.assert_array_equal(apply({"params": params}, x, t, text=other.astype(np.float32),
                                        text_mask=mask), out)
    # ...while a real token does (the test can fail): change example 1's last valid token.
    changed = text.copy()
    changed[1, 3] += 1.0
    diff = np.abs(np.asarray(apply({"params": params}, x, t, text=changed, text_mask=mask)) - out)
    assert diff[1].max() > 1e-3 and diff[0].max() == 0


def test_null_text_force_drop_cfg_and_training_dropout():
    from genjax.diffusion.guidance import cfg_denoiser

    x, t, text, mask = text_inputs()
    module = TEXT_UNET  # text_dropout_prob=1
    params = random_params(module, x, t, text=text, text_mask=mask)
    apply = TEXT_APPLY
    cond = np.asarray(apply({"params": params}, x, t, text=text, text_mask=mask))
    # force_drop_ids == passing the null embedding as a one-token prompt (here padded to S=5).
    null_text = np.broadcast_to(params["text_embedding"]["null_text"], text.shape)
    null_mask = np.broadcast_to(np.arange(5) == 0, mask.shape)
    uncond = np.asarray(apply({"params": params}, x, t, text=null_text, text_mask=null_mask))
    assert np.abs(uncond - cond).max() > 1e-3
    mixed = apply({"params": params}, x, t, text=text, text_mask=mask,
                  force_drop_ids=np.array([True, False]))
    np.testing.assert_allclose(mixed[0], uncond[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed[1], cond[1], atol=1e-5, rtol=0)
    # text_dropout_prob = 1 in training drops every example's text.
    dropped = apply({"params": params}, x, t, text=text, text_mask=mask, train=True,
                    rngs={"dropout": KEY})
    np.testing.assert_allclose(dropped, uncond, atol=1e-5, rtol=0)

    # Classifier-free guidance: null_cond={"force_drop_ids": True} against force_drop_ids=False.
    @jax.jit
    def guided(scale):
        denoise = lambda x_t, t_, **c: module.apply({"params": params}, x_t, t_, **c)  # noqa: E731
        g = cfg_denoiser(denoise, scale, null_cond={"force_drop_ids": True})
        return g(x, t, text=text, text_mask=mask, force_drop_ids=np.zeros(2, bool))

    np.testing.assert_allclose(guided(1.0), cond, atol=1e-5, rtol=0)
    np.testing.assert_allclose(guided(0.0), uncond, atol=1e-5, rtol=0)


def test_text_bad_input_raises_user_error():
    x, t, text, mask = text_inputs()

    def init(*, y=None, model=None, **kw):
        module = unet.Model(**{**TEXT, **(model or {})})
        return jax.eval_shape(module.init, KEY, x, t, y, **kw)

    assert init(text=text, text_mask=mask)  # the valid call goes through
    with pytest.raises(UserError, match="text_mask=None"):
        init(text=text)
    with pytest.raises(UserError, match=r"text.shape=\(2, 5, 4\)"):
        init(text=text[..., :4], text_mask=mask)
    with pytest.raises(UserError, match="text=None: .* required"):
        init()
    with pytest.raises(UserError, match="text_mask.shape"):
        init(text=text, text_mask=mask[:, :3])
    with pytest.raises(UserError, match="force_drop_ids.shape"):
        init(text=text, text_mask=mask, force_drop_ids=np.zeros(3, bool))
    with pytest.raises(UserError, match="needs a UNet built with context_dim"):
        init(text=text, text_mask=mask, model=dict(context_dim=None))
    with pytest.raises(UserError, match="at least one attention layer"):
        init(text=text, text_mask=mask, model=dict(down_block_types=("DownBlock2D",) * 2,
                                                   up_block_types=("UpBlock2D",) * 2, add_attention=False))
    with pytest.raises(UserError, match="text_dropout_prob"):
        init(text=text, text_mask=mask, model=dict(text_dropout_prob=1.5))
    with pytest.raises(UserError, match="context_dim"):
        unet.load_diffusers({k: v.numpy() for k, v in torch_unet(CONFIGS["misc"]).state_dict().items()},
                            attention_head_dim=4, norm_num_groups=4, context_dim=8)


def test_attention_impl_reaches_every_attention_and_blockwise_equals_xla():
    """`attention_impl` is threaded to every self- and cross-attention layer (an unknown name
    raises), and "blockwise" gives the numbers of "xla" (text padding masked in both)."""
    x, t, text, mask = text_inputs()
    params = {"params": random_params(TEXT_UNET, x, t, text=text, text_mask=mask)}
    out = {impl: np.asarray(TEXT_UNET.clone(attention_impl=impl).apply(params, x, t, text=text, text_mask=mask))
           for impl in ("xla", "blockwise")}
    assert np.abs(out["xla"]).max() > 0.1
    np.testing.assert_allclose(out["blockwise"], out["xla"], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="attention_impl"):
        jax.eval_shape(TEXT_UNET.clone(attention_impl="flash").apply, params, x, t, text=text, text_mask=mask)
