"""The result of analyzing one function (`FunctionAnalysis`), and the defaults a bare site takes from
it: the loop a ``--site FUNCTION`` patches and the stream a site without a stream key prefetches.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from amppatch.errors import UsageError
from amppatch.source.records import Loop, Stream


@dataclass(frozen=True)
class Call:
    """A call from the analyzed function to a function defined in the same file."""

    callee: str  # the callee as a site names it: "gemv_q4_b32_8x8_q8_0_lut_avx<block_q4_0x8>"
    line: int
    live: bool | None


@dataclass(frozen=True)
class FunctionAnalysis:
    """What `analyze_function` found: the live definition, its loops and streams, and how sure it is."""

    function: str
    repo: Path
    file: Path  # absolute path of the file holding the live definition
    relpath: str  # the same, relative to repo
    grammar: str  # "c" or "cpp": the tree-sitter grammar used
    start_line: int
    end_line: int
    start_byte: int
    end_byte: int
    loops: tuple[Loop, ...]
    live: bool | None  # is this definition compiled at all (None: unknown)
    compile_command: tuple[str, ...] | None
    source_sha: str  # hash of the file's bytes that offsets refer to
    warnings: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()  # every file that defines the function (relpaths)
    parse_errors: int = 0  # ERROR nodes inside the function (after blanking)
    source: bytes = field(default=b"", repr=False, compare=False)
    # A template analyzed for one specialization ("gemv<block_q4_0x8>"): template parameter -> argument,
    # and the C++ condition true only in that specialization (what confines an inserted prefetch to it).
    specialization: dict[str, str] = field(default_factory=dict)
    specialization_guard: str | None = None
    # Calls in the live body to functions defined in the same file (where a wrapper's loops really are).
    calls: tuple[Call, ...] = ()

    def loop(self, ordinal: int) -> Loop:
        """The loop numbered `ordinal`; a UsageError naming how many there are when there is none."""
        for loop in self.loops:
            if loop.ordinal == ordinal:
                return loop
        raise UsageError(f"{self.function} has no loop #{ordinal} (it has {len(self.loops)})",
                         next_step=f"run `amppatch apply --dry-run --site {self.function}` to list its loops")

    def loop_at_line(self, line: int) -> Loop | None:
        """The loop whose header is on `line`, else the innermost loop containing `line`."""
        for loop in self.loops:
            if loop.start_line == line:
                return loop
        return self.loop_for_line(line)

    def loop_for_line(self, line: int) -> Loop | None:
        """The innermost loop whose lines contain `line` (for mapping sampled hot lines onto loops)."""
        inside = [lp for lp in self.loops if lp.start_line <= line <= lp.end_line]
        return max(inside, key=lambda lp: (lp.depth, lp.start_line)) if inside else None

    def default_loop(self) -> Loop | None:
        """What a bare `--site FUNCTION` patches: the first outermost loop (source order) that is not dead,
        parses cleanly and walks a stream of typed elements (else any stream) — the main SIMD loop of
        every ggml vec_dot, the block loop of a repack GEMV; tail loops come after it, dead ISA branches
        are skipped."""
        usable = [lp for lp in self.loops if lp.live is not False and not lp.parse_error and lp.streams]
        if not usable:
            return None
        # A loop that walks typed elements (x[ib] over blocks: bytes per iteration known) is the kernel's
        # streaming loop; an outer loop over rows (a_ptr_start + y * nb) merely sets one up. GEMVs nest
        # the block loop inside row loops, vec_dots have it outermost: both get the block loop.
        walking = [lp for lp in usable if any(s.bytes_per_iteration and not _written(s) for s in lp.streams)]
        # A loop that hands its induction variable to a lambda (ggml's AMX kernels: Unroll<N>{}(compute,
        # i)) carries the lambda's streams; the loops inside the lambda only walk within one iteration.
        calling = [lp for lp in usable if any(s.kind == "tile" for s in lp.streams)]
        usable = calling or walking or usable
        top = min(lp.depth for lp in usable)
        return next(lp for lp in usable if lp.depth == top)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no source bytes, no byte offsets: those only mean something to the editor)."""
        data = asdict(self)
        data.pop("source")
        data["repo"] = str(self.repo)
        data["file"] = str(self.file)
        for loop in data["loops"]:
            loop["file"] = str(loop["file"])
            for key in ("start_byte", "end_byte", "body_start_byte", "body_end_byte", "body_compound",
                        "body_indent"):
                loop.pop(key, None)
            for stream in loop["streams"]:
                stream.pop("insert_byte", None)
                stream.pop("insert_indent", None)
        return data


def _written(stream: Stream) -> bool:
    """A stream of non-const elements (an output such as `s` of a GEMV): written, not a read to prefetch."""
    return bool(stream.element_type) and not re.search(r"\bconst\b", stream.element_type or "")


def default_stream(loop: Loop) -> Stream | None:
    """The stream a site without a stream key prefetches: the one from the earliest pointer parameter
    (in ggml's vec_dot that is `vx`, the weight row; the activation row `vy` is reused by every row and
    stays in cache), then indexed/offset streams before bumps and row pointers."""
    if not loop.streams:
        return None
    kind_rank = {"indexed": 0, "offset": 1, "row": 2, "bump": 3, "tile": 0}
    return min(loop.streams, key=lambda s: (_written(s), _activation_tile(s),
                                            s.param_index if s.param_index is not None else 99,
                                            kind_rank.get(s.kind, 9), s.line))


def _activation_tile(stream: Stream) -> bool:
    """A lambda's stream of activations: in ggml's GEMM micro-kernels (the AMX buffer's) the activation
    operand comes first (A) and is f32 or the quantized vec_dot type (block_q8_0/q8_1/q8_K), the weights
    second (packed bytes, F16): parameter order would pick the activations, element type does not."""
    return stream.kind == "tile" and bool(re.search(r"\b(float|block_q8_[01K])\b", stream.element_type or ""))
