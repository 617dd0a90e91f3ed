"""How sites spell functions: plain names, template specializations ``NAME<ARGS>`` and methods of class
(partial) specializations ``CLASS<ARGS>::METHOD`` — split, and written one canonical way. Pure strings.
"""

from __future__ import annotations

from amppatch.errors import UsageError


def closing_angle(text: str, open_index: int) -> int:
    """Index of the '>' that closes the '<' at `open_index` (nested pairs counted), or -1."""
    depth = 0
    for i in range(open_index, len(text)):
        depth += (text[i] == "<") - (text[i] == ">")
        if depth == 0:
            return i
    return -1


def split_specialization(function: str) -> tuple[str, tuple[str, ...]]:
    """'gemv<block_q4_0x8, 4>' -> ('gemv', ('block_q4_0x8', '4')); a plain name has no arguments."""
    text = function.strip()
    if "<" not in text:
        return text, ()
    name, rest = text.split("<", 1)
    if not rest.endswith(">"):
        raise UsageError(f"{function!r}: template arguments must end with '>'",
                         next_step="write the specialization as NAME<ARG, ...>, e.g. gemv<block_q4_0x8>")
    args, depth, current = [], 0, ""
    for ch in rest[:-1]:
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        depth += (ch in "<([") - (ch in ">)]")
        current += ch
    args.append(current.strip())
    return name.strip(), tuple(" ".join(a.split()) for a in args)


def split_member(function: str) -> tuple[str | None, str]:
    """'tinygemm<block_q8_0, T>::apply' -> ('tinygemm<block_q8_0, T>', 'apply'); 'gemv<X>' -> (None, 'gemv<X>').
    Only a '::' outside template arguments separates a class from its method."""
    text = function.strip()
    depth = 0
    for i in range(len(text) - 1, 0, -1):
        ch = text[i]
        depth += (ch == ">") - (ch == "<")
        if depth == 0 and text[i - 1 : i + 1] == "::":
            return text[: i - 1].strip(), text[i + 1 :].strip()
    return None, text


def canonical_name(function: str) -> str:
    """One spelling per site function: single spaces after commas in template arguments."""
    owner, member = split_member(function)
    if owner is not None:
        name, args = split_specialization(owner)
        return f"{name}<{', '.join(args)}>::{member}" if args else f"{name}::{member}"
    name, args = split_specialization(member)
    return f"{name}<{', '.join(args)}>" if args else name
