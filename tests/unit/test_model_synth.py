import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest

from amppatch.errors import UsageError
from amppatch.model import SHAPES, Shape, SynthOptions, synth_model, write_f16_model

MICRO = Shape(dim=64, layers=2, ffn=128, heads=4, kv_heads=2, context=256)


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


@pytest.mark.parametrize(("field", "value"), [("shape", "7b"), ("type", "q3_k"), ("seed", -1)])
def test_bad_options_are_refused(field: str, value, tmp_path: Path):
    options = SynthOptions(**{field: value}, repo=tmp_path)
    with pytest.raises(UsageError):
        synth_model(options)


def test_unwritable_output_is_refused_before_work(tmp_path: Path):
    with pytest.raises(UsageError, match=r"not writable|missing"):
        synth_model(SynthOptions(out=tmp_path / "no" / "such" / "dir" / "m.gguf", repo=tmp_path))


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
