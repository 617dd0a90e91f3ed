"""The real translation unit: compile commands from compile_commands.json, preprocessing with markers,
and compiled constant probes (``sizeof`` of block types, macro-valued loop steps).

Why the compiler and not a guess: which ``#if`` branch is live depends on ``-march=native``, ``-D`` options
and macros headers derive from them (``GGML_SIMD``, ``GGML_F16_DOT_STEP``); block struct sizes differ between
llama.cpp versions. Asking the same compiler with the same command is the only answer that cannot drift.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from amppatch.errors import UsageError
from amppatch.inputs import COMPILE_DB, read_json
from amppatch.proc import run

# Flags that make a compile command produce an object or dependency file; dropped when we reuse the
# command for -E or for a probe object of our own. The ones in _WITH_ARG take a separate argument.
_DROP = {"-c", "-MD", "-MMD", "-MP"}
_DROP_WITH_ARG = {"-o", "-MF", "-MT", "-MQ"}
_LAUNCHERS = {"ccache", "sccache", "distcc"}


@dataclass(frozen=True)
class CompileCommand:
    """One translation unit's compile command, with paths rewritten from the build's source tree to `repo`."""

    argv: tuple[str, ...]
    directory: Path
    file: Path  # the source file in `repo`
    source_root: str  # the source tree the command was recorded for (a build worktree, usually)

    def base_argv(self) -> list[str]:
        """The command without output, dependency and input arguments (and without a ccache launcher)."""
        argv = list(self.argv)
        while argv and Path(argv[0]).name in _LAUNCHERS:
            argv.pop(0)
        out: list[str] = []
        skip = False
        for arg in argv:
            if skip:
                skip = False
                continue
            if arg in _DROP:
                continue
            if arg in _DROP_WITH_ARG:
                skip = True
                continue
            if arg.startswith(("-o", "-MF", "-MT", "-MQ")):
                continue  # joined forms: -ofoo.o, -MFfoo.d (no other gcc/clang flag starts like these)
            if arg == str(self.file):
                continue
            out.append(arg)
        return out


def load_compile_db(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "compile_commands.json"
    if not path.is_file():
        raise UsageError(f"no compile_commands.json at {path}",
                         next_step="pass a CMake build dir configured with CMAKE_EXPORT_COMPILE_COMMANDS=ON")
    return read_json(path, COMPILE_DB)


def command_for(db: list[dict], repo: Path, relpath: str) -> CompileCommand | None:
    """The compile command of `repo/relpath`, found by path suffix (the build may have compiled a worktree
    of the same repository at another absolute path); every occurrence of the recorded source root in the
    command is rewritten to `repo`, so headers are read from the tree being analyzed."""
    repo = Path(repo).resolve()
    suffix = "/" + relpath.replace(os.sep, "/")
    for entry in db:
        directory = entry.get("directory", "")
        file = entry.get("file", "")
        full = os.path.normpath(os.path.join(directory, file))
        if not full.endswith(suffix):
            continue
        root = full[: -len(suffix)]
        argv = list(entry["arguments"]) if "arguments" in entry else shlex.split(entry.get("command", ""))
        rewritten = tuple(a.replace(root, str(repo)) if root and root in a else a for a in argv)
        return CompileCommand(argv=rewritten, directory=Path(directory), file=repo / relpath, source_root=root)
    return None


def compiled_files(db: list[dict]) -> list[str]:
    """Absolute paths of every translation unit in the database."""
    return [os.path.normpath(os.path.join(e.get("directory", ""), e.get("file", ""))) for e in db]


def _language_flag(command: CompileCommand) -> list[str]:
    return ["-x", "c++"] if command.file.suffix in (".cpp", ".cc", ".cxx") else ["-x", "c"]


def preprocess_markers(command: CompileCommand, source: bytes, positions: list[int]) -> list[bool]:
    """Which of `positions` (byte offsets in `source`) sit in code the compiler really compiles.

    A unique identifier is inserted at each position of a scratch copy, which is preprocessed with the
    unit's own command (quote includes still resolve against the original directory via -iquote); a
    marker that survives -E is in a live #if branch.
    """
    nonce = os.urandom(4).hex()
    names = [f"amppatch_live_{nonce}_{i}" for i in range(len(positions))]
    text = bytearray(source)
    for offset, name in sorted(zip(positions, names, strict=True), reverse=True):
        text[offset:offset] = f" {name} ".encode()
    with tempfile.TemporaryDirectory(prefix="amppatch-pp-") as tmp:
        scratch = Path(tmp) / command.file.name
        scratch.write_bytes(bytes(text))
        argv = [*command.base_argv(), "-iquote", str(command.file.parent), "-E", "-w", str(scratch)]
        done = run(argv, cwd=command.directory if command.directory.is_dir() else None,
                   what=f"preprocessing {command.file.name} with its compile command",
                   next_step="check that the compile command in compile_commands.json still works", timeout=300)
    found = set(re.findall(rf"amppatch_live_{nonce}_\d+", done.stdout))
    return [name in found for name in names]


def probe_constants(command: CompileCommand, expressions: list[str]) -> dict[str, int]:
    """Integer values of constant C expressions (``sizeof(block_q8_0)``, ``GGML_F16_DOT_STEP``) as the unit
    itself sees them: the unit is #included into a probe whose arrays have those sizes; the sizes are
    read back from the object's symbol table. Expressions the compiler rejects are left out."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    pending = list(dict.fromkeys(e for e in expressions if e.strip()))
    values: dict[str, int] = {}
    suffix = command.file.suffix if command.file.suffix in (".c", ".cpp", ".cc", ".cxx") else ".c"
    with tempfile.TemporaryDirectory(prefix="amppatch-probe-") as tmp:
        for _attempt in range(4):
            if not pending:
                break
            lines = [f'#include "{command.file}"', "/* amppatch constant probe */"]
            first_line = len(lines) + 1
            for i, expr in enumerate(pending):
                lines.append(f"__attribute__((used)) char amppatch_probe_{i}[(unsigned long)({expr})];")
            probe = Path(tmp) / f"amppatch_probe{suffix}"
            probe.write_text("\n".join(lines) + "\n")
            obj = Path(tmp) / "probe.o"
            argv = [*command.base_argv(), "-iquote", str(command.file.parent), "-O0", "-g0", "-w",
                    "-c", str(probe), "-o", str(obj)]
            done = run(argv, check=False, cwd=command.directory if command.directory.is_dir() else None,
                       what=f"constant probe for {command.file.name}", timeout=300)
            if done.returncode == 0:
                with obj.open("rb") as fh:
                    elf = ELFFile(fh)
                    symtab = elf.get_section_by_name(".symtab")
                    sizes = {}
                    if isinstance(symtab, SymbolTableSection):
                        for sym in symtab.iter_symbols():
                            m = re.fullmatch(r"amppatch_probe_(\d+)", sym.name)
                            if m:
                                sizes[int(m.group(1))] = int(sym["st_size"])
                for i, expr in enumerate(pending):
                    if i in sizes:
                        values[expr] = sizes[i]
                break
            # Drop the expressions the compiler complained about and try again with the rest.
            bad = {int(n) - first_line for n in re.findall(rf"{re.escape(probe.name)}:(\d+):\d*:? *error", done.stderr)}
            bad = {b for b in bad if 0 <= b < len(pending)}
            if not bad:
                break  # the unit itself does not compile this way: no constants
            pending = [e for i, e in enumerate(pending) if i not in bad]
    return values
