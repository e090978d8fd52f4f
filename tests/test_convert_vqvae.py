"""`genjax convert --from diffusers --model vqvae`: a diffusers `VQModel` folder (random weights,
save_pretrained) -> orbax + config.json -> the same codes and decoder output as diffusers."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from genjax import cli
from genjax.convert import load_converted
from tests.models.test_vqvae import _diffusers_vqmodel


@pytest.mark.slow  # ~7 s; fast counterparts: tests/models/test_vqvae.py::test_vqvae_matches_diffusers_vqmodel
# (the same load_diffusers) and tests/test_convert.py (the generic converter, on DiT)
def test_convert_vqmodel_folder_round_trip_matches_diffusers(tmp_path):
    ref = _diffusers_vqmodel(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3,
                             num_vq_embeddings=16, norm_num_groups=4)
    src, out = tmp_path / "vqmodel", str(tmp_path / "converted")
    ref.save_pretrained(src)  # safetensors + config.json, as on the Hub
    assert cli.main(["convert", "--from", "diffusers", "--model", "vqvae", str(src), "--out", out]) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["family"] == "vqvae" and saved["kwargs"]["num_codes"] == 16
    module, params = load_converted(out)
    assert not module.use_ema and module.norm_num_groups == 4
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        h = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latents
        _, _, (_, _, idx_ref) = ref.quantize(h)
        recon_ref = ref.decode(h).sample.numpy().transpose(0, 2, 3, 1)
    recon, idx, _ = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), idx_ref.numpy().reshape(-1))
    np.testing.assert_allclose(np.asarray(recon), recon_ref, atol=1e-4, rtol=0)
