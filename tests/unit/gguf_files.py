"""GGUF files for unit tests, written with the gguf package (nothing runs them)."""

from __future__ import annotations

from pathlib import Path


def write_small_gguf(path: Path, heads: int = 0) -> Path:
    """A small but whole GGUF (metadata, a string array, an F32 and a Q8_0 tensor), written with the gguf
    package as a model file would be; `heads` attention heads give it a KV cache to count."""
    import gguf
    import numpy as np
    from gguf import quants

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    if heads:
        writer.add_head_count(heads)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    q8 = quants.quantize(np.ones((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

