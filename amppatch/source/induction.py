"""A loop's induction variable and its step: `for (...; ...; i += STEP)`, `i++`, `i = i + k`, or in a
while/do loop the variable of the condition that the body itself advances.
"""

from __future__ import annotations

from collections.abc import Iterator

from tree_sitter import Node

from amppatch.source.parse import LOOP_TYPES, ParsedFile
from amppatch.source.syntax import binary_operator, identifiers


def induction_and_step(parsed: ParsedFile, loop: Node) -> tuple[str | None, str | None]:
    """(induction variable, step expression) of a loop."""
    if loop.type == "for_statement":
        update = loop.child_by_field_name("update")
        updates = [update] if update is not None else []
        if update is not None and update.type == "comma_expression":
            updates = [c for c in update.named_children]
        for u in updates:
            got = _step_of(parsed, u)
            if got is not None:
                return got
        init = loop.child_by_field_name("initializer")
        if init is not None:
            ids = identifiers(init)
            if len(ids) == 1:
                return ids.pop(), None
        return None, None
    if loop.type in ("while_statement", "do_statement"):
        cond = loop.child_by_field_name("condition")
        body = loop.child_by_field_name("body")
        if cond is None or body is None:
            return None, None
        names = identifiers(cond)
        for node in _walk_same_loop(body):
            if node.type in ("update_expression", "assignment_expression"):
                got = _step_of(parsed, node)
                if got is not None and got[0] in names:
                    return got
    return None, None


def _step_of(parsed: ParsedFile, node: Node) -> tuple[str, str] | None:
    """(variable, step expression) when `node` advances one variable by an amount: i++, i += k, i = i + k."""
    if node.type == "update_expression":
        arg = node.child_by_field_name("argument")
        if arg is not None and arg.type == "identifier":
            return parsed.text(arg), ("-1" if "--" in parsed.text(node) else "1")
    if node.type == "assignment_expression":
        left, right = node.child_by_field_name("left"), node.child_by_field_name("right")
        if left is None or right is None or left.type != "identifier":
            return None
        op = binary_operator(parsed, left, right)
        name = parsed.text(left)
        if op == "+=":
            return name, parsed.text(right)
        if op == "-=":
            return name, f"-({parsed.text(right)})"
        if op == "=" and right.type == "binary_expression":
            rl, rr = right.child_by_field_name("left"), right.child_by_field_name("right")
            rop = binary_operator(parsed, rl, rr) if rl and rr else ""
            if rop == "+" and rl is not None and rr is not None and parsed.text(rl) == name:
                return name, parsed.text(rr)
    return None


def _walk_same_loop(body: Node) -> Iterator[Node]:
    """Nodes of a loop body that do not belong to a nested loop."""
    stack = [body]
    while stack:
        node = stack.pop()
        yield node
        for child in reversed(node.children):
            if child.type not in LOOP_TYPES:
                stack.append(child)
