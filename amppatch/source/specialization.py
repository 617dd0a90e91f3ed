"""Template specializations in the source: which class a method is defined in, which (partial)
specialization a site's ``CLASS<ARGS>`` names, and the C++ guard that confines inserted code to one
specialization of a template.
"""

from __future__ import annotations

from tree_sitter import Node

from amppatch.errors import UsageError
from amppatch.source.names import split_specialization
from amppatch.source.parse import ParsedFile, function_name


def enclosing_class(node: Node) -> Node | None:
    """The struct/class specifier a method definition sits in (None for a free function)."""
    current = node.parent
    while current is not None and current.type in ("field_declaration_list", "access_specifier",
                                                     "preproc_if", "preproc_ifdef", "preproc_else",
                                                     "preproc_elif", "declaration_list"):
        current = current.parent
    return current if current is not None and current.type in ("struct_specifier", "class_specifier") else None


def class_pattern(parsed: ParsedFile, cls: Node) -> tuple[str, tuple[str, ...] | None]:
    """(class name, its specialization pattern) — ('tinygemm', ('block_q8_0', 'BLOCK_M')) for a partial
    specialization, (name, None) for a primary template or a plain class."""
    name_node = cls.child_by_field_name("name")
    if name_node is None:
        return "", None
    if name_node.type == "template_type":
        base = name_node.child_by_field_name("name")
        targs = name_node.child_by_field_name("arguments")
        args = tuple(" ".join(parsed.text(a).split()) for a in targs.named_children) if targs is not None else ()
        return (parsed.text(base) if base is not None else ""), args
    return parsed.text(name_node), None


def member_site_name(parsed: ParsedFile, definition: Node) -> str | None:
    """How a site names a method defined in a class body: 'Class<pattern>::method' (a partial
    specialization is named by its own pattern), 'Class::method'; None for a free function."""
    cls = enclosing_class(definition)
    method = function_name(definition)
    if cls is None or method is None:
        return None
    name, pattern = class_pattern(parsed, cls)
    if not name:
        return None
    return f"{name}<{', '.join(pattern)}>::{method}" if pattern else f"{name}::{method}"


def match_owner(parsed: ParsedFile, definition: Node, owner: str) -> tuple[dict[str, str], str | None] | None:
    """Does the method `definition` belong to the class `owner` names ('X', 'X<args>')? Returns the
    template parameters the owner's arguments bind and the guard confining code to that binding, or None.

    A partial specialization's pattern (X<block_q8_0, float, BLOCK_M>) matches arguments that equal its
    concrete entries; an argument in the place of one of its own parameters either repeats the parameter
    (every instantiation: no guard) or binds it (BLOCK_M = 1: guarded). Trailing arguments may be left out."""
    cls = enclosing_class(definition)
    if cls is None:
        return None
    owner_name, owner_args = split_specialization(owner)
    name, pattern = class_pattern(parsed, cls)
    if name != owner_name:
        return None
    params = template_parameters(cls) or []
    if pattern is None:
        if not owner_args:
            return {}, None
        if len(owner_args) != len(params):
            return None  # a primary template is named with all its arguments (a partial one may match)
        return specialize(owner, cls, owner_args)
    kinds = {pname: kind for kind, pname in params}
    if len(owner_args) > len(pattern):
        return None
    mapping: dict[str, str] = {}
    terms: list[str] = []
    for pat, arg in zip(pattern, owner_args, strict=False):
        if pat in kinds:
            if arg != pat:
                mapping[pat] = arg
                terms.append(guard_term(kinds[pat], pat, arg))
        elif pat.replace(" ", "") != arg.replace(" ", ""):
            return None
    return mapping, (" && ".join(terms) or None)


def template_parameters(node: Node) -> list[tuple[str, str]] | None:
    """[(kind 'type'|'value', name)] of the template a function (or class) definition belongs to; None if
    none."""
    parent = node.parent
    if parent is None or parent.type != "template_declaration":
        return None
    plist = parent.child_by_field_name("parameters")
    out: list[tuple[str, str]] = []
    for p in plist.named_children if plist is not None else []:
        if p.type in ("type_parameter_declaration", "optional_type_parameter_declaration"):
            ident = next((c for c in p.named_children if c.type == "type_identifier"), None)
            out.append(("type", ident.text.decode() if ident is not None and ident.text else ""))
        elif p.type in ("parameter_declaration", "optional_parameter_declaration"):
            d = p.child_by_field_name("declarator")
            out.append(("value", d.text.decode() if d is not None and d.text else ""))
        else:
            out.append(("other", p.text.decode() if p.text else ""))
    return out


def guard_term(kind: str, param: str, arg: str) -> str:
    """The C++ condition true only where template parameter `param` is `arg`."""
    return f"std::is_same<{param}, {arg}>::value" if kind == "type" else f"(({param}) == ({arg}))"


def specialize(function: str, node: Node, args: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The template parameters of the definition `node` bound to `args` (the site's NAME<ARGS>), and the
    guard true only in that specialization; a UsageError when they do not fit the template."""
    params = template_parameters(node)
    if params is None:
        raise UsageError(f"{function}: the definition is not a template, so it has no specialization",
                         next_step="name the function without <...>")
    if len(params) != len(args) or any(kind == "other" or not name for kind, name in params):
        shown = ", ".join(f"{k} {n}" for k, n in params)
        raise UsageError(f"{function}: the template takes ({shown}); {len(args)} argument(s) given",
                         next_step="give one argument per template parameter (defaults are not filled in)")
    mapping = {name: arg for (_, name), arg in zip(params, args, strict=True)}
    # std::is_same needs <type_traits>, which every C++ unit with such templates already pulls in; a plain
    # `if` (not `if constexpr`) keeps C++11 units valid and still folds to nothing in other specializations.
    terms = [guard_term(kind, name, arg) for (kind, name), arg in zip(params, args, strict=True)]
    return mapping, " && ".join(terms)
