"""CLIP: towers vs transformers (CLIPTextModel / CLIPVisionModel / CLIPModel, random weights),
padding never leaks, scan == unrolled, losses vs numpy, sharded == 1 device, parameter count vs
transformers, bf16, bad input, zero-shot MNIST after a short training run."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from genjax.data.sources import MnistEmbeddedSource
from genjax.errors import UserError
from genjax.models import clip, clip_towers, contrastive
from genjax.models.tokenizer import ByteTokenizer

torch.set_num_threads(1)
TOL = 1e-4


def _random_params(module, *args, seed=0, scale=0.3, method=None):
    """normal(0, scale) for every parameter (unboxed), shapes from eval_shape (nothing compiled)."""
    init = functools.partial(module.init, method=method) if method else module.init
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0), *args))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), shapes)


def _t2n(t):
    return t.detach().numpy().astype(np.float32)


def _randomise(model, std=0.2):
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, std)
    return model.eval()


def _text_batch(eos, vocab=100, length=12, seed=0):
    """Right-padded ids: [bos, random tokens, eos, pad...], lengths 12, 5, 3 (eos never elsewhere)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab - 1, size=(3, length))
    ids[ids == eos] = 3
    mask = np.zeros((3, length), bool)
    for row, n in enumerate((length, 5, 3)):
        ids[row, 0], ids[row, n - 1], mask[row, :n] = 1, eos, True
        ids[row, n:] = 0
    return ids.astype(np.int32), mask


TEXT_CFG = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, pad_token_id=0, attn_implementation="eager")


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("eos,act", [(99, "quick_gelu"), (2, "gelu"), (7, "quick_gelu")])
def test_text_tower_matches_transformers(tmp_path, eos, act):
    """eos 2 = transformers' legacy argmax pooling (EOT = largest id, 99); 7 = first-EOT pooling."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = _randomise(CLIPTextModel(CLIPTextConfig(**TEXT_CFG, eos_token_id=eos, hidden_act=act)))
    eot = 99 if eos == 2 else eos
    ids, mask = _text_batch(eot)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    if eos == 7:  # from a state dict: heads from overrides, pooling from eos_token_id
        module, params = clip.load_transformers({k: _t2n(v) for k, v in ref.state_dict().items()}, num_heads=2,
                                                eos_token_id=7, activation=act)
    else:  # from a saved folder with config.json
        ref.save_pretrained(tmp_path)
        module, params = clip.load_transformers(tmp_path)
    assert (module.eos_token_id, module.context_length, module.num_layers) == (
        None if eos == 2 else eos, 16, 2)
    hidden, pooled = jax.jit(module.apply)({"params": params}, ids, mask)
    np.testing.assert_allclose(hidden, _t2n(out.last_hidden_state), atol=TOL)
    np.testing.assert_allclose(pooled, _t2n(out.pooler_output), atol=TOL)
    # scan over layers gives the same numbers
    module_s, params_s = clip.load_transformers({k: _t2n(v) for k, v in ref.state_dict().items()}, num_heads=2,
                                                eos_token_id=module.eos_token_id, activation=act, scan=True)
    np.testing.assert_allclose(jax.jit(module_s.apply)({"params": params_s}, ids, mask)[1], pooled, atol=1e-5)


def test_vision_tower_matches_transformers():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ref = _randomise(CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=7, num_channels=1, attn_implementation="eager")))
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    module, params = clip.load_transformers(ref.state_dict(), num_heads=2)
    assert isinstance(module, clip_towers.VisionTransformer) and module.image_size == (28, 28)
    hidden, pooled = jax.jit(module.apply)({"params": params}, x)
    np.testing.assert_allclose(hidden, _t2n(out.last_hidden_state), atol=TOL)
    np.testing.assert_allclose(pooled, _t2n(out.pooler_output), atol=TOL)


def test_clip_model_matches_transformers(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    cfg = CLIPConfig(text_config={**TEXT_CFG, **tower, "eos_token_id": 2},
                     vision_config={**tower, "image_size": 16, "patch_size": 8, "num_channels": 3},
                     projection_dim=24, attn_implementation="eager")
    ref = _randomise(CLIPModel(cfg), std=0.1)
    ref.save_pretrained(tmp_path)
    ids, mask = _text_batch(99)
    x = np.random.default_rng(1).uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                  pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
    module, params = clip.load_transformers(tmp_path)
    assert isinstance(module, clip.CLIP) and module.embed_dim == 24
    got = jax.jit(module.apply)({"params": params}, ids, mask, x)
    np.testing.assert_allclose(got["text"], _t2n(out.text_embeds), atol=TOL)
    np.testing.assert_allclose(got["image"], _t2n(out.image_embeds), atol=TOL)
    logits = np.exp(got["logit_scale"]) * got["image"] @ got["text"].T
    np.testing.assert_allclose(logits, _t2n(out.logits_per_image), atol=1e-3 * np.abs(logits).max())


# --------------------------------------------------------------------------- masking


def test_padding_tokens_never_influence_real_tokens_or_pooled():
    m = clip_towers.TextTransformer(vocab_size=50, context_length=10, width=16, num_layers=2, num_heads=2, mlp_dim=32,
                             eos_token_id=49)
    ids = np.array([[0, 0, 0, 1, 5, 6, 7, 49, 0, 0]], np.int32)  # left and right padding
    mask = np.zeros_like(ids, bool)
    mask[0, 3:8] = True
    params = {"params": _random_params(m, ids, mask)["params"]}
    apply = jax.jit(m.apply)
    hidden, pooled = apply(params, ids, mask)
    other = np.where(mask, ids, np.array([[3, 9, 44, 0, 0, 0, 0, 0, 12, 30]], np.int32))
    hidden2, pooled2 = apply(params, other, mask)
    np.testing.assert_array_equal(pooled2, pooled)
    np.testing.assert_array_equal(hidden2[0, 3:8], hidden[0, 3:8])
    # control: without the mask, the left padding is attended and the output changes
    assert np.abs(apply(params, other, None)[1] - apply(params, ids, None)[1]).max() > 1e-3


# --------------------------------------------------------------------------- losses


def _np_clip_loss(img, txt, logit_scale):
    logits = min(np.exp(logit_scale), 100.0) * img.astype(np.float64) @ txt.T.astype(np.float64)

    def ce(lg):
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return np.mean(lse - np.diag(lg))

    return (ce(logits) + ce(logits.T)) / 2


def _np_siglip_loss(img, txt, logit_scale, logit_bias):
    logits = np.exp(logit_scale) * img.astype(np.float64) @ txt.T.astype(np.float64) + logit_bias
    z = 2 * np.eye(len(img)) - 1
    return -np.sum(-np.log1p(np.exp(-z * logits))) / len(img)


def _embeddings(n=16, e=8, seed=0):
    rng = np.random.default_rng(seed)
    img, txt = rng.normal(size=(2, n, e)).astype(np.float32)
    txt = img + 0.7 * txt  # correlated pairs, as after some training
    return [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (img, txt)]


def test_losses_match_numpy():
    img, txt = _embeddings()
    for scale in (np.log(1 / 0.07), np.log(1000.0)):  # the second is clamped to 100
        np.testing.assert_allclose(contrastive.clip_loss(img, txt, scale), _np_clip_loss(img, txt, scale), rtol=1e-5)
    for scale, bias in ((np.log(10.0), -10.0), (1.3, 0.5)):
        np.testing.assert_allclose(contrastive.siglip_loss(img, txt, scale, bias), _np_siglip_loss(img, txt, scale, bias),
                                   rtol=1e-5)
    assert abs(float(contrastive.clip_loss(img, img[::-1], 0.0)) - _np_clip_loss(img, img[::-1], 0.0)) < 1e-5


def test_losses_under_8_device_sharding_equal_one_device():
    img, txt = _embeddings()
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8
    mesh = Mesh(devices.reshape(4, 2), ("data", "fsdp"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    s_img, s_txt = jax.device_put(img, batch), jax.device_put(txt, batch)
    scale, bias = jnp.float32(2.3), jnp.float32(-3.0)

    for name, loss, extra in (("clip", contrastive.clip_loss, ()), ("siglip", contrastive.siglip_loss, (bias,))):
        want = loss(img, txt, scale, *extra)
        assert abs(jax.jit(loss)(s_img, s_txt, scale, *extra) - want) <= 1e-6, name
        # shard_map: each device holds 2 rows and gathers the rest; gradients flow back through all_gather
        local = functools.partial(loss, axis_name=("data", "fsdp"))
        mapped = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(("data", "fsdp")),) * 2 + (P(),) * (1 + len(extra)),
                                       out_specs=P()))
        assert abs(mapped(s_img, s_txt, scale, *extra) - want) <= 1e-6, name
        g_want = jax.grad(loss, argnums=(0, 1))(img, txt, scale, *extra)
        g_got = jax.grad(mapped, argnums=(0, 1))(s_img, s_txt, scale, *extra)
        for a, b in zip(g_got, g_want):
            np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- shapes, counts, dtypes


def _tiny_inputs(b=2):
    rng = np.random.default_rng(0)
    ids, mask = ByteTokenizer().encode(["digit 1", "a digit 7 moving up"][:b], 32)
    return (ids, mask, rng.uniform(-1, 1, size=(b, 28, 28, 1)).astype(np.float32),
            rng.uniform(-1, 1, size=(b, 8, 32, 32, 1)).astype(np.float32))


def test_tower_shapes_normalised_embeddings_and_bf16():
    m = clip.Model(variant="tiny")
    ids, mask, images, videos = _tiny_inputs()
    params = _random_params(m, ids, mask, images, videos, scale=0.1)
    want = jax.jit(m.apply)(params, ids, mask, images, videos)
    got = jax.jit(clip.Model(variant="tiny", dtype=jnp.bfloat16).apply)(params, ids, mask, images, videos)
    for key in ("text", "image", "video"):
        assert want[key].shape == got[key].shape == (2, 64) and got[key].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(want[key], axis=-1), 1.0, rtol=1e-5)
        assert np.abs(got[key] - want[key]).max() < 0.05, key  # bf16 close to float32
        assert np.all(np.sum(got[key] * want[key], -1) > 0.995), key  # cosine similarity
    p = params["params"]
    towers = [(clip_towers.TextTransformer(259, 32, 64, 2, 2, 256, "gelu_tanh"), p["text"], (ids, mask), (2, 32, 64)),
              (clip_towers.VisionTransformer((28, 28), (7, 7), 1, 64, 2, 2, 256, "gelu_tanh"), p["vision"], (images,),
               (2, 1 + 16, 64)),
              (clip_towers.VideoTransformer((2, 8, 8), 1, (4, 4, 4), 64, 2, 2, 256, num_temporal_layers=1), p["video"],
               (videos,), (2, 4 * 4 * 4, 64))]
    for tower, tower_params, args, hidden_shape in towers:
        hidden, pooled = jax.eval_shape(tower.apply, {"params": tower_params}, *args)
        assert hidden.shape == hidden_shape and pooled.shape == (2, 64)


@pytest.mark.parametrize("loss,scale,bias", [("clip", np.log(1 / 0.07), None), ("siglip", np.log(10.0), -10.0)])
def test_init_under_jit_is_boxed_and_sets_the_temperature(loss, scale, bias):
    m = clip.CLIP(embed_dim=8, loss=loss, vocab_size=259, context_length=8, text_width=16, text_layers=1,
                  text_heads=2, image_size=(8, 8), patch_size=(4, 4), in_channels=1, vision_width=16,
                  vision_layers=1, vision_heads=2)
    ids, mask = ByteTokenizer().encode(["x"], 8)
    args = (ids, mask, np.zeros((1, 8, 8, 1), np.float32))
    variables = jax.jit(m.init)(jax.random.key(0, impl="rbg"), *args)
    assert isinstance(variables["params"]["text"]["token_embedding"]["embedding"], nn.Partitioned)
    assert jax.tree.map(np.shape, nn.unbox(variables)) == jax.tree.map(
        np.shape, nn.unbox(jax.eval_shape(m.init, jax.random.key(0), *args)))
    assert np.isclose(variables["params"]["logit_scale"], scale)
    assert variables["params"].get("logit_bias") == bias
    out = jax.jit(m.apply)(variables, *args)  # apply takes boxed params
    assert set(out) == {"text", "image", "logit_scale"} | ({"logit_bias"} if bias else set())


def test_parameter_count_equals_transformers_clip_vit_b32():
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        ref = sum(p.numel() for p in CLIPModel(CLIPConfig()).parameters())  # ViT-B/32 defaults
    m = clip.Model(variant="ViT-B/32")
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32), None,
                            jnp.zeros((1, 224, 224, 3)))
    assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == ref == 151_277_313


def test_bad_input_raises_user_error():
    m = clip.Model(variant="tiny", video_patch_size=None)
    ids, mask, images, videos = _tiny_inputs()
    key = jax.random.key(0)
    cases = [
        (lambda: jax.eval_shape(m.init, key, np.zeros((1, 33), np.int32)), "ids.shape"),
        (lambda: jax.eval_shape(m.init, key, ids, mask[:, :5]), "mask.shape"),
        (lambda: jax.eval_shape(m.init, key, None, None, np.zeros((1, 32, 32, 1))), "images.shape"),
        (lambda: jax.eval_shape(m.init, key, None, None, np.zeros((1, 28, 28, 3))), "images.shape"),
        (lambda: jax.eval_shape(m.init, key, None, None, None, videos), "video_patch_size"),
        (lambda: jax.eval_shape(clip.Model(variant="tiny").init, key, None, None, None, videos[:, :, :20]),
         "divisible"),
        (lambda: jax.eval_shape(clip.Model(variant="tiny").init, key, None, None, None,
                                np.zeros((1, 16, 32, 32, 1))), "max_grid"),
        (lambda: jax.eval_shape(clip.Model(variant="tiny", loss="nce").init, key, ids), "loss"),
        (lambda: clip.Model(variant="ViT-H/99"), "variant"),
        (lambda: contrastive.zero_shot_accuracy({}, m, np.zeros((4, 28, 28)), np.zeros(4), ByteTokenizer()), "images"),
    ]
    for fn, match in cases:
        with pytest.raises(UserError, match=match):
            fn()


def test_load_transformers_rejects_other_families_and_bad_configs():
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = CLIPTextModel(CLIPTextConfig(**TEXT_CFG))
    state = {k: _t2n(v) for k, v in ref.state_dict().items()}
    with pytest.raises(UserError, match="num_heads"):
        clip.load_transformers(state)  # a bare state dict does not record the heads
    with pytest.raises(UserError, match="num_heads"):
        clip.load_transformers(state, num_heads=5)
    with pytest.raises(UserError, match="unexpected"):
        clip.load_transformers({**state, "lm_head.weight": np.zeros((3, 3))}, num_heads=2)
    with pytest.raises(UserError, match="missing"):
        clip.load_transformers({k: v for k, v in state.items() if "layers.1.mlp.fc2" not in k}, num_heads=2)
    with pytest.raises(UserError, match="shape"):
        clip.load_transformers({**state, "final_layer_norm.weight": np.zeros(7, np.float32)}, num_heads=2)
    with pytest.raises(UserError, match="wrong model family"):
        clip.load_transformers({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3))})


# --------------------------------------------------------------------------- zero-shot MNIST


def _train_mnist_clip(steps, batch_size=64, seed=0):
    """A tiny CLIP (image + text towers) trained with plain optax on (digit, "digit N") pairs."""
    tok = ByteTokenizer()
    m = clip.Model(variant="tiny", video_patch_size=None, context_length=12, text_layers=1, vision_layers=1)
    train = MnistEmbeddedSource("train")
    captions = tok.encode([f"digit {n}" for n in range(10)], 12)
    images = train.images.astype(np.float32) / 127.5 - 1.0
    params = jax.jit(m.init)(jax.random.key(seed, impl="rbg"), captions[0][:1], captions[1][:1], images[:1])
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, ids, mask):
        def loss_fn(p):
            out = m.apply(p, ids, mask, x)
            return contrastive.clip_loss(out["image"], out["text"], out["logit_scale"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(train), batch_size, replace=False)
        labels = train.labels[idx]
        params, opt_state, loss = step(params, opt_state, images[idx], captions[0][labels], captions[1][labels])
        losses.append(float(loss))
    test = MnistEmbeddedSource("test")
    return contrastive.zero_shot_accuracy(params, m, test.images, test.labels, tok), losses


def test_zero_shot_mnist_after_short_training():
    acc, losses = _train_mnist_clip(steps=250)  # measured 0.777
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert acc >= 0.5, acc  # chance is 0.1


@pytest.mark.slow
def test_zero_shot_mnist_reaches_90_percent():
    acc, _ = _train_mnist_clip(steps=1500, batch_size=128)
    assert acc >= 0.9, acc
