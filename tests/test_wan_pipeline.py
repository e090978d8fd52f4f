"""Wan 2.1 text-to-video end to end (issue 16): a tiny random diffusers `WanPipeline` (umT5, tokenizer,
transformer, VAE, FlowMatchEulerDiscreteScheduler with shift) saved with save_pretrained ->
`genjax convert --model wan` -> `genjax sample ... --out clip.mp4`, against `WanPipeline` run from the
same initial latents, prompt, negative prompt, steps and guidance: every pixel within one uint8 level.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch

from genjax import cli
from genjax.convert import convert
from genjax.errors import UserError
from genjax.io import media

torch.set_num_threads(1)
T5 = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
          relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
# Wan's own VAE factors (8 spatial, 4 temporal), tiny widths: the slow test. The fast one uses a
# 2 x 2 VAE (told to WanPipeline by scale_factor_*), which compiles in half the time.
WAN_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
               latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
SMALL_VAE = dict(WAN_VAE, dim_mult=[1, 2], temperal_downsample=[True], scale_factor_spatial=2,
                 scale_factor_temporal=2)
SHIFT, STEPS, CFG, SEED = 3.0, 4, 5.0, 0
PROMPT, NEGATIVE = "the cat sat on the mat", "a dog ran"


def _tokenizer(folder):
    """The tiny Unigram tokenizer of tests/models/test_t5.py, as the pipeline's tokenizer."""
    import pathlib

    from transformers import PreTrainedTokenizerFast

    from tests.models.test_t5 import _tiny_tokenizer_file

    os.makedirs(folder, exist_ok=True)
    return PreTrainedTokenizerFast(tokenizer_file=_tiny_tokenizer_file(pathlib.Path(folder)), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def _perturbed(model, scale):
    with torch.no_grad():  # no zero-init (biases, gates) or unit-init (norms) may hide a mistake
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _pipeline(root, vae):
    """(WanPipeline, its save_pretrained folder) of tiny random weights."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    pipe = WanPipeline(tokenizer=_tokenizer(str(root / "tok")),
                       text_encoder=_perturbed(UMT5EncoderModel(UMT5Config(**T5)), 0.3),
                       vae=_perturbed(AutoencoderKLWan(**vae), 0.05),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
                       transformer=_perturbed(WanTransformer3DModel(**TRANSFORMER), 0.1))
    pipe.set_progress_bar_config(disable=True)
    folder = root / "Wan-tiny-Diffusers"
    pipe.save_pretrained(folder)
    return pipe, str(folder)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _pipeline(tmp_path_factory.mktemp("wan_small"), SMALL_VAE)


def _reference(pipe, noise, frames, size, **kw):
    """WanPipeline's video from x_T `noise` (N, t, h, w, C) channels-last, as uint8 (N, T, H, W, 3)."""
    with torch.no_grad():
        video = pipe(latents=torch.from_numpy(np.asarray(noise).transpose(0, 4, 1, 2, 3).copy()), output_type="np",
                     height=size, width=size, num_frames=frames, num_inference_steps=STEPS, **kw).frames
    return media.to_uint8(np.asarray(video, np.float32) * 2 - 1)  # [0, 1] -> [-1, 1] -> uint8, as genjax


def _compare(ours, want, shape):
    diff = np.abs(ours.astype(int) - want.astype(int))
    print(f"max |uint8 diff| vs WanPipeline: {diff.max()}, pixels differing: {(diff > 0).mean():.4f}, "
          f"pixel std {want.std():.1f}")
    assert ours.shape == want.shape == shape
    assert want.std() > 5  # a real video, not a flat clamp
    assert diff.max() <= 1


def test_convert_and_sample_cli_match_wan_pipeline(pipeline, tmp_path, capsys):
    """The CLI path: convert, then `genjax sample ... --out clip.mp4` with a negative prompt and CFG."""
    pipe, folder = pipeline
    out = str(tmp_path / "wan")
    assert cli.main(["convert", "--from", "diffusers", "--model", "wan", folder, "--out", out]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["family"] == "wan" and config["scheduler"]["flow_shift"] == SHIFT
    from genjax.tasks import wan

    assert wan.converted_config(out).eval.sampler == "euler"  # the pipeline's FlowMatchEulerDiscreteScheduler
    assert os.path.islink(os.path.join(out, "text_encoder", "config.json"))  # the umT5 is linked, not copied
    clip = str(tmp_path / "clip.mp4")
    assert cli.main(["sample", "--workdir", out, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--num", "1",
                     "--frames", "5", "--height", "16", "--width", "16", "--steps", str(STEPS), "--cfg-scale",
                     str(CFG), "--seed", str(SEED), "--out", clip]) == 0
    assert os.path.getsize(clip) > 0 and os.path.isfile(str(tmp_path / "clip.gif"))
    ours = np.load(str(tmp_path / "clip.npz"))["videos"]
    # generate's documented draw: x_T = normal(split(PRNGKey(seed))[0], (N, t, h, w, C))
    noise = np.asarray(jax.random.normal(jax.random.split(jax.random.PRNGKey(SEED))[0], (1, 3, 8, 8, 4)))
    want = _reference(pipe, noise, 5, 16, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG)
    with capsys.disabled():  # show the figure with -s
        _compare(ours, want, (1, 5, 16, 16, 3))
    base = ["sample", "--workdir", out, "--prompt", PROMPT, "--num", "1", "--steps", "1"]
    for extra, message in ((["--frames", "4", "--height", "16", "--width", "16"], "num_frames=4: must be 1 + 2 k"),
                           (["--frames", "5", "--height", "10", "--width", "16"], "height=10: must be a positive "
                            "multiple of 4"), (["--vae", out], "do not apply to a converted Wan")):
        assert cli.main(base + extra + ["--out", str(tmp_path / "bad.mp4")]) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad.npz")


@pytest.mark.slow
def test_wan_factors_given_noise_default_negative_and_no_guidance_match_wan_pipeline(tmp_path):
    """Wan's own VAE factors (T = 1 + 4k, 8x): sample_fn with explicit initial noise, the default
    negative prompt "" and, at cfg_scale <= 1, no guidance (WanPipeline's rule); two prompts; the
    UniPC sampler against UniPCMultistepScheduler; bfloat16 close to float32."""
    from genjax import sample

    pipe, folder = _pipeline(tmp_path, WAN_VAE)
    out = convert("wan", folder, str(tmp_path / "wan"))
    _, task, params = sample.restore(out, vae=None, image_size=None)
    prompts = [PROMPT, "a cat ran on the mat"]
    noise = np.random.default_rng(1).standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    kw = dict(num_steps=STEPS, num_frames=9, height=32, width=32, noise=noise)
    for cfg in (CFG, 1.0):
        ours = np.asarray(task.sample_fn(params, jax.random.PRNGKey(5), prompts, cfg_scale=cfg, **kw))
        _compare(ours, _reference(pipe, noise, 9, 32, prompt=prompts, guidance_scale=cfg), (2, 9, 32, 32, 3))
        if cfg == CFG:
            full = ours
    from diffusers import UniPCMultistepScheduler  # the scheduler of the Wan2.1 Diffusers folders

    pipe.scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=SHIFT, prediction_type="flow_prediction")
    ours = np.asarray(task.sample_fn(params, jax.random.PRNGKey(5), prompts, cfg_scale=CFG, sampler="unipc", **kw))
    _compare(ours, _reference(pipe, noise, 9, 32, prompt=prompts, guidance_scale=CFG), (2, 9, 32, 32, 3))
    _, task16, params16 = sample.restore(out, vae=None, image_size=None, dtype="bfloat16")
    assert jax.tree.leaves(params16)[0].dtype == jax.numpy.bfloat16
    half = np.asarray(task16.sample_fn(params16, jax.random.PRNGKey(5), prompts, cfg_scale=CFG, **kw))
    diff = np.abs(half.astype(int) - full.astype(int))
    print(f"bfloat16 transformer + umT5 vs float32: max |uint8 diff| {diff.max()}, mean {diff.mean():.2f}")
    assert 0 < diff.mean() < 4  # bf16 really ran, and stays close


def test_convert_refuses_bad_pipelines(pipeline, tmp_path):
    _, folder = pipeline
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--out"):
        convert("wan", folder, str(busy))
    assert (busy / "keep.txt").read_text() == "mine"

    def fake(name, index=None, transformer=None, drop=()):
        root = tmp_path / name
        for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if sub not in drop:
                (root / sub).mkdir(parents=True)
        (root / "model_index.json").write_text(json.dumps(index or {"_class_name": "WanPipeline"}))
        if "transformer" not in drop:
            (root / "transformer" / "config.json").write_text(json.dumps(transformer or {}))
        return str(root)

    with pytest.raises(UserError, match="has no scheduler/ subfolder"):
        convert("wan", fake("no_sched", drop=("scheduler",)), str(tmp_path / "a"))
    with pytest.raises(UserError, match="image-to-video"):
        convert("wan", fake("i2v", transformer={"image_dim": 1280}), str(tmp_path / "b"))
    with pytest.raises(UserError, match="WanImageToVideoPipeline"):
        convert("wan", fake("i2v_index", index={"_class_name": "WanImageToVideoPipeline"}), str(tmp_path / "c"))
    with pytest.raises(UserError, match="model_index.json"):
        convert("wan", str(tmp_path / "busy"), str(tmp_path / "d"))
    assert not any(p.name in "abcd" or p.name.endswith(".partial") for p in tmp_path.iterdir())  # nothing written

    from genjax.convert import wan_scheduler

    sched = tmp_path / "s" / "scheduler"
    sched.mkdir(parents=True)
    for cfg, want in (({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 5.0,
                        "prediction_type": "flow_prediction"}, {"class": "UniPCMultistepScheduler", "flow_shift": 5.0}),
                      ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 900},
                       {"flow_shift": 3.0, "num_train_timesteps": 900}),
                      ({"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0}, "use_flow_sigmas=true"),
                      ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "dynamic"),
                      ({"_class_name": "DDIMScheduler"}, "want FlowMatchEulerDiscreteScheduler")):
        (sched / "scheduler_config.json").write_text(json.dumps(cfg))
        if isinstance(want, str):
            with pytest.raises(UserError, match=want):
                wan_scheduler(str(tmp_path / "s"))
        else:
            assert want.items() <= wan_scheduler(str(tmp_path / "s")).items()
