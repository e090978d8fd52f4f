"""tasks.text_encoders: every kind of task.text_encoder gives the hidden states of its reference
(transformers T5EncoderModel / CLIPTextModel with tiny random weights, on the same tokenized
prompts, to 1e-4); frozen T5 params are sharded over fsdp / tensor on an 8-device mesh; the kind
is read from the folder and anything else is one UserError naming the field."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from genjax.errors import UserError
from genjax.parallel import mesh as mesh_lib
from genjax.parallel.axes import RULES
from genjax.tasks import text_encoders

torch.set_num_threads(1)
TOL = 1e-4
PROMPTS = ["the cat sat on the mat", "a dog", "dog ran"]
T5_TINY = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu")


def _randomise(model, std=0.3):
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, std)
    return model.eval()


def tiny_t5_folder(folder):
    """A transformers T5EncoderModel (random weights, save_pretrained) + a Unigram tokenizer.json."""
    from transformers import T5Config, T5EncoderModel

    from tests.models.test_t5 import _tiny_tokenizer_file

    folder.mkdir(parents=True, exist_ok=True)
    model = _randomise(T5EncoderModel(T5Config(**T5_TINY)))
    model.save_pretrained(folder)
    _tiny_tokenizer_file(folder)
    return model


def tiny_clip_folder(folder):
    """A transformers CLIPTextModel (random weights, 16 positions) + a BPE tokenizer.json (<sot> 2, <eot> 3)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.models.test_tokenizer import _train_bpe

    folder.mkdir(parents=True, exist_ok=True)
    model = _randomise(CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0, attn_implementation="eager")), 0.2)
    model.save_pretrained(folder)
    _train_bpe(folder)
    return model


def _task(folder, **kw):
    return {"text_encoder": str(folder), "text_length": 16, **kw}


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(np.asarray(mask)).long())
    return out.last_hidden_state.numpy()


def test_t5_folder_equals_transformers_and_is_sharded_over_fsdp_and_tensor(tmp_path):
    ref = tiny_t5_folder(tmp_path / "t5")
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
    text = text_encoders.build(_task(tmp_path / "t5"), mesh=mesh)
    assert (text.kind, text.width, text.length, text.init) == ("t5", 32, 16, None)
    params = text.frozen[text_encoders.FROZEN]
    # (embed, mlp) kernel: fsdp x tensor, each device holds a quarter; embedding (vocab, embed) too.
    for kernel, spec in ((params["layers_0"]["wi_0"]["kernel"], P("fsdp", "tensor")),
                         (params["token_embedding"]["embedding"], P("tensor", "fsdp"))):
        assert kernel.sharding.spec == spec and not kernel.sharding.is_fully_replicated
        assert kernel.addressable_shards[0].data.size == kernel.size // 4
    ids, mask = text.tokenize(PROMPTS)
    assert ids.shape == (3, 16) and mask[1].sum() < 16 and not mask[1, -1]  # padded to text_length
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        got = np.asarray(jax.jit(text.encode)(text.frozen, ids, mask))
    want = _reference(ref, ids, mask)
    err = np.abs(got - want)[mask].max()
    print(f"T5 hidden states vs transformers T5EncoderModel: max |diff| {err:.2e} (real tokens)")
    assert got.shape == (3, 16, 32) and got.dtype == np.float32 and err < TOL
    # bfloat16 params and compute: close, not equal
    bf16 = text_encoders.build(_task(tmp_path / "t5", text_dtype="bfloat16"))
    assert params["layers_0"]["q"]["kernel"].dtype == np.float32
    assert bf16.frozen[text_encoders.FROZEN]["layers_0"]["q"]["kernel"].dtype == jax.numpy.bfloat16
    got16 = np.asarray(jax.jit(bf16.encode)(bf16.frozen, ids, mask))
    rel = np.abs(got16 - want)[mask].max() / np.abs(want).max()
    assert got16.dtype == np.float32 and 0 < rel < 0.1


def test_clip_folder_equals_transformers(tmp_path):
    ref = tiny_clip_folder(tmp_path / "clip")
    text = text_encoders.build(_task(tmp_path / "clip"))
    assert (text.kind, text.width) == ("clip", 32)
    ids, mask = text.tokenize(["digit one moving", "two digits bounce left right"])
    assert (ids[:, 0] == 2).all() and ids[0, mask[0].sum() - 1] == 3  # <sot> ... <eot>, then padding
    got = np.asarray(jax.jit(text.encode)(text.frozen, ids, mask))
    err = np.abs(got - _reference(ref, ids, mask))[mask].max()
    print(f"CLIP hidden states vs transformers CLIPTextModel: max |diff| {err:.2e} (real tokens)")
    assert err < TOL
    with pytest.raises(UserError, match=r"^task.text_length=17: must be <= the text encoder's context_length 16"):
        text_encoders.build(_task(tmp_path / "clip", text_length=17))


def test_kind_is_read_from_the_folder_and_anything_else_is_one_line(tmp_path):
    assert text_encoders.kind_of("") == "joint"
    workdir = tmp_path / "clip_run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {"name": "clip"}}))
    assert text_encoders.kind_of(str(workdir)) == "clip_workdir"
    cases = {"nothing": None, "vae_run": {"model": {"name": "video_vae"}}, "bert": {"model_type": "bert"},
             "t5_no_tok": {"model_type": "umt5"}, "bad_json": "{"}
    messages = {"nothing": "holds no config.json; must be empty", "vae_run": "is a genjax workdir of model.name='video_vae'",
                "bert": "config.json has model_type='bert'; must be empty",
                "t5_no_tok": "is a transformers 'umt5' folder without tokenizer.json",
                "bad_json": "config.json is not readable JSON"}
    for name, cfg in cases.items():
        (tmp_path / name).mkdir()
        if cfg is not None:
            (tmp_path / name / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        with pytest.raises(UserError, match=rf"^task.text_encoder='.*{name}': {messages[name]}") as e:
            text_encoders.kind_of(str(tmp_path / name))
        assert "\n" not in str(e.value)
