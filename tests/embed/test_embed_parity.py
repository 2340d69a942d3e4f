"""Embeddings equal the references: all-MiniLM-L6-v2 against sentence-transformers, tiny random-weight BERT /
RoBERTa encoders against transformers' BertModel / RobertaModel, and a tiny Qwen3 decoder (last-token pooling,
Qwen3-Embedding style) against transformers' Qwen3Model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tokenmill.embed.embedder import Embedder

WORDS = ("alpha beta gamma river mountain quantum ledger violin harbour syntax orbit lantern meadow cipher falcon "
         "the of and to in is was it for on with as by at from").split()


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """n texts from 1 word to ~600 tokens, some with punctuation, digits, accents and odd whitespace."""
    rng = np.random.default_rng(seed)
    lengths = np.unique(np.geomspace(1, 560, n).astype(int))
    lengths = np.concatenate([lengths, rng.integers(1, 560, n - len(lengths))])
    texts = []
    for i, k in enumerate(lengths):
        words = list(rng.choice(WORDS, size=int(k)))
        if i % 5 == 0:
            words.insert(len(words) // 2, "Zürich, 1984 -- naïve café!")
        texts.append(("  " if i % 7 == 0 else "") + " ".join(words) + ("\n" if i % 3 == 0 else ""))
    texts[0] = "ok"  # one word piece: [CLS] ok [SEP]
    return texts


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_minilm_matches_sentence_transformers(minilm, st_minilm):
    texts = varied_texts(120)
    tokens = minilm.tokenize(texts)
    raw_lens = [len(st_minilm.tokenizer(t.strip()).input_ids) for t in texts]
    assert min(raw_lens) <= 3 and max(raw_lens) >= 512, (min(raw_lens), max(raw_lens))  # 1..512+ tokens
    assert sum(t.truncated for t in tokens) >= 20
    assert all(len(t.token_ids) <= 256 for t in tokens) and minilm.max_seq_length == 256
    assert [t.truncated for t in tokens] == [n > 256 for n in raw_lens]
    ours = minilm.encode(texts)
    ref = st_minilm.encode(texts, convert_to_numpy=True, batch_size=16)
    cos = cosines(ours, ref)
    assert cos.min() >= 0.9999, f"worst text {int(cos.argmin())}: cosine {cos.min()}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the model's Normalize module


def test_vectors_do_not_depend_on_the_batch(minilm):
    texts = varied_texts(40, seed=1)
    ids = [t.token_ids for t in minilm.tokenize(texts)]
    big = minilm.embed_token_ids(ids)
    old = minilm.max_batch_tokens
    try:
        minilm.max_batch_tokens = 97  # many small packed batches, long texts alone
        small = minilm.embed_token_ids(ids)
        alone = np.stack([minilm.embed_token_ids([s])[0] for s in ids[:8]])
    finally:
        minilm.max_batch_tokens = old
    assert np.abs(big - small).max() < 1e-5
    assert np.abs(big[:8] - alone).max() < 1e-5
    assert minilm.padding_fraction == 0.0


def _save_tiny_encoder(kind: str, path, pooling_cfg: dict | None):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=80, hidden_act="gelu")
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(**common), add_pooling_layer=False)
    else:
        model = tf.RobertaModel(tf.RobertaConfig(**common, pad_token_id=1), add_pooling_layer=False)
    model.eval().save_pretrained(str(path))
    _word_tokenizer(120).save_pretrained(str(path))
    if pooling_cfg is not None:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    return model


def _word_tokenizer(vocab_size: int):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", eos_token="w2")


def _random_seqs(vocab: int, lengths, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def _hf_states(model, seqs):
    """transformers' last hidden state per sequence, each run alone (no padding involved)."""
    return [model(torch.tensor([s])).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("kind,pooling", [("bert", "mean"), ("roberta", "cls"), ("bert", "max")])
def test_tiny_encoder_matches_transformers(tmp_path, kind, pooling):
    cfg = {"word_embedding_dimension": 48, f"pooling_mode_{ {'mean': 'mean_tokens', 'cls': 'cls_token', 'max': 'max_tokens'}[pooling]}": True}
    model = _save_tiny_encoder(kind, tmp_path, cfg)
    emb = Embedder(str(tmp_path), max_batch_tokens=64)
    assert emb.pooling.modes == (pooling,) and not emb.pooling.normalize
    seqs = _random_seqs(120, [1, 2, 5, 5, 5, 17, 40, 64, 77, 3])
    ours = emb.embed_token_ids(seqs)
    ref = []
    for h in _hf_states(model, seqs):
        ref.append({"mean": h.mean(0), "cls": h[0], "max": h.max(0).values}[pooling].numpy())
    assert np.abs(ours - np.stack(ref)).max() < 1e-4


def test_tiny_qwen3_decoder_embedding_matches_transformers(tmp_path):
    import transformers as tf

    from helpers import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("qwen3")
    cfg.architectures = ["Qwen3Model"]
    model = tf.Qwen3Model(cfg).eval()
    model.save_pretrained(str(tmp_path))
    _word_tokenizer(cfg.vocab_size).save_pretrained(str(tmp_path))
    emb = Embedder(str(tmp_path), max_batch_tokens=100)
    assert emb.is_decoder and emb.pooling.modes == ("last",) and emb.pooling.normalize
    seqs = _random_seqs(cfg.vocab_size, [1, 3, 9, 9, 30, 60, 2, 45])
    ours = emb.embed_token_ids(seqs)
    ref = np.stack([h[-1].numpy() for h in _hf_states(model, seqs)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(ours - ref).max() < 1e-5
    assert cosines(ours, ref).min() >= 0.9999


def test_sentence_transformers_modules_are_checked(tmp_path):
    _save_tiny_encoder("bert", tmp_path, {"pooling_mode_mean_tokens": True})
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        Embedder(str(tmp_path))
    shutil.rmtree(tmp_path / "1_Pooling")
