"""MAE / VideoMAE (`genjax.models.mae`, task "mae"): the encoder never reads a masked tubelet
(gradients), `random_masking` keeps num_visible tubelets per example and ids_restore inverts the
shuffle (tube masking: whole tubes), the norm-pix loss against numpy on masked patches only
(MAE `forward_loss`), end to end through `trainer.main` + `genjax sample` on the smoke config, and
the vivit task initialised from the MAE workdir (task.pretrained)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from genjax import cli, tasks
from genjax.config import load_config
from genjax.errors import UserError
from genjax.io import checkpoint, media
from genjax.models import mae
from genjax.models.spacetime import patchify_3d
from genjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("video", [False, pytest.param(True, marks=pytest.mark.slow)])  # ~3 s each
def test_encoder_never_reads_a_masked_patch(video):
    """d(encoder output)/d(pixels) is exactly 0 on every pixel of a masked tubelet and nonzero on
    every visible one (random masking on images, tube masking on videos)."""
    kw = dict(patch_size=(2, 4, 4), masking="tube", mask_ratio=0.5) if video else {}
    model = mae.Model(variant="tiny", **kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16, 16, 1) if video else (2, 16, 16, 1))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x, jax.random.PRNGKey(2))
    grid = (2, 4, 4) if video else (1, 4, 4)
    ids_keep, mask, _ = mae.random_masking(jax.random.PRNGKey(3), 2, 16 * grid[0], model.mask_ratio,
                                           frames=grid[0] if video else 1)
    weights = jax.random.normal(jax.random.PRNGKey(4), (2, ids_keep.shape[1], 16))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(params, x, ids_keep, method=model.encode) * weights)))(x)
    pixels = np.abs(np.asarray(patchify_3d(mae.as_video(grad), model.patch_size)[0]))  # (B, L, P)
    masked = np.asarray(mask) > 0
    assert masked.sum() == mask.size - ids_keep.size
    assert np.all(pixels[masked] == 0)
    assert np.all(pixels[~masked] > 0)  # every pixel of a visible tubelet reaches the output


def test_random_masking_keeps_num_visible_and_restore_inverts_the_shuffle():
    b, length = 5, 49
    ids_keep, mask, ids_restore = map(np.asarray, mae.random_masking(jax.random.PRNGKey(0), b, length, 0.75))
    assert ids_keep.shape == (b, 12) and mae.num_visible(49, 0.75) == 12 == int(49 * 0.25)
    np.testing.assert_array_equal(mask.sum(1), length - 12)
    for i in range(b):
        assert sorted(np.flatnonzero(mask[i] == 0)) == sorted(ids_keep[i])
        shuffle = np.argsort(ids_restore[i])  # the shuffle ids_restore undoes
        np.testing.assert_array_equal(shuffle[:12], ids_keep[i])
        np.testing.assert_array_equal(shuffle[ids_restore[i]], np.arange(length))
    assert len({tuple(r) for r in ids_keep}) == b  # one shuffle per example
    assert mae.num_visible(10, 0.7) == 3  # 10 * 0.3 = 2.9999999999999996 in floating point
    # Tube masking (VideoMAE): 4 frames x 16 locations, the same locations masked in every frame.
    ids_keep, mask, ids_restore = map(np.asarray, mae.random_masking(jax.random.PRNGKey(1), b, 64, 0.9, frames=4))
    tubes = mask.reshape(b, 4, 16)
    assert np.all(tubes == tubes[:, :1]) and ids_keep.shape == (b, 4 * mae.num_visible(16, 0.9))
    np.testing.assert_array_equal(tubes[:, 0].sum(1), 16 - 1)
    np.testing.assert_array_equal(np.take_along_axis(np.argsort(ids_restore, 1), ids_restore, 1),
                                  np.broadcast_to(np.arange(64), (b, 64)))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_the_masked_patch_mse_of_mae(norm_pix):
    """numpy: targets normalised per patch with the unbiased variance (torch `Tensor.var`, as MAE's
    forward_loss) + 1e-6, per-patch mean squared error, averaged over masked patches only."""
    rng = np.random.default_rng(0)
    pred, patches = rng.normal(size=(3, 10, 12)), rng.normal(size=(3, 10, 12)) * 2 + 1
    mask = (rng.random((3, 10)) < 0.6).astype(np.float64)
    target = patches
    if norm_pix:
        target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    expect = sum(((pred[b, l] - target[b, l]) ** 2).mean() for b, l in zip(*np.nonzero(mask))) / mask.sum()
    got = mae.mae_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(patches, jnp.float32), jnp.asarray(mask, jnp.float32),
                       norm_pix_loss=norm_pix)
    np.testing.assert_allclose(float(got), expect, rtol=1e-5)
    # Changing the prediction on visible patches leaves the loss unchanged.
    moved = pred + 5 * (1 - mask)[..., None]
    np.testing.assert_allclose(float(mae.mae_loss(jnp.asarray(moved, jnp.float32), jnp.asarray(patches, jnp.float32),
                                                  jnp.asarray(mask, jnp.float32), norm_pix_loss=norm_pix)),
                               float(got), rtol=1e-6)


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mae") / "run")
    config = load_config(os.path.join(ROOT, "configs", "mae_mnist.py") + ":smoke=True", ["--config.mesh.data=1"])
    trainer.main(config, workdir, devices=jax.devices()[:1])
    return workdir


def test_mae_trains_and_samples_reconstructions_through_the_cli(mae_workdir, tmp_path):
    with open(os.path.join(mae_workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["visible"] == 4 for r in steps)  # 16 patches of 16 x 16, 25 % kept
    (ev,) = [r for r in records if "masked_mse" in r]
    assert set(ev) == {"step", "masked_mse"} and 0 < ev["masked_mse"] < 10  # smoke: no probe
    assert os.path.isfile(os.path.join(mae_workdir, "samples", "step_000003.png"))
    out = str(tmp_path / "rec.npz")
    assert cli.main(["sample", "--workdir", mae_workdir, "--class-label", "0", "--class-label", "9",
                     "--num", "1", "--out", out]) == 0
    saved = np.load(out)
    images, labels = saved["images"], saved["class_labels"]
    assert images.shape == (2, 16, 3 * 16 + 4, 1) and list(labels) == [0, 9]
    assert os.path.isfile(str(tmp_path / "rec.png"))
    config = checkpoint.read_config(mae_workdir)
    from genjax.tasks import mae as mae_task

    held = mae_task.spread_examples(config, 16, "test")
    for img, y in zip(images, labels):
        original, masked, recon = img[:, :16], img[:, 18:34], img[:, 36:]
        assert any(np.array_equal(original, o) for o, z in zip(media.to_uint8(held["image"]), held["label"]) if z == y)
        hidden = np.all(masked == 128, axis=-1)  # masked 4 x 4 patches are mid-grey (0.0)
        np.testing.assert_array_equal(masked[~hidden], original[~hidden])
        np.testing.assert_array_equal(recon[~hidden], original[~hidden])  # visible patches pasted back
        assert hidden.reshape(4, 4, 4, 4).all(axis=(1, 3)).sum() >= 12  # 12 of 16 patches masked


def test_linear_probe_reads_digits_from_features():
    """Raw pixels as the features: well above chance on held-out digits (88.9 % with all 4,000
    training digits, experiments/mae_mnist); with shuffled training labels, near chance."""
    from genjax.tasks import mae as mae_task

    config = load_config(os.path.join(ROOT, "configs", "mae_mnist.py") + ":smoke=True", [])
    train, test = mae_task.spread_examples(config, 300, "train"), mae_task.spread_examples(config, 200, "test")
    flat = jax.jit(lambda x: x.reshape(len(x), -1))
    acc = mae_task.linear_probe(flat, train["image"], train["label"], test["image"], test["label"], batch_size=100)
    shuffled = np.random.default_rng(0).permutation(train["label"])
    chance = mae_task.linear_probe(flat, train["image"], shuffled, test["image"], test["label"], batch_size=100)
    assert acc > 0.7 and chance < 0.3, (acc, chance)


@pytest.mark.slow  # ~25 s: the smoke run with the probe; the fast tests run its parts
def test_evaluate_reports_the_probe_against_a_random_encoder(tmp_path):
    config = load_config(os.path.join(ROOT, "configs", "mae_mnist.py") + ":smoke=True",
                         ["--config.mesh.data=1", "--config.task.probe_train=16", "--config.num_steps=1",
                          "--config.eval.sample_every_steps=1"])
    trainer.main(config, str(tmp_path), devices=jax.devices()[:1])
    with open(tmp_path / "metrics.jsonl") as f:
        (ev,) = [r for r in map(json.loads, f) if "masked_mse" in r]
    assert 0 <= ev["probe_accuracy"] <= 1 and 0 <= ev["probe_accuracy_random_init"] <= 1


def test_vivit_starts_from_the_mae_encoder(mae_workdir):
    config = load_config(os.path.join(ROOT, "configs", "vivit_moving_mnist.py") + f":smoke=True,pretrained={mae_workdir}",
                         ["--config.mesh.data=1", "--config.eval.num_samples=8"])
    assert config.model.attention == "joint" and tuple(config.model.patch_size) == (1, 4, 4)
    task = tasks.build(config)
    params = nn.meta.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    source = checkpoint.restore_ema(mae_workdir)
    for name in ("tubelet_embed", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(params[name]), jax.device_get(source[name]))
    def config_with(override):
        return load_config(os.path.join(ROOT, "configs", "vivit_moving_mnist.py") + f":smoke=True,pretrained={mae_workdir}",
                           ["--config.mesh.data=1", "--config.eval.num_samples=8", override])

    with pytest.raises(UserError, match=r"task\.pretrained.*encoder/blocks_0/.*shape"):
        tasks.build(config_with("--config.model.mlp_dim=64"))
    with pytest.raises(UserError, match=r"model\.attention='factorised_encoder'.*task\.pretrained"):
        tasks.validate(config_with("--config.model.attention=factorised_encoder"))
