"""Resolving build options into everything that determines the binaries (`ResolvedBuild`, whose hash is the
build key): the commit or dirty tree, the compiler, the CMake options this llama.cpp declares, the ISA
flags to disable, the PGO training models — and the shared source checkout clean builds compile."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from amppatch import __version__
from amppatch.build.options import _ALWAYS, _OFFLINE_CPU_OPTIONS, Build, BuildOptions
from amppatch.build.pgo import pgo_training_models
from amppatch.build.programs import PROGRAM_DIRS, TreePrograms, choose_programs, declared_executables
from amppatch.errors import UsageError
from amppatch.features import IsaReport, disable_flags, probe_isa
from amppatch.inputs import check_gguf
from amppatch.paths import cache_dir
from amppatch.proc import require_tool, run
from amppatch.workspace import check_llama_tree


def _git(repo: Path, *args: str, check: bool = True) -> str:
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    return run([git, "-C", str(repo), *args], check=check, what=f"git {args[0]}").stdout


def _require_git_repo(repo: Path) -> None:
    if not (repo / ".git").exists():
        raise UsageError(
            f"{repo} is not a git repository; amppatch keys builds by commit",
            next_step=f"run `git init && git add -A && git commit -m base` in {repo}, or use `amppatch llama fetch`",
        )


def dirty_files(repo: Path) -> list[str]:
    """Paths with uncommitted changes (modified, staged or untracked, ignored files excepted)."""
    out = _git(repo, "status", "--porcelain", "--untracked-files=all")
    return [line[3:] for line in out.splitlines() if line.strip()]


def _dirty_hash(repo: Path, files: list[str]) -> str:
    """A hash of the uncommitted state: the diff against HEAD plus the contents of untracked files."""
    digest = hashlib.sha256(_git(repo, "diff", "HEAD", "--binary").encode())
    for name in sorted(files):
        path = repo / name
        digest.update(name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


_CMAKE_LISTS = ("CMakeLists.txt", "ggml/CMakeLists.txt")
_OPTION_RE = re.compile(r"^\s*option\(\s*([A-Za-z0-9_]+)", re.MULTILINE)


def declared_cmake_options(source_dir: Path) -> set[str]:
    """Names of `option(...)` declared by the top-level and ggml CMakeLists of this llama.cpp version."""
    names: set[str] = set()
    for rel in _CMAKE_LISTS:
        path = source_dir / rel
        if path.is_file():
            names.update(_OPTION_RE.findall(path.read_text()))
    return names


def _declared_at_commit(repo: Path, commit: str) -> set[str]:
    """declared_cmake_options of a commit (what will be built), not of whatever the working tree holds."""
    names: set[str] = set()
    for rel in _CMAKE_LISTS:
        names.update(_OPTION_RE.findall(_git(repo, "show", f"{commit}:{rel}", check=False)))
    return names


# The CMakeLists lines declarations are read from (whatever else those files hold does not matter).
_DECLARATION_GREP = r"set\s*\(\s*TARGET|add_executable|llama_(build_and_test|target_and_test|build)\s*\("
_GREP_LINE_RE = re.compile(r"^[0-9a-f]+:(.+?):\d+:(.*)$")


def _program_cmake_texts(repo: Path, commit: str, in_place: bool) -> dict[str, str]:
    """The CMakeLists under tools/, examples/ and tests/ that will be built: the working tree's for an
    in-place build, else the commit's declaration lines (one `git grep`, whatever is checked out)."""
    if in_place:
        return {str(p.relative_to(repo)): p.read_text(errors="replace")
                for d in PROGRAM_DIRS for p in sorted((repo / d).rglob("CMakeLists.txt")) if p.is_file()}
    out = _git(repo, "grep", "-n", "-I", "--no-color", "-E", _DECLARATION_GREP, commit, "--",
               *(f"{d}/*CMakeLists.txt" for d in PROGRAM_DIRS), check=False)  # exit 1: no line matched
    texts: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = _GREP_LINE_RE.match(line)
        if m:
            texts.setdefault(m.group(1), []).append(m.group(2))
    return {path: "\n".join(lines) for path, lines in texts.items()}


def tree_programs(repo: Path, commit: str, in_place: bool) -> TreePrograms:
    """The programs (bench, greedy completion, perplexity, quantize, kernel test) this tree declares."""
    return choose_programs(declared_executables(_program_cmake_texts(repo, commit, in_place)))


def _compiler_identity() -> tuple[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise UsageError("no C compiler found", next_step="install one (apt-get install -y gcc g++)")
    return cc, run([cc, "--version"]).stdout.splitlines()[0]


@dataclass(frozen=True)
class ResolvedBuild:
    """Everything that determines the binaries; its hash is the build key."""

    repo: str
    source_dir: str
    in_place: bool
    commit: str
    dirty_hash: str | None
    compiler: str
    compiler_version: str
    cflags: str
    kernel_cflags: str
    cmake_options: dict[str, str]
    pgo: bool
    pgo_training: str | None
    isa_disabled: tuple[str, ...]
    amx_batch1: bool = False
    amppatch_version: str = __version__

    def kernel_flags(self) -> list[str]:
        """Every extra flag of the ggml-cpu target, in order: the user's, the ISA probe's removals, and
        last (so they win over a removal) the AMX flags of an --amx-batch1 build."""
        return self.kernel_cflags.split() + list(self.isa_disabled) + (list(AMX_FLAGS) if self.amx_batch1 else [])

    def key_fields(self) -> dict:
        """What the key hashes: everything but where the user's repository lives. A clean or `--ref` build
        compiles amppatch's one shared checkout, so its key is pure content (commit, compiler, flags,
        options) and every clone of the commit shares it; a dirty tree is built in place, so its path
        (source_dir) stays in its key."""
        values = asdict(self)
        values.pop("repo")
        if not self.in_place:
            values.pop("source_dir")
        return values

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.key_fields(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dir_key(self) -> str:
        """The build directory's name: the key without the uncommitted-changes hash, so successive edits
        of a dirty tree rebuild incrementally in one directory (only what an edit touches recompiles),
        while the manifest's full key still keeps a stale build from being reused."""
        if self.dirty_hash is None:
            return self.key
        values = self.key_fields()
        values.pop("dirty_hash")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


AMX_FLAGS = ("-mamx-tile", "-mamx-int8")


def _check_amx_batch1(cmake_options: dict[str, str], isa: IsaReport) -> None:
    """--amx-batch1 compiles amx/mmq.cpp with -march=native plus the AMX flags; its batch-1 kernels then
    run AVX512-VNNI instructions, which this CPU must execute."""
    if cmake_options.get("GGML_NATIVE", "ON").upper() not in ("ON", "1", "TRUE"):
        raise UsageError("--amx-batch1 builds on the native build (GGML_NATIVE=ON)",
                         next_step="drop --define GGML_NATIVE=OFF, or drop --amx-batch1")
    if not isa.executes.get("avx512vnni"):
        raise UsageError("--amx-batch1 needs a CPU that executes AVX512-VNNI (the AMX buffer's batch-1 kernels "
                         f"use it); this one: {isa.detail.get('avx512vnni', 'not advertised')}",
                         next_step="build without --amx-batch1 (the AMX buffer cannot run on this CPU)")


def shared_checkout() -> Path:
    """amppatch's one source checkout, where every clean and `--ref` build compiles (any repository, any
    commit): one set of absolute paths, so builds are keyed by content and ccache serves them all."""
    return cache_dir("worktrees") / "source"


def resolve(options: BuildOptions, isa: IsaReport | None = None) -> ResolvedBuild:
    return resolve_with_programs(options, isa)[0]


def resolve_with_programs(options: BuildOptions, isa: IsaReport | None = None) -> tuple[ResolvedBuild, TreePrograms]:
    """The resolved build and the programs its tree declares (which CMake options it needs depend on them)."""
    repo = check_llama_tree(options.repo)
    _require_git_repo(repo)
    for key, _ in options.defines:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"--define {key!r} is not a CMake variable name", next_step="use --define NAME=VALUE")
    if options.ref is not None:
        commit = _git(repo, "rev-parse", "--verify", "--quiet", f"{options.ref}^{{commit}}", check=False).strip()
        if not commit:
            raise UsageError(f"{options.ref!r} is not a commit or branch of {repo}", next_step="check `git log`")
        dirty, in_place, source_dir = None, False, shared_checkout()
    else:
        commit = _git(repo, "rev-parse", "HEAD").strip()
        files = dirty_files(repo)
        if files:
            dirty, in_place, source_dir = _dirty_hash(repo, files), True, repo
        else:
            dirty, in_place, source_dir = None, False, shared_checkout()
    compiler, compiler_version = _compiler_identity()
    declared = declared_cmake_options(repo) if in_place else _declared_at_commit(repo, commit)
    cmake_options = {k: v for k, v in _OFFLINE_CPU_OPTIONS.items() if k in declared or k in _ALWAYS}
    cmake_options["CMAKE_EXPORT_COMPILE_COMMANDS"] = "ON"
    programs = tree_programs(repo, commit, in_place)
    if programs.needs_examples() and "LLAMA_BUILD_EXAMPLES" in cmake_options:
        # a tree from before llama.cpp moved its programs to tools/: they are examples there
        cmake_options["LLAMA_BUILD_EXAMPLES"] = "ON"
    cmake_options.update(dict(options.defines))
    isa_disabled: tuple[str, ...] = ()
    if cmake_options.get("GGML_NATIVE", "ON").upper() in ("ON", "1", "TRUE") and not options.allow_faulting_isa:
        isa = isa or probe_isa()
        isa_disabled = disable_flags(isa)
    if options.amx_batch1:
        _check_amx_batch1(cmake_options, isa or probe_isa())
    training = None
    if options.pgo:
        if not options.pgo_models:
            raise UsageError("--pgo needs a training model", next_step="pass --pgo-model M (e.g. a tiny synthetic)")
        entries = []
        for given in options.pgo_models:
            model = Path(given).expanduser().resolve()
            check_gguf(model, what="PGO training model")
            entries.append(f"{model}:{model.stat().st_size}")
        training = ";".join(entries)  # one model reads exactly as before, so existing build keys stay
    resolved = ResolvedBuild(
        repo=str(repo),
        source_dir=str(source_dir),
        in_place=in_place,
        commit=commit,
        dirty_hash=dirty,
        compiler=compiler,
        compiler_version=compiler_version,
        cflags=options.cflags.strip(),
        kernel_cflags=options.kernel_cflags.strip(),
        cmake_options=cmake_options,
        pgo=options.pgo,
        pgo_training=training,
        isa_disabled=isa_disabled,
        amx_batch1=options.amx_batch1,
    )
    return resolved, programs


def _prepare_worktree(repo: Path, worktree: Path, commit: str) -> None:
    """Check out `commit` (detached) in amppatch's shared checkout, fetching its objects from `repo` when
    the checkout lacks them; the user's checkout and branches are never touched. The checkout is a
    repository of its own (not a linked worktree), so it outlives any user clone it fetched from."""
    if not (worktree / ".git").is_dir():
        if worktree.exists():
            shutil.rmtree(worktree)
        _git(worktree.parent, "init", "--quiet", str(worktree))
        # Commits are fetched by id, not kept by refs: no automatic gc should prune them mid-build.
        _git(worktree, "config", "gc.auto", "0")
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    if run([git, "-C", str(worktree), "cat-file", "-e", f"{commit}^{{commit}}"], check=False).returncode != 0:
        run([git, "-C", str(worktree), "fetch", "--quiet", "--no-tags", str(repo), commit],
            what=f"git fetch of {commit[:12]} from {repo} into amppatch's source checkout",
            next_step=f"check that {repo} exists and holds commit {commit[:12]}")
    current = _git(worktree, "rev-parse", "--verify", "--quiet", "HEAD", check=False).strip()
    if current != commit or dirty_files(worktree):
        _git(worktree, "checkout", "--quiet", "--force", "--detach", commit)
        _git(worktree, "clean", "-fdq")


def _resolved_of(build_: Build) -> ResolvedBuild:
    """The ResolvedBuild a finished build was made from (its manifest holds every field)."""
    m = build_.manifest
    values = {f.name: m[f.name] for f in fields(ResolvedBuild) if f.name in m}
    values["isa_disabled"] = tuple(values.get("isa_disabled", ()))
    return ResolvedBuild(**values)


def _check_source_unchanged(rb: ResolvedBuild, what: str) -> None:
    """An in-place build's tree must still hold what was built, or a side build would compile other code."""
    repo = Path(rb.source_dir)
    head = _git(repo, "rev-parse", "HEAD").strip()
    files = dirty_files(repo)
    state = _dirty_hash(repo, files) if files else None
    if head != rb.commit or state != rb.dirty_hash:
        raise UsageError(f"{repo} changed since its build was made, so {what} cannot be built from the same source",
                         next_step="rebuild (amppatch build) and run again, or commit the change and build that")


def with_options(build_: Build, **changes: object) -> BuildOptions:
    """The options a finished build was made with (for `--like BUILD`), with `changes` applied."""
    m = build_.manifest
    base = BuildOptions(
        repo=Path(m["repo"]),
        cflags=m.get("cflags", ""),
        kernel_cflags=m.get("kernel_cflags", ""),
        # Re-passing every resolved CMake option reproduces the same resolved set, hence the same key.
        defines=tuple(m.get("cmake_options", {}).items()),
        pgo=m.get("pgo", False),
        pgo_models=pgo_training_models(m.get("pgo_training")),
        amx_batch1=m.get("amx_batch1", False),
    )
    return replace(base, **changes)  # type: ignore[arg-type]
