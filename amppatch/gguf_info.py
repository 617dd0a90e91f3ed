"""What a GGUF model holds and how many bytes one generated token reads, from the file itself.

Token generation is a sequence of matrix-vector products: every weight tensor is streamed whole once per
token, except the token-embedding table, of which only the row of the current token is gathered. When a
model has no separate ``output.weight`` (tied embeddings), the output projection multiplies by the
embedding table, which is then read whole. In a mixture-of-experts model the expert tensors
(``blk.N.ffn_{gate,up,down}_exps``, one slice per expert) are read only in the slices of the experts the
router picks: ``expert_used_count`` of ``expert_count`` of their bytes per token (the router and shared
experts are read whole). The KV cache adds K and V rows of every cached position in every layer. These
counts drive ab-test's achieved-bandwidth figure and profile's bytes per kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import SupportsInt

from amppatch.errors import UsageError

# Tensors that are indexed by token id (or position), so one row per token is read, not the whole table.
_GATHERED = ("token_embd.weight", "position_embd.weight", "token_types.weight")
_OUTPUT = "output.weight"
_TOKEN_EMBD = "token_embd.weight"
# Tensors with one slice per expert (ggml's last dimension), e.g. blk.0.ffn_up_exps.weight; shared experts
# are named _shexp and are read whole.
_EXPERT_MARK = "_exps."

# Bytes per element of the KV-cache types llama-bench accepts for -ctk/-ctv (block types as bytes/element).
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
    "iq4_nl": 18 / 32,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. "Q8_0"
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    n_elements: int
    n_bytes: int

    @property
    def per_expert(self) -> bool:
        """One slice per expert: mul_mat_id reads only the routed experts' slices."""
        return _EXPERT_MARK in self.name

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (all dimensions but the first collapsed into rows)."""
        rows = max(1, self.n_elements // max(1, self.shape[0]))
        return self.n_bytes // rows


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    file_size: int
    tensors: tuple[TensorInfo, ...]
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int | None
    n_expert: int = 0  # experts per MoE layer (0: dense)
    n_expert_used: int = 0  # experts the router picks per token

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def tied_embeddings(self) -> bool:
        return self.tensor(_OUTPUT) is None and self.tensor(_TOKEN_EMBD) is not None

    @property
    def type_histogram(self) -> dict[str, int]:
        """Bytes per tensor type (what the kernels actually stream)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + t.n_bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class TokenBytes:
    """Bytes one generated token reads, and how the figure was made."""

    weights_whole: int  # tensors streamed whole
    gathered_rows: int  # one row of each gathered table
    kv: int  # K and V rows of all cached positions, all layers
    context_len: float  # cached positions assumed (average over the run)
    tied_embeddings: bool
    excluded: tuple[str, ...]  # tables only gathered from
    experts_read: int = 0  # the routed experts' slices of the per-expert tensors
    experts_total: int = 0  # all bytes of the per-expert tensors (what the file holds)
    n_expert: int = 0
    n_expert_used: int = 0
    by_type: dict[str, int] = field(default_factory=dict)  # weight bytes read per tensor type (not gathered)
    # of by_type, the routed experts' slices: the bytes mul_mat_id reads (the rest of a type goes to mul_mat)
    experts_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        """Weight bytes the matrix products read: tensors streamed whole plus the routed experts."""
        return self.weights_whole + self.experts_read

    @property
    def total(self) -> int:
        return self.weights + self.gathered_rows + self.kv


def _field(reader: object, key: str) -> object | None:
    field = reader.get_field(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    return field.contents()


def _first_int(value: object | None, default: int) -> int:
    # Some architectures store per-layer arrays (e.g. head_count_kv); the first layer stands for all here.
    if value is None:
        return default
    if isinstance(value, list):
        return int(value[0]) if value else default
    if not isinstance(value, (SupportsInt, str)):  # numpy scalars from the reader are SupportsInt
        raise TypeError(f"not a number: {value!r}")
    return int(value)


def read_gguf(path: Path) -> GgufInfo:
    """Tensor table and the attention shape of a GGUF file (memory-mapped; tensor data is not read)."""
    from gguf import GGUFReader  # imported lazily: the package parses numpy-heavy tables at import

    from amppatch.inputs import check_gguf

    path = Path(path).expanduser()
    check_gguf(path)  # structure and size first: the gguf package's reader fails on a cut file with an IndexError
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a readable GGUF file: {exc}", next_step="check the model file") from exc
    arch = str(_field(reader, "general.architecture") or "")
    tensors = tuple(
        TensorInfo(
            name=t.name,
            type=t.tensor_type.name,
            shape=tuple(int(d) for d in t.shape),
            n_elements=int(t.n_elements),
            n_bytes=int(t.n_bytes),
        )
        for t in reader.tensors
    )
    n_embd = _first_int(_field(reader, f"{arch}.embedding_length"), 0)
    n_head = _first_int(_field(reader, f"{arch}.attention.head_count"), 0)
    n_head_kv = _first_int(_field(reader, f"{arch}.attention.head_count_kv"), n_head)
    head_dim = n_embd // n_head if n_head else 0
    vocab = _field(reader, "tokenizer.ggml.tokens")
    embd = next((t for t in tensors if t.name == _TOKEN_EMBD), None)
    n_vocab = len(vocab) if isinstance(vocab, list) else (embd.shape[1] if embd and len(embd.shape) > 1 else None)
    per_expert = next((t for t in tensors if t.per_expert and len(t.shape) == 3), None)
    # The expert count is in the KV data; a file without it still says it through its 3-D expert tensors.
    n_expert = _first_int(_field(reader, f"{arch}.expert_count"), per_expert.shape[2] if per_expert else 0)
    return GgufInfo(
        path=path.resolve(),
        architecture=arch,
        file_size=path.stat().st_size,
        tensors=tensors,
        n_layer=_first_int(_field(reader, f"{arch}.block_count"), 0),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=_first_int(_field(reader, f"{arch}.attention.key_length"), head_dim),
        head_dim_v=_first_int(_field(reader, f"{arch}.attention.value_length"), head_dim),
        n_vocab=n_vocab,
        n_expert=n_expert,
        n_expert_used=_first_int(_field(reader, f"{arch}.expert_used_count"), 0),
    )


def kv_bytes_per_token(info: GgufInfo, context_len: float, *, type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V bytes attention reads for one token that attends `context_len` cached positions."""
    try:
        bk, bv = KV_TYPE_BYTES[type_k], KV_TYPE_BYTES[type_v]
    except KeyError as exc:
        raise UsageError(
            f"unknown KV cache type {exc.args[0]!r}", next_step=f"use one of {sorted(KV_TYPE_BYTES)}"
        ) from None
    per_position = info.n_head_kv * (info.head_dim_k * bk + info.head_dim_v * bv)
    return round(info.n_layer * context_len * per_position)


def generation_context(depth: int, n_gen: int) -> float:
    """Average cached positions per generated token in a llama-bench `-d depth -n n_gen` run: token i
    (1-based) attends depth + i positions."""
    return depth + (n_gen + 1) / 2.0


def weight_reads(info: GgufInfo) -> list[tuple[TensorInfo, int]]:
    """The tensors one generated token streams, each with the bytes it reads of it: whole, or the routed
    experts' slices of a per-expert tensor. Gathered tables (one row per token) are not among them, except the
    token-embedding table when the output projection is tied to it (then it is read whole). Per type, these
    sum to `bytes_per_token(info).by_type`."""
    tied = info.tied_embeddings
    routed = 0 < info.n_expert_used <= info.n_expert
    out: list[tuple[TensorInfo, int]] = []
    for t in info.tensors:
        if t.name in _GATHERED and not (tied and t.name == _TOKEN_EMBD):
            continue
        out.append((t, t.n_bytes // info.n_expert * info.n_expert_used if t.per_expert and routed else t.n_bytes))
    return out


def bytes_per_token(
    info: GgufInfo, *, context_len: float = 0.0, type_k: str = "f16", type_v: str = "f16"
) -> TokenBytes:
    """Bytes read per generated token: weights whole (gathered tables one row, per-expert tensors the routed
    experts' slices), plus the KV cache."""
    whole = 0
    rows = 0
    experts_read = 0
    experts_total = 0
    by_type: dict[str, int] = {}
    experts_by_type: dict[str, int] = {}
    excluded: list[str] = []
    tied = info.tied_embeddings
    # Without a used-expert count the share read is unknown: such tensors count whole (an upper bound).
    routed = 0 < info.n_expert_used <= info.n_expert
    for t in info.tensors:
        if t.name in _GATHERED and not (tied and t.name == _TOKEN_EMBD):
            rows += t.row_bytes
            excluded.append(t.name)
            continue
        if t.per_expert and routed:
            read = t.n_bytes // info.n_expert * info.n_expert_used
            experts_read += read
            experts_total += t.n_bytes
            experts_by_type[t.type] = experts_by_type.get(t.type, 0) + read
        else:
            read = t.n_bytes
            whole += t.n_bytes
        by_type[t.type] = by_type.get(t.type, 0) + read
    if tied:
        # The output projection reads the (whole) embedding table, and the input still gathers one row.
        embd = info.tensor(_TOKEN_EMBD)
        assert embd is not None
        rows += embd.row_bytes
    return TokenBytes(
        weights_whole=whole,
        gathered_rows=rows,
        kv=kv_bytes_per_token(info, context_len, type_k=type_k, type_v=type_v) if context_len > 0 else 0,
        context_len=context_len,
        tied_embeddings=tied,
        excluded=tuple(excluded),
        experts_read=experts_read,
        experts_total=experts_total,
        n_expert=info.n_expert if routed else 0,
        n_expert_used=info.n_expert_used if routed else 0,
        by_type=by_type,
        experts_by_type=experts_by_type,
    )
