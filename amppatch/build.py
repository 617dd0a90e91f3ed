"""Out-of-tree CMake builds of llama.cpp, keyed by what determines the binaries, reused when identical.

A clean tree (or an explicit `ref`) is built from ONE amppatch-owned source checkout, a git repository in
the cache into which the commit's objects are fetched from the user's repository. The key is therefore the
content (commit, compiler, flags, options), not where the user's tree lives: every clone of a commit finds
the same build, and the baseline and a patched branch compile the same absolute paths, so ccache turns the
patched rebuild into a handful of real compiles. A dirty tree is built in place, with its path and a hash of
its uncommitted changes in the key.

A manifest is written only after a build succeeded. A build that fails or is interrupted is removed; one
whose process was killed outright is removed by the next build that finds it abandoned (no manifest, lock free).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from amppatch import __version__
from amppatch.errors import BuildError, UsageError
from amppatch.features import IsaReport, disable_flags, probe_isa
from amppatch.inputs import BUILD_MANIFEST, check_gguf, read_json
from amppatch.paths import FileLock, cache_dir, write_text_atomic
from amppatch.proc import describe_returncode, progress, require_tool, run, stream
from amppatch.workspace import check_llama_tree

SCHEMA_VERSION = 1
DEFAULT_TARGETS = ("llama-bench", "llama-completion", "llama-quantize", "llama-perplexity")

# Options that keep a build CPU-only and offline. Each is passed only when this llama.cpp version declares
# it (options come and go between versions; passing an unknown one only warns, but the manifest should say
# what really applied).
_OFFLINE_CPU_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "ON",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "GGML_CCACHE": "OFF",  # amppatch sets the compiler launcher itself (and keys ccache its own way)
}
_ALWAYS = {"CMAKE_BUILD_TYPE", "CMAKE_EXPORT_COMPILE_COMMANDS"}


@dataclass(frozen=True)
class BuildOptions:
    """What to build. Everything but `name` goes into the build key."""

    repo: Path
    ref: str | None = None
    name: str | None = None
    cflags: str = ""
    kernel_cflags: str = ""
    defines: tuple[tuple[str, str], ...] = ()
    pgo: bool = False
    # PGO training models: one llama-bench run each, so every kernel they use is trained on its own trip counts
    pgo_models: tuple[Path, ...] = ()
    targets: tuple[str, ...] = DEFAULT_TARGETS
    allow_faulting_isa: bool = False
    # Compile the AMX buffer (ggml-cpu/amx) for a CPU without AMX: its batch-1 kernels need AVX512-VNNI
    # only; runs preload a shim that grants the AMX permission request, and prompts go one token per
    # micro-batch (-ub 1) because the tile kernels (batch > 1) would fault.
    amx_batch1: bool = False


@dataclass(frozen=True)
class Build:
    dir: Path
    manifest: dict = field(compare=False)
    source_dir: Path

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    def binary(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise UsageError(
                f"build {self.dir} has no {name}",
                next_step=f"rebuild with that target (amppatch build --repo {self.manifest.get('repo')} ...)",
            )
        return path


def run_env(build: Build) -> dict[str, str]:
    """Environment for running a build's binaries: its own shared libraries first; for an --amx-batch1
    build, the AMX permission shim preloaded (ahead of any LD_PRELOAD already set)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(build.bin_dir), env.get("LD_LIBRARY_PATH", "")]))
    if build.manifest.get("amx_batch1"):
        from amppatch.shims import amx_permit_library

        env["LD_PRELOAD"] = ":".join(filter(None, [str(amx_permit_library()), env.get("LD_PRELOAD", "")]))
    return env


def runtime_args(build: Build, given: Sequence[str] = ()) -> tuple[str, ...]:
    """llama.cpp arguments every run of this build needs: one token per micro-batch where only the AMX
    buffer's batch-1 kernels can execute (its tile kernels for batch > 1 raise SIGILL) — unless the
    arguments `given` already set the micro-batch (`-ub N`, `--ubatch-size=N`)."""
    if not build.manifest.get("amx_batch1"):
        return ()
    return () if {a.split("=", 1)[0] for a in given} & {"-ub", "--ubatch-size"} else ("-ub", "1")


def load_build(path: Path) -> Build:
    """A build from its directory or its manifest.json."""
    path = Path(path).expanduser()
    manifest_path = path if path.name == "manifest.json" else path / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(
            f"{path} is not a finished amppatch build (no manifest.json)",
            next_step="pass a directory printed by `amppatch build` (or its manifest.json); a build that failed "
            "has no manifest and is not usable",
        )
    manifest = read_json(manifest_path, BUILD_MANIFEST)
    return Build(manifest_path.parent.resolve(), manifest, Path(manifest["source_dir"]))


# ----------------------------------------------------------------------------------------------------------
# Resolving options


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
    return ResolvedBuild(
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


# ----------------------------------------------------------------------------------------------------------
# Building


def _kernel_flags_cmake(compile_flags: list[str], link_flags: list[str]) -> str:
    """A CMAKE_PROJECT_INCLUDE script that adds flags to the ggml-cpu target alone.

    The target does not exist when project() runs, so the call is deferred to the end of the top-level
    directory, after ggml's own `-march=native`, which the flags therefore override.
    """

    def quote(flags: list[str]) -> str:
        return " ".join('"' + f.replace("\\", "\\\\").replace('"', '\\"') + '"' for f in flags)

    return f"""# generated by amppatch: flags for the ggml CPU backend only
get_property(_amppatch_done GLOBAL PROPERTY AMPPATCH_KERNEL_FLAGS)
if(NOT _amppatch_done)
  set_property(GLOBAL PROPERTY AMPPATCH_KERNEL_FLAGS TRUE)
  function(_amppatch_kernel_flags)
    if(TARGET ggml-cpu)
      target_compile_options(ggml-cpu PRIVATE {quote(compile_flags)})
      target_link_options(ggml-cpu PRIVATE {quote(link_flags)})
    else()
      message(FATAL_ERROR "amppatch: no ggml-cpu target in this llama.cpp version")
    endif()
  endfunction()
  cmake_language(DEFER DIRECTORY "${{CMAKE_SOURCE_DIR}}" CALL _amppatch_kernel_flags)
endif()
"""


def _build_env() -> dict[str, str]:
    env = dict(os.environ)
    # The A and B build dirs differ but compile the same worktree paths: without hashing the working
    # directory, ccache serves the unchanged files of a patched build from the baseline's objects.
    env.setdefault("CCACHE_NOHASHDIR", "1")
    env.setdefault("CCACHE_DIR", str(cache_dir("builds") / ".ccache"))
    env.setdefault("CCACHE_MAXSIZE", "5G")
    return env


class _Progress:
    """Prints ninja's [n/N] progress at most every 5% or 15 s, so long builds show life without flooding."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last_pct = -100
        self.last_time = 0.0

    def __call__(self, line: str) -> None:
        m = re.match(r"^\[(\d+)/(\d+)\]", line)
        if not m:
            return
        done, total = int(m.group(1)), int(m.group(2))
        pct = 100 * done // max(total, 1)
        now = time.monotonic()
        if pct - self.last_pct >= 5 or now - self.last_time > 15 or done == total:
            self.last_pct, self.last_time = pct, now
            progress(f"  {self.label}: [{done}/{total}] {pct}%")


def _error_excerpt(lines: list[str]) -> str:
    """The compiler's error lines (with a little context), else the log's tail."""
    picked: list[str] = []
    for i, line in enumerate(lines):
        if re.search(r"\berror\b|FAILED:|CMake Error", line):
            picked.extend(lines[i : i + 4])
    return "\n".join((picked or lines)[-40:])


def _cmake(args: list[str], *, label: str, env: dict[str, str]) -> None:
    cmake = require_tool("cmake", install_hint="install CMake (apt-get install -y cmake or pip install cmake)")
    code, tail = stream([cmake, *args], env=env, on_line=_Progress(label))
    if code != 0:
        raise BuildError(
            f"{label} failed: {describe_returncode(code)}",
            next_step="fix the error above (for a patched tree: the patch does not compile); "
            "the failed build is not kept as usable",
            returncode=code,
            output_tail=_error_excerpt(tail),
        )


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


def _configure_and_build(rb: ResolvedBuild, build_dir: Path, targets: tuple[str, ...], label: str,
                         kernel_compile: list[str], kernel_link: list[str]) -> None:
    env = _build_env()
    flags_file = build_dir / "amppatch-kernel-flags.cmake"
    write_text_atomic(flags_file, _kernel_flags_cmake(kernel_compile, kernel_link))
    defines = dict(rb.cmake_options)
    common = " ".join(filter(None, ["-g", rb.cflags]))
    defines["CMAKE_C_FLAGS"] = common
    defines["CMAKE_CXX_FLAGS"] = common
    defines["CMAKE_PROJECT_INCLUDE"] = str(flags_file)
    ccache = shutil.which("ccache")
    if ccache:  # ccache hashes -fprofile-use data, and PGO flags only touch the CPU backend
        defines["CMAKE_C_COMPILER_LAUNCHER"] = ccache
        defines["CMAKE_CXX_COMPILER_LAUNCHER"] = ccache
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if (build_dir / "CMakeCache.txt").exists():
        generator = []  # a generator cannot change on reconfigure
    args = ["-S", rb.source_dir, "-B", str(build_dir), *generator, *[f"-D{k}={v}" for k, v in defines.items()]]
    progress(f"{label}: configuring ({'ccache, ' if ccache else ''}"
             f"{'ninja' if shutil.which('ninja') else 'make'}) ...")
    _cmake(args, label=f"{label} configure", env=env)
    jobs = str(os.cpu_count() or 2)
    _cmake(["--build", str(build_dir), "-j", jobs, "--target", *targets], label=label, env=env)


def _pgo_train(rb: ResolvedBuild, build_dir: Path) -> None:
    tmp_build = Build(build_dir, {"amx_batch1": rb.amx_batch1}, Path(rb.source_dir))  # same runtime needs
    bench = tmp_build.binary("llama-bench")
    models = pgo_training_models(rb.pgo_training)
    for i, model in enumerate(models, 1):
        progress(f"pgo: training run {i}/{len(models)} (llama-bench token generation on {model.name}) ...")
        run([bench, "-m", str(model), "-p", "0", "-n", "32", "-r", "2", "-t", str(os.cpu_count() or 1),
             "-o", "jsonl", *runtime_args(tmp_build)],
            env=run_env(tmp_build), timeout=1800, what="PGO training run",
            next_step="check that the training model loads with the instrumented build")


def pgo_training_models(training: str | None) -> tuple[Path, ...]:
    """The models of a resolved `pgo_training` ("path:size;path:size")."""
    return tuple(Path(entry.rsplit(":", 1)[0]) for entry in training.split(";")) if training else ()


_BUILD_DIR_RE = re.compile(r"[0-9a-f]{16}(-[a-z]+)?")


@contextlib.contextmanager
def _try_lock(path: Path):
    """The build lock `path` if no one holds it (yields True), else yields False at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_abandoned_builds(builds: Path) -> list[Path]:
    """Remove build directories without a manifest whose lock nobody holds: what a build killed outright
    (SIGKILL, power loss) left behind. A build in progress holds its lock, so it is never touched."""
    removed = []
    for entry in sorted(builds.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or not _BUILD_DIR_RE.fullmatch(entry.name):
            continue
        if (entry / "manifest.json").is_file():
            continue
        with _try_lock(builds / f".{entry.name}.lock") as free:
            if free and entry.is_dir() and not (entry / "manifest.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        progress(f"build: removed {len(removed)} abandoned build director{'y' if len(removed) == 1 else 'ies'} "
                 f"(no manifest: failed or killed): {', '.join(p.name for p in removed)}")
    return removed


@contextlib.contextmanager
def _removed_unless_finished(build_dir: Path):
    """A build directory that does not get its manifest is deleted, whether the build failed or was
    interrupted (Ctrl-C): a half build is never reused and never left to grow the cache."""
    try:
        yield
    except BaseException:
        if not (build_dir / "manifest.json").is_file():
            shutil.rmtree(build_dir, ignore_errors=True)
            progress(f"build: removed the unfinished build directory {build_dir}")
        raise


def _reused(existing: Build, rb: ResolvedBuild, manifest_path: Path) -> Build:
    """A finished build found for a request. Its key does not depend on the repository (for a clean or
    --ref build), so another clone may find it: the manifest's `repo` is updated to the repository that
    asked last (what `--like` and model synthesis read), everything else stays as built."""
    if existing.manifest.get("repo") == rb.repo:
        return existing
    manifest = {**existing.manifest, "repo": rb.repo}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return Build(existing.dir, manifest, existing.source_dir)


def build(options: BuildOptions) -> Build:
    """Build (or reuse) llama.cpp for `options`; returns the finished build."""
    rb = resolve(options)
    targets = tuple(dict.fromkeys(options.targets))
    builds = cache_dir("builds")
    remove_abandoned_builds(builds)
    build_dir = builds / rb.dir_key
    label = options.name or f"build {rb.key}"
    with FileLock(builds / f".{rb.dir_key}.lock"):
        manifest_path = build_dir / "manifest.json"
        existing = load_build(build_dir) if manifest_path.is_file() else None
        if existing is not None and existing.manifest.get("key") != rb.key:
            existing = None  # the same tree with other uncommitted changes: rebuild incrementally
        if existing is not None and all((build_dir / "bin" / t).is_file() for t in targets):
            progress(f"{label}: reusing {build_dir}")
            return _reused(existing, rb, manifest_path)
        previous_targets = existing.manifest.get("targets", []) if existing is not None else []
        source_lock = FileLock(Path(rb.source_dir + ".lock")) if not rb.in_place else contextlib.nullcontext()
        start = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        # No manifest while building: an interrupted or failed build is never taken for a good one.
        manifest_path.unlink(missing_ok=True)
        kernel = rb.kernel_flags()
        with _removed_unless_finished(build_dir), source_lock:
            if not rb.in_place:
                _prepare_worktree(Path(rb.repo), Path(rb.source_dir), rb.commit)
            if rb.pgo:
                gcda = build_dir / "pgo-data"
                shutil.rmtree(gcda, ignore_errors=True)
                gen = [f"-fprofile-generate={gcda}", "-fprofile-update=prefer-atomic"]
                _configure_and_build(rb, build_dir, targets, f"{label} (pgo: instrumented)", kernel + gen,
                                     ["-fprofile-generate"])
                _pgo_train(rb, build_dir)
                use = [f"-fprofile-use={gcda}", "-fprofile-partial-training", "-Wno-missing-profile"]
                _configure_and_build(rb, build_dir, targets, f"{label} (pgo: optimized)", kernel + use, [])
            else:
                _configure_and_build(rb, build_dir, targets, label, kernel, [])
            seconds = time.monotonic() - start
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "key": rb.key,
                "name": options.name,
                **{k: v for k, v in asdict(rb).items()},
                "ref": options.ref,
                "kernel_flags_applied": kernel,
                "isa": _isa_summary(rb),
                "targets": sorted(set(previous_targets) | set(targets)),
                "build_seconds": round(seconds, 1),
                "build_dir": str(build_dir),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        progress(f"{label}: built in {seconds:.0f} s -> {build_dir}")
        return Build(build_dir, manifest, Path(rb.source_dir))


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


def source_text(build_: Build, relpath: str) -> str | None:
    """A file of the source a build compiled, as of its commit (None when the tree has no such file). The
    shared checkout may have moved on to another commit since, so its text comes from git, not the disk."""
    rb = _resolved_of(build_)
    if rb.in_place:
        path = Path(rb.source_dir) / relpath
        return path.read_text(errors="replace") if path.is_file() else None
    git = require_tool("git", install_hint="install git (apt-get install -y git)")
    done = run([git, "-C", rb.source_dir, "show", f"{rb.commit}:{relpath}"], check=False)
    return done.stdout if done.returncode == 0 else None


def build_side_target(parent: Build, target: str, defines: dict[str, str], *, suffix: str) -> Path:
    """Build one extra target of `parent`'s source with `parent`'s compiler, flags and options plus
    `defines` (e.g. LLAMA_BUILD_TESTS=ON for a llama.cpp test) in a side directory `<parent>-<suffix>`,
    keyed off the parent's key; returns the target's binary. The parent's own build, and so every cached
    build, stays without it. Same source paths and flags, so ccache serves everything the parent
    compiled; a failed or interrupted side build is removed like any other."""
    rb = _resolved_of(parent)
    side_rb = replace(rb, cmake_options={**rb.cmake_options, **defines})
    builds = cache_dir("builds")
    remove_abandoned_builds(builds)
    side_dir = builds / f"{parent.dir.name}-{suffix}"
    binary = side_dir / "bin" / target
    key = parent.manifest.get("key")
    label = f"{target} (side build of {parent.dir.name})"
    with FileLock(builds / f".{side_dir.name}.lock"):
        manifest_path = side_dir / "manifest.json"
        if manifest_path.is_file() and binary.is_file():
            try:
                if json.loads(manifest_path.read_text()).get("key") == key:
                    progress(f"{label}: reusing {side_dir}")
                    return binary
            except json.JSONDecodeError:
                pass
        start = time.monotonic()
        side_dir.mkdir(parents=True, exist_ok=True)
        manifest_path.unlink(missing_ok=True)
        kernel = list(parent.manifest.get("kernel_flags_applied", rb.kernel_flags()))
        if rb.pgo:  # the parent's trained profile, so its kernels compile as in the parent
            kernel += [f"-fprofile-use={parent.dir / 'pgo-data'}", "-fprofile-partial-training",
                       "-Wno-missing-profile"]
        source_lock = FileLock(Path(rb.source_dir + ".lock")) if not rb.in_place else contextlib.nullcontext()
        with _removed_unless_finished(side_dir), source_lock:
            if rb.in_place:
                _check_source_unchanged(rb, target)
            else:
                _prepare_worktree(Path(rb.repo), Path(rb.source_dir), rb.commit)
            _configure_and_build(side_rb, side_dir, (target,), label, kernel, [])
            if not binary.is_file():
                raise BuildError(f"{label} produced no {binary.relative_to(side_dir)}",
                                 next_step=f"check that this llama.cpp version defines the target {target}")
            write_text_atomic(manifest_path, json.dumps({
                "schema_version": SCHEMA_VERSION,
                "key": key,
                "parent": str(parent.dir),
                "target": target,
                "defines": defines,
                "build_seconds": round(time.monotonic() - start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=2) + "\n")
        progress(f"{label}: built in {time.monotonic() - start:.0f} s -> {side_dir}")
        return binary


def _isa_summary(rb: ResolvedBuild) -> dict:
    if not rb.isa_disabled:
        return {"disabled_flags": [], "reason": None}
    report = probe_isa()
    return {
        "disabled_flags": list(rb.isa_disabled),
        "reason": {name: report.detail[name] for name in report.faulting},
    }


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
