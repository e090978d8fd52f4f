"""The `genjax` command: train | sample | eval | convert | data | demo.

Each subcommand has `--help`. User errors (`genjax.errors.UserError`: a missing file, an unknown
config key, a bad value, an unknown dataset) and file-system faults (an `OSError` such as a full
or read-only disk, or a path that is a file: `genjax.io.fs.FS_ERRNOS`) print one line to stderr
and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from genjax.errors import UserError


def _lazy(module: str, func: str = "main"):
    """Run `module.func(args)` importing the module only when the subcommand runs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args) or 0
    return run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="config file and argument, e.g. configs/dit_mnist.py:smoke=True; "
                        "override fields with --config.section.field=value")
    p.add_argument("--workdir", required=True, help="folder for checkpoints, metrics and samples")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genjax",
        description="genjax: the Sora stack in JAX. Train, sample, evaluate, convert weights, "
                    "look at data, run the demo.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config",
                       description="Train a model: genjax train --config configs/X.py:ARGS "
                                   "--workdir DIR [--config.section.field=value ...]")
    _add_config_args(p)
    p.set_defaults(run=_lazy("genjax.train.trainer", "cli_main"))

    p = sub.add_parser("sample", help="generate videos or images from a trained or converted model",
                       description="Text-to-video: genjax sample --workdir W --prompt TEXT [--num N] "
                                   "[--seed S] --out FILE.npz writes videos uint8 (N, T, H, W, C) and "
                                   "prompts to FILE.npz, and FILE.gif / FILE.mp4 beside it. "
                                   "Images: genjax sample --workdir W [--vae V] --class-label Y "
                                   "--out FILE.npz writes images uint8 (N, H, W, C) and class_labels, "
                                   "and FILE.png beside it. Text-to-image (dalle): --prompt TEXT "
                                   "[--temperature T --top-k K --top-p P] writes images and prompts.")
    p.add_argument("--workdir", required=True,
                   help="a `genjax demo` workdir (or its dit/ stage), a `genjax train` run "
                        "(video_dit, dit, unet, dalle) or a `genjax convert` DiT / U-Net / Wan folder")
    p.add_argument("--prompt", action="append", default=[],
                   help="text prompt, e.g. 'digit 3' (repeat for several); text-to-video and text-to-image models")
    p.add_argument("--class-label", action="append", type=int, default=[],
                   help="class id, e.g. 3 or ImageNet 207 (repeat for several; default the first "
                        "ten classes); class-conditional image models")
    p.add_argument("--vae", default=None, help="for a converted latent DiT: the VAE folder "
                   "(`genjax convert --model vae` output or a trained VAE workdir)")
    p.add_argument("--num", type=int, default=4, help="samples per prompt / class label (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz, or .mp4 for a video model (the .npz / .gif / "
                   ".mp4 trio is written either way; refused if it, or the GIF / MP4 / PNG "
                   "beside it, exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's "
                   "eval.num_sampling_steps; 50 for a converted model)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale "
                   "(default: the run's eval.cfg_scale; 4 for a converted model; 1 = no guidance)")
    p.add_argument("--sampler", default=None, help="ddpm | ddim | dpmpp_2m | euler | heun | unipc (flow) "
                   "(`genjax.diffusion.samplers`; default: the run's eval.sampler, ddim for a converted DiT / U-Net, "
                   "the pipeline scheduler's for a converted Wan)")
    p.add_argument("--temperature", type=float, default=None, help="text-to-image (dalle): softmax temperature "
                   "of each token (default: the run's eval.temperature)")
    p.add_argument("--top-k", type=int, default=None, help="dalle: keep the k most likely tokens (0: all; "
                   "default eval.top_k)")
    p.add_argument("--top-p", type=float, default=None, help="dalle: nucleus mass in (0, 1] (default eval.top_p)")
    p.add_argument("--frames", type=int, default=None, help="frames (default: the training clips')")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--init-frame", default=None, help="image file used as the first frame "
                   "(image-to-video)")
    p.add_argument("--negative-prompt", default=None, help="converted Wan: the text guidance steers away "
                   "from (the unconditional branch of classifier-free guidance; default '', as diffusers)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="converted Wan: params and "
                   "compute of the transformer and umT5 (default float32; the VAE stays float32)")
    p.set_defaults(run=_lazy("genjax.sample"))

    p = sub.add_parser("eval", help="evaluate samples or a trained model",
                       description="Evaluate generated digit videos: genjax eval --samples FILE.npz "
                                   "(videos uint8 (N,T,H,W,C), prompts) [--reference moving_mnist:test] "
                                   "[--num-reference N] [--out metrics.json]; prints a table, writes JSON.")
    p.add_argument("--samples", default=None, help=".npz with videos (and prompts); default WORKDIR/samples.npz")
    p.add_argument("--workdir", default=None, help="run folder holding samples.npz")
    p.add_argument("--reference", default="moving_mnist:test",
                   type=lambda s: None if s.lower() == "none" else s,
                   help="real videos for the Frechet distance (moving_mnist:test; 'none' to skip)")
    p.add_argument("--num-reference", type=int, default=500, help="number of reference videos")
    p.add_argument("--out", default=None, help="JSON file (default: <samples>.metrics.json)")
    p.add_argument("--classifier-cache", default=None,
                   help="folder of the digit classifier's cached params (default ~/.cache/genjax)")
    p.set_defaults(run=_lazy("genjax.eval.evaluate"))

    p = sub.add_parser("convert", help="convert reference weights (diffusers) to genjax",
                       description="genjax convert --from diffusers --model dit|vae|unet|vqvae|wan_vae SRC --out DIR; "
                                   "genjax convert --from diffusers --model wan WAN_PIPELINE_FOLDER --out DIR "
                                   "(a diffusers Wan 2.1 text-to-video pipeline: transformer, VAE, umT5 link, "
                                   "scheduler settings)")
    p.add_argument("--from", dest="src_format", default="diffusers", choices=["diffusers"])
    p.add_argument("--model", required=True, choices=["dit", "vae", "unet", "vqvae", "wan", "wan_vae"])
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_lazy("genjax.convert"))

    p = sub.add_parser("data", help="look at a dataset",
                       description="genjax data show NAME --out preview.gif: write a GIF (videos) or "
                                   "PNG grid (images) of real examples with their captions.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    show = data_sub.add_parser("show", help="write a preview GIF / PNG grid of a dataset")
    show.add_argument("name", help="moving_mnist, mnist_embedded, video_folder:PATH, "
                                   "image_folder:PATH, or any TFDS name (mnist, cifar10, ucf101, ...)")
    show.add_argument("--out", required=True, help="output .gif or .png")
    show.add_argument("--num", type=int, default=16, help="number of examples (default 16)")
    show.add_argument("--split", default="train")
    show.add_argument("--data-dir", default=None, help="TFDS data_dir")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="source option, e.g. --set num_frames=20 --set num_digits=2")
    show.set_defaults(run=_lazy("genjax.data.preview"))

    p = sub.add_parser("demo", help="run the main end-to-end job",
                       description="Train the text-to-video stack (video VAE -> text encoder -> "
                                   "video DiT) on Moving MNIST, sample and evaluate, into --workdir "
                                   "(default runs/demo). Finished stages are reused on a re-run. "
                                   "Override config fields with --config.SECTION.FIELD=VALUE.")
    p.add_argument("--config", default=None,
                   help="demo config and argument (default configs/demo_moving_mnist.py; "
                        "configs/demo_moving_mnist_large.py for one GPU / TPU host)")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--steps-scale", type=float, default=None,
                   help="multiply every stage's training steps (default 1: ~24 min on 2 CPU cores "
                        "with the default config); added to the config arg as steps_scale=S")
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps (seconds); added "
                   "to the config arg as smoke=True")
    p.add_argument("--classifier-cache", default=None,
                   help="folder of the digit classifier's cached params (default ~/.cache/genjax)")
    p.set_defaults(run=_lazy("genjax.demo"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `--config.a.b=value` overrides are not argparse options: split them off first.
    overrides = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"genjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk, a path that is a file: one line, no traceback
        from genjax.io.fs import FS_ERRNOS, describe_os_error

        if e.errno not in FS_ERRNOS:
            raise
        print(f"genjax {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"genjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
