"""What the stream finders of one loop share: the loop, its parse and names in scope (read), and the
streams and unplaceable accesses found so far (filled in, in order: indexed and offset streams, row
pointers, lambda tiles, pointer bumps — a base already taken keeps its first kind).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from tree_sitter import Node

from amppatch.source.parse import ParsedFile
from amppatch.source.records import Stream
from amppatch.source.scope import Decl, lookup, out_of_scope
from amppatch.source.syntax import NodeIndex, int_value


@dataclass
class LoopContext:
    parsed: ParsedFile
    loop: Node
    body: Node
    var: str  # the induction variable
    step: str | None  # C expression of its step
    decls: dict[str, list[Decl]]
    index: NodeIndex
    streams: dict[str, Stream] = field(default_factory=dict)  # by base pointer
    unplaceable: dict[str, str] = field(default_factory=dict)  # access expression -> why

    @property
    def top(self) -> int:
        """Where a prefetch goes: the first byte inside the body's braces (or the body statement itself)."""
        return self.body.start_byte + 1 if self.body.type == "compound_statement" else self.body.start_byte

    @cached_property
    def var_re(self) -> re.Pattern[str]:
        """The induction variable as a whole word."""
        return re.compile(rf"\b{re.escape(self.var)}\b")

    @property
    def step_value(self) -> int | None:
        """The step when it is an integer literal (else None: a macro or an expression)."""
        return int_value(self.step)

    def lookup(self, name: str, byte: int) -> Decl | None:
        """The declaration of `name` in scope at `byte`."""
        return lookup(self.decls, name, byte)

    def out_of_scope(self, names: set[str], use_byte: int) -> list[str]:
        """Those of `names` (used at `use_byte`) that would mean something else at the top of the body."""
        return out_of_scope(names, use_byte, self.top, self.decls)
