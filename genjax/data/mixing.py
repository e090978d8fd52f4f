"""data.mix: several datasets in one stream of videos at given weights, images entering as
1-frame videos (T = 1), for NaViT-packed training (`recipes.packed_latent_data`).

    data.dataset = "mix"
    data.mix = [("moving_mnist", 0.8), ("mnist_embedded", 0.2)]      # or
    data.mix = [("video_folder:/clips", 0.9), ("image_folder:/pics", 0.1)]

Every entry is any data.dataset value but "mix" (a TFDS name, "tfds:NAME", a folder, moving_mnist,
mnist_embedded), read by `recipes.source` with the rest of config.data (so data.num_frames,
frame_stride / fps, clip_start apply to every video entry) at its native size. The examples of
the entries are interleaved by grain's `MapDataset.mix`: a deterministic pattern with the weights
as integer proportions (0.8 / 0.2 -> 4 : 1; grain's `_float_to_int_proportions`), each entry
shuffled by its own seed, so the ratio and the order are exact and reproducible for a seed.

Why packed only: an unpacked batch is one array (B, T, H, W, C), so a 1-frame image would have
to be repeated or padded to T frames, which trains the model on frozen videos or on padding;
Sora / NaViT instead train images as 1-frame examples beside videos in packed sequences, which
is what data.packing does. So data.mix without data.packing is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from genjax.errors import check


def entries(config) -> list[tuple[str, float]]:
    """data.mix as `[(dataset, weight float)]`."""
    return [(str(spec), float(weight)) for spec, weight in config.data.mix]


def validate(config) -> None:
    """Raises UserError: data.mix not a non-empty list of (dataset str, weight > 0) pairs or
    naming "mix"; data.mix without data.dataset "mix" or the reverse; data.mix without data.packing."""
    from genjax.data import recipes

    d = config.data
    mix = d.get("mix")
    if d.dataset != recipes.MIX and not mix:
        return
    ok = isinstance(mix, (list, tuple)) and len(mix) >= 1 and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and e[0] not in ("", recipes.MIX)
        and isinstance(e[1], (int, float)) and not isinstance(e[1], bool) and e[1] > 0 for e in mix)
    check(ok, "data.mix", mix, "must be a non-empty list of (dataset, weight > 0) pairs, no dataset 'mix'")
    check(d.dataset == recipes.MIX, "data.dataset", d.dataset, "must be 'mix' when data.mix names the datasets")
    check(d.get("packing") is not None, "data.mix", [tuple(e) for e in mix],
          "requires data.packing: images enter as 1-frame videos, and only packed batches hold examples "
          "of different lengths")


@dataclasses.dataclass(frozen=True)
class AsVideo(grain.transforms.Map):
    """An image example -> a 1-frame video: `{"image": (H, W, C), ...}` -> `{"video": (1, H, W, C), ...}`."""

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in example.items() if k != "image"}
        out["video"] = np.asarray(example["image"])[None]
        return out


def configs(config) -> list:
    """One copy of `config` per data.mix entry, its data.dataset that entry's."""
    out = []
    for spec, _ in entries(config):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.data.dataset = spec
        out.append(c)
    return out


def sources(config, split: str) -> list[tuple[Any, float, bool, tuple]]:
    """data.mix's entries for `split`: `[(source, weight, skip_unreadable, first transforms)]`,
    the first transforms `(AsVideo(),)` for an image entry, else `()`. Without data.mix: the
    one `recipes.source`, weight 1.

    Raises `UserError` for an entry whose pixels have other channels than data.channels (read
    from its first example), and what `recipes.source` raises.
    """
    from genjax.data import recipes

    if config.data.dataset != recipes.MIX:
        return [(recipes.source(config, split), 1.0, recipes.skips_unreadable(config), ())]
    out = []
    for (spec, weight), c in zip(entries(config), configs(config)):
        src = recipes.source(c, split)
        first = src[0]
        key = "video" if "video" in first else "image"
        channels = first[key].shape[-1]
        check(channels == config.data.get("channels", channels), "data.channels", config.data.get("channels"),
              f"data.mix entry {spec!r} has {channels}-channel pixels; every entry needs data.channels")
        out.append((src, weight, recipes.skips_unreadable(c), (AsVideo(),) if key == "image" else ()))
    return out
