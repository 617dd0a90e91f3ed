import hashlib
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from amppatch import model
from amppatch.errors import UsageError
from amppatch.gguf_info import bytes_per_token, read_gguf
from amppatch.model import (
    ALIASES,
    PRESETS,
    SHAPES,
    TYPES,
    VOCAB_BPE,
    Shape,
    SynthOptions,
    canonical_type,
    f16_bytes,
    synth_model,
    tensor_plan,
    write_f16_model,
)

MICRO = Shape(dim=64, layers=2, ffn=128, heads=4, kv_heads=2, context=256)
MICRO_MOE = Shape(dim=64, layers=2, ffn=128, heads=4, kv_heads=2, context=256, experts=4, experts_used=2)


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    """A small tokenizer-only GGUF written here (the real one comes from llama.cpp's models/)."""
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"tok{i}".encode() for i in range(300)])
    writer.add_token_scores([float(-i) for i in range(300)])
    writer.add_token_types([1] * 300)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_file_other_seed_other_weights(tmp_path: Path, vocab: Path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    write_f16_model(a, MICRO, 7, vocab, "m")
    write_f16_model(b, MICRO, 7, vocab, "m")
    write_f16_model(c, MICRO, 8, vocab, "m")
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_model_has_llama_shape_and_tokenizer(tmp_path: Path, vocab: Path):
    path = tmp_path / "m.gguf"
    write_f16_model(path, MICRO, 0, vocab, "m")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 300
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * MICRO.layers
    k = tensors["blk.1.attn_k.weight"]
    # GGUF lists dimensions fastest-first: ne0 = input dim, ne1 = kv heads * head dim.
    assert list(k.shape) == [64, 32]
    assert k.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.isfinite(np.asarray(k.data, dtype=np.float32)).all()


def test_1b_shape_is_tinyllama():
    s = SHAPES["1b"]
    assert (s.dim, s.layers, s.ffn, s.heads, s.kv_heads) == (2048, 22, 5632, 32, 4)
    assert all(v.dim % 256 == 0 and v.ffn % 256 == 0 for v in SHAPES.values())


@pytest.mark.parametrize(("field", "value"), [("shape", "7b"), ("type", "q7_k"), ("type", "iq2_xxs"), ("seed", -1)])
def test_bad_options_are_refused(field: str, value, tmp_path: Path):
    options = SynthOptions(**{field: value}, repo=tmp_path)
    with pytest.raises(UsageError):
        synth_model(options)


def test_unwritable_output_is_refused_before_work(tmp_path: Path):
    with pytest.raises(UsageError, match=r"not writable|missing"):
        synth_model(SynthOptions(out=tmp_path / "no" / "such" / "dir" / "m.gguf", repo=tmp_path))


def _write_in_memory(path: Path, shape: Shape, seed: int, vocab_gguf: Path, name: str) -> None:
    """The writer before streaming (every tensor built, then the file written): the reference that keeps
    cached models valid — streaming must not change a byte."""
    reader = gguf.GGUFReader(str(vocab_gguf))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer."):
            if fld.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_key_value(key, fld.contents(), fld.types[0], sub_type=fld.types[-1])
            else:
                writer.add_key_value(key, fld.contents(), fld.types[0])
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(shape.dim, dtype=np.float32)
    kv_dim = shape.head_dim * shape.kv_heads
    writer.add_tensor("token_embd.weight", weight(vocab, shape.dim))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weight(vocab, shape.dim))
    for i in range(shape.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(shape.dim, shape.dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, shape.dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, shape.dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(shape.dim, shape.dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(shape.ffn, shape.dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(shape.ffn, shape.dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(shape.dim, shape.ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_streaming_writer_writes_the_bytes_of_the_in_memory_writer(tmp_path: Path, vocab: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    # Chunks smaller than a tensor, so the chunked draw is exercised: values continue one generator stream.
    monkeypatch.setattr(model, "_CHUNK_ELEMENTS", 1000)
    streamed, reference = tmp_path / "s.gguf", tmp_path / "r.gguf"
    write_f16_model(streamed, MICRO, 3, vocab, "m")
    _write_in_memory(reference, MICRO, 3, vocab, "m")
    assert _digest(streamed) == _digest(reference)


def test_streaming_writer_holds_one_tensor_not_the_model(tmp_path: Path, vocab: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    shape = Shape(dim=256, layers=12, ffn=1024, heads=4, kv_heads=2, context=256)
    plan = tensor_plan(shape, 300)
    largest = max(t.n_bytes for t in plan)
    total = f16_bytes(shape, 300)
    assert total > 20 * largest
    monkeypatch.setattr(model, "_CHUNK_ELEMENTS", 1 << 14)  # 64 KiB of float32 scratch
    tracemalloc.start()
    try:
        write_f16_model(tmp_path / "m.gguf", shape, 0, vocab, "m")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # one f16 tensor, one chunk of scratch and the writer's own tables — far below the model's 12.7 MB
    assert peak < 2 * largest + (1 << 16) * 4 + 1_000_000, (peak, largest, total)
    assert (tmp_path / "m.gguf").stat().st_size > total


def test_moe_model_has_router_and_3d_expert_tensors(tmp_path: Path, vocab: Path):
    path = tmp_path / "moe.gguf"
    write_f16_model(path, MICRO_MOE, 0, vocab, "m")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["llama.expert_count"].contents() == 4
    assert reader.fields["llama.expert_used_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.ffn_up.weight" not in tensors
    # ggml order: ne0 = input dim, ne1 = expert ffn rows, ne2 = experts (llama.cpp's {n_embd, n_ff, n_expert})
    assert list(tensors["blk.1.ffn_gate_exps.weight"].shape) == [64, 128, 4]
    assert list(tensors["blk.1.ffn_up_exps.weight"].shape) == [64, 128, 4]
    assert list(tensors["blk.1.ffn_down_exps.weight"].shape) == [128, 64, 4]
    router = tensors["blk.0.ffn_gate_inp.weight"]
    assert list(router.shape) == [64, 4] and router.tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    info = read_gguf(path)
    assert (info.n_expert, info.n_expert_used) == (4, 2)
    tb = bytes_per_token(info)
    expert_bytes = MICRO_MOE.layers * 3 * 4 * 128 * 64 * 2
    assert tb.experts_total == expert_bytes and tb.experts_read == expert_bytes // 2


def test_8b_shape_is_llama3_8b_with_the_bpe_vocabulary():
    s = SHAPES["8b"]
    assert (s.dim, s.layers, s.ffn, s.heads, s.kv_heads) == (4096, 32, 14336, 32, 8)
    assert s.rope_theta == 500000.0 and s.vocab == VOCAB_BPE and s.experts == 0
    # 8.03B parameters with Llama-3's 128256 tokens, as the real model has
    assert f16_bytes(s, 128256) // 2 == pytest.approx(8.03e9, rel=0.005)


def test_moe_shape_fits_a_small_machine_and_reads_a_1b_model_per_token():
    s = SHAPES["moe"]
    assert (s.experts, s.experts_used) == (8, 2)
    embd = 32000 * s.dim  # gathered one row per token
    total = f16_bytes(s, 32000) // 2
    expert = 3 * s.experts * s.ffn * s.dim * s.layers
    read = total - embd - expert + expert * s.experts_used // s.experts
    dense_read = f16_bytes(SHAPES["1b"], 32000) // 2 - 32000 * SHAPES["1b"].dim
    assert total == pytest.approx(3.5e9, rel=0.05)
    assert read == pytest.approx(dense_read, rel=0.05)  # a token costs what the 1b's does
    assert SHAPES["tiny-moe"].experts_used < SHAPES["tiny-moe"].experts


def test_written_rope_base_follows_the_shape(tmp_path: Path, vocab: Path):
    path = tmp_path / "m.gguf"
    write_f16_model(path, Shape(dim=64, layers=1, ffn=128, heads=4, kv_heads=2, context=256, rope_theta=5e5),
                    0, vocab, "m")
    assert gguf.GGUFReader(str(path)).fields["llama.rope.freq_base"].contents() == 500000.0


def test_presets_are_llama_quantize_names_and_aliases_resolve():
    assert {"Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "Q8_0", "Q4_0", "F16"} <= set(PRESETS.values())
    assert canonical_type("q4_k") == canonical_type("Q4_K_M") == "q4_k_m"
    assert canonical_type("IQ4_XS") == "iq4_xs"
    assert canonical_type("Q5_K") == "q5_k_m"
    # every old name still works, spelled as before (run and apply pass these)
    assert {"f16", "q8_0", "q4_0", "q4_k", "q6_k"} <= set(TYPES)
    assert all(TYPES[a] == PRESETS[t] for a, t in ALIASES.items())


def test_disk_check_refuses_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(model.shutil, "disk_usage", lambda _p: type("U", (), {"free": 10})())
    with pytest.raises(UsageError, match=r"the 8b model needs 1\.0 GB in .* 0\.0 GB free"):
        model._check_disk(tmp_path, 1_000_000_000, "the 8b model")


def _tiny_tree(tmp_path: Path, vocab: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from amppatch import model, workspace

    repo = tmp_path / "tree"
    (repo / "models").mkdir(parents=True)
    (repo / model.VOCAB_FILE).write_bytes(vocab.read_bytes())
    monkeypatch.setenv("AMPPATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(workspace, "check_llama_tree", lambda p: Path(p))
    monkeypatch.setitem(model.SHAPES, "tiny", MICRO)
    return repo


def test_a_copy_that_fills_the_disk_is_one_write_error_and_leaves_no_temp(tmp_path: Path, vocab: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    import errno
    import shutil

    from amppatch.errors import WriteError

    repo = _tiny_tree(tmp_path, vocab, monkeypatch)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def full(src, dst):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(WriteError, match="disk full"):
        synth_model(SynthOptions(shape="tiny", type="f16", repo=repo, out=out_dir / "m.gguf"))
    assert list(out_dir.iterdir()) == []  # was: an OSError traceback and a .m.gguf.tmp left behind


def test_a_build_whose_manifest_names_no_repo_is_refused(tmp_path: Path):
    from amppatch.build import Build

    bld = Build(tmp_path, {"schema_version": 1, "source_dir": str(tmp_path)}, tmp_path)  # was a KeyError
    with pytest.raises(UsageError, match="names no repository"):
        synth_model(SynthOptions(shape="tiny", type="q8_0", build=bld))
