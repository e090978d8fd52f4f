"""Moving MNIST video evaluation and the `genjax eval` command.

`evaluate_videos` reads generated single-digit videos with the digit classifier of
`genjax.eval.digit_classifier` (trained only on training digits): is the prompted digit drawn,
does it stay the same digit, does it move, and how far is the set from held-out real videos in
the classifier's feature space (Frechet distance). `reconstruction_metrics` measures an
autoencoder's PSNR / SSIM. `main` is `genjax eval --samples FILE.npz`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable

import numpy as np

from genjax.errors import UserError, check
from genjax.eval import digit_classifier as dc
from genjax.eval import metrics
from genjax.io import fs


def prompted_digit(prompt: str) -> int:
    """The digit a prompt asks for: the one number in it if it has exactly one and it is a
    single digit ("digit 3" -> 3, "a 7 moving left" -> 7); otherwise -1 ("digits 3 and 5",
    "digit 12", "a cat")."""
    numbers = re.findall(r"\d+", str(prompt))
    return int(numbers[0]) if len(numbers) == 1 and len(numbers[0]) == 1 else -1


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    return metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))


def evaluate_videos(videos, prompted_digits, *, classifier_params, reference_videos=None) -> dict:
    """Measure generated single-digit videos against their prompts and real videos.

    Every frame is read by `digit_classifier.analyse_frames` (28 x 28 crop around the ink's
    centre of mass, then the classifier).

    Args:
      videos: uint8 `(N, T, H, W, C)` in [0, 255], C in {1, 3}, one digit per frame.
      prompted_digits: int `(N,)`, the digit each video was prompted with, -1 for a prompt
        without exactly one digit (left out of the digit accuracy).
      classifier_params: `digit_classifier.load_or_train()`.
      reference_videos: optional uint8 `(M, T, H', W', C')` held-out real videos with the same
        T (e.g. Moving MNIST test videos), M >= 2, for the Frechet distance.

    Returns:
      dict of floats (NaN where undefined):
        digit_accuracy: fraction of frames read as the prompted digit, averaged per prompted
          digit and then over the digits present (chance: 0.1).
        per_digit_accuracy: {digit: that fraction} for each prompted digit present.
        temporal_consistency: mean over videos of the fraction of frames read as the video's
          most frequent digit (1.0: the digit never changes).
        motion: mean frame-to-frame displacement of the ink centre, pixels per frame (> 0: it moves).
        frechet_distance, frechet_distance_appearance, frechet_distance_motion: with a
          reference, the Frechet distance (Heusel et al. 2017) between the two sets' per-video
          features (`digit_classifier.video_features`), all of it / its 128 classifier-feature
          dims / its trajectory dims.
        num_videos, num_frames, num_excluded (prompts without exactly one digit).

    Raises:
      UserError: bad dtype / shape, prompted_digits not (N,) ints in [-1, 9], a reference with
        another T or fewer than 2 videos.
    """
    analysis = dc.analyse_frames(classifier_params, videos)
    preds = analysis["predictions"]
    n, t = preds.shape
    prompted = np.asarray(prompted_digits)
    check(prompted.shape == (n,) and np.issubdtype(prompted.dtype, np.integer)
          and bool(np.all((prompted >= -1) & (prompted <= 9))), "prompted_digits",
          f"{prompted.dtype}{prompted.shape}", f"must be ({n},) ints in [-1, 9]")
    per_digit = {int(d): float(np.mean(preds[prompted == d] == d))
                 for d in sorted(set(prompted.tolist()) - {-1})}
    majority = np.array([np.bincount(p, minlength=10).argmax() for p in preds])
    out = {
        "digit_accuracy": float(np.mean(list(per_digit.values()))) if per_digit else math.nan,
        "per_digit_accuracy": per_digit,
        "temporal_consistency": float(np.mean(preds == majority[:, None])),
        "motion": float(dc.centroid_speed(analysis["centroids"]).mean()),
        "num_videos": n, "num_frames": t, "num_excluded": int(np.sum(prompted == -1)),
    }
    if reference_videos is not None:
        ref = np.asarray(reference_videos)
        check(ref.ndim == 5 and ref.shape[1] == t and ref.shape[0] >= 2, "reference_videos.shape",
              ref.shape, f"must be (M >= 2, T={t}, H, W, C) like the videos")
        check(n >= 2, "videos.shape", np.shape(videos), "needs N >= 2 for a Frechet distance")
        ours = dc.video_features(analysis)
        theirs = dc.video_features(dc.analyse_frames(classifier_params, ref))
        k = dc.FEATURE_DIM
        out["frechet_distance"] = _frechet(ours, theirs)
        out["frechet_distance_appearance"] = _frechet(ours[:, :k], theirs[:, :k])
        out["frechet_distance_motion"] = _frechet(ours[:, k:], theirs[:, k:]) if t > 1 else 0.0
    return out


def reconstruction_metrics(vae_encode_decode_fn: Callable, videos, *, batch_size: int = 16) -> dict:
    """Mean PSNR (dB) and SSIM of an autoencoder's reconstructions of `videos`.

    Args:
      vae_encode_decode_fn: maps float32 `(B, T, H, W, C)` in [-1, 1] to its reconstruction, the
        same shape, in [-1, 1] (e.g. `lambda x: vae.apply(params, x)` made deterministic).
      videos: uint8 `(N, T, H, W, C)` in [0, 255] (or images `(N, H, W, C)`).
      batch_size: videos per call of the function.

    Returns:
      {"psnr": mean of `metrics.psnr`, "ssim": mean of `metrics.ssim`}, both on uint8 pixels
      (the reconstruction is clipped to [-1, 1] and rounded to uint8 first, as when it is saved).

    Raises:
      UserError: videos not uint8 rank 4 / 5; the function returns another shape.
    """
    videos = np.asarray(videos)
    check(videos.dtype == np.uint8 and videos.ndim in (4, 5), "videos", f"{videos.dtype}{videos.shape}",
          "must be uint8 (N, T, H, W, C) or (N, H, W, C)")
    recon = []
    for i in range(0, len(videos), batch_size):
        x = videos[i:i + batch_size].astype(np.float32) / 127.5 - 1.0
        y = np.asarray(vae_encode_decode_fn(x), np.float32)
        check(y.shape == x.shape, "reconstruction.shape", y.shape, f"must equal the input's {x.shape}")
        recon.append(np.rint((np.clip(y, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8))
    recon = np.concatenate(recon)
    return {"psnr": float(metrics.psnr(videos, recon).mean()),
            "ssim": float(metrics.ssim(videos, recon).mean())}


# ----------------------------------------------------------------------------- genjax eval


def load_samples(path: str) -> tuple[np.ndarray, list[str] | None]:
    """`videos` uint8 (N, T, H, W, C) and `prompts` (N strings, or None if absent) from an .npz.

    Raises `UserError` for a missing / unreadable file, no `videos` array, a dtype other than
    uint8, a shape other than (N, T, H, W, C) with C in {1, 3}, prompts not N strings.
    """
    check(os.path.isfile(path), "--samples", path, "must be an existing .npz file")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError) as e:
        raise UserError(f"--samples={path!r}: not a readable .npz file ({e})") from None
    check("videos" in keys, "--samples", path, f"must hold a 'videos' array (it has {sorted(keys)})")
    videos = data["videos"]
    check(videos.dtype == np.uint8, "videos.dtype", str(videos.dtype), "must be uint8 in [0, 255]")
    check(videos.ndim == 5 and videos.shape[-1] in (1, 3) and min(videos.shape) > 0, "videos.shape",
          videos.shape, "must be (N, T, H, W, C) with C in {1, 3}")
    prompts = None
    if "prompts" in keys:
        p = data["prompts"]
        check(p.dtype.kind == "U" and p.shape == videos.shape[:1], "prompts",
              f"{p.dtype}{p.shape}", f"must be {videos.shape[0]} strings")
        prompts = [str(s) for s in p]
    return videos, prompts


def reference_videos(spec: str, num: int, *, num_frames: int, image_size: int,
                     num_digits: int = 1) -> np.ndarray:
    """`num` real videos for `spec` = "moving_mnist:SPLIT" (`num_digits` digits, default one; the
    samples' T and size; seed 0): uint8 (num, T, S, S, 1). Raises `UserError` for another spec or
    num < 2."""
    from genjax.data.sources import MovingMnistSource

    name, _, split = spec.partition(":")
    check(name == "moving_mnist", "--reference", spec, "must be moving_mnist:test (or :train)")
    check(num >= 2, "--num-reference", num, "must be >= 2")
    source = MovingMnistSource(split or "test", num_examples=num, num_frames=num_frames,
                               image_size=image_size, num_digits=num_digits)
    return np.stack([source[i]["video"] for i in range(num)])


def _table(results: dict) -> str:
    rows = []
    for key, value in results.items():
        if key == "per_digit_accuracy":
            value = "  ".join(f"{d}:{a:.3f}" for d, a in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        rows.append(f"  {key:<28} {value}")
    return "\n".join(rows)


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(args: argparse.Namespace) -> int:
    """Entry point of `genjax eval` (parser in `genjax.cli`): evaluate `--samples FILE.npz`
    (or `WORKDIR/samples.npz`), print a table, write the JSON to `--out` (default: next to the
    samples, `<name>.metrics.json`; written to a temporary name and renamed into place).

    Raises:
      UserError: bad arguments or samples; an `--out` that is not .json, is a folder or cannot
        be written (checked before any work), or a write that fails (full disk), naming it."""
    samples = args.samples
    if samples is None:
        check(args.workdir is not None, "--samples", None, "give --samples FILE.npz or --workdir W")
        samples = os.path.join(args.workdir, "samples.npz")
    check(args.num_reference >= 2, "--num-reference", args.num_reference, "must be >= 2")
    out = args.out or os.path.splitext(samples)[0] + ".metrics.json"
    check(out.endswith(".json"), "--out", out, "must be a .json file")
    fs.check_new_file(out, "--out", overwrite=True)  # a folder, a read-only disk: before any work
    videos, prompts = load_samples(samples)
    digits = np.array([prompted_digit(p) for p in prompts] if prompts else [-1] * len(videos))
    ref = None
    if args.reference:
        ref = reference_videos(args.reference, args.num_reference, num_frames=videos.shape[1],
                               image_size=max(videos.shape[2:4]))
    params = dc.load_or_train(args.classifier_cache)
    results = {"samples": os.path.abspath(samples), "reference": args.reference,
               **evaluate_videos(videos, digits, classifier_params=params, reference_videos=ref)}
    fs.write_json(out, _json_safe(results), "--out", indent=2)
    print(f"genjax eval: {samples} ({videos.shape[0]} videos, {videos.shape[1]} frames)")
    print(_table({k: v for k, v in results.items() if k not in ("samples", "reference")}))
    print(f"wrote {out}")
    return 0
