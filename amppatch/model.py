"""Synthetic llama-architecture GGUF models: random weights of a real shape, a real tokenizer.

Token-generation speed depends on shapes and weight types, not on values, so a synthetic 1.1B model runs
at the speed of a real one. The tokenizer is copied from one of the vocab files that llama.cpp ships,
f16 weights are written with the `gguf` package, and other types come from the tree's own llama-quantize
under the preset names users know (Q4_K_M, IQ4_XS, ...).

The f16 file is streamed: every tensor's header is written first, then each tensor's random values are
generated just before it is written and dropped after, so the peak memory is one tensor (the 8B shape's
1 GiB output matrix), not the whole model.

The mixture-of-experts shapes are Mixtral's layout in the llama architecture — ``llama.expert_count``,
``llama.expert_used_count``, a router ``blk.N.ffn_gate_inp`` and 3-D ``blk.N.ffn_{gate,up,down}_exps``
tensors — which llama.cpp runs through ``mul_mat_id``. Mixtral's own size (47B parameters) does not fit a
small machine, so ``moe`` keeps its 8 experts with 2 active per token and scales the rest down until a
token reads about what the dense ``1b`` shape reads (1.0B active of 3.5B parameters, F16 7.0 GB):
a token should cost what a 1b token does (not measured yet at full size), while the file holds over 3×
the weights a token touches, as in a real MoE.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from amppatch.errors import UsageError
from amppatch.inputs import write_error
from amppatch.paths import FileLock, cache_dir
from amppatch.proc import progress, run

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField

VOCAB_SPM = "models/ggml-vocab-llama-spm.gguf"  # Llama-2's 32000-token SentencePiece vocabulary
VOCAB_BPE = "models/ggml-vocab-llama-bpe.gguf"  # Llama-3's 128256-token BPE vocabulary
VOCAB_FILE = VOCAB_SPM  # the default shapes' tokenizer

# Random values are generated in chunks of this many elements, so the float32 scratch stays small next to
# the float16 tensor it fills; the chunks continue one generator stream, so the values do not depend on it.
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Shape:
    dim: int
    layers: int
    ffn: int  # per expert in a mixture-of-experts shape
    heads: int
    kv_heads: int
    context: int
    rope_theta: float = 10000.0
    vocab: str = VOCAB_SPM  # the tree's vocab file whose tokenizer the model gets
    experts: int = 0  # 0: a dense model
    experts_used: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


SHAPES: dict[str, Shape] = {
    # Small enough to load and generate in about a second, yet every dimension is a multiple of 256 so
    # every weight type (incl. K-quants) and every extra buffer (repack: rows % 8, AMX) accepts it.
    "tiny": Shape(dim=256, layers=2, ffn=768, heads=4, kv_heads=2, context=2048),
    # The tiny model with 4 experts, 2 active: the mul_mat_id kernels in about a second.
    "tiny-moe": Shape(dim=256, layers=2, ffn=512, heads=4, kv_heads=2, context=2048, experts=4, experts_used=2),
    # TinyLlama-1.1B's shape.
    "1b": Shape(dim=2048, layers=22, ffn=5632, heads=32, kv_heads=4, context=2048),
    # A Llama-3.2-3B-like shape (3072 is a multiple of 256, unlike open_llama_3b's 3200).
    "3b": Shape(dim=3072, layers=28, ffn=8192, heads=24, kv_heads=8, context=4096),
    # Llama-3-8B: its shape, RoPE base and 128k BPE vocabulary (F16 ≈ 16 GB, Q4_K_M ≈ 4.9 GB).
    "8b": Shape(dim=4096, layers=32, ffn=14336, heads=32, kv_heads=8, context=8192, rope_theta=500000.0,
                vocab=VOCAB_BPE),
    # Mixtral's layout (8 experts, 2 active, RoPE base 1e6, Llama-2 vocabulary) scaled to a 1B-active model
    # that fits this kind of machine: 3.5B parameters, 1.0B read per token.
    "moe": Shape(dim=2048, layers=16, ffn=4096, heads=32, kv_heads=8, context=4096, rope_theta=1000000.0,
                 experts=8, experts_used=2),
}

# llama-quantize's preset (ftype) names for the types amppatch offers, by the lower-case name amppatch
# takes. IQ4_XS and IQ4_NL quantize without an importance matrix; the IQ1/IQ2/IQ3_XXS presets need one
# (llama-quantize refuses them without --imatrix), so they are not offered.
PRESETS: dict[str, str] = {
    "f16": "F16",
    "q8_0": "Q8_0",
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K_M",
    "q5_k_s": "Q5_K_S",
    "q4_k_m": "Q4_K_M",
    "q4_k_s": "Q4_K_S",
    "q4_0": "Q4_0",
    "iq4_xs": "IQ4_XS",
    "iq4_nl": "IQ4_NL",
    "q3_k_m": "Q3_K_M",
}
# llama-quantize's own short names for the _M mixes (q4_k was amppatch's name for Q4_K_M before).
ALIASES: dict[str, str] = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
# Every name --type accepts (lower case) → llama-quantize's preset name.
TYPES: dict[str, str] = {**PRESETS, **{alias: PRESETS[target] for alias, target in ALIASES.items()}}


def canonical_type(name: str) -> str:
    """The preset key of a --type name, any case, aliases resolved: 'Q4_K' → 'q4_k_m'."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise UsageError(f"unknown weight type {name!r}",
                         next_step=f"use one of {', '.join(PRESETS)} (or the aliases {', '.join(ALIASES)})")
    return key


@dataclass(frozen=True)
class SynthOptions:
    shape: str = "tiny"
    type: str = "q8_0"  # a TYPES name, any case
    seed: int = 0
    out: Path | None = None
    build: object | None = None  # amppatch.build.Build providing llama-quantize
    repo: Path | None = None  # tree providing the vocab (default: the build's, else the pinned fetch)


def _validate(options: SynthOptions) -> None:
    if options.shape not in SHAPES:
        raise UsageError(f"unknown shape {options.shape!r}", next_step=f"use one of {', '.join(SHAPES)}")
    canonical_type(options.type)
    if options.seed < 0:
        raise UsageError("--seed must be >= 0", next_step="pass a non-negative integer")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of a synthetic model, before its values exist."""

    name: str
    shape: tuple[int, ...]  # numpy order: the last dimension is the row (ggml's ne0)
    kind: str  # "weight": random f16, "router": random f32, "norm": f32 ones

    @property
    def dtype(self) -> type[np.generic]:
        return np.float16 if self.kind == "weight" else np.float32

    @property
    def n_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def tensor_plan(shape: Shape, vocab: int) -> list[TensorPlan]:
    """The tensors of a llama model of `shape`, in file order (which is also the order values are drawn)."""
    kv_dim = shape.head_dim * shape.kv_heads
    plan = [
        TensorPlan("token_embd.weight", (vocab, shape.dim), "weight"),
        TensorPlan("output_norm.weight", (shape.dim,), "norm"),
        TensorPlan("output.weight", (vocab, shape.dim), "weight"),
    ]
    for i in range(shape.layers):
        plan += [
            TensorPlan(f"blk.{i}.attn_norm.weight", (shape.dim,), "norm"),
            TensorPlan(f"blk.{i}.attn_q.weight", (shape.dim, shape.dim), "weight"),
            TensorPlan(f"blk.{i}.attn_k.weight", (kv_dim, shape.dim), "weight"),
            TensorPlan(f"blk.{i}.attn_v.weight", (kv_dim, shape.dim), "weight"),
            TensorPlan(f"blk.{i}.attn_output.weight", (shape.dim, shape.dim), "weight"),
            TensorPlan(f"blk.{i}.ffn_norm.weight", (shape.dim,), "norm"),
        ]
        if shape.experts:
            e = shape.experts
            plan += [
                # The router stays f32, as converted models have it (llama-quantize never quantizes it).
                TensorPlan(f"blk.{i}.ffn_gate_inp.weight", (e, shape.dim), "router"),
                TensorPlan(f"blk.{i}.ffn_gate_exps.weight", (e, shape.ffn, shape.dim), "weight"),
                TensorPlan(f"blk.{i}.ffn_up_exps.weight", (e, shape.ffn, shape.dim), "weight"),
                TensorPlan(f"blk.{i}.ffn_down_exps.weight", (e, shape.dim, shape.ffn), "weight"),
            ]
        else:
            plan += [
                TensorPlan(f"blk.{i}.ffn_gate.weight", (shape.ffn, shape.dim), "weight"),
                TensorPlan(f"blk.{i}.ffn_up.weight", (shape.ffn, shape.dim), "weight"),
                TensorPlan(f"blk.{i}.ffn_down.weight", (shape.dim, shape.ffn), "weight"),
            ]
    return plan


def _values(plan: TensorPlan, rng: np.random.Generator) -> np.ndarray:
    if plan.kind == "norm":
        return np.ones(plan.shape, dtype=np.float32)
    out = np.empty(plan.shape, dtype=plan.dtype)
    flat = out.reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMENTS):
        # Small normal values keep activations finite, so outputs (tokens, perplexity) are well defined.
        block = rng.standard_normal(min(_CHUNK_ELEMENTS, flat.size - start), dtype=np.float32)
        block *= 0.02
        flat[start:start + block.size] = block
    return out


def _vocab_size(reader: object) -> int:
    # An array field's `data` indexes its elements: the count without decoding 128k token strings.
    return len(reader.fields["tokenizer.ggml.tokens"].data)  # type: ignore[attr-defined]


def _tokenizer_fields(reader: GGUFReader) -> Iterator[tuple[str, ReaderField]]:
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer."):
            yield key, fld


def write_f16_model(path: Path, shape: Shape, seed: int, vocab_gguf: Path, name: str) -> None:
    """Write a llama GGUF with random f16 weights (deterministic for a seed) and the vocab's tokenizer,
    one tensor in memory at a time."""
    import gguf

    reader = gguf.GGUFReader(str(vocab_gguf))
    vocab = _vocab_size(reader)
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
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.experts:
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, fld in _tokenizer_fields(reader):
        value_type = fld.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, fld.contents(), value_type, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), value_type)
    del reader

    plan = tensor_plan(shape, vocab)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.n_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    try:
        for t in plan:
            writer.write_tensor_data(_values(t, rng))
    finally:
        writer.close()


def f16_bytes(shape: Shape, vocab: int) -> int:
    """Tensor bytes of the f16 model of `shape` (the file is these plus header and alignment)."""
    return sum(t.n_bytes for t in tensor_plan(shape, vocab))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _check_disk(directory: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < need:
        raise UsageError(f"{what} needs {need / 1e9:.1f} GB in {directory}, which has {free / 1e9:.1f} GB free",
                         next_step="free disk space (`amppatch clean --kind models` drops cached models) "
                         "or set AMPPATCH_CACHE_DIR to a larger disk")


# A quantized file is at most this fraction of its f16 source (Q8_0: 8.5 bits per weight of 16).
_QUANTIZED_FRACTION = 0.55


def _write_f16(dest: Path, options: SynthOptions, shape: Shape, vocab: Path, *, then_quantize: bool) -> None:
    """Write the f16 model to `dest` atomically (a temporary file in the same directory, then rename)."""
    import gguf

    n_bytes = f16_bytes(shape, _vocab_size(gguf.GGUFReader(str(vocab))))
    # Checked before writing, for the quantized file too: a full disk should not cost a 16 GB write first.
    need = int(n_bytes * (1 + _QUANTIZED_FRACTION)) if then_quantize else n_bytes
    _check_disk(dest.parent, need, f"the {options.shape} model" if then_quantize else f"the {options.shape} f16 model")
    progress(f"writing synthetic {options.shape} f16 model (seed {options.seed}, {n_bytes / 1e9:.2f} GB) ...")
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".gguf.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write_f16_model(tmp_path, shape, options.seed, vocab, f"amppatch-synthetic-{options.shape}")
        tmp_path.chmod(0o644)  # NamedTemporaryFile creates 0600; models are shared like any cache file
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)
    progress(f"wrote {dest.name} in {time.monotonic() - t0:.0f} s (peak RSS so far {_peak_rss_gb():.2f} GB)")


def synth_model(options: SynthOptions) -> Path:
    """Return a cached synthetic GGUF (creating it first); with `out`, also place a copy there.

    A quantized model is made from an f16 one that is written for it and deleted right after (an 8B f16 is
    16 GB, and writing it again costs less than quantizing); only a model asked for as f16 is kept as
    f16, and a cached one is quantized from directly.
    """
    from amppatch.build import Build, BuildOptions, build
    from amppatch.workspace import FetchOptions, check_llama_tree, fetch_llama

    _validate(options)
    type_key = canonical_type(options.type)
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
    shape = SHAPES[options.shape]
    vocab = repo / shape.vocab
    if not vocab.is_file():
        raise UsageError(f"{repo} has no {shape.vocab} to take the tokenizer from",
                         next_step="use a llama.cpp tree that ships its models/ggml-vocab-*.gguf files")
    models = cache_dir("models")
    stem = f"{options.shape}-{{}}-seed{options.seed}-{_file_digest(vocab)}"
    f16 = models / f"{stem.format('f16')}.gguf"
    if type_key == "f16":
        with FileLock(models / f".{f16.name}.lock"):
            if not f16.is_file():
                _write_f16(f16, options, shape, vocab, then_quantize=False)
        result = f16
    else:
        if not isinstance(bld, Build):
            bld = build(BuildOptions(repo=repo, targets=("llama-quantize",)))
        quantize = bld.program("quantize")
        if not isinstance(bld.manifest.get("commit"), str):
            raise UsageError(f"build {bld.dir}'s manifest names no commit (it keys the quantized model)",
                             next_step="pass a build made by `amppatch build`")
        target = models / f"{stem.format(type_key)}-{bld.manifest['commit'][:12]}.gguf"
        with FileLock(models / f".{target.name}.lock"):
            if not target.is_file():
                from amppatch.build import run_env

                # The f16 is only an intermediate here: a unique name (nobody else reads it) that goes away
                # whether quantizing works or not. A cached f16 (someone asked for f16) is used as it is.
                source = f16 if f16.is_file() else target.with_name(f".{target.stem}.f16-{os.getpid()}.gguf")
                tmp_q = target.with_name(target.name + ".tmp")
                try:
                    if source != f16:
                        _write_f16(source, options, shape, vocab, then_quantize=True)
                    else:
                        _check_disk(models, int(source.stat().st_size * _QUANTIZED_FRACTION),
                                    f"quantizing to {PRESETS[type_key]}")
                    progress(f"quantizing to {PRESETS[type_key]} with llama-quantize ...")
                    t0 = time.monotonic()
                    run([quantize, source, tmp_q, PRESETS[type_key], str(os.cpu_count() or 1)],
                        env=run_env(bld), timeout=3 * 3600, what="llama-quantize")
                    os.replace(tmp_q, target)
                    progress(f"quantized in {time.monotonic() - t0:.0f} s")
                finally:
                    tmp_q.unlink(missing_ok=True)
                    if source != f16:
                        source.unlink(missing_ok=True)
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
