"""Live definition sizes: ``sizeof`` of every stream's element type and the value of macro-valued steps
and bumps, from one compiled probe of the translation unit (its real compile command).
"""

from __future__ import annotations

import re
from dataclasses import replace

from amppatch.source.compiledb import CompileCommand, probe_constants
from amppatch.source.records import Loop


def _substitute(text: str, mapping: dict[str, str]) -> str:
    """`text` with each template parameter (whole word) replaced by its argument."""
    for name, arg in mapping.items():
        text = re.sub(rf"\b{re.escape(name)}\b", arg, text)
    return text


def fill_sizes(loops: list[Loop], command: CompileCommand, warnings: list[str],
               mapping: dict[str, str] | None = None) -> list[Loop]:
    """sizeof(element type) and macro-valued steps/bumps, from one compiled probe of the unit
    (element types of a template specialization with its arguments substituted)."""
    mapping = mapping or {}
    if mapping:
        loops = [replace(lp, streams=tuple(replace(s, element_type=_substitute(s.element_type, mapping))
                                           if s.element_type else s for s in lp.streams)) for lp in loops]
    exprs: list[str] = []
    for lp in loops:
        if lp.live is False:
            continue
        if lp.step is not None and lp.step_value is None and _constant_looking(lp.step):
            exprs.append(lp.step)
        for s in lp.streams:
            if s.element_type:
                exprs.append(f"sizeof({s.element_type})")
            if s.kind == "bump" and s.elements_per_iteration and s.elements_per_iteration_value is None \
                    and _constant_looking(s.elements_per_iteration):
                exprs.append(s.elements_per_iteration)
    values = probe_constants(command, exprs) if exprs else {}
    missing = [e for e in dict.fromkeys(exprs) if e not in values]
    if missing:
        warnings.append(f"the compiled probe could not evaluate: {', '.join(missing[:6])}")
    out = []
    for lp in loops:
        step_value = lp.step_value if lp.step_value is not None else values.get(lp.step or "")
        streams = []
        for s in lp.streams:
            size = values.get(f"sizeof({s.element_type})") if s.element_type else None
            per = s.elements_per_iteration_value
            if per is None and s.kind in ("indexed", "offset") and s.elements_per_iteration == lp.step:
                per = step_value
            if per is None and s.kind == "bump" and s.elements_per_iteration:
                per = values.get(s.elements_per_iteration)
            nbytes = size * per if size is not None and per is not None else None
            streams.append(replace(s, element_size=size, elements_per_iteration_value=per,
                                   bytes_per_iteration=nbytes))
        out.append(replace(lp, step_value=step_value, streams=tuple(streams)))
    return out


def _constant_looking(expr: str) -> bool:
    """Macro names, literals and sizeof: worth asking the compiler about (locals are not)."""
    return bool(re.fullmatch(r"[\w\s()+\-*/<>&|~]+", expr)) and not re.search(r"\b[a-z_][a-z0-9_]*\b(?!\s*\()",
                                                                              re.sub(r"\bsizeof\b", "", expr))
