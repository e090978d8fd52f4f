"""T5 / umT5 encoders vs transformers (T5EncoderModel / UMT5EncoderModel, tiny random configs,
padding included), bucket table, scan == unrolled, bf16, xxl parameter counts (meta device vs
eval_shape), tokenizer vs transformers, bad input."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from genjax.errors import UserError
from genjax.models import t5

torch.set_num_threads(1)
TOL = 1e-4
TINY = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, feed_forward_proj="gated-gelu")


def _reference(kind, **cfg):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if kind == "umt5" else (T5Config, T5EncoderModel)
    model = model_cls(config_cls(**{**TINY, **cfg}))
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model.eval()


def _batch(length=24, seed=0):
    """Right-padded ids (lengths 24, 9, 1); pad id 0, mask 0 there. 24 > max_distance reaches the far buckets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, size=(3, length)).astype(np.int32)
    mask = np.zeros((3, length), np.int32)
    for row, n in enumerate((length, 9, 1)):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def _ref_out(ref, ids, mask):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("kind,sharded", [("t5", False), ("umt5", True)])
def test_encoder_matches_transformers(tmp_path, kind, sharded):
    ref = _reference(kind)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ids, mask = _batch()
    want = _ref_out(ref, ids, mask)
    module, params = t5.load_transformers(tmp_path)
    assert (module.per_layer_bias, module.num_heads, module.d_kv, module.num_buckets, module.max_distance) == (
        kind == "umt5", 4, 8, 8, 20)
    got = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
    real = mask.astype(bool)
    err_real, err_pad = np.abs(got - want)[real].max(), np.abs(got - want)[~real].max()
    print(f"{kind}: max |diff| real {err_real:.2e}, padded {err_pad:.2e}")
    assert err_real < TOL and err_pad < TOL  # padded positions too: padding masked the same way
    # no mask == all-ones mask, and transformers without a mask agrees
    no_mask = np.asarray(module.apply({"params": params}, ids))
    np.testing.assert_allclose(no_mask, _ref_out(ref, ids, np.ones_like(mask)), atol=TOL)


def test_umt5_from_state_dict_scanned_and_bf16():
    """A bare state dict (umT5 and heads read from the keys; max_distance, which no tensor records, as an
    override); scan=True gives the same numbers; bf16 runs close."""
    ref = _reference("umt5")
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ids, mask = _batch(length=12)
    want = _ref_out(ref, ids, mask)
    module, params = t5.load_transformers(state, scan=True, max_distance=20)
    assert module.per_layer_bias and module.scan and params["layers"]["q"]["kernel"].shape == (2, 32, 4, 8)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, ids, mask)), want, atol=TOL)
    module, params = t5.load_transformers(state, max_distance=20, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = module.apply({"params": params}, ids, mask)
    assert out.dtype == jnp.bfloat16 and params["final_layer_norm"]["scale"].dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32) - want).max() / np.abs(want).max()
    assert rel < 0.05, rel


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for q_len, buckets, dist in ((40, 32, 128), (300, 32, 128), (30, 8, 20)):
        rel = torch.arange(q_len)[None, :] - torch.arange(q_len)[:, None]
        want = T5Attention._relative_position_bucket(rel, True, buckets, dist).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(q_len, q_len, buckets, dist), want)


@pytest.mark.parametrize("variant,expected", [("t5-v1_1-xxl", 4_762_310_656), ("umt5-xxl", 5_680_910_336)])
def test_xxl_parameter_count_equals_transformers(variant, expected):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if variant == "umt5-xxl" else (T5Config, T5EncoderModel)
    v = t5.VARIANTS[variant]
    cfg = config_cls(vocab_size=v["vocab_size"], d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                     feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        ref = sum(p.numel() for p in model_cls(cfg).parameters())
    m = t5.Model(variant=variant)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    ours = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
    print(f"{variant}: genjax {ours:,} transformers {ref:,}")
    assert ours == ref == expected
    boxed = shapes["params"]["layers_0"]["wi_0"]["kernel"]  # sharded over fsdp / tensor, not replicated
    assert boxed.names == ("embed", "mlp") and shapes["params"]["token_embedding"]["embedding"].names == (
        "vocab", "embed")


def _tiny_tokenizer_file(folder):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "s", "t", "c", "d", "o", "g", "n", "m", "r"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i) for i, w in enumerate(words)] + [
        (w, -5.0 - i) for i, w in enumerate(words)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def test_tokenizer_matches_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    file = _tiny_tokenizer_file(tmp_path)
    texts = ["the cat sat on the mat", "a dog", "", "the dog ran on a mat the cat sat xyz"]
    ref = PreTrainedTokenizerFast(tokenizer_file=file, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    for max_length in (6, 16):
        ids, mask = t5.load_tokenizer(tmp_path, max_length=max_length)(texts)
        want = ref(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        assert ids.dtype == mask.dtype == np.int32 and ids.shape == (4, max_length)
        np.testing.assert_array_equal(ids, want["input_ids"])
        np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (ids[1, :4] == [8, 9, 1, 0]).all() and ids[0, 6] == 1 and ids[2, 0] == 1  # "▁a ▁dog </s> <pad>"
    short, _ = t5.load_tokenizer(tmp_path, max_length=6)(texts)
    assert (short[:, -1][[0, 3]] == 1).all()


def test_bad_input_raises_user_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds none of"):
        t5.load_transformers(empty)
    with pytest.raises(UserError, match="no such file"):
        t5.load_transformers(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no transformers T5 encoder blocks"):
        t5.load_transformers({"embeddings.word_embeddings.weight": np.zeros((4, 2), np.float32)})
    ref = _reference("t5")
    ref.save_pretrained(tmp_path / "t5")
    cfg_file = tmp_path / "t5" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(UserError, match="model_type='bert'"):
        t5.load_transformers(tmp_path / "t5")
    cfg_file.write_text(json.dumps({**cfg, "d_ff": 48}))
    with pytest.raises(UserError, match=r"DenseReluDense.wo.weight.*\(32, 64\).*\(32, 48\)"):
        t5.load_transformers(tmp_path / "t5")
    cfg_file.write_text(json.dumps({**cfg, "model_type": "umt5"}))  # T5 weights read as umT5
    with pytest.raises(UserError, match="block.1.layer.0.SelfAttention.relative_attention_bias.weight.*missing"):
        t5.load_transformers(tmp_path / "t5")
    with pytest.raises(UserError, match="override='heads'"):
        t5.load_transformers(tmp_path / "t5", heads=2)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "spiece.model").write_bytes(b"")
    with pytest.raises(UserError, match="spiece.model"):
        t5.load_tokenizer(tmp_path / "sp")
    _tiny_tokenizer_file(tmp_path)
    with pytest.raises(UserError, match="pad_token='<blank>'"):
        t5.load_tokenizer(tmp_path, pad_token="<blank>")
    with pytest.raises(UserError, match="texts"):
        t5.load_tokenizer(tmp_path)("a single string")
    m = t5.T5Encoder(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1)
    with pytest.raises(UserError, match="attention_mask.shape"):
        jax.eval_shape(m.init, jax.random.key(0), np.zeros((2, 5), np.int32), np.ones((2, 4), np.int32))
    with pytest.raises(UserError, match="input_ids.shape"):
        jax.eval_shape(m.init, jax.random.key(0), np.zeros((5,), np.int32))
