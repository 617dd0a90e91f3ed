"""`amppatch run --model`: the description, the refusals, the identity key and the model stage (no builds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from amppatch import run as run_mod
from amppatch import run_model
from amppatch.cli import main
from amppatch.errors import UsageError
from amppatch.run import RunOptions, model_stage_inputs, stage_key
from amppatch.run_report import render_summary


def _write(path: Path, types: tuple[str, ...] = ("Q8_0", "Q4_0"), experts: int = 0) -> Path:
    import gguf
    import numpy as np
    from gguf import quants

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    for i, name in enumerate(types):
        qtype = gguf.GGMLQuantizationType[name]
        rows = 16 if i == 0 else 8  # the first type dominates
        try:
            data = quants.quantize(np.ones((rows, 256), dtype=np.float32), qtype)
        except NotImplementedError:  # gguf-py quantizes few types; the reader needs only the right byte count
            data = np.zeros(quants.quant_shape_to_byte_shape((rows, 256), qtype), dtype=np.uint8)
        writer.add_tensor(f"blk.0.ffn_{i}.weight", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_meminfo_parser() -> None:
    text = "MemTotal:       16303428 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n"
    assert run_model.parse_meminfo(text) == 12000000 * 1024
    assert run_model.parse_meminfo("MemTotal: 5 kB\n") is None
    assert run_model.parse_meminfo("MemAvailable: lots\n") is None


def test_mem_available_reads_a_file(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemAvailable: 2 kB\n")
    assert run_model.mem_available(tmp_path / "meminfo") == 2048
    assert run_model.mem_available(tmp_path / "missing") is None


def test_the_model_is_described(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "m.gguf", experts=4)
    info = run_model.check_user_model(path, available=1 << 40)
    err = capsys.readouterr().err
    assert "m.gguf" in err and "architecture: llama" in err and "parameters" in err
    assert "Q8_0" in err and "Q4_0" in err and "%" in err
    assert "experts: 4, 2 active" in err and "file size" in err
    assert run_model.dominant_type(info) == "Q8_0" and run_model.gate_type(info) == "q8_0"
    assert next(iter(run_model.type_shares(info))) == "Q8_0"


def test_an_unknown_weight_type_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", types=("Q8_0", "Q5_0"))
    with pytest.raises(UsageError, match="no CPU kernel amppatch knows serves: Q5_0"):
        run_model.check_user_model(path, available=1 << 40)


def test_the_refusal_lists_the_accepted_types(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", types=("Q4_K", "Q2_K"))
    with pytest.raises(UsageError) as info:
        run_model.check_user_model(path, available=1 << 40)
    assert info.value.next_step is not None
    for t in ("Q8_0", "Q4_0", "Q4_K", "Q6_K", "F16", "Q5_K", "Q3_K", "IQ4_XS", "IQ4_NL", "F32"):
        assert t in info.value.next_step


# Types accepted beyond Q8_0/Q4_0/Q4_K/Q6_K/F16, each checked on the pinned tree: apply finds a site in its
# x86 kernel, `model synth` makes a tiny model holding it, the gate proves the patched kernel ran there.
@pytest.mark.parametrize(("gguf_type", "synthetic", "kernel"), [
    ("Q5_K", "q5_k", "ggml_vec_dot_q5_K_q8_K"),
    ("Q3_K", "q3_k", "ggml_vec_dot_q3_K_q8_K"),
    ("IQ4_XS", "iq4_xs", "ggml_vec_dot_iq4_xs_q8_K"),
    ("IQ4_NL", "iq4_nl", "ggml_vec_dot_iq4_nl_q8_0"),
])
def test_an_added_weight_type_is_accepted_and_gated_on_its_own_model(tmp_path: Path, gguf_type: str,
                                                                       synthetic: str, kernel: str) -> None:
    from amppatch.gate_sites import model_type_for
    from amppatch.model import TYPES

    path = _write(tmp_path / "m.gguf", types=(gguf_type, "Q6_K"))
    info = run_model.check_user_model(path, available=1 << 40)
    assert run_model.dominant_type(info) == gguf_type
    assert run_model.gate_type(info) == synthetic == model_type_for(kernel)
    assert synthetic in TYPES


def test_more_weights_than_memory_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    with pytest.raises(UsageError, match="of memory is available"):
        run_model.check_user_model(path, available=100)


def test_a_broken_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="--model"):
        run_model.check_user_model(tmp_path / "m.gguf", available=1 << 40)


def test_a_touched_model_changes_the_model_stage_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf")
    options = RunOptions(model=path)
    key = stage_key("model", model_stage_inputs(options))
    assert stage_key("model", model_stage_inputs(options)) == key
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert stage_key("model", model_stage_inputs(options)) != key
    synthetic = stage_key("model", model_stage_inputs(RunOptions()))
    assert synthetic != key


@pytest.mark.parametrize("flag", [["--shape", "tiny"], ["--type", "q4_0"]])
def test_model_with_shape_or_type_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             flag: list[str]) -> None:
    path = _write(tmp_path / "m.gguf")
    assert main(["run", "-o", str(tmp_path / "o"), "--model", str(path), *flag]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "excludes --shape and --type" in err
    assert not (tmp_path / "o").exists()


class _Manifest:
    path = Path("/x/manifest.json")
    branch = "b"
    build_b = "/x/b"


class _Result:
    manifest = _Manifest()


def _runner(tmp_path: Path, model: Path) -> run_mod._Runner:
    options = run_mod.resolve_options(RunOptions(model=model, out=tmp_path / "o", threads=(1,)))
    (tmp_path / "o").mkdir()
    r = run_mod._Runner(options)
    r.outputs = {"fetch": {"repo": str(tmp_path)}, "build": {"build": str(tmp_path / "stock")}}
    return r


def test_the_model_stage_uses_the_users_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import build, model, patch

    path = _write(tmp_path / "m.gguf")
    monkeypatch.setattr(run_model, "mem_available", lambda path=None: 1 << 40)
    monkeypatch.setattr(build, "load_build", lambda p: "BUILD")
    synthesized: list[Any] = []

    def synth(o: Any) -> Path:
        synthesized.append(o)
        return tmp_path / f"{o.shape}-{o.type}.gguf"

    monkeypatch.setattr(model, "synth_model", synth)
    r = _runner(tmp_path, path)
    status, out = r.model()
    assert status == "done" and out["model"] == str(path.resolve())
    assert out["user_model"]["name"] == "m.gguf" and out["user_model"]["architecture"] == "llama"
    # only the tiny gate model of the dominant type, never the main model
    assert [(o.shape, o.type) for o in synthesized] == [("tiny", "q8_0")]
    assert out["gate_model"] == str(tmp_path / "tiny-q8_0.gguf")

    r.outputs["model"] = out
    r.outputs["profile"] = {"profile": str(tmp_path / "profile.json"), "fallback_sites": []}
    seen: list[Any] = []
    monkeypatch.setattr(patch, "apply", lambda o: seen.append(o) or _Result())
    monkeypatch.setattr(r, "build_options", lambda: None)
    r.apply_tunable()
    assert seen[0].gate_model is None  # apply gates each kernel on its own weight type
    assert seen[0].gate_type == "q8_0"  # and a site of no weight type on the dominant one's

    report = render_summary(r.o, r.outputs, {})
    assert "- model: m.gguf (llama; Q8_0" in report and "synthetic" not in report.split("\n")[2]


def test_a_moe_model_is_gated_on_the_tiny_moe_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import build, model

    path = _write(tmp_path / "m.gguf", types=("Q4_K", "Q6_K"), experts=4)
    monkeypatch.setattr(run_model, "mem_available", lambda path=None: 1 << 40)
    monkeypatch.setattr(build, "load_build", lambda p: "BUILD")
    monkeypatch.setattr(model, "synth_model", lambda o: tmp_path / f"{o.shape}-{o.type}.gguf")
    r = _runner(tmp_path, path)
    _, out = r.model()
    assert out["gate_model"] == str(tmp_path / "tiny-moe-q4_k.gguf") and out["gate_type"] == "q4_k"
    r.outputs["model"] = out
    r.outputs["profile"] = {"hot_function": "ggml_gemv_q4_K_8x8_q8_K", "hot_share": 0.56, "sites": [],
                            "matrix_ops": {"ggml_gemv_q4_K_8x8_q8_K": "mul_mat_id 75 % · mul_mat 25 % of the q4_k "
                                                                      "bytes"}}
    assert ("- mixture of experts, what drives each hot kernel: ggml_gemv_q4_K_8x8_q8_K: mul_mat_id 75 % · "
            "mul_mat 25 % of the q4_k bytes") in render_summary(r.o, r.outputs, {})


def test_a_synthetic_moe_run_gates_on_the_tiny_moe_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import build, model

    monkeypatch.setattr(build, "load_build", lambda p: "BUILD")
    monkeypatch.setattr(model, "synth_model", lambda o: tmp_path / f"{o.shape}-{o.type}.gguf")
    options = run_mod.resolve_options(RunOptions(shape="moe", type="q4_k", out=tmp_path / "o", threads=(1,)))
    (tmp_path / "o").mkdir()
    r = run_mod._Runner(options)
    r.outputs = {"fetch": {"repo": str(tmp_path)}, "build": {"build": str(tmp_path / "stock")}}
    _, out = r.model()
    assert out["model"] == str(tmp_path / "moe-q4_k.gguf")
    assert out["gate_model"] == str(tmp_path / "tiny-moe-q4_k.gguf")
    r.outputs["model"] = out
    assert r.apply_gate() == {"gate_model": tmp_path / "tiny-moe-q4_k.gguf"}


def test_an_unsynthesizable_dominant_type_skips_the_final_gate(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from amppatch import build, model

    path = _write(tmp_path / "m.gguf", types=("F32", "Q8_0"))
    monkeypatch.setattr(run_model, "mem_available", lambda path=None: 1 << 40)
    monkeypatch.setattr(build, "load_build", lambda p: "BUILD")
    monkeypatch.setattr(model, "synth_model", lambda o: pytest.fail("nothing to synthesize"))
    r = _runner(tmp_path, path)
    _, out = r.model()
    assert out["gate_model"] is None and "F32" in out["gate_note"]
    r.outputs["model"] = out
    assert "note: the dominant weight type F32" in render_summary(r.o, r.outputs, {})


class _Captured(Exception):
    pass


@pytest.mark.parametrize("gate", [None, "/x/tiny-q8_0.gguf"])
def test_the_final_ab_test_gates_on_the_dominant_type_or_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               gate: str | None) -> None:
    from amppatch import abtest

    monkeypatch.setattr(run_model, "mem_available", lambda path=None: 1 << 40)
    r = _runner(tmp_path, _write(tmp_path / "m.gguf"))
    r.outputs["model"] = {"model": str(tmp_path / "m.gguf"), "gate_model": gate}
    r.outputs["bake"] = {"stock_build": "/x/a", "arms": {"prefetch": {"build": "/x/b"}}}
    seen: list[Any] = []

    def capture(options: Any) -> None:
        seen.append(options)
        raise _Captured

    monkeypatch.setattr(abtest, "run_abtest", capture)
    with pytest.raises(_Captured):
        r.final()
    assert seen[0].model == tmp_path / "m.gguf"
    assert seen[0].gate_model == (Path(gate) if gate else None)
    assert seen[0].skip_correctness is (gate is None)
