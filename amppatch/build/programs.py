"""Which llama.cpp programs a tree builds, under which names: read from its CMakeLists, never assumed.

amppatch runs four programs by role — a benchmark, a deterministic greedy completion, perplexity and the
quantizer — plus, for the gate, llama.cpp's kernel test. Their names and homes moved over time: the greedy
completion was `llama-cli` (`-no-cnv`) until llama.cpp split it off as `llama-completion`, when `llama-cli`
became a chat client; the programs lived under `examples/` (built only with LLAMA_BUILD_EXAMPLES) before
they moved to `tools/`. Everything here is pure: it takes CMakeLists texts and returns names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from amppatch.workspace import too_old_error

ROLES = ("bench", "completion", "quantize", "perplexity")
# Candidates per role, preferred first. llama-completion first: where both exist, llama-cli is the chat
# client, which no longer runs a plain completion.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "bench": ("llama-bench",),
    "completion": ("llama-completion", "llama-cli"),
    "quantize": ("llama-quantize",),
    "perplexity": ("llama-perplexity",),
}
# The names the roles have in current llama.cpp: the default targets, and what a build manifest written
# before manifests recorded their programs means.
CURRENT_NAMES = {role: names[0] for role, names in CANDIDATES.items()}
KERNEL_TEST = "test-quantize-fns"
# The top-level directories whose CMakeLists declare programs.
PROGRAM_DIRS = ("tools", "examples", "tests")

_COMMENT_RE = re.compile(r"#[^\n]*")
_FUNCTION_DEF_RE = re.compile(r"\b(?:function|macro)\s*\([^)]*\)")  # a helper's definition is no call of it
_SET_TARGET_RE = re.compile(r"\bset\s*\(\s*TARGET\s+([A-Za-z0-9_.+-]+)\s*\)")
_ADD_EXECUTABLE_RE = re.compile(r"\badd_executable\s*\(\s*(\$\{TARGET\}|[A-Za-z0-9_.+-]+)")
# llama.cpp's test helpers: the target is the source's stem unless NAME gives one
_TEST_HELPER_RE = re.compile(r"\bllama_(?:build_and_test|target_and_test|build)\s*\(\s*([A-Za-z0-9_.+/-]+)([^)]*)\)")
_NAME_ARG_RE = re.compile(r"\bNAME\s+([A-Za-z0-9_.+-]+)")
_EVENT_RE = re.compile(f"{_SET_TARGET_RE.pattern}|{_ADD_EXECUTABLE_RE.pattern}|{_TEST_HELPER_RE.pattern}")


def declared_executables(cmake_texts: Mapping[str, str]) -> dict[str, str]:
    """Executable target name -> the CMakeLists (relative path) that declares it, from the texts of a tree's
    CMakeLists files (whole files, or just their lines that set TARGET, add executables or call the test
    helpers, in order). Commented-out declarations do not count; the first declaration of a name wins."""
    found: dict[str, str] = {}
    for relpath in sorted(cmake_texts):
        text = _FUNCTION_DEF_RE.sub("", _COMMENT_RE.sub("", cmake_texts[relpath]))
        current: str | None = None
        for m in _EVENT_RE.finditer(text):
            set_target, executable, test_source, test_args = m.group(1), m.group(2), m.group(3), m.group(4)
            if set_target is not None:
                current = set_target
                continue
            if executable is not None:
                name = current if executable == "${TARGET}" else executable
            else:
                named = _NAME_ARG_RE.search(test_args or "")
                name = named.group(1) if named else test_source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if name and not name.startswith("$"):
                found.setdefault(name, relpath)
    return found


@dataclass(frozen=True)
class TreePrograms:
    """The tree's name for each role (None: the tree declares none), where each is declared, and its kernel
    test target (None: the tree has none)."""

    names: dict[str, str | None]
    declared_in: dict[str, str] = field(default_factory=dict)
    kernel_test: str | None = None

    @property
    def missing(self) -> list[str]:
        return [role for role in ROLES if self.names.get(role) is None]

    def needs_examples(self) -> bool:
        """Whether a program lives under examples/, which CMake adds only with LLAMA_BUILD_EXAMPLES."""
        return any(self.declared_in.get(role, "").startswith("examples/") for role in ROLES)

    def target_for(self, requested: str) -> str:
        """The tree's target for a requested one: a role's current name (llama-completion) stands for the
        role, so it becomes this tree's program (llama-cli); any other target is built as named."""
        for role, name in CURRENT_NAMES.items():
            if requested == name:
                return self.names.get(role) or requested
        return requested

    def roles_of(self, targets: tuple[str, ...]) -> list[str]:
        return [role for role in ROLES if CURRENT_NAMES[role] in targets]

    def to_json(self) -> dict:
        """The build manifest's `programs`: role -> target name (or null), and `kernel_test`."""
        return {**{role: self.names.get(role) for role in ROLES}, "kernel_test": self.kernel_test}


def choose_programs(declared: Mapping[str, str]) -> TreePrograms:
    """Each role's program among the declared executables (pure). A role the tree does not declare stays
    None: a build of other targets (a library) still works; `require_programs` refuses it where needed."""
    names: dict[str, str | None] = {}
    where: dict[str, str] = {}
    for role in ROLES:
        names[role] = next((name for name in CANDIDATES[role] if name in declared), None)
        if names[role] is not None:
            where[role] = declared[str(names[role])]
    return TreePrograms(names, where, KERNEL_TEST if KERNEL_TEST in declared else None)


def require_programs(programs: TreePrograms, roles: list[str], tree: str) -> None:
    """Refuse a tree that lacks a program a role needs, naming each missing program."""
    missing = [role for role in roles if programs.names.get(role) is None]
    if missing:
        wanted = ", ".join(" or ".join(CANDIDATES[role]) for role in missing)
        raise too_old_error(tree, f"it declares no {wanted} program (in tools/ or examples/)")
