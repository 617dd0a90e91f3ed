"""`amppatch run --model PATH`: the user's own GGUF in place of the synthetic model.

Before any build the file is checked (`inputs.check_gguf`), read (`gguf_info.read_gguf`) and described in one
progress block; it is refused when a weight type has no CPU kernel amppatch knows (the types its gates can
synthesize a model for, `gate_sites.GATE_TYPES`) or when its weights do not fit in the machine's
available memory. The run state keys the model by its identity (resolved path, size, mtime_ns), so a changed
file is not silently reused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from amppatch.errors import UsageError
from amppatch.gate_sites import GATE_TYPES
from amppatch.gguf_info import GgufInfo

# ggml tensor types of the weight kernels amppatch patches and gates, upper case as the GGUF names them →
# the synthetic --type that runs the same kernels. F32 holds norms and biases (and MoE routers): no
# streaming weight kernel to patch, but llama.cpp's CPU backend serves it, so it is accepted.
SYNTH_TYPE: dict[str, str] = {t.upper(): t for t in GATE_TYPES}
KNOWN_WEIGHT_TYPES = frozenset({*SYNTH_TYPE, "F32"})
MEMINFO = Path("/proc/meminfo")


def parse_meminfo(text: str) -> int | None:
    """MemAvailable of a /proc/meminfo text, in bytes (None when absent or unreadable)."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            parts = rest.split()
            if not parts or not parts[0].isdigit():
                return None
            unit = parts[1].lower() if len(parts) > 1 else "b"
            return int(parts[0]) * (1024 if unit == "kb" else 1)
    return None


def mem_available(path: Path = MEMINFO) -> int | None:
    try:
        return parse_meminfo(path.read_text())
    except OSError:
        return None


def model_identity(path: Path) -> dict[str, Any]:
    """What keys the user's model in the run state: a touched or replaced file changes it."""
    resolved = Path(path).expanduser().resolve()
    st = os.stat(resolved)
    return {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def n_params(info: GgufInfo) -> int:
    return sum(t.n_elements for t in info.tensors)


def type_shares(info: GgufInfo) -> dict[str, float]:
    """Byte share of each tensor type, largest first."""
    total = info.total_tensor_bytes or 1
    return {t: b / total for t, b in info.type_histogram.items()}


def dominant_type(info: GgufInfo) -> str | None:
    hist = info.type_histogram
    return next(iter(hist)) if hist else None


def gate_type(info: GgufInfo) -> str | None:
    """The synthetic --type of the user's dominant weight type (None: it cannot be synthesized)."""
    t = dominant_type(info)
    return SYNTH_TYPE.get(t) if t else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def describe(info: GgufInfo) -> str:
    """One progress block: what the model is."""
    types = ", ".join(f"{t} {s:.0%}" for t, s in type_shares(info).items())
    lines = [f"run: model {info.path.name} ({info.path})",
             f"  architecture: {info.architecture or 'unknown'}; {_params(n_params(info))} parameters; "
             f"{info.n_layer} layers",
             f"  weight types (byte share): {types}"]
    if info.n_expert:
        lines.append(f"  experts: {info.n_expert}, {info.n_expert_used or '?'} active per token")
    lines.append(f"  file size: {_gb(info.file_size)}")
    return "\n".join(lines)


def summary(info: GgufInfo) -> dict[str, Any]:
    """The user's model as the model stage records it (and the run report names it)."""
    return {"name": info.path.name, "path": str(info.path), "architecture": info.architecture,
            "params": n_params(info), "file_size": info.file_size,
            "types": {t: round(s, 4) for t, s in type_shares(info).items()},
            "n_expert": info.n_expert, "n_expert_used": info.n_expert_used}


def refusal(info: GgufInfo, available: int | None) -> UsageError | None:
    """Why this model cannot run here (None: it can)."""
    unknown = sorted({t.type for t in info.tensors if t.type not in KNOWN_WEIGHT_TYPES})
    if unknown:
        return UsageError(
            f"model {info.path.name} has weight types no CPU kernel amppatch knows serves: {', '.join(unknown)}",
            next_step=f"accepted: {', '.join(SYNTH_TYPE)} and F32; quantize the model to one of them "
                      "(llama-quantize), or run the synthetic default without --model")
    weights = info.total_tensor_bytes
    if available is not None and weights > available:
        return UsageError(
            f"model {info.path.name} has {_gb(weights)} of weights but only {_gb(available)} of memory is "
            "available", next_step="free memory, or pass a smaller model (a lower-bit quantization)")
    return None


def check_user_model(path: Path, available: int | None = None) -> GgufInfo:
    """Check, read and describe the user's model; raise one UsageError line when it cannot run here."""
    from amppatch.gguf_info import read_gguf
    from amppatch.inputs import check_gguf
    from amppatch.proc import progress

    check_gguf(path, what="--model")
    info = read_gguf(path)
    progress(describe(info))
    err = refusal(info, mem_available() if available is None else available)
    if err is not None:
        raise err
    return info
