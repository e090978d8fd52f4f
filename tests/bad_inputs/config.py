"""Bad-input catalogue rows: config (issue 21): misspelt keys in every section of a config file,
numbers out of range, config files that do not load, and the model / schedule API's range checks.

Every row fails at validation, before a mesh, a workdir file or a compiled step exists.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from tests.bad_inputs import Case

ROOT = Path(__file__).resolve().parents[2]
DIT = str(ROOT / "configs" / "dit_mnist.py")

# (row name, base config, statement run on the unlocked config `c`, expected message)
TYPOS = [
    ("model key misspelt", "dit_mnist", "c.model.hiden_size = 64",
     r"model\.hiden_size=64: is not an attribute of DiT \(attributes: .*hidden_size"),
    ("data key misspelt", "dit_mnist", "c.data.batch_sise = 8",
     r"data\.batch_sise: unknown key in config\.data \(did you mean 'batch_size'\?"),
    ("optim key misspelt", "dit_mnist", "c.optim.ema_dacay = 0.9",
     r"optim\.ema_dacay: unknown key in config\.optim \(did you mean 'ema_decay'\?"),
    ("diffusion key misspelt", "dit_mnist", "c.diffusion.num_timestep = 100",
     r"diffusion\.num_timestep: unknown key in config\.diffusion \(did you mean 'num_timesteps'\?"),
    ("ckpt key misspelt", "dit_mnist", "c.ckpt.max_to_kep = 1",
     r"ckpt\.max_to_kep: unknown key in config\.ckpt \(did you mean 'max_to_keep'\?.*fallback"),
    ("eval key misspelt", "dit_mnist", "c.eval.num_sample = 4",
     r"eval\.num_sample: unknown key in config\.eval \(did you mean 'num_samples'\?"),
    ("task key misspelt (dit)", "dit_mnist", "c.task = dict(vea='')",
     r"task\.vea: unknown key in config\.task \(did you mean 'vae'\?"),
    ("task key misspelt (vae family)", "vae_mnist", "c.task.kl_wieght = 1e-6",
     r"task\.kl_wieght: unknown key in config\.task \(did you mean 'kl_weight'\?"),
    ("mesh key misspelt", "dit_mnist", "c.mesh.fdsp = 1",
     r"mesh\.fdsp: unknown key in config\.mesh \(did you mean 'fsdp'\?"),
    ("top-level key misspelt", "dit_mnist", "c.num_step = 5",
     r"num_step: unknown key in the config \(did you mean 'num_steps'\?"),
    ("diffusion section on a VAE", "vae_mnist", "c.diffusion = dict(num_timesteps=10)",
     r"diffusion: unknown key in the config \(allowed: .*"),
]

# (row name, base config, statement, expected message): the video data options (issue 15 item 1)
_MIX = "c.data.mix = [('moving_mnist', 0.8), ('mnist_embedded', 0.2)]"
VIDEO_DATA = [
    ("data.clip_start unknown", "video_vae_moving_mnist", "c.data.clip_start = 'middle'",
     r"data\.clip_start='middle': must be one of \('fixed', 'random'\)"),
    ("data.clip_start random on moving_mnist", "video_vae_moving_mnist", "c.data.clip_start = 'random'",
     r"data\.clip_start='random': applies to video_folder:PATH and TFDS video datasets, not 'moving_mnist'"),
    ("data.fps zero", "video_vae_moving_mnist", "c.data.fps = 0.0",
     r"data\.fps=0\.0: must be a number of frames per second > 0"),
    ("data.fps without frame rates", "video_vae_moving_mnist", "c.data.fps = 8.0",
     r"data\.fps=8\.0: needs video files with a frame rate \(video_folder:PATH\); 'moving_mnist' records none"),
    ("data.fps with frame_stride", "video_vae_moving_mnist",
     "c.data.dataset = 'video_folder:/nowhere'; c.data.fps = 8.0; c.data.frame_stride = 2",
     r"data\.fps=8\.0: and data\.frame_stride=2 are exclusive"),
    ("data.mix unpacked", "video_vae_moving_mnist", "c.data.dataset = 'mix'; " + _MIX,
     r"data\.mix=\[\('moving_mnist', 0\.8\), \('mnist_embedded', 0\.2\)\]: requires data\.packing"),
    ("data.mix zero weight", "video_vae_moving_mnist", "c.data.dataset = 'mix'; c.data.mix = [('moving_mnist', 0.0)]",
     r"data\.mix=.*: must be a non-empty list of \(dataset, weight > 0\) pairs"),
    ("data.mix beside another dataset", "video_vae_moving_mnist", _MIX,
     r"data\.dataset='moving_mnist': must be 'mix' when data\.mix names the datasets"),
]

# (row name, base config, statement, expected message): the VQ-VAE task (issue 17 item 1)
VQVAE = [
    ("vqvae codebook unknown", "vqvae_mnist", "c.task.codebook = 'kmeans'",
     r"task\.codebook='kmeans': must be one of \('loss', 'ema'\)"),
    ("vqvae beta negative", "vqvae_mnist", "c.model.beta = -0.25", r"model\.beta=-0\.25: must be a finite number >= 0"),
    ("vqvae ema_decay 1", "vqvae_mnist", "c.model.ema_decay = 1.0", r"model\.ema_decay=1\.0: must be in \[0, 1\)"),
    ("vqvae restarts with the loss codebook", "vqvae_mnist", "c.task.codebook = 'loss'",
     r'task\.restart_threshold=1\.0: needs task\.codebook="ema"'),
    ("vqvae restart threshold negative", "vqvae_mnist", "c.task.restart_threshold = -1.0",
     r"task\.restart_threshold=-1\.0: must be a finite number >= 0"),
    ("vqvae rec unknown", "vqvae_mnist", "c.task.rec = 'l3'", r"task\.rec='l3': must be \"l1\" or \"l2\""),
    ("vqvae use_ema in the model section", "vqvae_mnist", "c.model.use_ema = True",
     r"model\.use_ema=True: is set by task\.codebook"),
    ("vqvae num_codes zero", "vqvae_mnist", "c.model.num_codes = 0", r"model\.num_codes=0: must be >= 1"),
    ("vqvae task key misspelt", "vqvae_mnist", "c.task.restart_treshold = 1.0",
     r"task\.restart_treshold: unknown key in config\.task \(did you mean 'restart_threshold'\?"),
    ("vqvae scales with the EMA codebook", "vqvae_mnist", "c.model.scales = (1, 2, 8)",
     r"task\.codebook='ema': must be \"loss\" with model\.scales"),
    ("vqvae scales not increasing", "vqvae_mnist",
     "c.task.codebook = 'loss'; c.task.restart_threshold = 0.0; c.model.scales = (2, 1, 8)",
     r"model\.scales=\(2, 1, 8\): must be strictly increasing ints >= 1"),
    ("var without a tokenizer", "var_mnist", "c.task.vqvae = ''",
     r"task\.vqvae='': must be a `genjax train` workdir of task vqvae with model\.scales"),
]

# the gated PixelCNN task (issue 17 item 4)
PIXELCNN = [
    ("pixelcnn kernel size even", "pixelcnn_mnist", "c.model.kernel_size = 4",
     r"model\.kernel_size=4: must be an odd integer >= 3"),
    ("pixelcnn three channels", "pixelcnn_mnist", "c.data.channels = 3", r"data\.channels=3: must be 1"),
    ("pixelcnn temperature zero", "pixelcnn_mnist", "c.eval.temperature = 0.0", r"eval\.temperature=0\.0: must be > 0"),
    ("pixelcnn digit accuracy without classes", "pixelcnn_mnist", "c.model.num_classes = 0",
     r"task\.eval_samples=10: must be 0 when model\.num_classes=0"),
]


def _tfds_video_channels():
    import ml_collections
    import tensorflow_datasets as tfds

    from genjax.data import recipes

    config = ml_collections.ConfigDict({"seed": 0, "data": dict(
        dataset="tfds:bair_robot_pushing_small", split="train", image_size=32, num_frames=5, channels=1)})
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        recipes.source(config, "train")


def _make_source(name, **options):
    def run():
        from genjax.data.sources import make_source

        make_source(name, **options)
    return run


# (row name, override, expected message) on configs/dit_mnist.py:smoke=True
RANGES = [
    ("ema_decay above 1", "--config.optim.ema_decay=2", r"optim\.ema_decay=2\.0: must be in \[0, 1\]"),
    ("ema_decay negative", "--config.optim.ema_decay=-0.5", r"optim\.ema_decay=-0\.5: must be in \[0, 1\]"),
    ("ema_decay NaN", "--config.optim.ema_decay=nan", r"optim\.ema_decay=nan: must be in \[0, 1\]"),
    ("lr zero", "--config.optim.lr=0", r"optim\.lr=0\.0: must be > 0"),
    ("lr infinite", "--config.optim.lr=inf", r"optim\.lr=inf: must be a finite number > 0"),
    ("b2 equal to 1", "--config.optim.b2=1.0", r"optim\.b2=1\.0: must be in \[0, 1\)"),
    ("eps zero", "--config.optim.eps=0", r"optim\.eps=0\.0: must be a finite number > 0"),
    ("end_lr_ratio negative", "--config.optim.end_lr_ratio=-1", r"optim\.end_lr_ratio=-1\.0: must be >= 0"),
    ("max_nonfinite_steps zero", "--config.optim.max_nonfinite_steps=0", r"optim\.max_nonfinite_steps=0: must be >= 1"),
    ("model depth negative", "--config.model.depth=-1", r"model\.depth=-1: must be >= 1"),
    ("model num_heads zero", "--config.model.num_heads=0", r"model\.num_heads=0: must be >= 1"),
    ("model hidden_size zero", "--config.model.hidden_size=0", r"model\.hidden_size=0: must be >= 1"),
    ("class_dropout_prob above 1", "--config.model.class_dropout_prob=1.5",
     r"model\.class_dropout_prob=1\.5: must be in \[0, 1\]"),
    ("save_interval_steps zero", "--config.ckpt.save_interval_steps=0", r"ckpt\.save_interval_steps=0: must be >= 1"),
    ("eval num_samples zero", "--config.eval.num_samples=0", r"eval\.num_samples=0: must be >= 1"),
    ("mesh size zero", "--config.mesh.fsdp=0", r"mesh\.fsdp=0: must be a positive size or -1"),
]

# (row name, file text, expected message): config files that do not load
FILES = [
    ("config file syntax error", "import ml_collections\n\ndef get_config(arg=None):\n    c = dict(\n    return c\n",
     r"--config='.*syntax\.py': line 4: '\(' was never closed"),
    ("config file without get_config", "X = 1\n", r"--config='.*noget\.py': defines no get_config\(arg=None\) function"),
    ("config file raising", "def get_config(arg=None):\n    raise RuntimeError('boom')\n",
     r"--config='.*raises\.py': line 2: RuntimeError: boom"),
    ("config file bad import", "import genjax_no_such_module\n\ndef get_config(arg=None):\n    return None\n",
     r"--config='.*badimport\.py': line 1: ModuleNotFoundError: No module named 'genjax_no_such_module'"),
]
FILE_NAMES = ("syntax", "noget", "raises", "badimport")


def _derived_config(workspace: Path, index: int, base: str, statement: str) -> Path:
    """A config file that loads configs/<base>.py (smoke) and runs `statement` on it, as a user's
    edited copy would."""
    path = workspace / f"typo_{index}.py"
    path.write_text(textwrap.dedent(f"""\
        import importlib.util

        def get_config(arg=None):
            spec = importlib.util.spec_from_file_location("_base", {str(ROOT / "configs" / (base + ".py"))!r})
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            c = module.get_config("smoke=True")
            c.unlock()
            {statement}
            return c
        """))
    return path


def _dit_apply(y):
    def run():
        import jax
        import jax.numpy as jnp

        from genjax.models import dit

        m = dit.Model(depth=1, hidden_size=8, num_heads=2, patch_size=2, in_channels=1, num_classes=3,
                      class_dropout_prob=0.0, learn_sigma=False)
        return m.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32), y)
    return run


def _alpha_sigma(t):
    def run():
        from genjax.diffusion import schedules

        return schedules.alpha_sigma(schedules.make("linear", 10), t)
    return run


# (row name, config.json of the folder given as task.text_encoder or None for no config.json,
# expected message) on configs/video_dit_moving_mnist.py:smoke=True with a stand-in task.vae folder
TEXT_ENCODERS = [
    ("text encoder neither kind", {"model_type": "bert"},
     r"task\.text_encoder='.*bert': config\.json has model_type='bert'; must be empty \(a text tower trained "
     r"jointly, byte tokenizer\), a genjax CLIP workdir, or a transformers folder"),
    ("text encoder T5 without tokenizer.json", {"model_type": "t5", "d_model": 32},
     r"task\.text_encoder='.*t5': is a transformers 't5' folder without tokenizer\.json"),
    ("text encoder a VAE run", {"model": {"name": "video_vae"}},
     r"task\.text_encoder='.*vae_run': is a genjax workdir of model\.name='video_vae'; must be empty"),
    ("text encoder folder without config.json", None, r"task\.text_encoder='.*empty': holds no config\.json"),
]


def _text_encoder_rows(workspace: Path, workdir: str) -> list[Case]:
    """video_dit with task.text_encoder of no accepted kind: refused in validate, nothing loaded."""
    import json

    vae = workspace / "video_vae_stand_in"
    vae.mkdir(exist_ok=True)
    (vae / "config.json").write_text(json.dumps({"model": {"name": "video_vae"}}))
    rows = []
    for (name, cfg, message), folder in zip(TEXT_ENCODERS, ("bert", "t5", "vae_run", "empty")):
        (workspace / folder).mkdir(exist_ok=True)
        if cfg is not None:
            (workspace / folder / "config.json").write_text(json.dumps(cfg))
        rows.append(Case(name, ["train", "--config", str(ROOT / "configs" / "video_dit_moving_mnist.py") +
                                f":smoke=True,vae={vae}", "--workdir", workdir,
                                f"--config.task.text_encoder={workspace / folder}"], 2,
                         r"^genjax train: error: " + message))
    return rows


def cases(workspace: Path) -> list[Case]:
    workspace.mkdir(parents=True, exist_ok=True)
    workdir = str(workspace / "w")
    rows = _text_encoder_rows(workspace, workdir)
    for i, (name, base, statement, message) in enumerate(TYPOS + VIDEO_DATA + VQVAE + PIXELCNN):
        path = _derived_config(workspace, i, base, statement)
        rows.append(Case(name, ["train", "--config", str(path), "--workdir", workdir], 2,
                         r"^genjax train: error: " + message))
    for name, override, message in RANGES:
        rows.append(Case(name, ["train", "--config", f"{DIT}:smoke=True", "--workdir", workdir, override],
                         2, r"^genjax train: error: " + message))
    for file_name, (name, text, message) in zip(FILE_NAMES, FILES):
        path = workspace / f"{file_name}.py"
        path.write_text(text)
        rows.append(Case(name, ["train", "--config", str(path), "--workdir", workdir], 2,
                         r"^genjax train: error: " + message))
    rows += [
        Case("config file missing", ["train", "--config", str(workspace / "nope.py"), "--workdir", workdir], 2,
             r"^genjax train: error: --config='.*nope\.py': no such config file"),
        Case("tfds: without a name", _make_source("tfds:"), 2, r"^dataset='tfds:': must be tfds:NAME"),
        Case("tfds: an unknown name", _make_source("tfds:no_such_dataset_xyz"), 2,
             r"^dataset='no_such_dataset_xyz': must be moving_mnist, .*tfds:NAME"),
        Case("tfds video channels differ from data.channels", _tfds_video_channels, 2,
             r"^data\.channels=1: 'tfds:bair_robot_pushing_small' has 3-channel videos; set data\.channels=3"),
        Case("dit label = num_classes", _dit_apply(np.array([0, 3])), 2, r"^y=3: class labels must be in \[0, 3\)"),
        Case("dit label negative", _dit_apply(np.array([-1, 0])), 2, r"^y=-1: class labels must be in \[0, 3\)"),
        Case("dit float labels", _dit_apply(np.array([0.0, 1.7], np.float32)), 2,
             r"^y\.dtype='float32': class labels must be integers"),
        Case("timestep = T", _alpha_sigma(np.array([0, 10])), 2, r"^t=10: timesteps must be in \[0, num_timesteps=10\)"),
        Case("timestep negative", _alpha_sigma(np.array([-1])), 2, r"^t=-1: timesteps must be in \[0, num_timesteps=10\)"),
        Case("timestep fractional", _alpha_sigma(np.array([2.5])), 2, r"^t\.dtype='float64': timesteps must be integers"),
    ]
    return rows
