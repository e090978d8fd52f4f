"""evaluate_videos on real Moving MNIST (and controls that must fail), reconstruction metrics, `genjax eval`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from genjax import cli
from genjax.errors import UserError
from genjax.eval import digit_classifier as dc
from genjax.eval import evaluate, metrics
from tests.eval import classifier_params, moving_mnist_test


def test_prompted_digit():
    assert [evaluate.prompted_digit(p) for p in
            ("digit 3", "a 7 moving left", "digits 3 and 5", "digit 12", "a cat")] == [3, 7, -1, -1, -1]


def test_real_videos_score_high_and_wrong_prompts_score_low():
    videos, labels, _ = moving_mnist_test(200, 8)
    r = evaluate.evaluate_videos(videos, labels, classifier_params=classifier_params())
    assert r["digit_accuracy"] >= 0.95, r
    assert set(r["per_digit_accuracy"]) == set(range(10))
    assert r["temporal_consistency"] >= 0.95, r
    assert 2.0 <= r["motion"] <= 5.5, r  # the source's speeds are uniform in [2, 5] px / frame
    # Control: every prompt names a wrong digit -> accuracy at most chance.
    wrong = (labels + np.random.default_rng(0).integers(1, 10, len(labels))) % 10
    r = evaluate.evaluate_videos(videos, wrong, classifier_params=classifier_params())
    assert r["digit_accuracy"] <= 0.1, r
    # Still videos do not move; prompts without one digit are excluded and counted.
    still = np.repeat(videos[:20, :1], 8, axis=1)
    digits = np.where(np.arange(20) < 5, -1, labels[:20])
    r = evaluate.evaluate_videos(still, digits, classifier_params=classifier_params())
    assert r["motion"] == 0.0 and r["num_excluded"] == 5 and r["temporal_consistency"] == 1.0


def test_frechet_distance_separates_real_from_noise_still_and_shuffled():
    videos, _, _ = moving_mnist_test(450, 8)
    real_a, real_b, other = videos[:150], videos[150:300], videos[300:]
    rng = np.random.default_rng(0)
    fake = {"noise": rng.integers(0, 256, other.shape, dtype=np.uint8),
            "still": np.repeat(other[:, :1], 8, axis=1),
            "shuffled": other[:, rng.permutation(8)]}
    params = classifier_params()
    base = evaluate.evaluate_videos(real_a, np.full(150, -1), classifier_params=params,
                                    reference_videos=real_b)
    r = {name: evaluate.evaluate_videos(v, np.full(150, -1), classifier_params=params,
                                        reference_videos=real_b) for name, v in fake.items()}
    # Measured: real 34, noise 2120, still 1144, shuffled 535 (appearance 20 / 1071 / 18 / 18).
    for name in fake:
        assert r[name]["frechet_distance"] > 10 * base["frechet_distance"], (name, r[name], base)
    # Noise is far in appearance too; a still or shuffled real digit is far only in motion.
    assert r["noise"]["frechet_distance_appearance"] > 10 * base["frechet_distance_appearance"]
    assert r["still"]["frechet_distance_appearance"] < 2 * base["frechet_distance_appearance"]
    with pytest.raises(UserError, match="reference_videos.shape"):
        evaluate.evaluate_videos(real_a, np.full(150, -1), classifier_params=params,
                                 reference_videos=real_b[:, :4])


def test_reconstruction_metrics_equal_the_metrics_of_the_rounded_reconstruction():
    videos, _, _ = moving_mnist_test(200, 8)
    videos = videos[:6]
    identity = evaluate.reconstruction_metrics(lambda x: x, videos, batch_size=4)
    assert identity["psnr"] == np.inf and identity["ssim"] == pytest.approx(1.0, abs=1e-6)
    noise = np.random.default_rng(0).normal(0, 0.1, videos.shape).astype(np.float32)
    r = evaluate.reconstruction_metrics(lambda x: x + noise[:len(x)], videos, batch_size=6)
    recon = np.rint((np.clip(videos / 127.5 - 1 + noise, -1, 1) + 1) * 127.5).astype(np.uint8)
    assert r["psnr"] == pytest.approx(metrics.psnr(videos, recon).mean(), rel=1e-6)
    assert r["ssim"] == pytest.approx(metrics.ssim(videos, recon).mean(), rel=1e-6)
    with pytest.raises(UserError, match="reconstruction.shape"):
        evaluate.reconstruction_metrics(lambda x: x[:, :1], videos)


@pytest.fixture()
def cache(tmp_path):
    """A classifier cache folder already holding the trained params (so the CLI does not train)."""
    import flax.serialization

    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / dc.CACHE_NAME).write_bytes(flax.serialization.to_bytes(classifier_params()))
    return folder


def test_genjax_eval_on_real_videos(tmp_path, cache, capsys):
    videos, _, captions = moving_mnist_test(200, 8)
    prompts = captions[:60] + ["digits 1 and 2"] * 4
    np.savez(tmp_path / "samples.npz", videos=videos[:64], prompts=np.array(prompts))
    out = tmp_path / "m.json"
    code = cli.main(["eval", "--workdir", str(tmp_path), "--num-reference", "60", "--out", str(out),
                     "--classifier-cache", str(cache)])
    printed = capsys.readouterr().out
    assert code == 0 and "digit_accuracy" in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["digit_accuracy"] >= 0.9 and result["num_excluded"] == 4
    assert result["num_videos"] == 64 and result["frechet_distance"] >= 0


def test_genjax_eval_bad_input_is_one_line_exit_2(tmp_path, cache, capsys):
    np.savez(tmp_path / "no_videos.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "float.npz", videos=np.zeros((2, 4, 64, 64, 1), np.float32))
    for name, message in (("no_videos.npz", "'videos'"), ("float.npz", "videos.dtype")):
        code = cli.main(["eval", "--samples", str(tmp_path / name), "--classifier-cache", str(cache)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    proc = subprocess.run([sys.executable, "-m", "genjax.cli", "eval", "--samples",
                           str(tmp_path / "missing.npz")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "missing.npz" in proc.stderr


def test_reference_videos_take_the_number_of_digits():
    from genjax.data.sources import MovingMnistSource

    one = evaluate.reference_videos("moving_mnist:test", 3, num_frames=2, image_size=64)
    two = evaluate.reference_videos("moving_mnist:test", 3, num_frames=2, image_size=64, num_digits=2)
    src = MovingMnistSource("test", num_examples=3, num_frames=2, image_size=64, num_digits=2)
    assert two.shape == one.shape == (3, 2, 64, 64, 1)
    assert np.array_equal(two, np.stack([src[i]["video"] for i in range(3)]))
    assert (two > 0).sum() > (one > 0).sum()  # more ink: two digits per frame
