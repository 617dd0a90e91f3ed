"""Out-of-tree CMake builds of llama.cpp, keyed by what determines the binaries, reused when identical.

A clean tree (or an explicit `ref`) is built from one amppatch-owned git worktree per repository, so the
baseline and a patched branch compile the same absolute paths and ccache turns the patched rebuild into a
handful of real compiles. A dirty tree is built in place, with a hash of its uncommitted changes in the key.
A manifest is written only after a build succeeded; a build without one is never reported or reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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


def declared_cmake_options(source_dir: Path) -> set[str]:
    """Names of `option(...)` declared by the top-level and ggml CMakeLists of this llama.cpp version."""
    names: set[str] = set()
    for path in (source_dir / "CMakeLists.txt", source_dir / "ggml" / "CMakeLists.txt"):
        if path.is_file():
            names.update(re.findall(r"^\s*option\(\s*([A-Za-z0-9_]+)", path.read_text(), re.MULTILINE))
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

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def dir_key(self) -> str:
        """The build directory's name: the key without the uncommitted-changes hash, so successive edits
        of a dirty tree rebuild incrementally in one directory (only what an edit touches recompiles),
        while the manifest's full key still keeps a stale build from being reused."""
        if self.dirty_hash is None:
            return self.key
        fields = asdict(self)
        fields.pop("dirty_hash")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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


def worktree_path(repo: Path) -> Path:
    """The one amppatch-owned worktree of `repo` (shared by all refs, so ccache sees one set of paths)."""
    tag = hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:12]
    return cache_dir("worktrees") / f"{repo.name}-{tag}"


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
        dirty, in_place, source_dir = None, False, worktree_path(repo)
    else:
        commit = _git(repo, "rev-parse", "HEAD").strip()
        files = dirty_files(repo)
        if files:
            dirty, in_place, source_dir = _dirty_hash(repo, files), True, repo
        else:
            dirty, in_place, source_dir = None, False, worktree_path(repo)
    compiler, compiler_version = _compiler_identity()
    declared = declared_cmake_options(repo)
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
    """Check out `commit` (detached) in amppatch's worktree; the user's checkout is never touched."""
    if not (worktree / ".git").exists():
        if worktree.exists():
            shutil.rmtree(worktree)
        _git(repo, "worktree", "prune")
        _git(repo, "worktree", "add", "--detach", "--force", str(worktree), commit)
        return
    current = _git(worktree, "rev-parse", "HEAD").strip()
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


def build(options: BuildOptions) -> Build:
    """Build (or reuse) llama.cpp for `options`; returns the finished build."""
    rb = resolve(options)
    targets = tuple(dict.fromkeys(options.targets))
    build_dir = cache_dir("builds") / rb.dir_key
    label = options.name or f"build {rb.key}"
    with FileLock(cache_dir("builds") / f".{rb.dir_key}.lock"):
        manifest_path = build_dir / "manifest.json"
        existing = load_build(build_dir) if manifest_path.is_file() else None
        if existing is not None and existing.manifest.get("key") != rb.key:
            existing = None  # the same tree with other uncommitted changes: rebuild incrementally
        if existing is not None and all((build_dir / "bin" / t).is_file() for t in targets):
            progress(f"{label}: reusing {build_dir}")
            return existing
        previous_targets = existing.manifest.get("targets", []) if existing is not None else []
        source_lock = FileLock(Path(rb.source_dir + ".lock")) if not rb.in_place else contextlib.nullcontext()
        start = time.monotonic()
        build_dir.mkdir(parents=True, exist_ok=True)
        # No manifest while building: an interrupted or failed build is never taken for a good one.
        manifest_path.unlink(missing_ok=True)
        kernel = rb.kernel_flags()
        with source_lock:
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
