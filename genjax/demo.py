"""`genjax demo`: train a text-to-video Sora stack on Moving MNIST made from real MNIST digits.

    genjax demo [--config configs/demo_moving_mnist.py[:ARG]] [--workdir runs/demo]
                [--steps-scale S] [--smoke] [--config.SECTION.FIELD=VALUE ...]

Stages, in the latent-diffusion order (Rombach et al. 2022; Sora report, Brooks et al. 2024), each
in its own folder WORKDIR/<stage>/ with config.json, checkpoints/, metrics.jsonl, loss.png and a
`done.json` (its step count and CPU / wall seconds) once finished — a re-run skips a done stage,
and an interrupted one resumes from its newest checkpoint (`configs/demo_moving_mnist.py`). Each
stage folder's `stage.json` holds a fingerprint of its config section and of the stages it is
trained on; a re-run with another config (another --steps-scale, an override) stops with a
one-line error before anything trains instead of reusing or resuming a stale stage:

  1. vae   causal video VAE (genjax trainer, model.name "video_vae")
  2. text  CLIP text encoder trained contrastively on (video, caption) pairs (trainer, "clip"),
           frozen afterwards
  3. dit   video DiT (trainer, "video_dit") on the frozen VAE's latents (encoded once into the
           latent cache dit/latents/), conditioned on the frozen text tower's token states
  4. sample + evaluate: the DiT task's `sample_fn` (DDIM with classifier-free guidance) for the
     config's prompts ->
     WORKDIR/samples/*.gif, *.mp4, contact_sheet.png, WORKDIR/samples.npz; the digit classifier
     (`genjax.eval.evaluate.evaluate_videos`) and the VAE's reconstruction PSNR / SSIM on test
     videos -> WORKDIR/eval.json, printed at the end.

`--steps-scale S` multiplies every stage's steps (better samples); `--smoke` uses tiny models and
a few steps (tests/test_demo.py). `--config FILE.py:ARG` picks another demo-style config (sections
vae / text / dit / sample, args `steps_scale` and `smoke`), e.g. `configs/demo_moving_mnist_large.py`
for one GPU / TPU host; a relative FILE not found from the current folder is looked up in the
genjax checkout (where `configs/` sits beside the package).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time

import numpy as np

from genjax.errors import check
from genjax.io import fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: configs/ is here
CONFIG = os.path.join(ROOT, "configs", "demo_moving_mnist.py")
SECTIONS = ("vae", "text", "dit", "sample")
STAGE_FILE = "stage.json"  # a stage folder's config fingerprint, written before it trains


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (seconds)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plot_losses(metrics_path: str, out: str, title: str) -> str:
    """Training loss against step from a metrics.jsonl -> PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path) as f:
        records = [r for r in (json.loads(line) for line in f if line.strip()) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    # a non-finite loss is null in metrics.jsonl (strict JSON): a gap in the curve
    ax.plot([r["step"] for r in records], [np.nan if r["loss"] is None else r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with fs.atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def stage_done(stage_dir: str, num_steps: int) -> dict | None:
    """The stage's done.json record if it finished `num_steps` (or more) steps, else None."""
    path = os.path.join(stage_dir, "done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done if done.get("num_steps", 0) >= num_steps else None


def stage_fingerprint(section, upstream: str = "") -> str:
    """A short hash of a stage's config section (JSON, sorted keys) and of the fingerprint of the
    stage it is trained on (its inputs): equal fingerprints = the same training run."""
    blob = json.dumps(section.to_dict(), sort_keys=True, default=str) + upstream
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_stage(name: str, stage_dir: str, fingerprint: str) -> None:
    """Refuse to reuse or resume a stage folder trained with another config or on other upstream
    stages (its stage.json fingerprint differs, or it holds files but no stage.json).

    Raises:
      UserError: naming the workdir and the stage; nothing is changed on disk.
    """
    path = os.path.join(stage_dir, STAGE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            same = json.load(f).get("fingerprint") == fingerprint
    else:
        same = not (os.path.isdir(stage_dir) and os.listdir(stage_dir))
    check(same, "--workdir", os.path.dirname(stage_dir),
          f"its {name} stage was trained with another config (or on other earlier stages); use a "
          f"new --workdir, or delete {stage_dir} to retrain it")


def run_stage(name: str, stage_dir: str, num_steps: int, train, fingerprint: str) -> dict:
    """Run `train()` unless the stage is done; write stage.json (the fingerprint, first),
    done.json and loss.png. Returns the record `{"stage", "num_steps", "cpu_seconds",
    "wall_seconds", "skipped"}`."""
    check_stage(name, stage_dir, fingerprint)
    done = stage_done(stage_dir, num_steps)
    if done is not None:
        print(f"  {name}: done earlier ({done['num_steps']} steps), skipped")
        return {**done, "skipped": True}
    os.makedirs(stage_dir, exist_ok=True)
    fs.write_json(os.path.join(stage_dir, STAGE_FILE), {"stage": name, "fingerprint": fingerprint})
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    train()
    record = {"stage": name, "num_steps": num_steps, "cpu_seconds": round(cpu_seconds() - cpu0, 1),
              "wall_seconds": round(time.perf_counter() - wall0, 1)}
    plot_losses(os.path.join(stage_dir, "metrics.jsonl"), os.path.join(stage_dir, "loss.png"),
                f"{name} on Moving MNIST")
    fs.write_json(os.path.join(stage_dir, "done.json"), record, indent=2)
    print(f"  {name}: {num_steps} steps in {record['cpu_seconds']:.0f} s CPU, "
          f"{record['wall_seconds']:.0f} s wall")
    return {**record, "skipped": False}


# --------------------------------------------------------------------------- stage 3: video DiT

def dit_stage_config(config, dirs: dict[str, str]):
    """The `dit` section as a `genjax train` config of task "video_dit": the frozen VAE and text
    stages as task.vae / task.text_encoder, and task.latent_scale = 1 / std of the VAE's latents
    (`tasks.video_dit.latent_scale_of`, LDM App. D.1) when the section leaves it 0."""
    from genjax.tasks import video_dit

    c = config.dit.copy_and_resolve_references()
    c.unlock()
    c.task.update(vae=dirs["vae"], text_encoder=dirs["text"])
    if not c.task.latent_scale:
        c.task.latent_scale = video_dit.latent_scale_of(c)
    return c


# --------------------------------------------------------------------------- sample + evaluate

def sample_and_evaluate(workdir: str, config, *, classifier_cache: str | None = None) -> dict:
    """Samples for `config.sample.prompts` (the DiT stage's task `sample_fn`) -> WORKDIR/samples/
    and samples.npz; evaluation -> WORKDIR/eval.json. Returns the evaluation dict."""
    import jax

    from genjax import tasks
    from genjax.eval import digit_classifier, evaluate
    from genjax.io import media

    s = config.sample
    dit_config, task, params = tasks.restore(os.path.join(workdir, "dit"))
    prompts = [p for p in s.prompts for _ in range(s.samples_per_prompt)]
    videos = np.asarray(task.sample_fn(params, jax.random.PRNGKey(s.seed), prompts, sampler=s.sampler,
                                       num_steps=s.num_steps, cfg_scale=s.cfg_scale))
    out = os.path.join(workdir, "samples")
    os.makedirs(out, exist_ok=True)
    media.write_outputs(os.path.join(workdir, "samples.npz"), videos, prompts)
    for p in s.prompts:
        stem = os.path.join(out, p.replace(" ", "_"))
        chosen = videos[[i for i, q in enumerate(prompts) if q == p]]
        media.write_gif(stem + ".gif", chosen, captions=[p] * len(chosen))
        media.write_mp4(stem + ".mp4", chosen, captions=[p] * len(chosen))
    media.write_png_grid(os.path.join(out, "contact_sheet.png"), videos, captions=prompts)

    d = dit_config.data
    ref_kw = dict(num_frames=d.num_frames, image_size=d.image_size, num_digits=d.get("num_digits", 1))
    reference = None if s.num_reference < 2 else evaluate.reference_videos(
        "moving_mnist:test", s.num_reference, **ref_kw)
    clf = digit_classifier.load_or_train(classifier_cache)
    digits = np.array([evaluate.prompted_digit(p) for p in prompts])
    try:
        result = evaluate.evaluate_videos(videos, digits, classifier_params=clf, reference_videos=reference)
    except ValueError as e:  # sqrtm of near-singular covariances (few videos): report, do not fail
        print(f"  Frechet distance not computed: {e}")
        result = evaluate.evaluate_videos(videos, digits, classifier_params=clf)
    if reference is None:  # too few for a Frechet distance: reconstruct a handful of test clips
        reference = evaluate.reference_videos("moving_mnist:test", 2, **ref_kw)
    vae, vae_params = tasks.load_frozen(dit_config.task.vae, family_name="video_vae")

    @jax.jit
    def reconstruct(x):
        return vae.apply({"params": vae_params}, x, sample_posterior=False)[0]

    result["vae_reconstruction"] = evaluate.reconstruction_metrics(reconstruct, reference)
    result["prompts"] = list(s.prompts)
    fs.write_json(os.path.join(workdir, "eval.json"), result, indent=2, default=float)
    return result


def config_spec(spec: str | None, *, steps_scale: float | None = None, smoke: bool = False) -> str:
    """`FILE.py[:ARG]` for `load_config`: FILE resolved (as given if it exists, else relative to
    the checkout; default `CONFIG`), ARG extended with `steps_scale=S` / `smoke=True`.

    Raises:
      UserError: steps_scale <= 0, or no such config file (named as given).
    """
    path, _, arg = (spec or CONFIG).partition(":")
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    check(os.path.isfile(path), "--config", path, "no such config file (a demo config, e.g. "
          "configs/demo_moving_mnist_large.py)")
    extra = []
    if steps_scale is not None:
        check(steps_scale > 0, "--steps-scale", steps_scale, "must be > 0")
        extra.append(f"steps_scale={steps_scale}")
    if smoke:
        extra.append("smoke=True")
    arg = ",".join(a for a in (arg, *extra) if a)
    return f"{path}:{arg}" if arg else path


def main(args) -> int:
    """`genjax demo`: run the stages, then sample and evaluate; prints where everything is.

    Raises:
      UserError (before anything trains): see `config_spec`; a config that fails to load (an
        unknown arg, a bad override) or lacks the sections vae, text, dit, sample; a --workdir
        that is a file or cannot be written. Later: an output that cannot be written (full
        disk), naming it (every file is written to a temporary name and renamed into place).
    """
    from genjax.config import load_config
    from genjax.train import trainer

    spec = config_spec(getattr(args, "config", None), steps_scale=getattr(args, "steps_scale", 1.0),
                       smoke=getattr(args, "smoke", False))
    config = load_config(spec, getattr(args, "overrides", None) or ())
    missing = [k for k in SECTIONS if k not in config]
    check(not missing, "--config", spec, f"is not a demo config: it lacks the sections {missing}")
    workdir = os.path.abspath(args.workdir)
    fs.check_writable_dir(workdir, "--workdir")
    dirs = {name: os.path.join(workdir, name) for name in ("vae", "text", "dit")}
    fingerprints = {"vae": stage_fingerprint(config.vae)}
    fingerprints["text"] = stage_fingerprint(config.text)
    fingerprints["dit"] = stage_fingerprint(config.dit, fingerprints["vae"] + fingerprints["text"])
    for name in dirs:  # all three before anything trains
        check_stage(name, dirs[name], fingerprints[name])
    cpu0, wall0 = cpu_seconds(), time.perf_counter()

    print(f"[1/4] video VAE on Moving MNIST ({config.vae.num_steps} steps) -> {dirs['vae']}")
    stages = [run_stage("vae", dirs["vae"], config.vae.num_steps,
                        lambda: trainer.main(config.vae, dirs["vae"]), fingerprints["vae"])]
    print(f"[2/4] text encoder: CLIP on (video, caption) pairs ({config.text.num_steps} steps) -> {dirs['text']}")
    stages.append(run_stage("text", dirs["text"], config.text.num_steps,
                            lambda: trainer.main(config.text, dirs["text"]), fingerprints["text"]))
    print(f"[3/4] video DiT on VAE latents with text conditioning ({config.dit.num_steps} steps) -> {dirs['dit']}")
    stages.append(run_stage("dit", dirs["dit"], config.dit.num_steps,
                            lambda: trainer.main(dit_stage_config(config, dirs), dirs["dit"]), fingerprints["dit"]))
    print(f"[4/4] sample {len(config.sample.prompts)} prompts x {config.sample.samples_per_prompt} "
          f"({config.sample.sampler}-{config.sample.num_steps}, cfg {config.sample.cfg_scale}) and evaluate")
    result = sample_and_evaluate(workdir, config, classifier_cache=getattr(args, "classifier_cache", None))
    result["stages"] = stages
    fs.write_json(os.path.join(workdir, "eval.json"), result, indent=2, default=float)

    print(f"\nDone in {cpu_seconds() - cpu0:.0f} s CPU, {time.perf_counter() - wall0:.0f} s wall. "
          f"Everything is in {workdir}:")
    for name in ("samples/", "samples/contact_sheet.png", "samples.npz", "samples.gif", "samples.mp4",
                 "eval.json", "vae/loss.png", "text/loss.png", "dit/loss.png",
                 "vae/metrics.jsonl", "text/metrics.jsonl", "dit/metrics.jsonl"):
        print(f"  {os.path.join(workdir, name)}")
    for st in stages:
        print(f"  stage {st['stage']}: {st['num_steps']} steps, {st['cpu_seconds']:.0f} s CPU"
              + (" (earlier run)" if st["skipped"] else ""))
    rec = result["vae_reconstruction"]
    if result["per_digit_accuracy"]:
        print("Digit accuracy (prompted digit recognised, single-digit prompts): "
              f"{result['digit_accuracy']:.1%}")
        print("  per digit: " + " ".join(f"{k}:{v:.0%}" for k, v in result["per_digit_accuracy"].items()))
    else:
        print("Digit accuracy: not defined (no single-digit prompts)")
    print(f"Temporal consistency {result['temporal_consistency']:.1%}, motion "
          f"{result['motion']:.2f} px/frame, Frechet distance to test videos "
          f"{result.get('frechet_distance', float('nan')):.2f}")
    print(f"VAE reconstruction on test videos: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f}")
    return 0
