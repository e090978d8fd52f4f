"""Wan denoising loop, tiny random transformer: genjax's one compiled loop vs diffusers in torch eager.

ours: `samplers.sample(cfg_denoiser(WanTransformer), noise, sampler="euler", flow_shift=3)` under
  one `jax.jit` (a `lax.scan`; the classifier-free-guidance batch of 2 per call, as
  `tasks.diffusion.generate` runs it), compiled ahead of time (not timed).
reference: diffusers `FlowMatchEulerDiscreteScheduler(shift=3)` stepping `WanTransformer3DModel`
  in eager mode under `torch.no_grad()`, cond and uncond as two calls per step (as `WanPipeline`).
Same weights (`wan.load_diffusers` of the torch state dict), same noise, text embeddings and
negative embeddings; the final latents must agree to --tol relative to their max |x|.
Reported: wall seconds per denoising step (loop time / num_steps), median over --repeats, and
torch / jax. `--record` is refused on a loaded machine (`common.check_quiet`: 1-minute load above
half the cores; such a figure is not a result).

    .venv/bin/python benchmarks/wan_step.py [--record]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/wan_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

TITLE = "Wan 2.1 denoising loop, tiny random transformer (issue 16)"


def main(argv: list[str] | None = None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=3, help="latent frames")
    parser.add_argument("--size", type=int, default=16, help="latent side")
    parser.add_argument("--text-length", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--tol", type=float, default=1e-3, help="max relative difference of the final latents")
    args = parser.parse_args(argv)
    context = common.start(args)

    import jax
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from genjax.diffusion import guidance, samplers, schedules
    from genjax.models import wan

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=4,
               out_channels=4, text_dim=64, freq_dim=64, ffn_dim=4 * args.heads * args.head_dim,
               num_layers=args.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
               rope_max_seq_len=64)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module, params = wan.load_diffusers({k: v.numpy() for k, v in ref.state_dict().items()},
                                        num_attention_heads=args.heads, rope_max_seq_len=64)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, args.frames, args.size, args.size, 4)).astype(np.float32)
    text = rng.standard_normal((1, args.text_length, 64)).astype(np.float32)
    negative = rng.standard_normal((1, args.text_length, 64)).astype(np.float32)
    schedule = schedules.make("flow")
    shift = 3.0

    @jax.jit
    def sample_jax(params, noise, text, negative):
        def denoise(x_t, t, text):
            return module.apply({"params": params}, x_t, t, text)

        guided = guidance.cfg_denoiser(denoise, args.cfg_scale, null_cond={"text": negative})
        return samplers.sample(guided, noise, schedule=schedule, sampler="euler", num_steps=args.num_steps,
                               cond={"text": text}, flow_shift=shift)

    compiled = sample_jax.lower(params, noise, text, negative).compile()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    x_torch = torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy())
    text_t, negative_t = torch.from_numpy(text), torch.from_numpy(negative)
    with torch.no_grad():  # warm-up: one eager forward
        ref(x_torch, torch.zeros(1), text_t)
    out: dict[str, np.ndarray] = {}

    def run_jax():
        out["jax"] = np.asarray(compiled(params, noise, text, negative).block_until_ready())

    def run_torch():
        scheduler.set_timesteps(args.num_steps)
        x = x_torch
        with torch.no_grad():
            for t in scheduler.timesteps:
                cond = ref(x, t.expand(1), text_t).sample
                uncond = ref(x, t.expand(1), negative_t).sample
                x = scheduler.step(uncond + args.cfg_scale * (cond - uncond), t, x).prev_sample
        out["torch"] = x.permute(0, 2, 3, 4, 1).numpy()

    times = common.time_interleaved({"jax": run_jax, "torch": run_torch}, args.repeats)
    diff = common.check_agree("final latents", out["jax"], out["torch"], args.tol)
    jax_step = common.median(times["jax"]) / args.num_steps
    torch_step = common.median(times["torch"]) / args.num_steps
    tokens = args.frames * (args.size // 2) ** 2
    result = {"jax_s_per_step": jax_step, "torch_s_per_step": torch_step, "ratio": torch_step / jax_step,
              "max_rel_diff": diff, "times": times, "num_steps": args.num_steps}
    rows = [("genjax s/step (one jitted scan, CFG batch 2)", f"{jax_step:.4f}"),
            ("torch s/step (eager, no_grad, 2 calls)", f"{torch_step:.4f}"),
            ("ratio torch / genjax", f"{torch_step / jax_step:.2f}"),
            *common.cpu_rows(times),
            ("max rel. diff of final latents", f"{diff:.1e}"),
            ("steps x repeats", f"{args.num_steps} x {args.repeats}"),
            ("sizes", f"{args.num_layers} layers, {args.heads} x {args.head_dim} heads, {tokens} video tokens "
                      f"({args.frames}x{args.size}x{args.size}x4 latents), {args.text_length} text tokens, float32")]
    return common.finish("wan_step", TITLE, args, argv, context, result, rows)


if __name__ == "__main__":
    main()
