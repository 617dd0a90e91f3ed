"""Synthetic llama-architecture GGUF models: random weights of a real shape, a real tokenizer.

Token-generation speed depends on shapes and weight types, not on values, so a synthetic 1.1B model runs
at the speed of a real one. The tokenizer is copied from one of the vocab files that llama.cpp ships,
f16 weights are written with the `gguf` package, and other types come from the tree's own llama-quantize.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amppatch.errors import UsageError
from amppatch.inputs import write_error
from amppatch.paths import FileLock, cache_dir
from amppatch.proc import progress, run

VOCAB_FILE = "models/ggml-vocab-llama-spm.gguf"


@dataclass(frozen=True)
class Shape:
    dim: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    context: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


SHAPES: dict[str, Shape] = {
    # Small enough to load and generate in about a second, yet every dimension is a multiple of 256 so
    # every weight type (incl. K-quants) and every extra buffer (repack: rows % 8, AMX) accepts it.
    "tiny": Shape(dim=256, layers=2, ffn=768, heads=4, kv_heads=2, context=2048),
    # TinyLlama-1.1B's shape.
    "1b": Shape(dim=2048, layers=22, ffn=5632, heads=32, kv_heads=4, context=2048),
    # A Llama-3.2-3B-like shape (3072 is a multiple of 256, unlike open_llama_3b's 3200).
    "3b": Shape(dim=3072, layers=28, ffn=8192, heads=24, kv_heads=8, context=4096),
}
# llama-quantize's type names for the types amppatch offers.
TYPES: dict[str, str] = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M", "q6_k": "Q6_K"}


@dataclass(frozen=True)
class SynthOptions:
    shape: str = "tiny"
    type: str = "q8_0"
    seed: int = 0
    out: Path | None = None
    build: object | None = None  # amppatch.build.Build providing llama-quantize
    repo: Path | None = None  # tree providing the vocab (default: the build's, else the pinned fetch)


def _validate(options: SynthOptions) -> None:
    if options.shape not in SHAPES:
        raise UsageError(f"unknown shape {options.shape!r}", next_step=f"use one of {', '.join(SHAPES)}")
    if options.type not in TYPES:
        raise UsageError(f"unknown weight type {options.type!r}", next_step=f"use one of {', '.join(TYPES)}")
    if options.seed < 0:
        raise UsageError("--seed must be >= 0", next_step="pass a non-negative integer")


def write_f16_model(path: Path, shape: Shape, seed: int, vocab_gguf: Path, name: str) -> None:
    """Write a llama GGUF with random f16 weights (deterministic for a seed) and the vocab's tokenizer."""
    import gguf

    reader = gguf.GGUFReader(str(vocab_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = len(tokens)
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
        if not key.startswith("tokenizer."):
            continue
        value_type = fld.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, fld.contents(), value_type, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), value_type)

    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        # Small normal values keep activations finite, so outputs (tokens, perplexity) are well defined.
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


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def synth_model(options: SynthOptions) -> Path:
    """Return a cached synthetic GGUF (creating it first); with `out`, also place a copy there."""
    from amppatch.build import Build, BuildOptions, build
    from amppatch.workspace import FetchOptions, check_llama_tree, fetch_llama

    _validate(options)
    if options.out is not None:
        out = Path(options.out).expanduser().resolve()
        if out.is_dir():
            raise UsageError(f"{out} is a directory", next_step="pass a file path ending in .gguf for -o")
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise UsageError(f"cannot write {out}: {out.parent} is missing or not writable",
                             next_step="choose -o in a writable directory")
    bld = options.build
    if options.repo is not None:
        repo = check_llama_tree(options.repo)
    elif isinstance(bld, Build):
        if not bld.manifest.get("repo"):
            raise UsageError(f"build {bld.dir}'s manifest names no repository to take the tokenizer from",
                             next_step="pass --repo DIR too, or a build made by `amppatch build`")
        repo = Path(bld.manifest["repo"])
    else:
        repo = fetch_llama(FetchOptions())
    vocab = repo / VOCAB_FILE
    if not vocab.is_file():
        raise UsageError(f"{repo} has no {VOCAB_FILE} to take the tokenizer from",
                         next_step="use a llama.cpp tree that ships its models/ggml-vocab-*.gguf files")
    shape = SHAPES[options.shape]
    models = cache_dir("models")
    f16 = models / f"{options.shape}-f16-seed{options.seed}-{_file_digest(vocab)}.gguf"
    with FileLock(models / f".{f16.name}.lock"):
        if not f16.is_file():
            progress(f"writing synthetic {options.shape} f16 model (seed {options.seed}) ...")
            with tempfile.NamedTemporaryFile(dir=models, suffix=".gguf.tmp", delete=False) as tmp:
                tmp_path = Path(tmp.name)
            try:
                write_f16_model(tmp_path, shape, options.seed, vocab, f"amppatch-synthetic-{options.shape}")
                tmp_path.chmod(0o644)  # NamedTemporaryFile creates 0600; models are shared like any cache file
                os.replace(tmp_path, f16)
            finally:
                tmp_path.unlink(missing_ok=True)
    result = f16
    if options.type != "f16":
        if not isinstance(bld, Build):
            bld = build(BuildOptions(repo=repo, targets=("llama-quantize",)))
        quantize = bld.binary("llama-quantize")
        if not isinstance(bld.manifest.get("commit"), str):
            raise UsageError(f"build {bld.dir}'s manifest names no commit (it keys the quantized model)",
                             next_step="pass a build made by `amppatch build`")
        target = models / f"{f16.stem.replace('-f16-', f'-{options.type}-')}-{bld.manifest['commit'][:12]}.gguf"
        with FileLock(models / f".{target.name}.lock"):
            if not target.is_file():
                from amppatch.build import run_env

                progress(f"quantizing to {options.type} with llama-quantize ...")
                tmp_q = target.with_name(target.name + ".tmp")
                try:
                    run([quantize, f16, tmp_q, TYPES[options.type], str(os.cpu_count() or 1)], env=run_env(bld),
                        timeout=3600, what="llama-quantize")
                    os.replace(tmp_q, target)
                finally:  # a failed or interrupted quantization leaves no partial model in the cache
                    tmp_q.unlink(missing_ok=True)
        result = target
    if options.out is None:
        return result
    tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(result, tmp_out)
        os.replace(tmp_out, out)
    except OSError as exc:  # disk full, read-only: one line, and no partial copy left behind
        raise write_error(out, exc, "copy the model to") from None
    finally:
        tmp_out.unlink(missing_ok=True)
    return out
