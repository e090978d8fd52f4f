"""Bad-input catalogue rows: the public packing and sampler APIs (issue 21), called as a user's
script would. Every row fails at the argument checks, before any packing or compiled step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.bad_inputs import Case


def _pack(videos, **kwargs):
    def run():
        from genjax.data import packing

        args = dict(seq_len=16, patch_size=(1, 2, 2), max_per_seq=4) | kwargs
        return packing.pack(videos, **args)
    return run


def _best_fit(num_tokens, **kwargs):
    def run():
        from genjax.data import packing

        return packing.best_fit_bins(num_tokens, **(dict(seq_len=8, max_per_seq=2) | kwargs))
    return run


def _unpatchify(tokens, grid):
    def run():
        from genjax.data import packing

        return packing.unpatchify_video(tokens, grid, (1, 2, 2))
    return run


def _denoise(x, t, **cond):
    return x


def _sample(**kwargs):
    def run():
        import jax.numpy as jnp

        from genjax.diffusion import samplers, schedules

        args = dict(schedule=schedules.make("linear", 100), num_steps=5) | kwargs
        return samplers.sample(_denoise, jnp.zeros((1, 4, 4, 1)), **args)
    return run


def _sdedit(**kwargs):
    def run():
        import jax
        import jax.numpy as jnp

        from genjax.diffusion import samplers, schedules

        args = dict(strength=0.5, schedule=schedules.make("linear", 100), num_steps=5,
                    rng=jax.random.key(0)) | kwargs
        return samplers.sdedit(_denoise, jnp.zeros((1, 4, 4, 1)), **args)
    return run


def _flow():
    from genjax.diffusion import schedules

    return schedules.make("flow", 100)


def _cfg(cfg_scale, **kwargs):
    def run():
        from genjax.diffusion import guidance

        return guidance.cfg_denoiser(_denoise, cfg_scale, null_cond={}, **kwargs)
    return run


def cases(workspace: Path) -> list[Case]:
    video = np.zeros((2, 4, 4, 1), np.float32)  # 8 tokens with patch (1, 2, 2)
    return [
        Case("pack seq_len zero", _pack([video], seq_len=0), 2, r"^seq_len=0: must be"),
        Case("pack max_per_seq zero", _pack([video], max_per_seq=0), 2, r"^max_per_seq=0: must be"),
        Case("pack patch_size two entries", _pack([video], patch_size=(2, 2)), 2,
             r"^patch_size=\(2, 2\): must be a \(pt, ph, pw\) tuple of positive ints"),
        Case("pack empty list", _pack([]), 2, r"^videos=0: must hold at least one example"),
        Case("pack video not divisible by patch", _pack([np.zeros((2, 5, 4, 1))]), 2,
             r"^videos\[0\] shape=\(2, 5, 4, 1\): .*divisible"),
        Case("pack video 3-D", _pack([np.zeros((4, 4, 1))]), 2, r"^videos\[0\] shape=\(4, 4, 1\): "),
        Case("pack channels differ", _pack([video, np.zeros((2, 4, 4, 3))]), 2,
             r"^videos\[1\] shape=\(2, 4, 4, 3\): must have C=1 channels like videos\[0\]"),
        Case("pack example longer than seq_len", _pack([np.zeros((8, 4, 4, 1))]), 2,
             r"^videos\[0\] shape=\(8, 4, 4, 1\): has 32 tokens .* more than seq_len=16"),
        Case("pack drop_rate 1", _pack([video], drop_rate=1.0, rng=np.random.default_rng(0)), 2,
             r"^drop_rate=1\.0: "),
        Case("pack dropping without rng", _pack([video], drop_rate=0.5), 2,
             r"^rng=None: must be a numpy Generator when drop_rate is not 0"),
        Case("pack beta drop_rate with a <= 0", _pack([video], drop_rate=("beta", 0, 1), rng=np.random.default_rng(0)),
             2, r"^drop_rate=\('beta', 0, 1\): a distribution must be \('beta', a, b\) with a, b > 0"),
        Case("best_fit_bins example longer than seq_len", _best_fit([3, 9]), 2,
             r"^num_tokens\[1\]=9: must be <= seq_len=8"),
        Case("unpatchify_video wrong token count", _unpatchify(np.zeros((3, 4)), (1, 2, 2)), 2,
             r"^tokens shape=\(3, 4\): must be \(prod\(grid\), pt\*ph\*pw\*C\)"),
        Case("sample unknown sampler", _sample(sampler="dpm++"), 2, r"^sampler='dpm\+\+': must be one of"),
        Case("sample num_steps zero", _sample(num_steps=0), 2, r"^num_steps=0: "),
        Case("sample num_steps above num_timesteps", _sample(num_steps=101), 2, r"^num_steps=101: "),
        Case("sample eta above 1", _sample(eta=1.5), 2, r"^eta=1\.5: must be in \[0, 1\]"),
        Case("sample without schedule", _sample(schedule=None), 2, r"^schedule=None: "),
        Case("sample unknown timestep_spacing", _sample(timestep_spacing="log"), 2,
             r"^timestep_spacing='log': must be one of"),
        Case("sample ddpm without rng", _sample(sampler="ddpm"), 2, r"^rng=None: "),
        Case("sample unknown variance_type", _sample(variance_type="learned"), 2, r"^variance_type='learned': "),
        Case("sdedit strength above 1", _sdedit(strength=2.0), 2, r"^strength=2\.0: must be in \[0, 1\]"),
        Case("sdedit flow_shift zero", _sdedit(schedule=_flow(), sampler="euler", flow_shift=0.0), 2,
             r"^flow_shift=0\.0: must be a finite number > 0"),
        Case("sdedit consistency sampler", _sdedit(sampler="consistency"), 2,
             r"^sampler='consistency': sdedit supports the diffusion samplers only"),
        Case("cfg_denoiser NaN scale", _cfg(float("nan")), 2, r"^cfg_scale=nan: must be a finite number"),
        Case("cfg_denoiser guidance_rescale above 1", _cfg(2.0, guidance_rescale=1.5), 2,
             r"^guidance_rescale=1\.5: must be a number in \[0, 1\]"),
        Case("cfg_denoiser guide_channels zero", _cfg(2.0, guide_channels=0), 2, r"^guide_channels=0: "),
    ]
