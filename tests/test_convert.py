"""`genjax convert`: diffusers weights -> orbax + config.json -> the same forward."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel

import jax.numpy as jnp

from genjax import cli
from genjax.convert import convert, load_converted
from genjax.errors import UserError


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
        # Real checkpoints hold one timestep/label embedder, copied into every block.
        emb0 = ref.transformer_blocks[0].norm1.emb.state_dict()
        for block in ref.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb0)
    folder = tmp_path_factory.mktemp("dit_diffusers")
    ref.save_pretrained(folder)  # safetensors + config.json, as on the Hub
    return str(folder), ref


def test_convert_round_trip_matches_diffusers(dit_folder, tmp_path):
    src, ref = dit_folder
    out = str(tmp_path / "dit")
    assert cli.main(["convert", "--from", "diffusers", "--model", "dit", src, "--out", out]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["family"] == "dit"
    module, params = load_converted(out)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3, 700], np.int32)
    y = np.array([1, 9], np.int32)
    ours = np.asarray(module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(t),
                     class_labels=torch.from_numpy(y).long()).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_convert_refuses_nonempty_out_and_wrong_family(dit_folder, tmp_path, capsys):
    src, _ = dit_folder
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--out"):
        convert("dit", src, str(out))
    assert (out / "keep.txt").read_text() == "mine"
    # A DiT state dict read as a VAE: one line naming a key, exit code 2.
    assert cli.main(["convert", "--model", "vae", src, "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key" in err[0]
