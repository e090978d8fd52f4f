"""ViViT: tubelets vs transformers, inflation identities, grid == packed, packing invariance,
scan == loop, parameter counts vs transformers, bf16, bad input, Moving MNIST training."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import spacetime, vivit
from genjax.models.layers import PatchEmbed, sincos_pos_embed_1d

torch.set_num_threads(1)


def _init(module, *args, seed=0, scale=0.3, **kw):
    """Random params normal(0, scale) for every leaf (zero-initialised heads included), unboxed;
    shapes from `jax.eval_shape` of `module.init` (nothing compiled). `kw` are static call args."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(module.init, **kw), jax.random.key(0), *args))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _t2n(t):
    return t.detach().numpy().astype(np.float32)


# --------------------------------------------------------------------------- tubelets


def test_patchify_3d_order_and_roundtrip():
    video = np.random.default_rng(0).normal(size=(2, 4, 6, 4, 3)).astype(np.float32)
    tokens, grid = spacetime.patchify_3d(video, (2, 3, 2))
    assert grid == (2, 2, 2) and tokens.shape == (2, 8, 2 * 3 * 2 * 3)
    for t, h, w in spacetime.grid_positions(grid):
        l = (t * 2 + h) * 2 + w  # (t, h, w) row-major
        want = video[:, 2 * t:2 * t + 2, 3 * h:3 * h + 3, 2 * w:2 * w + 2].reshape(2, -1)  # (pt, ph, pw, C)
        np.testing.assert_array_equal(tokens[:, l], want)
    np.testing.assert_array_equal(spacetime.unpatchify_3d(tokens, grid, (2, 3, 2)), video)


def test_tubelet_embed_matches_transformers_and_packed_path():
    from transformers import VivitConfig
    from transformers.models.vivit.modeling_vivit import VivitTubeletEmbeddings

    cfg = VivitConfig(num_frames=4, image_size=[6, 8], tubelet_size=[2, 3, 4], num_channels=3, hidden_size=8)
    torch.manual_seed(0)
    ref = VivitTubeletEmbeddings(cfg)
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    video = np.random.default_rng(0).normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
    want = _t2n(ref(torch.from_numpy(video).permute(0, 1, 4, 2, 3)))  # HF: (B, T, C, H, W)

    m = spacetime.TubeletEmbed(8, (2, 3, 4), in_channels=3)
    params = {"params": {"kernel": _t2n(ref.projection.weight).transpose(2, 3, 4, 1, 0),
                         "bias": _t2n(ref.projection.bias)}}
    got, grid = m.apply(params, video)
    assert grid == (2, 2, 2)
    np.testing.assert_allclose(got, want, atol=1e-5)
    packed, none = m.apply(params, spacetime.patchify_3d(video, (2, 3, 4))[0])
    assert none is None
    np.testing.assert_array_equal(packed, got)


@pytest.mark.parametrize("method", spacetime.INFLATION_METHODS)
def test_inflated_kernel_embeds_static_video_as_one_frame(method):
    pt, rng = 3, np.random.default_rng(0)
    frame = rng.normal(size=(1, 8, 12, 3)).astype(np.float32)
    patch = PatchEmbed(8, (4, 4))
    p2d = _init(patch, frame)["params"]["proj"]
    want = patch.apply({"params": {"proj": p2d}}, frame)  # (1, 2*3, D)
    tube = spacetime.TubeletEmbed(8, (pt, 4, 4), in_channels=3)
    params = {"params": {"kernel": spacetime.inflate_patch_kernel(p2d["kernel"], pt, method), "bias": p2d["bias"]}}
    static = np.repeat(frame[:, None], 2 * pt, axis=1)  # 6 identical frames -> nt = 2
    got, grid = tube.apply(params, static)
    assert grid == (2, 2, 3)
    np.testing.assert_allclose(got, np.tile(want, (1, 2, 1)), atol=1e-5)
    if method == "central_frame":  # any video: tubelet t embeds exactly its frame t*pt + pt//2
        video = rng.normal(size=(1, 2 * pt, 8, 12, 3)).astype(np.float32)
        got, _ = tube.apply(params, video)
        centre = np.concatenate([patch.apply({"params": {"proj": p2d}}, video[:, t * pt + pt // 2]) for t in (0, 1)], 1)
        np.testing.assert_allclose(got, centre, atol=1e-5)


def test_uniform_frame_sampling_and_frame_patch_embed():
    video = np.broadcast_to(np.arange(10, dtype=np.float32)[None, :, None, None, None], (1, 10, 4, 4, 1))
    # frame i = floor((i + 1/2) * T / n): T=10, n=3 -> 1, 5, 8; T=10, n=5 -> 1, 3, 5, 7, 9
    np.testing.assert_array_equal(spacetime.uniform_frame_sampling(video, 3)[0, :, 0, 0, 0], [1, 5, 8])
    np.testing.assert_array_equal(spacetime.uniform_frame_sampling(video, 5)[0, :, 0, 0, 0], [1, 3, 5, 7, 9])
    with pytest.raises(UserError, match="num_frames"):
        spacetime.uniform_frame_sampling(video, 11)

    x = np.random.default_rng(0).normal(size=(2, 6, 8, 4, 3)).astype(np.float32)
    frames = spacetime.FramePatchEmbed(8, (4, 2), in_channels=3, num_frames=3)
    params = _init(frames, x)
    got, grid = frames.apply(params, x)
    assert grid == (3, 2, 2)
    proj = params["params"]["patch_embed"]["proj"]
    tube = spacetime.TubeletEmbed(8, (1, 4, 2), in_channels=3)
    want, _ = tube.apply({"params": {"kernel": proj["kernel"][None], "bias": proj["bias"]}}, x[:, [1, 3, 5]])
    np.testing.assert_allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- positions


def test_factorised_pos_embed_kinds():
    grid = (2, 3, 4)
    pos = jnp.asarray(spacetime.grid_positions(grid))[None]
    learned = spacetime.FactorisedPosEmbed(12, 3, 4, 5, kind="learned")
    params = _init(learned, pos)
    tab = params["params"]
    want = tab["time"][pos[..., 0]] + tab["height"][pos[..., 1]] + tab["width"][pos[..., 2]]
    np.testing.assert_allclose(learned.apply(params, pos), want, atol=1e-6)

    d = 12
    dt, dh, dw = spacetime.sincos_split(d)
    assert (dt, dh, dw) == (4, 4, 4)
    sincos = spacetime.FactorisedPosEmbed(d, *grid, kind="sincos").apply({}, pos)[0]
    p = np.asarray(pos[0])
    want = np.concatenate([sincos_pos_embed_1d(dt, p[:, 0]), sincos_pos_embed_1d(dh, p[:, 1]),
                           sincos_pos_embed_1d(dw, p[:, 2])], 1)
    np.testing.assert_allclose(sincos, want, atol=1e-6)
    assert len({tuple(np.round(r, 5)) for r in np.asarray(sincos)}) == np.prod(grid)  # axes distinguishable

    frac = spacetime.FactorisedPosEmbed(d, *grid, kind="fractional")
    np.testing.assert_allclose(frac.apply({}, pos, grid_sizes=jnp.asarray(grid))[0], sincos, atol=1e-6)
    # Resolution invariance: (t, h, w) on grid g == (2t, 2h, 2w) on grid 2g.
    coarse = frac.apply({}, pos, grid_sizes=jnp.asarray(grid))
    fine = frac.apply({}, 2 * pos, grid_sizes=2 * jnp.asarray(grid))
    np.testing.assert_allclose(fine, coarse, atol=1e-5)
    derived = frac.apply({}, pos, segment_ids=jnp.ones(pos.shape[:2], jnp.int32))
    np.testing.assert_allclose(derived, coarse, atol=1e-6)


# --------------------------------------------------------------------------- encoders


def test_joint_encoder_matches_transformers_vivit_layers():
    from transformers import VivitConfig, VivitModel

    cfg = VivitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                      hidden_act="gelu_pytorch_tanh", num_frames=4, image_size=8, tubelet_size=[2, 4, 4])
    torch.manual_seed(0)
    ref = VivitModel(cfg, add_pooling_layer=False).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    x = np.random.default_rng(0).normal(size=(2, 9, 16)).astype(np.float32)  # CLS + 2*2*2 tokens
    h = torch.from_numpy(x)
    with torch.no_grad():
        for layer in ref.layers:
            h = layer(h)
    n, k = 2, 8

    def block(layer):
        a = layer.attention
        qkv = {name: {"kernel": _t2n(lin.weight).T.reshape(16, n, k), "bias": _t2n(lin.bias).reshape(n, k)}
               for name, lin in (("to_q", a.q_proj), ("to_k", a.k_proj), ("to_v", a.v_proj))}
        qkv["to_out"] = {"kernel": _t2n(a.o_proj.weight).T.reshape(n, k, 16), "bias": _t2n(a.o_proj.bias)}
        norm = lambda ln: {"norm": {"scale": _t2n(ln.weight), "bias": _t2n(ln.bias)}}  # noqa: E731
        lin = lambda l: {"kernel": _t2n(l.weight).T, "bias": _t2n(l.bias)}  # noqa: E731
        return {"norm1": norm(layer.layernorm_before), "attn": qkv, "norm2": norm(layer.layernorm_after),
                "mlp": {"fc1": lin(layer.mlp.fc1), "fc2": lin(layer.mlp.fc2)}}

    enc = vivit.ViViTEncoder(num_layers=2, num_heads=2, mlp_dim=32, attention="joint")
    params = {"params": {f"blocks_{i}": block(layer) for i, layer in enumerate(ref.layers)}}
    assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), x)))
    np.testing.assert_allclose(jax.jit(enc.apply)(params, x), _t2n(h), atol=1e-4)


SMALL = dict(num_layers=1, num_heads=2, mlp_dim=32, num_temporal_layers=1)


def test_classifier_shapes_and_jit_init():
    x = jnp.zeros((3, 4, 8, 12, 1))
    tokens = jnp.zeros((3, 2 * 2 * 3, 16))
    for attention in vivit.ATTENTION_KINDS:
        m = vivit.Model(variant="smoke", num_classes=7, attention=attention, patch_size=(2, 4, 4))
        params = jax.eval_shape(m.init, jax.random.key(0), x)
        assert jax.eval_shape(m.apply, params, x).shape == (3, 7)
        enc = vivit.ViViTEncoder(**SMALL, attention=attention)
        out, _ = jax.eval_shape(functools.partial(enc.init_with_output, grid=(2, 2, 3)), jax.random.key(0), tokens)
        assert out.shape == (3, 12, 16)
    params = jax.jit(m.init)(jax.random.key(0), x)
    kernel = params["params"]["tubelet_embed"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names[-2:] == ("conv_in", "conv_out")
    assert kernel.value.shape == (2, 4, 4, 1, 16) and np.isfinite(kernel.value).all()


def _pack(examples, seq_len):
    """Whole examples (tokens (n, ...), grid) one after another into one sequence, zero padding."""
    tokens = np.zeros((1, seq_len, *examples[0][0].shape[1:]), np.float32)
    seg, pos, start = np.zeros((1, seq_len), np.int32), np.zeros((1, seq_len, 3), np.int32), 0
    for i, (tok, grid) in enumerate(examples):
        n = len(tok)
        tokens[0, start:start + n], seg[0, start:start + n] = tok, i + 1
        pos[0, start:start + n] = spacetime.grid_positions(grid)
        start += n
    return tokens, seg, pos


@pytest.mark.parametrize("attention", vivit.ATTENTION_KINDS)
def test_packing_invariance_encoder(attention):
    """Two videos packed in one sequence (in a shuffled token order, with padding) give each
    token the output it gets alone. For the factorised kinds "alone" runs the regular-grid
    reshapes and "packed" the segment/position masks, so this also checks grid == packed."""
    enc = vivit.ViViTEncoder(**SMALL, attention=attention)
    rng = np.random.default_rng(0)
    grids = [(2, 2, 2), (1, 2, 3)]
    xs = [rng.normal(size=(np.prod(g), 16)).astype(np.float32) for g in grids]
    params = _init(enc, xs[0][None], grid=grids[0])
    tokens, seg, pos = _pack(list(zip(xs, grids)), 16)
    perm = rng.permutation(16)
    shuffled = jax.jit(enc.apply)(params, tokens[:, perm], segment_ids=seg[:, perm], positions=pos[:, perm])
    packed = np.empty((16, 16), np.float32)
    packed[perm] = shuffled[0]
    start = 0
    for x, g in zip(xs, grids):
        alone = jax.jit(enc.apply, static_argnames="grid")(params, x[None], grid=g)[0]
        np.testing.assert_allclose(packed[start:start + len(x)], alone, atol=1e-5)
        start += len(x)


def test_packing_invariance_classifier():
    """Per-segment logits of a packed sequence == logits of each video alone (tubelets, fractional
    positions with grid sizes derived per segment, model 2, per-segment mean pooling)."""
    m = vivit.Model(variant="smoke", num_classes=5, attention="factorised_encoder", pos_embed="fractional",
                    patch_size=(2, 4, 4), **SMALL)
    rng = np.random.default_rng(0)
    videos = [rng.uniform(-1, 1, size=(1, *s, 1)).astype(np.float32) for s in ((4, 8, 8), (2, 8, 12))]
    params = _init(m, videos[0])
    examples = [(spacetime.patchify_3d(v, (2, 4, 4))[0][0], spacetime.patchify_3d(v, (2, 4, 4))[1]) for v in videos]
    tokens, seg, pos = _pack(examples, 16)
    packed = jax.jit(m.apply, static_argnames="num_segments")(params, tokens, segment_ids=seg, positions=pos,
                                                              num_segments=3)
    for i, v in enumerate(videos):
        np.testing.assert_allclose(packed[0, i], jax.jit(m.apply)(params, v)[0], atol=1e-5)


@pytest.mark.parametrize("attention", ["factorised_encoder", "factorised_self_attention"])
def test_scan_equals_unrolled(attention):
    grid, x = (2, 2, 2), np.random.default_rng(0).normal(size=(2, 8, 16)).astype(np.float32)
    kw = dict(SMALL, num_layers=2, num_temporal_layers=3, attention=attention)
    loop = vivit.ViViTEncoder(**kw)
    scan = vivit.ViViTEncoder(**kw, scan=True, remat="full")
    params = _init(loop, x, grid=grid)["params"]
    stacked = {}
    for prefix in ("blocks", "spatial", "temporal"):
        layers = [params[k] for k in sorted(params) if k.rsplit("_", 1)[0] == prefix]
        if layers:
            stacked[prefix] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    shapes = nn.unbox(jax.eval_shape(functools.partial(scan.init, grid=grid), jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, {"params": stacked})
    run = lambda m, p: jax.jit(m.apply, static_argnames="grid")(p, x, grid=grid)  # noqa: E731
    np.testing.assert_allclose(run(scan, {"params": stacked}), run(loop, {"params": params}), atol=1e-5)


def test_bf16_close_to_f32():
    kw = dict(variant="smoke", num_classes=10, attention="factorised_self_attention", patch_size=(2, 4, 4))
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 4, 8, 8, 1)).astype(np.float32)
    params = _init(vivit.Model(**kw), x, scale=0.2)
    f32 = jax.jit(vivit.Model(**kw).apply)(params, x)
    bf16 = jax.jit(vivit.Model(**kw, dtype=jnp.bfloat16).apply)(params, x)
    assert bf16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(bf16 - f32)))
    assert err < 0.03 * float(jnp.max(jnp.abs(f32))) + 1e-3, err


def test_bad_input_raises_user_error():
    m = vivit.Model(variant="smoke", num_classes=10)  # tubelet (2, 8, 8), C = 1, max_grid (4, 4, 4)
    key = jax.random.key(0)
    for shape, field in (((1, 7, 32, 32, 1), "video"), ((1, 8, 30, 32, 1), "video"),
                         ((1, 8, 32, 32, 3), "video.shape"), ((8, 32, 32, 1), "video.shape"),
                         ((1, 8, 32, 40, 1), "tubelet grid")):
        with pytest.raises(UserError, match=field):
            jax.eval_shape(m.init, key, jnp.zeros(shape))
    packed = dict(segment_ids=jnp.ones((1, 6), jnp.int32), positions=jnp.zeros((1, 6, 3), jnp.int32))
    with pytest.raises(UserError, match="tubelets.shape"):  # P must be 2*8*8*1 = 128
        jax.eval_shape(functools.partial(m.init, **packed, num_segments=1), key, jnp.zeros((1, 6, 100)))
    for bad, field in ((dict(attention="divided"), "attention"), (dict(pool="max"), "pool"),
                       (dict(pool="cls", attention="factorised_encoder"), "pool"),
                       (dict(pos_embed="rope"), "pos_embed"), (dict(remat="some"), "remat")):
        with pytest.raises(UserError, match=field):
            jax.eval_shape(vivit.Model(variant="smoke", num_classes=10, **bad).init, key, jnp.zeros((1, 8, 32, 32, 1)))
    tok = jnp.zeros((1, 6, 128))
    with pytest.raises(UserError, match="num_segments"):
        jax.eval_shape(functools.partial(m.init, **packed), key, tok)
    with pytest.raises(UserError, match="positions.shape"):
        jax.eval_shape(functools.partial(m.init, segment_ids=packed["segment_ids"], num_segments=1), key, tok)
    enc = vivit.ViViTEncoder(**SMALL, attention="factorised_self_attention")
    with pytest.raises(UserError, match="grid"):
        jax.eval_shape(enc.init, key, jnp.zeros((1, 8, 16)))
    with pytest.raises(UserError, match="grid"):
        jax.eval_shape(functools.partial(enc.init, grid=(2, 2, 3)), key, jnp.zeros((1, 8, 16)))
    with pytest.raises(UserError, match="method"):
        spacetime.inflate_patch_kernel(jnp.zeros((4, 4, 3, 8)), 2, "mean")
    with pytest.raises(UserError, match="variant"):
        vivit.Model(variant="L", num_classes=10)


# --------------------------------------------------------------------------- parameter counts


def _count(module, shape):
    params = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("variant", [pytest.param("Ti", marks=pytest.mark.slow),
                                     pytest.param("S", marks=pytest.mark.slow), "B"])
def test_param_counts_match_transformers_vivit(variant):
    """Model 1 with a CLS token = transformers ViViT (32 x 224^2, 400 classes) with its
    (L+1, D) position table replaced by the factorised (16 + 14 + 14, D) ones; model 3 adds one
    attention + LayerNorm per block; model 2 adds L_t transformer layers."""
    from transformers import VivitConfig, VivitForVideoClassification
    from transformers.models.vivit.modeling_vivit import VivitAttention, VivitLayer

    v = vivit.VARIANTS[variant]
    d = v["hidden_size"]
    cfg = VivitConfig(hidden_size=d, num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
                      intermediate_size=v["mlp_dim"], num_labels=400)
    with torch.device("meta"):
        numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        hf, layer, attn = numel(VivitForVideoClassification(cfg)), numel(VivitLayer(cfg)), numel(VivitAttention(cfg))
    shape = (1, 32, 224, 224, 3)
    joint = hf - (16 * 14 * 14 + 1) * d + (16 + 14 + 14) * d
    assert _count(vivit.Model(variant=variant, num_classes=400, pool="cls"), shape) == joint
    no_cls = joint - d
    assert _count(vivit.Model(variant=variant, num_classes=400), shape) == no_cls
    assert _count(vivit.Model(variant=variant, num_classes=400, attention="factorised_self_attention"), shape) == (
        no_cls + v["num_layers"] * (attn + 2 * d))
    assert _count(vivit.Model(variant=variant, num_classes=400, attention="factorised_encoder"), shape) == (
        no_cls + v["num_temporal_layers"] * layer)


# --------------------------------------------------------------------------- training smoke


def _config(arg):
    from genjax.config import load_config

    return load_config(f"{os.path.dirname(__file__)}/../../configs/vivit_moving_mnist.py:{arg}")


def test_config_builds_every_attention_kind():
    for attention in vivit.ATTENTION_KINDS:
        c = _config(f"attention={attention}")
        model = {k: v for k, v in c.model.items() if k != "name"}
        m = vivit.ViViTClassifier(**model)
        x = jax.ShapeDtypeStruct((1, c.data.num_frames, c.data.image_size, c.data.image_size, c.data.channels),
                                 jnp.float32)
        assert jax.eval_shape(m.apply, jax.eval_shape(m.init, jax.random.key(0), x), x).shape == (1, 10)
    with pytest.raises(UserError, match="attention"):
        _config("attention=divided")


@pytest.mark.slow  # heavy on 2 CPU cores; run by `make test-all`
def test_trains_on_moving_mnist_digits(tmp_path):
    """configs/vivit_moving_mnist.py:smoke=True (model 2, ~7k params) trained by `genjax train`'s
    trainer (task "vivit") learns Moving MNIST digit labels: after 400 steps of batch 16 the loss
    fell, the train accuracy is far above the 10 % chance level, and so is the held-out accuracy."""
    import json

    from genjax.train import trainer

    c = _config("smoke=True")
    c.unlock()
    c.mesh.data = 1
    trainer.main(c, str(tmp_path), devices=jax.devices()[:1])
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    first_loss = np.mean([r["loss"] for r in train[:1]])
    last_loss, last_acc = np.mean([[r["loss"], r["accuracy"]] for r in train[-5:]], axis=0)
    assert last_loss < 0.7 * first_loss, (first_loss, last_loss)
    assert last_acc > 0.4, last_acc
    held_out = [r["accuracy"] for r in records if "loss" not in r]
    assert held_out and held_out[-1] > 0.3, held_out
