"""Transforms: exact identities, and resize against torch's antialiased bilinear interpolation."""

import numpy as np
import pytest
import torch

from genjax.data import transforms as T
from genjax.errors import UserError
from genjax.io import media


def _video(t=6, h=10, w=12, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, c), dtype=np.uint8)


def test_float_scaling_round_trips_every_uint8_value():
    x = np.arange(256, dtype=np.uint8)
    y = T.to_float(x)
    assert y.dtype == np.float32 and y[0] == -1.0 and y[255] == 1.0
    assert np.allclose(np.diff(y), 2 / 255)
    assert np.array_equal(media.to_uint8(y), x)


def test_to_uint8_rounds_and_clips():
    x = np.array([-3.0, -1.0, 1.0, 7.0, np.nan, 0.0, 1.0 / 255], np.float32)
    # (0 + 1) * 127.5 = 127.5 rounds half to even -> 128; (1/255 + 1) * 127.5 = 128.0.
    assert media.to_uint8(x).tolist() == [0, 0, 255, 255, 0, 128, 128]


def test_center_and_random_crop_windows():
    x = np.arange(7 * 9).reshape(7, 9, 1)
    assert np.array_equal(T.center_crop(x, (3, 4)), x[2:5, 2:6])
    video = _video()
    crops = {T.random_crop(video, 4, np.random.default_rng(s)).tobytes() for s in range(30)}
    assert len(crops) > 10  # many positions are drawn
    crop = T.random_crop(video, (4, 5), np.random.default_rng(3))
    # One window for all frames: find it in frame 0 and check it holds in every frame.
    hits = [(i, j) for i in range(7) for j in range(8)
            if np.array_equal(video[0, i:i + 4, j:j + 5], crop[0])]
    assert len(hits) == 1
    i, j = hits[0]
    assert np.array_equal(video[:, i:i + 4, j:j + 5], crop)


def test_crop_larger_than_input_is_a_user_error():
    with pytest.raises(UserError, match=r"^crop size=\(11, 4\)"):
        T.center_crop(_video(), (11, 4))
    with pytest.raises(UserError, match="^size="):
        T.CenterCrop(0)


@pytest.mark.parametrize("size", [(5, 6), (17, 23)])
def test_resize_matches_torch_antialiased_bilinear(size):
    # torch's antialias=True bilinear was written to reproduce PIL's resize (torchvision docs).
    video = np.random.default_rng(1).random((2, 12, 15, 3)).astype(np.float32) * 2 - 1
    ours = T.resize(video, size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(video).permute(0, 3, 1, 2), size=size,
                                          mode="bilinear", antialias=True, align_corners=False)
    assert ours.shape == (2, *size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-3)


def test_resize_uint8_is_pil_on_each_frame():
    from PIL import Image

    video = _video()
    ours = T.resize(video, (5, 7), resample="bicubic")
    assert ours.dtype == np.uint8 and ours.shape == (6, 5, 7, 3)
    ref = np.asarray(Image.fromarray(video[4]).resize((7, 5), Image.Resampling.BICUBIC))
    assert np.array_equal(ours[4], ref)
    assert np.array_equal(T.resize(video, (10, 12)), video)  # same size: identity


def test_flip_and_grayscale():
    x = _video(c=1)
    assert np.array_equal(T.horizontal_flip(T.horizontal_flip(x)), x)
    assert np.array_equal(T.horizontal_flip(x)[:, :, 0], x[:, :, -1])
    rgb = T.grayscale_to_rgb(x)
    assert rgb.shape == (6, 10, 12, 3) and all(np.array_equal(rgb[..., c], x[..., 0]) for c in range(3))
    assert T.grayscale_to_rgb(rgb) is rgb


def test_temporal_crop_frames_and_errors():
    video = np.arange(10).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 1), int)
    clip = T.temporal_crop(video, 3, stride=4, start=1)
    assert clip[:, 0, 0, 0].tolist() == [1, 5, 9]
    starts = {int(T.random_temporal_crop(video, 4, np.random.default_rng(s), stride=2)[0, 0, 0, 0])
              for s in range(50)}
    assert starts == {0, 1, 2, 3}  # every start whose clip (span 7) fits in 10 frames
    with pytest.raises(UserError, match="^clip="):
        T.temporal_crop(video, 4, stride=3, start=1)  # needs frames 1..10
    with pytest.raises(UserError, match="^clip="):
        T.random_temporal_crop(video, 11, np.random.default_rng(0))


def test_grain_transforms_touch_only_pixel_keys():
    ex = {"video": _video(), "labels": np.array([3], np.int32), "caption": "digit 3"}
    rng = np.random.default_rng(0)
    out = T.TemporalCrop(4, stride=1, random=False).random_map(ex, rng)
    out = T.RandomCrop((8, 8)).random_map(out, rng)
    out = T.RandomFlip(prob=1.0).random_map(out, rng)
    out = T.Resize(4).map(out)
    out = T.ToFloat().map(out)
    assert out["video"].shape == (4, 4, 4, 3) and out["video"].dtype == np.float32
    assert out["labels"] is ex["labels"] and out["caption"] == "digit 3"
    assert ex["video"].shape == (6, 10, 12, 3)  # the input example is untouched
    assert T.RandomFlip(prob=0.0).random_map(ex, rng) is ex


# --- ADM / DiT ImageNet center crop -----------------------------------------------------------

def _reference_center_crop_arr(pil_image, image_size):
    """openai/guided-diffusion image_datasets.py `center_crop_arr` (as DiT's train.py), restated."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def _photo_like(h, w, seed):
    """Noise plus smooth gradients, so both the BOX halvings and BICUBIC's overshoot matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    smooth = 127 + 100 * np.sin(yy[..., None] / 7.0 + np.arange(3)) * np.cos(xx[..., None] / 11.0)
    return np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h, w, size", [
    (375, 500, 256),   # a typical ImageNet photo: one BICUBIC step (min side < 2 * size)
    (500, 333, 256),   # portrait, odd side
    (1200, 701, 256),  # >= 2x: one BOX halving (701 // 2 = 350), then BICUBIC
    (1100, 2300, 64),  # >= 4x: several BOX halvings
    (17, 47, 32),      # smaller than the output: BICUBIC upscales
    (33, 32, 32),      # short side already at size: the width is resized, then cropped
])
def test_adm_center_crop_equals_the_guided_diffusion_reference(h, w, size):
    from PIL import Image

    x = _photo_like(h, w, seed=h + w)
    ours = T.adm_center_crop(x, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, _reference_center_crop_arr(Image.fromarray(x), size))
    # grayscale (mode "L") goes through the same path
    gray = x[..., :1]
    assert np.array_equal(T.adm_center_crop(gray, size)[..., 0],
                          _reference_center_crop_arr(Image.fromarray(gray[..., 0]), size))


def test_adm_center_crop_shapes_frames_and_grain_transform():
    video = np.stack([_photo_like(90, 60, seed=s) for s in range(3)])
    out = T.adm_center_crop(video, 32)
    assert out.shape == (3, 32, 32, 3)
    assert all(np.array_equal(out[i], T.adm_center_crop(video[i], 32)) for i in range(3))
    x = _photo_like(64, 64, seed=0)
    assert np.array_equal(T.adm_center_crop(x, 64), x)  # already size x size: unchanged
    example = {"image": _photo_like(70, 100, seed=1), "label": 7}
    mapped = T.AdmCenterCrop(48, keys=("image",)).map(example)
    assert mapped["label"] == 7 and np.array_equal(mapped["image"], T.adm_center_crop(example["image"], 48))


@pytest.mark.parametrize("size", [0, -4, 2.5, (32, 32), True])
def test_adm_center_crop_bad_size_is_one_user_error(size):
    with pytest.raises(UserError, match=r"^size=.*: must be a positive int") as e:
        T.adm_center_crop(_photo_like(40, 40, 0), size)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^size="):
        T.AdmCenterCrop(size)


def test_adm_center_crop_bad_pixels_is_a_user_error():
    with pytest.raises(UserError, match=r"^pixels=.*must be uint8"):
        T.adm_center_crop(np.zeros((40, 40, 3), np.float32), 32)
    with pytest.raises(UserError, match=r"^pixels="):
        T.adm_center_crop(np.zeros((40, 40), np.uint8), 32)


def test_budget_size_keeps_the_aspect_ratio_within_the_area_and_never_upscales():
    assert T.budget_size(272, 640, max_area=2730, multiple=4) == (32, 80)  # 0.125 x, aspect 2.35 -> 2.5
    assert T.budget_size(144, 176, max_area=2730, multiple=4) == (44, 56)
    assert T.budget_size(30, 40, max_area=10**6, multiple=4) == (28, 40)  # small: not upscaled, only rounded
    assert T.budget_size(1000, 10, max_area=100, multiple=8) == (8, 8)  # at least one multiple per side
    h, w = T.budget_size(720, 1280, max_area=128 * 128, multiple=16)
    assert h * w <= 128 * 128 and abs(w / h - 16 / 9) < 0.2
    video = np.random.default_rng(0).integers(0, 256, (2, 144, 176, 3), dtype=np.uint8)
    out = T.FitArea(max_area=2730, multiple=4, keys=("video",)).map({"video": video})["video"]
    np.testing.assert_array_equal(out, T.resize(video, (44, 56)))
    same = T.FitArea(max_area=10**6, multiple=4, keys=("video",)).map({"video": video})["video"]
    assert same is video
    with pytest.raises(UserError, match=r"^max_area=0: must be an int >= 1"):
        T.budget_size(10, 10, max_area=0, multiple=2)
