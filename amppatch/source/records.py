"""The records loop analysis produces: a loop, the memory streams it walks, the prefetches already in it.

Frozen dataclasses only (no parsing here), so the planner, the profiler and the analyses all share them
without importing tree-sitter code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MARKER_WORD = "amppatch:"  # every line amppatch inserts carries a comment starting with this word
UNROLL_INDEX = "amppatch_u"  # the unrolled index in a tile stream's address


@dataclass(frozen=True)
class Stream:
    expression: str  # the site key's stream part: "x[ib]", "x + i", "q4", "row"
    base: str  # the pointer variable
    kind: str  # indexed | offset | bump | row
    address: str  # C expression of the address the current iteration starts at: "&x[ib]", "q4"
    line: int  # first use (1-based)
    accesses: tuple[str, ...] = ()
    element_type: str | None = None  # "const block_q8_0" (declared pointee type)
    element_size: int | None = None  # sizeof(element_type) from the compiled probe
    elements_per_iteration: str | None = None  # C expression: loop step, or the sum of pointer bumps
    elements_per_iteration_value: int | None = None
    bytes_per_iteration: int | None = None
    param_index: int | None = None  # which function parameter the base pointer comes from (weights first)
    note: str = ""
    # Where the prefetch goes when not at the top of the loop body: right after the declaration of a row
    # pointer (the row does not exist before it). Byte offset of the declaration's end, and its indentation.
    insert_byte: int | None = field(default=None, repr=False)
    insert_indent: str | None = field(default=None, repr=False)
    # A row pointer set as base + var*stride (flash attention's k_data = k->data + ic*nbk1 + ...): C
    # expression of the BYTES it moves per iteration, so a distance can land a whole number of rows ahead.
    row_stride: str | None = None
    # A tile stream: C expression of the bytes one iteration moves (the address at induction value `step`
    # minus the address at 0, unrolled index 0: loop-invariant by construction, so the compiler folds it
    # to a constant and the distance's rounding costs no division in the loop); and how many unrolled
    # copies of the lambda each read their own tile (C expression of Unroll's count; None: a direct call).
    tile_step: str | None = None
    unroll: str | None = None



@dataclass(frozen=True)
class ExistingPrefetch:
    line: int
    text: str
    by_amppatch: bool  # carries an amppatch marker (inserted by an earlier apply)


@dataclass(frozen=True)
class Loop:
    ordinal: int  # 0-based, source order over every loop of the function (dead branches included)
    kind: str  # for | while | do | for_range
    file: Path
    start_line: int  # 1-based line of the loop keyword
    end_line: int
    depth: int  # 0 = outermost loop of the function
    parent: int | None  # ordinal of the enclosing loop
    induction: str | None
    step: str | None  # C expression of the induction step ("1", "2", "GGML_F16_DOT_STEP")
    step_value: int | None
    guard: str | None  # innermost enclosing preprocessor condition, e.g. "#if defined(__AVX2__)"
    streams: tuple[Stream, ...]
    prefetches: tuple[ExistingPrefetch, ...]
    parse_error: str | None  # why the loop's parse cannot be trusted (ERROR nodes), else None
    live: bool | None = None  # compiled by the real command (None: no compile command known)
    # Accesses that advance with the induction variable but cannot be prefetched at the top of the body,
    # because their address uses a name declared later (inside the body or a nested loop), with the reason.
    unplaceable: tuple[str, ...] = ()
    start_byte: int = field(default=0, repr=False)
    end_byte: int = field(default=0, repr=False)
    body_start_byte: int = field(default=0, repr=False)
    body_end_byte: int = field(default=0, repr=False)
    body_compound: bool = field(default=True, repr=False)
    body_indent: str = field(default="    ", repr=False)

    def stream(self, key: str) -> Stream | None:
        """The stream named by `key`: its expression, one of its accesses, or its base name."""
        norm = normalize_expression(key)
        for s in self.streams:
            if normalize_expression(s.expression) == norm or norm in (normalize_expression(a) for a in s.accesses):
                return s
        for s in self.streams:
            if s.base == key.strip():
                return s
        return None


def normalize_expression(text: str) -> str:
    """Whitespace-insensitive form of a C expression (for matching site keys)."""
    return re.sub(r"\s+", "", text)

