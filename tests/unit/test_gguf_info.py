"""gguf_info on small GGUF files written here (tensor tables only: nothing runs them)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from amppatch import gguf_info
from amppatch.errors import UsageError

N_EMBD, N_VOCAB, N_FF, N_LAYER, N_HEAD, N_HEAD_KV = 64, 100, 128, 2, 4, 2


def _write(path: Path, *, tied: bool, key_length: int | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYER)
    writer.add_embedding_length(N_EMBD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    if key_length is not None:
        writer.add_key_length(key_length)
        writer.add_value_length(key_length)
    writer.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), dtype=np.float16))
    for layer in range(N_LAYER):
        q8 = quants.quantize(np.ones((N_FF, N_EMBD), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((N_VOCAB, N_EMBD), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


EMBD_BYTES = N_VOCAB * N_EMBD * 2
ROW_BYTES = N_EMBD * 2
FFN_BYTES = N_FF * N_EMBD // 32 * 34  # Q8_0: 34 bytes per 32 weights
NORM_BYTES = N_EMBD * 4


def test_read_gguf_tensor_table_and_shape(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write(tmp_path / "m.gguf", tied=False))
    assert info.architecture == "llama"
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV)
    assert info.head_dim_k == info.head_dim_v == N_EMBD // N_HEAD
    up = info.tensor("blk.0.ffn_up.weight")
    assert up is not None and up.type == "Q8_0" and up.shape == (N_EMBD, N_FF)
    assert up.n_bytes == FFN_BYTES and up.row_bytes == N_EMBD // 32 * 34
    assert info.tensor("token_embd.weight").row_bytes == ROW_BYTES  # type: ignore[union-attr]
    assert info.n_vocab == N_VOCAB
    assert not info.tied_embeddings
    assert info.type_histogram["Q8_0"] == N_LAYER * FFN_BYTES
    assert info.total_tensor_bytes == 2 * EMBD_BYTES + N_LAYER * (FFN_BYTES + NORM_BYTES)


def test_bytes_per_token_gathers_one_embedding_row(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write(tmp_path / "m.gguf", tied=False))
    tb = gguf_info.bytes_per_token(info)
    assert tb.weights_whole == EMBD_BYTES + N_LAYER * (FFN_BYTES + NORM_BYTES)  # output.weight, not token_embd
    assert tb.gathered_rows == ROW_BYTES
    assert tb.kv == 0
    assert tb.excluded == ("token_embd.weight",)
    assert tb.total == tb.weights_whole + ROW_BYTES


def test_tied_embeddings_read_the_table_whole_for_the_output_matmul(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write(tmp_path / "m.gguf", tied=True))
    assert info.tied_embeddings
    tb = gguf_info.bytes_per_token(info)
    assert tb.tied_embeddings
    assert tb.weights_whole == EMBD_BYTES + N_LAYER * (FFN_BYTES + NORM_BYTES)
    assert tb.gathered_rows == ROW_BYTES  # the input lookup still gathers its row
    assert tb.excluded == ()


def test_kv_bytes_follow_the_attention_shape(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write(tmp_path / "m.gguf", tied=False, key_length=32))
    assert info.head_dim_k == 32
    # f16 K and V: layers × positions × kv heads × (dk + dv) × 2 bytes
    assert gguf_info.kv_bytes_per_token(info, 10) == N_LAYER * 10 * N_HEAD_KV * (32 + 32) * 2
    assert gguf_info.kv_bytes_per_token(info, 10, type_k="q8_0", type_v="q8_0") == round(
        N_LAYER * 10 * N_HEAD_KV * 64 * 34 / 32
    )
    tb = gguf_info.bytes_per_token(info, context_len=gguf_info.generation_context(100, 64))
    assert tb.context_len == pytest.approx(132.5)
    assert tb.kv == round(N_LAYER * 132.5 * N_HEAD_KV * 64 * 2)
    with pytest.raises(UsageError):
        gguf_info.kv_bytes_per_token(info, 1, type_k="q3_weird")


def test_unreadable_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        gguf_info.read_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(UsageError):
        gguf_info.read_gguf(bad)


N_EXPERT, N_EXPERT_USED = 8, 2
# Q8_0 expert slices of ffn_up_exps: N_EXPERT × (N_FF rows of N_EMBD)
EXPS_BYTES = N_EXPERT * N_FF * N_EMBD // 32 * 34
ROUTER_BYTES = N_EXPERT * N_EMBD * 4


def _write_moe(path: Path, *, expert_keys: bool = True, used: int = N_EXPERT_USED) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(N_LAYER)
    writer.add_embedding_length(N_EMBD)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    if expert_keys:
        writer.add_expert_count(N_EXPERT)
        writer.add_expert_used_count(used)
    writer.add_tensor("token_embd.weight", np.zeros((N_VOCAB, N_EMBD), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((N_VOCAB, N_EMBD), dtype=np.float16))
    for layer in range(N_LAYER):
        writer.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", np.zeros((N_EXPERT, N_EMBD), dtype=np.float32))
        exps = quants.quantize(np.ones((N_EXPERT, N_FF, N_EMBD), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", exps, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        # a shared expert is read whole whatever the router picks
        writer.add_tensor(f"blk.{layer}.ffn_up_shexp.weight", np.zeros((N_FF, N_EMBD), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SHEXP_BYTES = N_FF * N_EMBD * 2


def test_moe_reads_only_the_routed_experts(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write_moe(tmp_path / "moe.gguf"))
    assert (info.n_expert, info.n_expert_used) == (N_EXPERT, N_EXPERT_USED)
    exps = info.tensor("blk.0.ffn_up_exps.weight")
    assert exps is not None and exps.per_expert and exps.shape == (N_EMBD, N_FF, N_EXPERT)
    assert not info.tensor("blk.0.ffn_up_shexp.weight").per_expert  # type: ignore[union-attr]
    assert not info.tensor("blk.0.ffn_gate_inp.weight").per_expert  # type: ignore[union-attr]
    tb = gguf_info.bytes_per_token(info)
    assert (tb.n_expert, tb.n_expert_used) == (N_EXPERT, N_EXPERT_USED)
    assert tb.experts_total == N_LAYER * EXPS_BYTES
    assert tb.experts_read == N_LAYER * EXPS_BYTES * N_EXPERT_USED // N_EXPERT
    assert tb.weights_whole == EMBD_BYTES + N_LAYER * (ROUTER_BYTES + SHEXP_BYTES)
    assert tb.weights == tb.weights_whole + tb.experts_read
    assert tb.total == tb.weights + ROW_BYTES
    # per type: what a token reads, so profile attributes a quarter of the Q8_0 experts to its kernel
    assert tb.by_type == {"Q8_0": tb.experts_read, "F16": EMBD_BYTES + N_LAYER * SHEXP_BYTES,
                          "F32": N_LAYER * ROUTER_BYTES}
    # of which the routed experts' slices, the bytes mul_mat_id reads, per type
    assert tb.experts_by_type == {"Q8_0": tb.experts_read}
    # the file still holds every expert
    assert info.total_tensor_bytes == 2 * EMBD_BYTES + N_LAYER * (ROUTER_BYTES + EXPS_BYTES + SHEXP_BYTES)


def test_dense_model_has_no_experts_and_reads_every_weight(tmp_path: Path) -> None:
    info = gguf_info.read_gguf(_write(tmp_path / "m.gguf", tied=False))
    tb = gguf_info.bytes_per_token(info)
    assert (info.n_expert, info.n_expert_used, tb.experts_read, tb.experts_total) == (0, 0, 0, 0)
    assert tb.weights == tb.weights_whole
    assert tb.by_type == {"F16": EMBD_BYTES, "Q8_0": N_LAYER * FFN_BYTES, "F32": N_LAYER * NORM_BYTES}
    assert tb.experts_by_type == {}


def test_expert_count_without_its_keys_comes_from_the_tensor_and_counts_whole(tmp_path: Path) -> None:
    # without expert_used_count nobody knows how many experts a token reads: the figure stays an upper bound
    info = gguf_info.read_gguf(_write_moe(tmp_path / "moe.gguf", expert_keys=False))
    assert (info.n_expert, info.n_expert_used) == (N_EXPERT, 0)
    tb = gguf_info.bytes_per_token(info)
    assert tb.experts_read == 0 and tb.n_expert == 0
    assert tb.weights_whole == EMBD_BYTES + N_LAYER * (ROUTER_BYTES + EXPS_BYTES + SHEXP_BYTES)


@pytest.mark.parametrize("make", [lambda p: _write(p, tied=False), lambda p: _write(p, tied=True), _write_moe])
def test_weight_reads_sum_per_type_to_the_bytes_a_token_reads(tmp_path: Path, make) -> None:
    info = gguf_info.read_gguf(make(tmp_path / "m.gguf"))
    per_type: dict[str, int] = {}
    for tensor, n in gguf_info.weight_reads(info):
        per_type[tensor.type] = per_type.get(tensor.type, 0) + n
    assert per_type == gguf_info.bytes_per_token(info).by_type
    names = {t.name for t, _ in gguf_info.weight_reads(info)}
    assert ("token_embd.weight" in names) == info.tied_embeddings  # gathered one row, unless tied to the output
