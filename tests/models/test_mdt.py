"""MDT (`genjax.models.mdt`, task "mdt"): the masking and the side-interpolator as exact properties
of the MDTv2 forward (sail-sg/MDT `models.py`), and one end-to-end run through the trainer and
`genjax sample`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genjax.errors import UserError
from genjax.models import mdt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(**kw):
    return mdt.MDT(**{**dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                             num_classes=10, decode_layers=2, learn_sigma=False), **kw})


def _random_params(model, x, t, y, seed=0):
    """Params with every leaf random (adaLN-Zero's zero init would make the output constant)."""
    @jax.jit
    def init(key):
        leaves, tree = jax.tree.flatten(model.init(key, x, t, y)["params"])
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])

    return init(jax.random.key(seed))


def _inputs():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    return x, jnp.array([10, 700]), jnp.array([3, 7])


def test_masked_branch_at_ratio_zero_is_the_full_branch():
    """With nothing masked the shuffle is undone exactly and the masked shortcut keeps every input
    of the side-interpolator, so the masked branch computes the full branch."""
    model = _model(mask_ratio=0.0)
    x, t, y = _inputs()
    params = {"params": _random_params(model, x, t, y)}
    apply = jax.jit(model.apply, static_argnames="enable_mask")
    full = apply(params, x, t, y)
    masked = apply(params, x, t, y, enable_mask=True, rngs={"mask": jax.random.key(5)})
    assert float(jnp.max(jnp.abs(full))) > 1e-2
    np.testing.assert_allclose(masked, full, atol=2e-5, rtol=2e-5)


def test_side_interpolator_never_reads_a_masked_patch():
    """Without decoder blocks (whose long skip is the whole input, as in the official code), the
    masked branch's output depends on the kept patches only: the gradient with respect to exactly
    round(L * mask_ratio) patches is zero and the others' is not."""
    model = _model(depth=2, decode_layers=0, mask_ratio=0.5)
    x, t, y = _inputs()
    params = {"params": _random_params(model, x, t, y)}

    def out(x):
        return jnp.sum(model.apply(params, x, t, y, enable_mask=True, rngs={"mask": jax.random.key(3)}) ** 2)

    g = np.asarray(jax.jit(jax.grad(out))(x))  # (2, 8, 8, 1) -> per patch (2, 16)
    per_patch = np.abs(g).reshape(2, 4, 2, 4, 2).sum(axis=(2, 4)).reshape(2, 16)
    for b in range(2):
        assert np.sum(per_patch[b] == 0) == 8, per_patch[b]
        assert np.all(per_patch[b][per_patch[b] != 0] > 1e-8)
    full = jax.jit(jax.grad(lambda x: jnp.sum(model.apply(params, x, t, y) ** 2)))(x)
    assert np.all(np.abs(np.asarray(full)).reshape(2, 4, 2, 4, 2).sum(axis=(2, 4)) > 0)


def test_bad_decode_layers_is_one_line():
    x, t, y = _inputs()
    with pytest.raises(UserError, match="decode_layers"):
        _model(depth=4, decode_layers=1).init(jax.random.key(0), x, t, y)


def test_mdt_trains_through_the_trainer_and_samples(tmp_path):
    """configs/dit_mnist.py:mdt=True (smoke): the loss is the full plus the masked branch's, both
    logged; `genjax sample --class-label` draws from the full branch."""
    import json

    from genjax import cli
    from genjax.config import load_config
    from genjax.train import trainer

    config = load_config(os.path.join(ROOT, "configs", "dit_mnist.py") + ":smoke=True,mdt=True,steps=2",
                         ["--config.mesh.data=1"])
    assert config.model.name == "mdt"
    workdir = str(tmp_path / "mdt")
    trainer.main(config, workdir, devices=jax.devices()[:1])
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["loss"] == pytest.approx(r["full_loss"] + r["masked_loss"], rel=1e-5)
    out = str(tmp_path / "s.npz")
    assert cli.main(["sample", "--workdir", workdir, "--class-label", "7", "--num", "2", "--steps", "2",
                     "--out", out]) == 0
    with np.load(out) as f:
        assert f["images"].shape == (2, 28, 28, 1) and f["images"].dtype == np.uint8
