"""GGUF quantized blocks: Q4_0 / Q4_1 / Q4_K and Q8_0 tensors unpacked equal to the gguf package's dequantization,
iter_gguf_weights giving them to int4 / int8 as they are, and real models (SmolLM2's Q4_1 file, and a Q8_0 copy of
it) whose layers hold the file's own codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill import LLM
from tokenmill.model.quant import Int4Groups, Int8Groups


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_blocks_unpack_equal_to_the_gguf_dequantization(qtype):
    import gguf

    from tokenmill.model.gguf_weights import unpack_int4

    t = gguf.GGMLQuantizationType[qtype]
    n, k = 6, 512
    rng = np.random.default_rng(0)
    if qtype == "Q4_K":  # no numpy quantizer for Q4_K: random blocks with sane f16 d and dmin
        block, nbytes = gguf.GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, size=(n, k // block, nbytes), dtype=np.uint8)
        raw[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
        data = raw.reshape(n, -1)
    else:
        data = gguf.quantize(rng.standard_normal((n, k)).astype(np.float32), t)
    ref = gguf.dequantize(data, t).reshape(n, k)
    groups = unpack_int4(data, qtype, [n, k])
    assert groups.q.dtype == torch.uint8 and int(groups.q.max()) <= 15
    np.testing.assert_allclose(groups.dequantize().numpy(), ref, rtol=1e-6, atol=1e-6)


def test_gguf_q8_0_blocks_load_as_int8_groups(tmp_path):
    """A Q8_0 GGUF tensor unpacks into Int8Groups equal to the gguf package's dequantization, and iter_gguf_weights
    gives them for the linear weights under int8 (Q rows unpermuted like the float path's), floats otherwise."""
    import gguf

    from tokenmill.model.gguf_weights import iter_gguf_weights, open_gguf, unpack_q8_0

    rng = np.random.default_rng(0)
    n, k, heads = 8, 64, 2
    w = {name: rng.standard_normal((n, k)).astype(np.float32) for name in ("blk.0.attn_q.weight",
                                                                          "blk.0.ffn_up.weight")}
    data = {name: gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0) for name, a in w.items()}
    groups = unpack_q8_0(data["blk.0.ffn_up.weight"], [n, k])
    ref = gguf.dequantize(data["blk.0.ffn_up.weight"], gguf.GGMLQuantizationType.Q8_0).reshape(n, k)
    assert groups.q.dtype == torch.int8 and torch.equal(groups.scale, groups.scale.half().float())
    np.testing.assert_array_equal(groups.dequantize().numpy(), ref)

    path = tmp_path / "q8.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    for name, raw in data.items():
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = open_gguf(path)
    floats = dict(iter_gguf_weights(model))
    as_groups = dict(iter_gguf_weights(model, groups="int8"))
    assert set(floats) == set(as_groups) == {"model.layers.0.self_attn.q_proj.weight",
                                             "model.layers.0.mlp.up_proj.weight"}
    for name, t in as_groups.items():
        assert isinstance(t, Int8Groups) and torch.equal(t.dequantize(), floats[name])


def _write_q8_0_copy(src, dst) -> None:
    """SmolLM2's GGUF with its linear weights re-encoded as Q8_0 (metadata and other tensors as they are)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = []
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), t.tensor_type
        if t.name.startswith("blk.") and len(t.shape) == 2:
            shape = [int(d) for d in reversed(t.shape)]
            floats = gguf.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            data, qtype = gguf.quantize(floats, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        tensors.append((t.name, data, qtype))
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_q8_0_model_loads_its_blocks_without_rounding(tmp_path):
    """A real Q8_0 GGUF (SmolLM2's weights re-encoded): under int8 each projection holds the file's own codes and
    scales, and its log-probabilities follow the float32 model of the same file more closely than bfloat16's do."""
    from tokenmill.model.gguf_weights import open_gguf, unpack_q8_0
    from tokenmill.model.loader import default_model_path

    path = tmp_path / "smollm2-q8_0.gguf"
    _write_q8_0_copy(default_model_path(), path)
    cache_dir = str(tmp_path / "cache")  # this file's float32 conversion (0.5 GB) goes with the test's directory
    llm = LLM(str(path), quantization="int8", kv_cache_memory=0.1, max_model_len=256, cache_dir=cache_dir)
    mlp = llm.engine.runner.model.layers[3].mlp
    tensors = {t.name: t for t in open_gguf(path).reader.tensors}
    gate = tensors["blk.3.ffn_gate.weight"]
    want = unpack_q8_0(np.asarray(gate.data), [int(d) for d in reversed(gate.shape)])
    got = mlp.gate_up_proj.quantized.groups()
    rows = want.q.shape[0]  # gate_up = [gate | up]: the gate's rows come first
    if mlp.gate_up_proj.quantized.packed is not None:  # int8g_gemm (AVX512-BF16); elsewhere per channel, a rounding
        assert torch.equal(got.q[:rows], want.q) and torch.equal(got.scale[:rows], want.scale)
        assert (got.offset[:rows] == 0).all()  # Q8_0 is symmetric: the case offset = 0
    ids = [(7 * i + 3) % 5000 + 100 for i in range(48)]
    ref = torch.tensor(LLM(str(path), kv_cache_memory=0.1, max_model_len=256, cache_dir=cache_dir).engine.score(ids))
    ours = torch.tensor(llm.engine.score(ids))
    bf16 = torch.tensor(LLM(str(path), dtype="bfloat16", kv_cache_memory=0.1, max_model_len=256,
                            cache_dir=cache_dir).engine.score(ids))
    # int8 keeps the file's weights and rounds only the layers' inputs to bfloat16; a bfloat16 model rounds weights
    # and activations: int8 must stay well closer to float32 (measured: 0.016 against 0.046 mean |d logprob|)
    d_int8, d_bf16 = (ours - ref).abs().mean().item(), (bf16 - ref).abs().mean().item()
    assert d_int8 < d_bf16 / 2, (d_int8, d_bf16)


def test_smollm2_int4_loads_its_q4_blocks_without_rounding(cache_dir):
    """The default model is Q4_1: int4 holds the file's own codes, so its layers equal the dequantized weights."""
    import gguf

    from tokenmill.model.gguf_weights import hf_name_of, iter_gguf_weights, open_gguf
    from tokenmill.model.loader import default_model_path

    model = open_gguf(default_model_path())
    reader_types = {hf_name_of(t.name): t.tensor_type for t in model.reader.tensors}
    seen = 0
    for name, w in iter_gguf_weights(model, groups="int4"):
        if isinstance(w, Int4Groups):
            assert reader_types[name] == gguf.GGMLQuantizationType.Q4_1
            seen += 1
    assert seen == 30 * 7  # every projection of the 30 layers

