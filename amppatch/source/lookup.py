"""Site lookup by source position: which method's (or lambda's) body a sampled line is in, for the
profiler to name the site a hot line belongs to.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tree_sitter import Node

from amppatch.source.parse import ParsedFile, function_definitions, parse_bytes
from amppatch.source.specialization import member_site_name

IN_LAMBDA = "<lambda>"  # member_site_at: the line is in a lambda body (its caller's frame names the site)


@lru_cache(maxsize=16)
def _lookup_index(path: str, mtime_ns: int) -> tuple[ParsedFile, list[Node], list[bytes]]:
    """One parse per file version, with its function definitions and lines (profile asks line by line)."""
    parsed = parse_bytes(Path(path).read_bytes(), "c" if path.endswith(".c") else "cpp", Path(path))
    return parsed, function_definitions(parsed.root), parsed.source.split(b"\n")


def member_site_at(path: Path, line: int) -> str | None:
    """The site name of the method whose body holds `line` of `path` ('X<pattern>::m'), IN_LAMBDA when the
    line is inside a lambda (a sampled frame there belongs to the loop that calls the lambda), or None
    for a free function (its symbol names it) or a line outside any definition.

    Why by position: DWARF names an inlined method by its bare name ('apply'), and a partial
    specialization's instantiation by its arguments ('<block_q8_0, block_q8_0, float, 1, 128, 32>');
    the definition the line sits in is the one source specialization it came from."""
    try:
        parsed, definitions, lines = _lookup_index(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return None
    row = line - 1
    inside = [d for d in definitions if d.start_point[0] <= row <= d.end_point[0]]
    if not inside:
        return None
    definition = max(inside, key=lambda d: d.start_byte)
    text = lines[row] if row < len(lines) else b""
    col = len(text) - len(text.lstrip())  # the line's first token, not the whitespace of an outer block
    node = parsed.root.named_descendant_for_point_range((row, col), (row, col))
    while node is not None and node != definition:
        if node.type == "lambda_expression":
            return IN_LAMBDA
        node = node.parent
    return member_site_name(parsed, definition)
